"""Cross-validated evaluation: the study's aggregation levels, figures and uncertainty.

Levels (BBBC021):

* crop: argmax of each crop's softmax;
* image (field): element-wise median of a field's crop probabilities, argmax;
* treatment: for each (compound, concentration, replicate) the element-wise
  median over its crops, then the median over replicates, argmax (the
  original code's rule; two wells sharing ``Replicate=1`` are pooled).

BBBC014: a well is called positive when the mean probability over its crops
is >= 0.5. Uncertainty: inductive Mondrian (class-conditional) conformal
prediction calibrated on validation-compound predictions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

#: Treatment-level accuracy reported by Kensert et al. (2019), ImageNet-pretrained, 103 treatments.
PAPER_TREATMENT_ACCURACY = {"resnet50": 97.09, "inception_v3": 97.09, "inception_resnet_v2": 95.15}


def probability_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("p_")]


def _call(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    classes = [c[2:] for c in columns]
    return pd.Series(np.asarray(classes)[frame[columns].to_numpy().argmax(axis=1)], index=frame.index)


def aggregate(crops: pd.DataFrame, level: str) -> pd.DataFrame:
    """Predictions at ``level`` ("crop", "image" or "treatment") from crop probabilities.

    Parameters
    ----------
    crops : pandas.DataFrame
        Crop rows with ``p_<class>`` columns, ``true`` and the index columns
        (``compound``, ``concentration``, ``replicate``, ``image_number``, ``moa``).

    Returns
    -------
    frame : pandas.DataFrame
        One row per unit with the aggregated probabilities, ``true`` and ``predicted``.
    """
    columns = probability_columns(crops)
    if level == "crop":
        out = crops.copy()
    elif level == "image":
        out = crops.groupby(["compound", "concentration", "image_number"], as_index=False).agg(
            {**{c: "median" for c in columns}, "true": "first"})
    elif level == "treatment":
        replicate = crops.groupby(["compound", "concentration", "replicate"], as_index=False).agg(
            {**{c: "median" for c in columns}, "true": "first"})
        out = replicate.groupby(["compound", "concentration"], as_index=False).agg(
            {**{c: "median" for c in columns}, "true": "first"})
    else:
        raise ValueError(f"level={level!r}: expected 'crop', 'image' or 'treatment'")
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
    _save(fig, path)


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def plot_learning_curves(histories: dict[tuple[str, str], list[pd.DataFrame]], path: str | os.PathLike,
                         title: str) -> None:
    """Held-out accuracy per epoch, mean and min-max band over folds, per architecture and initialisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    architectures = sorted({a for a, _ in histories})
    fig, axes = plt.subplots(1, len(architectures), figsize=(4.2 * len(architectures), 3.4), squeeze=False)
    for ax, architecture in zip(axes[0], architectures):
        for (arch, init), frames in sorted(histories.items()):
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
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


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
    """Inductive Mondrian prediction sets: label y is kept when its p-value exceeds ``significance``.

    The p-value of y for a test example with score s = 1 - p(y) is
    ``(#{calibration scores of class y >= s} + 1) / (n_y + 1)``, so for each
    class the sets cover the true label with probability >= 1 - significance
    (exchangeability within the class). A class without calibration examples
    gets p = 1 and is always kept.
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
                         "coverage": float(covered[mask].mean()), "mean_set_size": float(sizes[mask].mean())})
    return pd.DataFrame(rows)


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


def _calibration_for(validation: pd.DataFrame, test_fold_compound: str) -> pd.DataFrame:
    # Pool validation predictions over folds, without the test compound's own images.
    return validation[validation["compound"] != test_fold_compound]


def evaluate_bbbc021(models_dir, folds: pd.DataFrame, architectures: list[str], inits: list[str],
                     out_dir, significances: list[float], seeds: list[int] = (0,)) -> dict:
    """Everything the BBBC021 report shows; writes CSVs and PNGs to ``out_dir``, returns the summary.

    With several seeds the accuracies are means over seeds (``sd_percent`` their
    standard deviation, ``seed_variation.csv`` each seed's value); confusion
    matrices, misclassified treatments, conformal sets and the ensemble use the first seed.
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
            test, validation, _ = runs[seeds[0]]
            columns = probability_columns(test)
            classes = [c[2:] for c in columns]
            histories[(architecture, init)] = [h for seed in seeds for h in runs[seed][2]]
            ensemble.setdefault(init, []).append(test)
            key = f"{architecture}/{init}"
            summary[key] = {}
            for level in ("crop", "image", "treatment"):
                frame = aggregate(test, level)
                values = [accuracy(aggregate(runs[seed][0], level)) for seed in seeds]
                by_seed += [{"architecture": architecture, "init": init, "level": level, "seed": seed,
                             "accuracy_percent": 100 * v} for seed, v in zip(seeds, values)]
                summary[key][level] = float(np.mean(values))
                rows.append({"architecture": architecture, "init": init, "level": level, "n": len(frame),
                             "seeds": len(seeds), "accuracy_percent": 100 * float(np.mean(values)),
                             "sd_percent": 100 * float(np.std(values, ddof=1)) if len(values) > 1 else None,
                             "paper_percent": PAPER_TREATMENT_ACCURACY.get(architecture)
                             if level == "treatment" and init == "imagenet" else None})
                if level in ("image", "treatment"):
                    matrix = confusion(frame, classes)
                    matrix.to_csv(out_dir / f"confusion_{level}_{architecture}_{init}.csv")
                    plot_confusion(matrix, out_dir / f"confusion_{level}_{architecture}_{init}.png",
                                   f"{architecture} ({init}), {level} level, all folds")
                if level == "treatment":
                    wrong = frame[frame["true"] != frame["predicted"]]
                    misclassified += [{"architecture": architecture, "init": init, "compound": r.compound,
                                       "concentration": r.concentration, "true": r.true, "predicted": r.predicted}
                                      for r in wrong.itertuples()]
                    per_moa += [{"architecture": architecture, "init": init, "moa": m, "recall": v}
                                for m, v in per_class_recall(frame, classes).items()]
            for fold, part in test.groupby("fold"):
                confusion(aggregate(part, "treatment"), classes).to_csv(
                    out_dir / f"fold_confusion_{architecture}_{init}_{fold}.csv")
            parts = []
            for fold, part in test.groupby("fold"):
                calibration = _calibration_for(validation, part["compound"].iloc[0])
                if len(calibration):
                    parts.append((part, calibration))
            if parts:
                table = pd.concat([conformal_table(p, c, significances).assign(fold=p["fold"].iloc[0])
                                   for p, c in parts])
                pooled = table.groupby(["significance", "class"]).apply(
                    lambda g: pd.Series({"n": g["n"].sum(),
                                         "coverage": np.average(g["coverage"], weights=g["n"]),
                                         "mean_set_size": np.average(g["mean_set_size"], weights=g["n"])}),
                    include_groups=False).reset_index()
                conformal.append(pooled.assign(architecture=architecture, init=init))
    for init, tests in ensemble.items():
        if len(tests) > 1:
            merged = tests[0].copy()
            columns = probability_columns(merged)
            merged[columns] = np.mean([t[columns].to_numpy() for t in tests], axis=0)
            for level in ("crop", "image", "treatment"):
                frame = aggregate(merged, level)
                rows.append({"architecture": "ensemble", "init": init, "level": level, "n": len(frame), "seeds": 1,
                             "accuracy_percent": 100 * accuracy(frame), "sd_percent": None, "paper_percent": None})
                summary.setdefault(f"ensemble/{init}", {})[level] = accuracy(frame)
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "accuracy.csv", index=False)
    if len(seeds) > 1:
        pd.DataFrame(by_seed).to_csv(out_dir / "seed_variation.csv", index=False)
        summary["seed_variation_percent"] = {
            f"{r.architecture}/{r.init}/{r.level}": r.sd_percent for r in table.itertuples() if r.sd_percent is not None}
    pd.DataFrame(misclassified, columns=["architecture", "init", "compound", "concentration", "true",
                                         "predicted"]).to_csv(out_dir / "misclassified_treatments.csv", index=False)
    pd.DataFrame(per_moa).to_csv(out_dir / "per_moa_recall.csv", index=False)
    conformal_frame = pd.concat(conformal) if conformal else pd.DataFrame(
        columns=["significance", "class", "n", "coverage", "mean_set_size", "architecture", "init"])
    conformal_frame.to_csv(out_dir / "conformal.csv", index=False)
    plot_learning_curves(histories, out_dir / "learning_curves.png", "Held-out compound accuracy per epoch")
    headline = {"dataset": "bbbc021", "folds": len(fold_names), "classes": classes, "accuracy": summary,
                "paper_treatment_accuracy_percent": PAPER_TREATMENT_ACCURACY}
    _write_json(headline, out_dir / "summary.json")
    return headline


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
    _write_json(headline, out_dir / "summary.json")
    return headline


