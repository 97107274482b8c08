"""Cross-validated evaluation of a dataset's trained folds: one tidy results table, then files, then figures.

`evaluate_runs` reads every trained network's held-out predictions (the
folders `moaflow.layout` names) and computes everything the report shows into
one `Evaluation`: accuracy per source, architecture, initialisation, level and
seed (a tidy table), confusion matrices, misclassified treatments, per-MoA
recall, cross-conformal coverage (`moaflow.analysis.conformal`) and learning
curves. `write_evaluation` writes its tables, `plot_evaluation` its figures.
Levels are `moaflow.analysis.levels`'. The authors' own treatment-level
predictions give a "published" row beside the run's (`evaluate_published`).

BBBC014: a well is called positive when the mean probability over its crops is
>= 0.5 (`evaluate_bbbc014`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, recall_score

from moaflow import layout
from moaflow.analysis.conformal import cross_conformal
from moaflow.analysis.levels import LEVELS, accuracy, aggregate, level_of, load_predictions, probability_columns
from moaflow.files import save_figure, write_json, write_table
from moaflow.logs import stderr
from moaflow.study import PAPER_TREATMENT_ACCURACY


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


# ------------------------------------------------------------------ a dataset's trained networks

def load_runs(seed_dir: str | os.PathLike, folds: list[str]):
    """One trained network's (a seed folder's) test and validation predictions and histories, over folds."""
    tests, validations, histories = [], [], []
    for fold in folds:
        folder = Path(seed_dir) / fold
        tests.append(pd.read_parquet(layout.fold_file(folder, "test_predictions")).assign(fold=fold))
        validations.append(pd.read_parquet(layout.fold_file(folder, "validation_predictions")).assign(fold=fold))
        histories.append(pd.read_csv(layout.fold_file(folder, "history"), sep="\t"))
    return pd.concat(tests, ignore_index=True), pd.concat(validations, ignore_index=True), histories


def _misclassified(frame: pd.DataFrame, **labels) -> list[dict]:
    wrong = frame[frame["true"] != frame["predicted"]]
    return [{**labels, "compound": r.compound, "concentration": r.concentration, "true": r.true,
             "predicted": r.predicted} for r in wrong.itertuples()]


@dataclass
class Evaluation:
    """Everything a MoA dataset's evaluation computes, before anything is written."""

    dataset: str
    folds: int
    seeds: list[int]
    classes: list[str] = field(default_factory=list)
    #: one row per (source, architecture, init, level, seed): n and accuracy_percent (plus model_selection)
    scores: list[dict] = field(default_factory=list)
    #: (architecture, init, level) -> confusion counts at image and treatment level (first seed)
    confusions: dict = field(default_factory=dict)
    #: (architecture, init, fold) -> treatment-level confusion of one fold (first seed)
    fold_confusions: dict = field(default_factory=dict)
    misclassified: list[dict] = field(default_factory=list)
    recall: list[dict] = field(default_factory=list)
    conformal: list[pd.DataFrame] = field(default_factory=list)
    histories: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)

    def accuracy_table(self) -> pd.DataFrame:
        """Mean and SD over seeds per source, architecture, initialisation and level, beside the paper's figure."""
        scores = pd.DataFrame(self.scores)
        keys = ["source", "architecture", "init", "level"]
        table = scores.groupby(keys, sort=False).agg(
            model_selection=("model_selection", "first"), n=("n", "first"), seeds=("seed", "nunique"),
            accuracy_percent=("accuracy_percent", "mean"), sd_percent=("accuracy_percent", "std")).reset_index()
        table["paper_percent"] = [PAPER_TREATMENT_ACCURACY.get(a) if lv == "treatment" and i in ("imagenet", "published")
                                  else None for a, i, lv in zip(table["architecture"], table["init"], table["level"])]
        return table

    def summary(self) -> dict:
        table = self.accuracy_table()
        accuracies = {}
        for r in table.itertuples():
            key = "published" if r.source == "published predictions" else f"{r.architecture}/{r.init}"
            if key == "published":
                accuracies.setdefault(key, {}).setdefault(r.architecture, {})[r.level] = r.accuracy_percent / 100
            else:
                accuracies.setdefault(key, {})[r.level] = r.accuracy_percent / 100
        headline = {"dataset": self.dataset, "folds": self.folds, "classes": self.classes, "accuracy": accuracies,
                    "paper_treatment_accuracy_percent": PAPER_TREATMENT_ACCURACY}
        if len(self.seeds) > 1:
            headline["seed_variation_percent"] = {f"{r.architecture}/{r.init}/{r.level}": r.sd_percent
                                                  for r in table.itertuples() if r.sd_percent == r.sd_percent}
        return headline


