"""Facts about the study and its data, each written once (see shared/reference/kensert2019.md).

Everything else derives from these: the stand-in generator, the config's
``plates: all``, the preprocessing channel order, the training presets and
the deviations-from-the-paper table.
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


# ------------------------------------------------------------------ training settings

#: Named hyper-parameter sets, as overrides of the defaults in ``data/hyperparameters.schema.yaml``
#: (the authors' final commit, "final"). A preset is either one dict, or one per architecture.
PRESETS = {
    "final": {},
    # The settings in the repository just before the final commit: likely behind the published
    # numbers (not confirmed). The reference gives InceptionV3 only "7 epochs"; its batch and rate
    # follow ResNet50's here.
    "published": {
        "resnet50": {"epochs": 5, "batch_size": 32, "learning_rate": 5e-4},
        "inception_v3": {"epochs": 7, "batch_size": 32, "learning_rate": 5e-4},
        "inception_resnet_v2": {"epochs": 5, "batch_size": 32, "learning_rate": 1e-3},
    },
    "bbbc014": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "class_weights": False,
                "augmentation": False, "channel_order": "stored", "head": "sigmoid"},
    # The course lab's protocol: Adam, batch 32, 30 epochs, inputs / 255.
    "lab": {"epochs": 30, "batch_size": 32, "optimizer": "adam", "learning_rate": 1e-3, "class_weights": False,
            "augmentation": False, "channel_order": "stored", "input_scaling": "unit"},
}


def hyperparameter_schema() -> dict:
    """The JSON schema of the hyper-parameters (keys, types, defaults, descriptions)."""
    from importlib import resources

    import yaml

    return yaml.safe_load(resources.files("moaflow").joinpath("data/hyperparameters.schema.yaml").read_text())


def hyperparameter_schema_path() -> str:
    """Where `hyperparameter_schema` is read from (for snakemake.utils.validate)."""
    from importlib import resources

    return str(resources.files("moaflow").joinpath("data/hyperparameters.schema.yaml"))


def hyperparameters(preset: str, architecture: str, overrides: dict | None = None) -> dict:
    """The defaults, then the preset's values for ``architecture``, then ``overrides`` (the config).

    Raises
    ------
    ValueError
        For an unknown preset or hyper-parameter, naming it and the choices.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    properties = hyperparameter_schema()["properties"]
    values = {key: spec.get("default") for key, spec in properties.items()}
    chosen = PRESETS[preset]
    values.update(chosen.get(architecture, {}) if any(isinstance(v, dict) for v in chosen.values()) else chosen)
    unknown = sorted(set(overrides or {}) - set(properties))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown}; expected some of {sorted(properties)}")
    values.update(overrides or {})
    return values