def _write_json(data, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


#: The paper's settings, for the deviations table.
PAPER_SETTINGS = {
    "data": "the Broad's BBBC021 v1 and BBBC014 v1 images",
    "illumination correction": "none",
    "normalisation": "study (Anscombe, plate DMSO z-score, per-field min-max)",
    "initialisations": "imagenet (and random for figure 4)",
    "architectures": "resnet50, inception_v3, inception_resnet_v2",
    "input sizes": "224 (ResNet50), 299 (Inceptions)",
    "epochs / batch / learning rate": "10 / 8 / 0.0001 (final commit)",
    "validation compounds": "0",
    "folds": "38 (leave one compound out)",
}


def deviations(config: dict) -> pd.DataFrame:
    """Each setting of this run next to the paper's, flagged where they differ."""
    training = config.get("training", {})
    pre = config.get("preprocess", {}).get("bbbc021", {})
    train021 = training.get("bbbc021", {})
    hyper = {**{"epochs": 10, "batch_size": 8, "learning_rate": 1e-4}, **train021.get("hyperparameters", {})}
    folds_file = train021.get("folds_file", "")
    n_folds, validation = "?", "?"
    if folds_file and Path(folds_file).exists():
        table = pd.read_csv(folds_file, sep="\t", dtype=str, keep_default_na=False)
        n_folds = str(len(table))
        validation = str(max((len([g for g in v.split(";") if g]) for v in table["validation_groups"]), default=0))
    urls = config.get("bbbc021", {}).get("base_urls", [])
    this = {
        "data": "the Broad's BBBC021 v1 and BBBC014 v1 images" if any("broadinstitute" in u for u in urls)
        else f"served from {urls[0] if urls else '?'} (a stand-in unless it mirrors the Broad's files)",
        "illumination correction": "CellProfiler-style, applied" if pre.get("illumination", {}).get("apply") else "none",
        "normalisation": "study (Anscombe, plate DMSO z-score, per-field min-max)"
        if pre.get("normalisation", "study") == "study" else pre.get("normalisation"),
        "initialisations": ", ".join(i["name"] if i["weights"] == "imagenet" else f"{i['name']} ({i['weights']})"
                                     for i in training.get("initialisations", [])),
        "architectures": ", ".join(training.get("architectures", [])),
        "input sizes": ", ".join(f"{a} {s}" for a, s in train021.get("input_sizes", {}).items()
                                 if a in (train021.get("architectures") or training.get("architectures", []))),
        "epochs / batch / learning rate": f"{hyper['epochs']} / {hyper['batch_size']} / {hyper['learning_rate']}"
        + (f" (preset {train021.get('preset')})" if train021.get("preset", "final") != "final" else ""),
        "validation compounds": validation,
        "folds": f"{n_folds} (leave one compound out)",
    }
    return pd.DataFrame([{"setting": k, "paper": v, "this run": this[k], "differs": v != this[k]}
                         for k, v in PAPER_SETTINGS.items()])


def evaluate_dataset(dataset: str, models_dir, folds_path, architectures: list[str], inits: list[str], out_dir, *,
                     seeds: list[int] = (0,), significances: list[float] = (0.05, 0.1, 0.2),
                     settings: dict | None = None, log=None) -> dict:
    """Evaluate a dataset's trained folds into ``out_dir`` (what the evaluate rule runs)."""
    from moaflow import folds
    from moaflow.logs import stderr

    table = folds.read_folds(folds_path)
    if dataset == "bbbc014":
        summary = evaluate_bbbc014(models_dir, table, architectures, inits, out_dir, seeds=seeds)
    else:
        summary = evaluate_bbbc021(models_dir, table, architectures, inits, out_dir, significances, seeds=seeds)
        deviations(settings or {}).to_csv(Path(out_dir) / "deviations.csv", index=False)
    (log or stderr)(f"evaluation written to {out_dir}")
    return summary