def headline_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """The report's opening table: one row per network, its accuracy at every level as mean ± SD over seeds.

    Parameters
    ----------
    accuracy : pandas.DataFrame
        `Evaluation.accuracy_table` (long: one row per source, architecture, initialisation and level).

    Returns
    -------
    headline : pandas.DataFrame
        ``network``, ``initialisation``, one ``<level> %`` column per level (``"87.1 ± 2.0"``; no SD with one
        seed) and ``paper, treatment %`` (the paper's figure where it has one); this run's networks first.
    """
    levels = list(dict.fromkeys(accuracy["level"]))
    rows = []
    for (source, architecture, init), group in accuracy.groupby(["source", "architecture", "init"], sort=False):
        row = {"network": architecture if source == "this run" else f"{architecture} ({source})",
               "initialisation": init}
        for level in levels:
            hit = group[group["level"] == level]
            mean, sd = (hit["accuracy_percent"].iloc[0], hit["sd_percent"].iloc[0]) if len(hit) else (None, None)
            row[f"{level} %"] = "" if mean is None else f"{mean:.1f}" + ("" if pd.isna(sd) else f" ± {sd:.1f}")
        paper = group["paper_percent"].dropna()
        row["paper, treatment %"] = f"{paper.iloc[0]:.1f}" if len(paper) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _model_selection(seed_dir: Path, fold: str) -> str:
    import json

    run = layout.fold_file(seed_dir / fold, "run")
    return json.loads(run.read_text()).get("hyperparameters", {}).get("model_selection", "last") if run.is_file() else ""


def _score_network(evaluation: Evaluation, architecture: str, init: str, runs: dict, selection: str,
                   significances: list[float]) -> pd.DataFrame:
    """Add one trained network's rows to ``evaluation``; its first seed's held-out predictions."""
    seeds = evaluation.seeds
    test = runs[seeds[0]][0]
    evaluation.classes = [c[2:] for c in probability_columns(test)]
    evaluation.histories[(architecture, init)] = [h for seed in seeds for h in runs[seed][2]]
    for level in LEVELS:
        for seed in seeds:
            frame = aggregate(runs[seed][0], level)
            evaluation.scores.append({"source": "this run", "architecture": architecture, "init": init,
                                      "level": level, "seed": seed, "n": len(frame), "model_selection": selection,
                                      "accuracy_percent": 100 * accuracy(frame)})
        frame = aggregate(test, level)
        if level in ("image", "treatment"):
            evaluation.confusions[(architecture, init, level)] = confusion(frame, evaluation.classes)
        if level == "treatment":
            evaluation.misclassified += _misclassified(frame, source="this run", architecture=architecture, init=init)
            evaluation.recall += [{"architecture": architecture, "init": init, "moa": m, "recall": v}
                                  for m, v in per_class_recall(frame, evaluation.classes).items()]
    for fold, part in test.groupby("fold"):
        evaluation.fold_confusions[(architecture, init, fold)] = confusion(aggregate(part, "treatment"),
                                                                           evaluation.classes)
    for level in ("crop", "treatment"):
        evaluation.conformal.append(cross_conformal(test, significances, level).assign(architecture=architecture,
                                                                                       init=init))
    return test


def _score_ensembles(evaluation: Evaluation, tests_by_init: dict[str, list[pd.DataFrame]]) -> None:
    """Per initialisation, the mean of every architecture's crop probabilities (first seed) as one more row."""
    for init, tests in tests_by_init.items():
        if len(tests) < 2:
            continue
        merged = tests[0].copy()
        columns = probability_columns(merged)
        merged[columns] = np.mean([t[columns].to_numpy() for t in tests], axis=0)
        for level in LEVELS:
            frame = aggregate(merged, level)
            evaluation.scores.append({"source": "this run", "architecture": "ensemble", "init": init, "level": level,
                                      "seed": evaluation.seeds[0], "n": len(frame), "model_selection": "",
                                      "accuracy_percent": 100 * accuracy(frame)})


