"""Facts about the study and its data, each written once (see shared/reference/kensert2019.md).

Everything else derives from these: the stand-in generator, the config's
``plates: all``, the preprocessing channel order and the evaluation's paper
figures. The study's settings are the config schema's defaults (they
reproduce the paper; ``tests/test_config.py`` holds them against the
reference), the training presets are in `moaflow.learn.presets`, the networks
in `moaflow.learn.architectures`.
"""

from __future__ import annotations

#: The 55 BBBC021 plates as published by the Broad, per week (= batch).
BBBC021_PLATES_BY_WEEK = {
    "Week1": ["22123", "22141", "22161", "22361", "22381", "22401"],
    "Week2": ["24121", "24141", "24161", "24361", "24381", "24401"],
    "Week3": ["25421", "25441", "25461", "25681", "25701", "25721"],
    "Week4": ["27481", "27521", "27542", "27801", "27821", "27861"],
    "Week5": ["28901", "28921", "28961", "29301", "29321", "29341"],
    "Week6": ["31641", "31661", "31681", "32061", "32121", "32161"],
    "Week7": ["34341", "34381", "34641", "34661", "34681"],
    "Week8": ["38203", "38221", "38241", "38341", "38342"],
    "Week9": ["39206", "39221", "39222", "39282", "39283", "39301"],
    "Week10": ["40111", "40115", "40119"],
}
BBBC021_PLATES = [f"{week}_{number}" for week, numbers in BBBC021_PLATES_BY_WEEK.items() for number in numbers]

#: BBBC021 channels as the image table names them (the CSV's ``Image_FileName_<channel>`` columns),
#: in the order fields are read, and the order of the study's stored 8-bit images.
BBBC021_CHANNELS = ("DAPI", "Tubulin", "Actin")
BBBC021_STORED_ORDER = ("Actin", "Tubulin", "DAPI")


def resolve_plates(plates) -> list[str]:
    """The config's ``bbbc021.plates``: ``"all"`` (the 55 published plates) or a list of plate names."""
    return list(BBBC021_PLATES) if plates == "all" else list(plates)


#: Treatment-level accuracy Kensert et al. (2019) report, ImageNet-pretrained, 103 treatments (percent).
PAPER_TREATMENT_ACCURACY = {"resnet50": 97.09, "inception_v3": 97.09, "inception_resnet_v2": 95.15}
