"""Predictions at the study's three levels, and the tables they come in.

* crop: argmax of each crop's softmax;
* image (field): element-wise median of a field's crop probabilities, argmax;
* treatment: for each (compound, concentration, replicate) the element-wise
  median over its crops, then the median over replicates, argmax (the
  original code's rule; two wells sharing ``Replicate=1`` are pooled).

A predictions table has ``p_<class>`` columns and ``true``; its finest level
is named by its columns (`level_of`), and it can be evaluated there and at
every coarser level.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score

LEVELS = ("crop", "image", "treatment")
#: Columns of a predictions table that are not class probabilities.
_NOT_CLASSES = {"architecture", "init", "seed", "fold", "split", "compound", "concentration", "moa", "true",
                "predicted", "replicate", "image_number", "crop", "crop_id", "plate", "well", "site", "batch",
                "treatment", "source", "is_dmso"}


def probability_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("p_")]


def level_of(frame: pd.DataFrame) -> str:
    """The finest level a predictions table can be evaluated at, from its columns."""
    if "crop_id" in frame or "crop" in frame:
        return "crop"
    if "image_number" in frame:
        return "image"
    return "treatment"


def load_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """A predictions table (CSV or parquet) in evaluation form: ``p_<class>`` columns and ``true``.

    Class columns are either already ``p_<class>`` or named by the class
    (every column that is not metadata: compound, concentration, moa,
    replicate, ...); ``true`` comes from ``true`` or ``moa``.

    Raises
    ------
    ValueError
        When the table has no class columns or no true class.
    """
    path = Path(path)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if not probability_columns(frame):
        classes = [c for c in frame.columns if c not in _NOT_CLASSES]
        frame = frame.rename(columns={c: f"p_{c}" for c in classes})
    if not probability_columns(frame):
        raise ValueError(f"{path}: no class probability columns")
    if "true" not in frame:
        if "moa" not in frame:
            raise ValueError(f"{path}: no true class: expected a 'true' or 'moa' column")
        frame["true"] = frame["moa"]
    unknown = sorted(set(frame["true"]) - {c[2:] for c in probability_columns(frame)})
    if unknown:
        raise ValueError(f"{path}: true classes {unknown} have no probability column")
    return frame


def _call(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    classes = [c[2:] for c in columns]
    return pd.Series(np.asarray(classes)[frame[columns].to_numpy().argmax(axis=1)], index=frame.index)


def aggregate(frame: pd.DataFrame, level: str) -> pd.DataFrame:
    """Predictions at ``level`` ("crop", "image" or "treatment") from finer ones.

    Parameters
    ----------
    frame : pandas.DataFrame
        Rows with ``p_<class>`` columns, ``true`` and the grouping columns
        (``compound``, ``concentration``, and where present ``replicate``, ``image_number``).

    Returns
    -------
    frame : pandas.DataFrame
        One row per unit with the aggregated probabilities, ``true`` and ``predicted``.

    Raises
    ------
    ValueError
        When ``level`` is finer than the table.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r}: expected one of {LEVELS}")
    have = level_of(frame)
    if LEVELS.index(level) < LEVELS.index(have):
        raise ValueError(f"predictions at {have} level cannot be evaluated at {level} level")
    columns = probability_columns(frame)
    carried = {c: "first" for c in ("true", "fold") if c in frame}
    if level == "crop":
        out = frame.copy()
    elif level == "image":
        out = frame.groupby(["compound", "concentration", "image_number"], as_index=False).agg(
            {**{c: "median" for c in columns}, **carried})
    else:
        if "replicate" in frame:
            frame = frame.groupby(["compound", "concentration", "replicate"], as_index=False).agg(
                {**{c: "median" for c in columns}, **carried})
        out = frame.groupby(["compound", "concentration"], as_index=False).agg(
            {**{c: "median" for c in columns}, **carried})
    out["predicted"] = _call(out, columns)
    return out.reset_index(drop=True)


def accuracy(frame: pd.DataFrame) -> float:
    return float(accuracy_score(frame["true"], frame["predicted"])) if len(frame) else float("nan")