def hyperparameter_help() -> str:
    """One line per hyper-parameter: name, choices or type, default, description (for ``--help``)."""
    lines = []
    for key, spec in hyperparameter_schema()["properties"].items():
        kind = "|".join(map(str, spec["enum"])) if "enum" in spec else spec["type"]
        lines.append(f"  {key} ({kind}, default {spec.get('default')}): {spec['description']}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the paper's settings

#: The paper's architectures and their input sizes.
PAPER_INPUT_SIZES = {"resnet50": 224, "inception_v3": 299, "inception_resnet_v2": 299}
#: What the deviations table compares, as the paper ran it (final commit; preprocessing per the reference).
PAPER_PREPROCESSING = {"illumination correction": "none", "normalisation": "study", "crop grid": "2x2",
                       "empty-crop rule": "at most 0.002 of values above 50",
                       "resizing": "OpenCV INTER_AREA"}
#: Hyper-parameters the deviations table reports.
COMPARED_HYPERPARAMETERS = ("epochs", "batch_size", "optimizer", "learning_rate", "momentum", "schedule",
                            "class_weights", "augmentation", "precision", "channel_order", "input_scaling",
                            "model_selection")


def settings_table(*, data: str, preprocessing: dict, input_sizes: dict, initialisations: str, folds: str,
                   validation_compounds: str, hyper: dict[str, dict]) -> dict[str, str]:
    """One run's settings as the deviations table shows them: setting -> text.

    ``hyper`` maps each architecture to its resolved hyper-parameters; a value
    that differs between architectures is shown per architecture.
    """
    table = {"data": data, **preprocessing,
             "architectures": ", ".join(hyper),
             "input sizes": ", ".join(f"{a} {input_sizes[a]}" for a in hyper),
             "initialisations": initialisations, "folds": folds, "validation compounds": validation_compounds}
    for key in COMPARED_HYPERPARAMETERS:
        values = {a: h[key] for a, h in hyper.items()}
        table[key] = (f"{next(iter(values.values()))}" if len(set(map(str, values.values()))) == 1
                      else ", ".join(f"{a} {v}" for a, v in values.items()))
    return table


def architecture_settings(dataset: dict, architecture: str) -> tuple[str, dict]:
    """The preset and hyper-parameter overrides of one architecture from a ``training.<dataset>`` section:
    the dataset's, then its ``per_architecture.<architecture>`` entry (preset and/or hyperparameters)."""
    special = (dataset.get("per_architecture") or {}).get(architecture, {})
    preset = special.get("preset") or dataset.get("preset", "final")
    return preset, {**(dataset.get("hyperparameters") or {}), **(special.get("hyperparameters") or {})}


def run_settings(settings: dict, folds, receipt: dict | None) -> dict[str, str]:
    """This run's settings in `settings_table` form.

    Parameters
    ----------
    settings : dict
        ``{"preprocess": config.preprocess.bbbc021, "training": config.training}``.
    folds : pandas.DataFrame
        The checked folds.
    receipt : dict, optional
        The image table's download receipt: whether it matched the published file.
    """
    pre = settings.get("preprocess", {})
    training = settings.get("training", {})
    dataset = training.get("bbbc021", {})
    architectures = dataset.get("architectures") or training.get("architectures", [])
    hyper = {}
    for architecture in architectures:
        preset, overrides = architecture_settings(dataset, architecture)
        hyper[architecture] = hyperparameters(preset, architecture, overrides)
    if receipt and any(c.startswith("SHA256 as published") for c in receipt.get("checks", [])):
        data = "the Broad's BBBC021 v1 files"
    else:
        data = f"files from {receipt['source'] if receipt else 'unknown'}, not checked against the published ones"
    grid = pre.get("crop_grid", [2, 2])
    validation = max((len([g for g in str(v).split(";") if g]) for v in folds["validation_groups"]), default=0)
    nscb = any(str(v) for v in folds.get("excluded_batches", []))
    return settings_table(
        data=data,
        preprocessing={
            "illumination correction": "CellProfiler-style, applied" if pre.get("illumination", {}).get("apply")
            else "none",
            "normalisation": pre.get("normalisation", "study"), "crop grid": f"{grid[0]}x{grid[1]}",
            "empty-crop rule": f"at most {pre.get('empty_fraction', 0.002):g} of values above "
                               f"{pre.get('empty_threshold', 50):g}",
            "resizing": "OpenCV INTER_AREA"},
        input_sizes=dataset.get("input_sizes", PAPER_INPUT_SIZES),
        initialisations=", ".join(i["name"] if i["weights"] in ("imagenet", "none") else f"{i['name']} ({i['weights']})"
                                  for i in training.get("initialisations", [])),
        folds=f"{len(folds)}, leave one compound out" + (" and its batches" if nscb else ""),
        validation_compounds=str(validation), hyper=hyper)


def paper_settings() -> dict[str, str]:
    """The paper's settings in `settings_table` form (ImageNet weights, final commit, no validation set)."""
    return settings_table(
        data="the Broad's BBBC021 v1 files", preprocessing=PAPER_PREPROCESSING, input_sizes=PAPER_INPUT_SIZES,
        initialisations="imagenet, random", folds="38, leave one compound out",
        validation_compounds="0", hyper={a: hyperparameters("final", a) for a in PAPER_INPUT_SIZES})
