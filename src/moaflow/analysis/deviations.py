"""The deviations-from-the-paper table: this run's settings beside the paper's, each flagged where it differs.

The paper's side is the configuration's defaults (they reproduce the study;
``tests/test_config.py`` checks them against the reference) with the shipped
38 leave-one-compound-out folds, described by the same function as the run's
own, so the two columns cannot be described differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

#: Hyper-parameters the table reports.
COMPARED_HYPERPARAMETERS = ("transfer", "epochs", "batch_size", "optimizer", "learning_rate", "momentum",
                            "schedule", "class_weights", "augmentation", "precision", "channel_order",
                            "input_scaling", "channel_adapter", "model_selection")
#: How the data is described when it is the Broad's published files.
PUBLISHED_DATA = "the Broad's BBBC021 v1 files"


def settings_of(config: dict) -> dict:
    """The parts of a validated config the table describes (what the evaluate rule passes)."""
    from moaflow.config import input_size, trained_architectures
    from moaflow.learn.presets import resolved

    architectures = trained_architectures(config, "bbbc021")
    training = config["training"]["bbbc021"]
    return {"preprocess": config["preprocess"]["bbbc021"],
            "initialisations": [_initialisation(i) for i in config["training"]["initialisations"]],
            "input_sizes": {a: input_size(config, "bbbc021", a) for a in architectures},
            "hyper": {a: resolved(training, a) for a in architectures}}


def _initialisation(entry: dict) -> str:
    """An initialisation as the table names it: its name, and its weights file and channel adapter if any."""
    details = [entry["weights"]] if entry["weights"] not in ("imagenet", "none") else []
    details += [f"channel_adapter {entry['channel_adapter']}"] if "channel_adapter" in entry else []
    return f"{entry['name']} ({', '.join(details)})" if details else entry["name"]


def _value(values: dict) -> str:
    """One value when every architecture shares it, else each architecture's."""
    if len(set(map(str, values.values()))) == 1:
        return f"{next(iter(values.values()))}"
    return ", ".join(f"{a} {v}" for a, v in values.items())


def describe(settings: dict, folds: pd.DataFrame, data: str) -> dict[str, str]:
    """One run's settings as the table shows them: setting -> text.

    Parameters
    ----------
    settings : dict
        From `settings_of`.
    folds : pandas.DataFrame
        The run's folds.
    data : str
        Where the images came from, in words.
    """
    pre = settings["preprocess"]
    grid = pre["crop_grid"]
    validation = max((len([g for g in str(v).split(";") if g]) for v in folds["validation_groups"]), default=0)
    nscb = any(str(v) for v in folds.get("excluded_batches", []))
    table = {"data": data,
             "illumination correction": "CellProfiler-style, applied" if pre["illumination"]["apply"] else "none",
             "normalisation": pre["normalisation"], "crop grid": f"{grid[0]}x{grid[1]}",
             "empty-crop rule": f"at most {pre['empty_fraction']:g} of values above {pre['empty_threshold']:g}",
             "resizing": "OpenCV INTER_AREA",
             "architectures": ", ".join(settings["hyper"]),
             "input sizes": ", ".join(f"{a} {s}" for a, s in settings["input_sizes"].items()),
             "initialisations": ", ".join(settings["initialisations"]),
             "folds": f"{len(folds)}, leave one compound out" + (" and its batches" if nscb else ""),
             "validation compounds": str(validation)}
    for key in COMPARED_HYPERPARAMETERS:
        table[key] = _value({a: h[key] for a, h in settings["hyper"].items()})
    return table


def data_description(receipt_path: str | None) -> str:
    """Whether the image table's CSV matched the Broad's published file, from its download receipt."""
    receipt = json.loads(Path(receipt_path).read_text()) if receipt_path else None
    if receipt and any(c.startswith("SHA256 as published") for c in receipt.get("checks", [])):
        return PUBLISHED_DATA
    return f"files from {receipt['source'] if receipt else 'unknown'}, not checked against the published ones"


def deviations(run: dict[str, str], paper: dict[str, str]) -> pd.DataFrame:
    """Each setting of this run beside the paper's, flagged where they differ."""
    return pd.DataFrame([{"setting": k, "paper": paper.get(k, ""), "this run": run.get(k, ""),
                          "differs": str(paper.get(k, "")) != str(run.get(k, ""))}
                         for k in dict.fromkeys([*paper, *run])])
