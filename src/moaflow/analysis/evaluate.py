"""Cross-validated evaluation: the study's aggregation levels, figures, published predictions and uncertainty.

Levels (BBBC021 and crop datasets):

* crop: argmax of each crop's softmax;
* image (field): element-wise median of a field's crop probabilities, argmax;
* treatment: for each (compound, concentration, replicate) the element-wise
  median over its crops, then the median over replicates, argmax (the
  original code's rule; two wells sharing ``Replicate=1`` are pooled).

Predictions can come from this run's folds or from a table (`load_predictions`,
e.g. the authors' own treatment-level predictions): a table is evaluated at
its own level and every coarser one, the level being named by its columns.

BBBC014: a well is called positive when the mean probability over its crops is
>= 0.5. Uncertainty: cross-conformal Mondrian (class-conditional) prediction
sets, calibrated for each held-out compound on the other folds' held-out
compounds, at crop and at treatment level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

from moaflow.files import save_figure, write_json, write_table
from moaflow.logs import stderr

LEVELS = ("crop", "image", "treatment")
#: Treatment-level accuracy reported by Kensert et al. (2019), ImageNet-pretrained, 103 treatments.
PAPER_TREATMENT_ACCURACY = {"resnet50": 97.09, "inception_v3": 97.09, "inception_resnet_v2": 95.15}
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


def per_class_recall(frame: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    values = recall_score(frame["true"], frame["predicted"], labels=classes, average=None, zero_division=0)
    return dict(zip(classes, map(float, values)))


def confusion(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Confusion counts, rows = true class, columns = predicted class."""
    return pd.DataFrame(confusion_matrix(frame["true"], frame["predicted"], labels=classes),
                        index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted"))


def plot_confusion(matrix: pd.DataFrame, path: str | os.PathLike, title: str) -> None:
    """Heat map with counts, zeros hidden (as the paper's figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(matrix)
    fig, ax = plt.subplots(figsize=(2.2 + 0.55 * n, 1.8 + 0.5 * n))
    ax.imshow(matrix.to_numpy(), cmap="Blues")
    for i in range(n):
        for j in range(n):
            value = matrix.iat[i, j]
            if value:
                ax.text(j, i, str(value), ha="center", va="center",
                        color="white" if value > matrix.to_numpy().max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(n), matrix.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), matrix.index, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_learning_curves(histories: dict[tuple[str, str], list[pd.DataFrame]], path: str | os.PathLike,
                         title: str) -> None:
    """Held-out accuracy per epoch, mean and min-max band over folds, per architecture and initialisation.

    Runs without a recorded epoch are left out; a figure with nothing to show says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = {key: [f for f in frames if len(f) and "test_accuracy" in f] for key, frames in histories.items()}
    architectures = sorted({a for (a, _), frames in usable.items() if frames}) or ["(no epochs recorded)"]
    fig, axes = plt.subplots(1, len(architectures), figsize=(4.2 * len(architectures), 3.4), squeeze=False)
    for ax, architecture in zip(axes[0], architectures):
        for (arch, init), frames in sorted(usable.items()):
            if arch != architecture or not frames:
                continue
            table = pd.concat([f.set_index("epoch")["test_accuracy"].rename(i) for i, f in enumerate(frames)], axis=1)
            ax.plot(table.index, table.mean(axis=1), marker="o", label=f"{init} (n={table.shape[1]})")
            ax.fill_between(table.index, table.min(axis=1), table.max(axis=1), alpha=0.2)
        ax.set_title(architecture)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out crop accuracy")
        ax.set_ylim(0, 1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------ conformal prediction

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


# ------------------------------------------------------------------ study evaluation

def load_runs(models_dir: str | os.PathLike, architecture: str, init: str, folds: list[str], seed: int = 0):
    """Concatenate a (architecture, init, seed)'s test and validation predictions and histories over folds."""
    base = Path(models_dir) / architecture / init / f"seed-{seed}"
    tests, validations, histories = [], [], []
    for fold in folds:
        tests.append(pd.read_parquet(base / fold / "test_predictions.parquet").assign(fold=fold))
        validations.append(pd.read_parquet(base / fold / "validation_predictions.parquet").assign(fold=fold))
        histories.append(pd.read_csv(base / fold / "history.tsv", sep="\t"))
    return pd.concat(tests, ignore_index=True), pd.concat(validations, ignore_index=True), histories


def _misclassified(frame: pd.DataFrame, **labels) -> list[dict]:
    wrong = frame[frame["true"] != frame["predicted"]]
    return [{**labels, "compound": r.compound, "concentration": r.concentration, "true": r.true,
             "predicted": r.predicted} for r in wrong.itertuples()]


def evaluate_bbbc021(models_dir, folds: pd.DataFrame, architectures: list[str], inits: list[str],
                     out_dir, significances: list[float], seeds: list[int] = (0,),
                     published: pd.DataFrame | None = None) -> dict:
    """Everything the report shows for a MoA dataset; writes CSVs and PNGs to ``out_dir``, returns the summary.

    With several seeds the accuracies are means over seeds (``sd_percent`` their
    standard deviation, ``seed_variation.csv`` each seed's value); confusion
    matrices, misclassified treatments, conformal sets and the ensemble use the
    first seed. ``published`` (from `load_predictions`, with an ``architecture``
    column) adds the authors' own predictions beside the run's.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    fold_names = list(folds["fold"])
    rows, summary, histories, misclassified, conformal, per_moa, by_seed = [], {}, {}, [], [], [], []
    ensemble: dict[str, list[pd.DataFrame]] = {}
    classes = None
    for architecture in architectures:
        for init in inits:
            runs = {seed: load_runs(models_dir, architecture, init, fold_names, seed) for seed in seeds}
            test = runs[seeds[0]][0]
            classes = [c[2:] for c in probability_columns(test)]
            histories[(architecture, init)] = [h for seed in seeds for h in runs[seed][2]]
            ensemble.setdefault(init, []).append(test)
            key = f"{architecture}/{init}"
            summary[key] = {}
            first_run = Path(models_dir) / architecture / init / f"seed-{seeds[0]}" / fold_names[0] / "run.json"
            selection = (json.loads(first_run.read_text()).get("hyperparameters", {}).get("model_selection", "last")
                         if first_run.is_file() else "")
            for level in LEVELS:
                frame = aggregate(test, level)
                values = [accuracy(aggregate(runs[seed][0], level)) for seed in seeds]
                by_seed += [{"architecture": architecture, "init": init, "level": level, "seed": seed,
                             "accuracy_percent": 100 * v} for seed, v in zip(seeds, values)]
                summary[key][level] = float(np.mean(values))
                rows.append({"source": "this run", "architecture": architecture, "init": init, "level": level,
                             "model_selection": selection,
                             "n": len(frame), "seeds": len(seeds), "accuracy_percent": 100 * float(np.mean(values)),
                             "sd_percent": 100 * float(np.std(values, ddof=1)) if len(values) > 1 else None,
                             "paper_percent": PAPER_TREATMENT_ACCURACY.get(architecture)
                             if level == "treatment" and init == "imagenet" else None})
                if level in ("image", "treatment"):
                    matrix = confusion(frame, classes)
                    matrix.to_csv(out_dir / f"confusion_{level}_{architecture}_{init}.csv")
                    plot_confusion(matrix, out_dir / f"confusion_{level}_{architecture}_{init}.png",
                                   f"{architecture} ({init}), {level} level, all folds"
                                   + (f", seed {seeds[0]} of {len(seeds)}" if len(seeds) > 1 else ""))
                if level == "treatment":
                    misclassified += _misclassified(frame, source="this run", architecture=architecture, init=init)
                    per_moa += [{"architecture": architecture, "init": init, "moa": m, "recall": v}
                                for m, v in per_class_recall(frame, classes).items()]
            for fold, part in test.groupby("fold"):
                confusion(aggregate(part, "treatment"), classes).to_csv(
                    out_dir / f"fold_confusion_{architecture}_{init}_{fold}.csv")
            for level in ("crop", "treatment"):
                conformal.append(cross_conformal(test, significances, level).assign(architecture=architecture,
                                                                                   init=init))
    for init, tests in ensemble.items():
        if len(tests) > 1:
            merged = tests[0].copy()
            columns = probability_columns(merged)
            merged[columns] = np.mean([t[columns].to_numpy() for t in tests], axis=0)
            for level in LEVELS:
                frame = aggregate(merged, level)
                rows.append({"source": "this run", "architecture": "ensemble", "init": init, "level": level,
                             "n": len(frame), "seeds": 1, "accuracy_percent": 100 * accuracy(frame),
                             "sd_percent": None, "paper_percent": None})
                summary.setdefault(f"ensemble/{init}", {})[level] = accuracy(frame)
    if published is not None:
        summary["published"] = evaluate_published(published, out_dir, rows, misclassified)
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "accuracy.csv", index=False)
    if len(seeds) > 1:
        pd.DataFrame(by_seed).to_csv(out_dir / "seed_variation.csv", index=False)
        summary["seed_variation_percent"] = {
            f"{r.architecture}/{r.init}/{r.level}": r.sd_percent for r in table.itertuples()
            if r.sd_percent is not None and r.sd_percent == r.sd_percent}
    pd.DataFrame(misclassified, columns=["source", "architecture", "init", "compound", "concentration", "true",
                                         "predicted"]).to_csv(out_dir / "misclassified_treatments.csv", index=False)
    pd.DataFrame(per_moa).to_csv(out_dir / "per_moa_recall.csv", index=False)
    conformal_frame = pd.concat(conformal) if conformal else pd.DataFrame(
        columns=["significance", "class", "n", "coverage", "mean_set_size", "level", "architecture", "init"])
    conformal_frame.to_csv(out_dir / "conformal.csv", index=False)
    plot_learning_curves(histories, out_dir / "learning_curves.png", "Held-out compound accuracy per epoch")
    headline = {"dataset": Path(models_dir).parent.name, "folds": len(fold_names), "classes": classes,
                "accuracy": summary,
                "paper_treatment_accuracy_percent": PAPER_TREATMENT_ACCURACY}
    write_json(headline, out_dir / "summary.json")
    return headline


def evaluate_published(published: pd.DataFrame, out_dir, rows: list | None = None,
                       misclassified: list | None = None) -> dict:
    """Accuracy, confusion matrices and misclassified units of an external predictions table, per
    architecture (its ``architecture`` column), at its own level and every coarser one.

    Appends to ``rows`` / ``misclassified`` when given (the study's tables); returns
    ``{architecture: {level: accuracy}}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else []
    misclassified = misclassified if misclassified is not None else []
    groups = published.groupby("architecture") if "architecture" in published else [("external", published)]
    finest = LEVELS.index(level_of(published))
    results = {}
    for architecture, frame in groups:
        classes = [c[2:] for c in probability_columns(frame)]
        results[architecture] = {}
        for level in LEVELS[finest:]:
            aggregated = aggregate(frame, level)
            results[architecture][level] = accuracy(aggregated)
            rows.append({"source": "published predictions", "architecture": architecture, "init": "published",
                         "level": level, "n": len(aggregated), "seeds": 1,
                         "accuracy_percent": 100 * accuracy(aggregated), "sd_percent": None,
                         "paper_percent": PAPER_TREATMENT_ACCURACY.get(architecture) if level == "treatment" else None})
            if level == "treatment":
                matrix = confusion(aggregated, classes)
                matrix.to_csv(out_dir / f"confusion_treatment_{architecture}_published.csv")
                plot_confusion(matrix, out_dir / f"confusion_treatment_{architecture}_published.png",
                               f"{architecture}, the authors' predictions, treatment level")
                misclassified += _misclassified(aggregated, source="published predictions",
                                                architecture=architecture, init="published")
    return results


def evaluate_external(predictions: str | os.PathLike, out_dir, log=stderr) -> dict:
    """`evaluate_published` of a predictions table on its own (``moaflow evaluate --predictions``)."""
    rows, misclassified = [], []
    results = evaluate_published(load_predictions(predictions), out_dir, rows, misclassified)
    pd.DataFrame(rows).to_csv(Path(out_dir) / "accuracy.csv", index=False)
    pd.DataFrame(misclassified).to_csv(Path(out_dir) / "misclassified_treatments.csv", index=False)
    write_json({"predictions": str(predictions), "accuracy": results}, Path(out_dir) / "summary.json")
    for architecture, levels in results.items():
        log(f"{architecture}: " + ", ".join(f"{level} {100 * value:.2f} %" for level, value in levels.items()))
    return results


def evaluate_bbbc014(models_dir, folds: pd.DataFrame, architectures: list[str], inits: list[str], out_dir,
                     seeds: list[int] = (0,)) -> dict:
    """Well-level accuracy per fold (cell line), architecture and seed: mean crop probability >= 0.5."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for architecture, init, seed in ((a, i, s) for a in architectures for i in inits for s in seeds):
        test, _, _ = load_runs(models_dir, architecture, init, list(folds["fold"]), seed)
        wells = test.groupby(["fold", "cell_line", "well"], as_index=False).agg(
            p=("p_positive", "mean"), label=("label", "first"))
        wells["predicted"] = (wells["p"] >= 0.5).astype(int)
        for (fold, line), part in wells.groupby(["fold", "cell_line"]):
            rows.append({"architecture": architecture, "init": init, "seed": seed, "fold": fold,
                         "test_cell_line": line, "wells": len(part),
                         "accuracy_percent": 100 * float((part["predicted"] == part["label"]).mean())})
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "well_accuracy.csv", index=False)
    headline = {"dataset": "bbbc014", "well_accuracy_percent": {
        f"{r.architecture}/{r.init}/seed-{r.seed}/{r.fold}": r.accuracy_percent for r in table.itertuples()}}
    write_json(headline, out_dir / "summary.json")
    return headline


def deviations(run: dict[str, str], paper: dict[str, str]) -> pd.DataFrame:
    """Each setting of this run beside the paper's, flagged where they differ (both from `moaflow.study`)."""
    return pd.DataFrame([{"setting": k, "paper": paper.get(k, ""), "this run": run.get(k, ""),
                          "differs": str(paper.get(k, "")) != str(run.get(k, ""))}
                         for k in dict.fromkeys([*paper, *run])])


def evaluate_dataset(dataset: str, models_dir, folds_path, architectures: list[str], inits: list[str], out_dir, *,
                     seeds: list[int] = (0,), significances: list[float] = (0.05, 0.1, 0.2),
                     settings: dict | None = None, data_receipt: str | os.PathLike | None = None,
                     published: str | os.PathLike | None = None, log=stderr) -> dict:
    """Evaluate a dataset's trained folds into ``out_dir`` (what the evaluate rule runs).

    ``settings`` (the config's relevant parts) and the image table's download
    receipt build the deviations-from-the-paper table; ``published`` adds the
    authors' predictions.
    """
    from moaflow.learn import folds
    from moaflow import study

    table = folds.read_folds(folds_path)
    if dataset == "bbbc014":
        summary = evaluate_bbbc014(models_dir, table, architectures, inits, out_dir, seeds=seeds)
    else:
        summary = evaluate_bbbc021(models_dir, table, architectures, inits, out_dir, significances, seeds=seeds,
                                   published=load_predictions(published) if published else None)
        if settings:   # the study's dataset: its deviations from the paper
            receipt = json.loads(Path(data_receipt).read_text()) if data_receipt else None
            run = study.run_settings(settings, table, receipt)
            write_table(deviations(run, study.paper_settings()), Path(out_dir) / "deviations.csv")
    log(f"evaluation written to {out_dir}")
    return summary