def evaluate_runs(dataset: str, folds: pd.DataFrame, networks: list[tuple[str, str]], *, seeds: list[int],
                  significance_levels: list[float], published: pd.DataFrame | None = None,
                  root: str = layout.ROOT) -> Evaluation:
    """Everything the report shows for a MoA dataset's trained networks, computed (nothing written).

    With several seeds the accuracies are means over seeds (and their SD); confusion matrices, misclassified
    treatments, conformal sets and the ensemble use the first seed. ``published`` (from `load_predictions`,
    with an ``architecture`` column) adds the authors' own predictions beside the run's.
    """
    evaluation = Evaluation(dataset=dataset, folds=len(folds), seeds=list(seeds))
    fold_names = list(folds["fold"])
    tests_by_init: dict[str, list[pd.DataFrame]] = {}
    for architecture, init in networks:
        folders = {seed: Path(layout.seed_dir(dataset, architecture, init, seed, root)) for seed in seeds}
        runs = {seed: load_runs(folder, fold_names) for seed, folder in folders.items()}
        selection = _model_selection(folders[seeds[0]], fold_names[0])
        tests_by_init.setdefault(init, []).append(
            _score_network(evaluation, architecture, init, runs, selection, significance_levels))
    _score_ensembles(evaluation, tests_by_init)
    if published is not None:
        evaluate_published(published, evaluation)
    return evaluation


def write_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike) -> dict:
    """The evaluation's tables into ``out_dir``; returns the summary (also ``summary.json``)."""
    out_dir = Path(out_dir)
    table = evaluation.accuracy_table()
    write_table(table, out_dir / "accuracy.csv")
    write_table(headline_table(table), out_dir / "headline.csv")
    if len(evaluation.seeds) > 1:
        write_table(pd.DataFrame(evaluation.scores).query("source == 'this run'"), out_dir / "seed_variation.csv")
    for (architecture, init, level), matrix in evaluation.confusions.items():
        matrix.to_csv(out_dir / f"confusion_{level}_{architecture}_{init}.csv")
    for (architecture, init, fold), matrix in evaluation.fold_confusions.items():
        matrix.to_csv(out_dir / f"fold_confusion_{architecture}_{init}_{fold}.csv")
    for architecture, matrix in evaluation.published.items():
        matrix.to_csv(out_dir / f"confusion_treatment_{architecture}_published.csv")
    write_table(pd.DataFrame(evaluation.misclassified, columns=["source", "architecture", "init", "compound",
                                                                "concentration", "true", "predicted"]),
                out_dir / "misclassified_treatments.csv")
    write_table(pd.DataFrame(evaluation.recall, columns=["architecture", "init", "moa", "recall"]),
                out_dir / "per_moa_recall.csv")
    conformal = pd.concat(evaluation.conformal) if evaluation.conformal else pd.DataFrame(
        columns=["significance", "class", "n", "coverage", "mean_set_size", "level", "architecture", "init"])
    write_table(conformal, out_dir / "conformal.csv")
    summary = evaluation.summary()
    write_json(summary, out_dir / "summary.json")
    return summary


def plot_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike) -> None:
    """The evaluation's figures into ``out_dir``: confusion matrices and learning curves."""
    out_dir = Path(out_dir)
    several = len(evaluation.seeds) > 1
    for (architecture, init, level), matrix in evaluation.confusions.items():
        plot_confusion(matrix, out_dir / f"confusion_{level}_{architecture}_{init}.png",
                       f"{architecture} ({init}), {level} level, all folds"
                       + (f", seed {evaluation.seeds[0]} of {len(evaluation.seeds)}" if several else ""))
    for architecture, matrix in evaluation.published.items():
        plot_confusion(matrix, out_dir / f"confusion_treatment_{architecture}_published.png",
                       f"{architecture}, the authors' predictions, treatment level")
    plot_learning_curves(evaluation.histories, out_dir / "learning_curves.png", "Held-out compound accuracy per epoch")


def evaluate_published(published: pd.DataFrame, evaluation: Evaluation) -> None:
    """Add an external predictions table to ``evaluation``, per architecture (its ``architecture`` column), at
    its own level and every coarser one: rows, treatment-level confusion matrices and misclassified units."""
    groups = published.groupby("architecture") if "architecture" in published else [("external", published)]
    finest = LEVELS.index(level_of(published))
    for architecture, frame in groups:
        classes = [c[2:] for c in probability_columns(frame)]
        for level in LEVELS[finest:]:
            aggregated = aggregate(frame, level)
            evaluation.scores.append({"source": "published predictions", "architecture": architecture,
                                      "init": "published", "level": level, "seed": 0, "n": len(aggregated),
                                      "model_selection": "", "accuracy_percent": 100 * accuracy(aggregated)})
            if level == "treatment":
                evaluation.published[architecture] = confusion(aggregated, classes)
                evaluation.misclassified += _misclassified(aggregated, source="published predictions",
                                                           architecture=architecture, init="published")


