"""Uncertainty: Mondrian (class-conditional) conformal prediction sets, cross-conformal over folds.

Each held-out compound's sets are calibrated on the other folds' held-out
compounds: every fold's model predicted only its own held-out compound, so
those scores are exchangeable with a new compound's, unlike scores of
compounds a model trained on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moaflow.analysis.levels import aggregate, probability_columns


def mondrian_calibration(calibration: pd.DataFrame) -> dict[str, np.ndarray]:
    """Sorted nonconformity scores ``1 - p(true class)`` per true class (the Mondrian categories)."""
    columns = probability_columns(calibration)
    true = pd.Index([c[2:] for c in columns]).get_indexer(calibration["true"])
    if (true < 0).any():
        raise ValueError(f"calibration labels {sorted(set(calibration['true'][true < 0]))} have no probability column")
    scores = 1.0 - calibration[columns].to_numpy()[np.arange(len(calibration)), true]
    return {c[2:]: np.sort(scores[true == k]) for k, c in enumerate(columns)}


def conformal_sets(test: pd.DataFrame, calibration: dict[str, np.ndarray], significance: float) -> list[list[str]]:
    """Mondrian prediction sets: label y is kept when its p-value exceeds ``significance``.

    The p-value of y for a test example with score s = 1 - p(y) is
    ``(#{calibration scores of class y >= s} + 1) / (n_y + 1)``, so for each
    class the sets cover the true label with probability >= 1 - significance
    when calibration and test examples are exchangeable within the class. A
    class without calibration examples gets p = 1 and is always kept.
    """
    columns = probability_columns(test)
    sets = [[] for _ in range(len(test))]
    for column in columns:
        label = column[2:]
        scores = calibration.get(label, np.zeros(0))
        s = 1.0 - test[column].to_numpy()
        at_least = len(scores) - np.searchsorted(scores, s, side="left")
        p_values = (at_least + 1) / (len(scores) + 1)
        for k in np.flatnonzero(p_values > significance):
            sets[k].append(label)
    return sets


def conformal_table(test: pd.DataFrame, calibration: pd.DataFrame, significances: list[float]) -> pd.DataFrame:
    """Empirical coverage and mean set size per true class and significance level."""
    scores = mondrian_calibration(calibration)
    rows = []
    for significance in significances:
        sets = conformal_sets(test, scores, significance)
        covered = np.array([t in s for t, s in zip(test["true"], sets)])
        sizes = np.array([len(s) for s in sets])
        for label in sorted(set(test["true"])) + ["all"]:
            mask = np.ones(len(test), bool) if label == "all" else (test["true"] == label).to_numpy()
            rows.append({"significance": significance, "class": label, "n": int(mask.sum()),
                         "n_calibration": int(sum(len(v) for v in scores.values()) if label == "all"
                                              else len(scores.get(label, []))),
                         "covered": int(covered[mask].sum()), "set_size_sum": int(sizes[mask].sum()),
                         "coverage": float(covered[mask].mean()), "mean_set_size": float(sizes[mask].mean())})
    return pd.DataFrame(rows)


def cross_conformal(held_out: pd.DataFrame, significances: list[float], level: str) -> pd.DataFrame:
    """Coverage of Mondrian sets for held-out compounds, each calibrated on the other folds' held-out compounds.

    Every fold's model predicted only its own held-out compound, so the
    calibration scores (other compounds, other folds' models) are exchangeable
    with a new compound's, unlike scores of compounds a model trained on.

    Parameters
    ----------
    held_out : pandas.DataFrame
        The test predictions of all folds (crop level), with a ``fold`` column.
    level : str
        Score units: "crop" or "treatment" (the held-out predictions aggregated first).

    Returns
    -------
    table : pandas.DataFrame
        Per significance level and true class (and "all"): n, coverage, mean set size, and the level.
    """
    parts = []
    for fold, part in held_out.groupby("fold"):
        calibration = aggregate(held_out[held_out["fold"] != fold], level)
        if len(calibration):
            parts.append(conformal_table(aggregate(part, level), calibration, significances))
    if not parts:
        return pd.DataFrame(columns=["significance", "class", "n", "coverage", "mean_set_size", "level"])
    pooled = pd.concat(parts).drop(columns=["coverage", "mean_set_size"]).groupby(["significance", "class"],
                                                                                as_index=False)[
        ["n", "covered", "set_size_sum"]].sum()
    pooled["coverage"] = pooled["covered"] / pooled["n"]
    pooled["mean_set_size"] = pooled["set_size_sum"] / pooled["n"]
    return pooled.drop(columns=["covered", "set_size_sum"]).assign(level=level)