def evaluate_external(predictions: str | os.PathLike, out_dir: str | os.PathLike, log=stderr) -> dict:
    """Evaluate a predictions table on its own, at its own level and every coarser one.

    Parameters
    ----------
    predictions : path
        CSV or parquet: crop, image or treatment rows (the level named by its columns), class probabilities
        as ``p_<class>`` or class-named columns, the true class as ``true`` or ``moa``.
    out_dir : path
        Where the accuracy table, misclassified units, confusion matrices and summary go.
    """
    evaluation = Evaluation(dataset=str(predictions), folds=0, seeds=[0])
    evaluate_published(load_predictions(predictions), evaluation)
    summary = write_evaluation(evaluation, out_dir)
    plot_evaluation(evaluation, out_dir)
    for architecture, levels in summary["accuracy"].get("published", {}).items():
        log(f"{architecture}: " + ", ".join(f"{level} {100 * value:.2f} %" for level, value in levels.items()))
    return summary


def evaluate_bbbc014(folds: pd.DataFrame, networks: list[tuple[str, str]], out_dir, *, seeds: list[int],
                     root: str = layout.ROOT) -> dict:
    """Well-level accuracy per fold (cell line), architecture and seed: mean crop probability >= 0.5."""
    out_dir = Path(out_dir)
    rows = []
    for architecture, init, seed in ((a, i, s) for a, i in networks for s in seeds):
        test, _, _ = load_runs(layout.seed_dir("bbbc014", architecture, init, seed, root), list(folds["fold"]))
        wells = test.groupby(["fold", "cell_line", "well"], as_index=False).agg(
            p=("p_positive", "mean"), label=("label", "first"))
        wells["predicted"] = (wells["p"] >= 0.5).astype(int)
        for (fold, line), part in wells.groupby(["fold", "cell_line"]):
            rows.append({"architecture": architecture, "init": init, "seed": seed, "fold": fold,
                         "test_cell_line": line, "wells": len(part),
                         "accuracy_percent": 100 * float((part["predicted"] == part["label"]).mean())})
    table = pd.DataFrame(rows)
    write_table(table, out_dir / "well_accuracy.csv")
    headline = {"dataset": "bbbc014", "well_accuracy_percent": {
        f"{r.architecture}/{r.init}/seed-{r.seed}/{r.fold}": r.accuracy_percent for r in table.itertuples()}}
    write_json(headline, out_dir / "summary.json")
    return headline


def evaluate_dataset(dataset: str, folds: str | os.PathLike, networks: list[list[str]], out_dir: str | os.PathLike,
                     *, seeds: list[int], significance_levels: list[float],
                     settings: dict | None = None, paper: dict | None = None,
                     paper_folds: str | os.PathLike | None = None, image_csv: str | None = None,
                     published: str | os.PathLike | None = None, root: str = layout.ROOT, log=stderr) -> dict:
    """Evaluate a dataset's trained folds into ``out_dir`` (what the evaluate rule runs).

    Parameters
    ----------
    dataset : str
        bbbc014 (translocation), or a MoA dataset (bbbc021, a crops dataset).
    folds : path
        The checked folds.
    networks : list of (architecture, initialisation)
        The trained networks.
    out_dir : path
        The evaluation folder (tables, figures, ``summary.json``).
    seeds : list of int
        With several, accuracies are means over seeds with their SD.
    significance_levels : list of float
        Of the conformal prediction sets.
    settings, paper : dict, optional
        The run's and the defaults' settings (`moaflow.analysis.deviations.settings_of`): the
        deviations-from-the-paper table.
    paper_folds : path, optional
        The paper's (shipped) folds, for that table.
    image_csv : path, optional
        The image table's CSV, whose download receipt says whether it was the Broad's published file.
    published : path, optional
        The authors' predictions, shown beside the run's.
    """
    from moaflow.analysis import deviations
    from moaflow.learn.folds import read_folds

    table = read_folds(folds)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if dataset == "bbbc014":
        return evaluate_bbbc014(table, networks, out_dir, seeds=seeds, root=root)
    evaluation = evaluate_runs(dataset, table, [tuple(n) for n in networks], seeds=seeds,
                               significance_levels=significance_levels,
                               published=load_predictions(published) if published else None, root=root)
    summary = write_evaluation(evaluation, out_dir)
    plot_evaluation(evaluation, out_dir)
    if settings:   # the study's dataset: its deviations from the paper
        run = deviations.describe(settings, table, deviations.data_description(
            layout.receipt(image_csv) if image_csv else None))
        reference = deviations.describe(paper, read_folds(paper_folds), deviations.PUBLISHED_DATA)
        write_table(deviations.deviations(run, reference), Path(out_dir) / "deviations.csv")
    log(f"evaluation written to {out_dir}")
    return summary
