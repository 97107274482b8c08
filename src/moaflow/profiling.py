"""Image-based profiling scores: treatment profiles from network features, and 1-nearest-neighbour MoA
accuracy "not same compound" (NSC) and "not same compound or batch" (NSCB).

Sources of features:

* each trained fold's model embeds the crops of the compound it held out (the
  pooled features before the classifier), so no treatment is embedded by a
  model that saw it in training;
* "ImageNet features, no training": the same architectures with their
  ImageNet weights, untouched, embed every crop.

Profiles are the mean (or median) of a well's crops, then of a treatment's
wells; optionally standardised per feature over all treatments. A treatment's
nearest neighbour (cosine distance) must come from another compound (NSC), and
for NSCB also from another batch; MoAs found in a single batch cannot be scored
under NSCB and are left out, with the count stated.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from moaflow.io import save_figure, write_json, write_table
from moaflow.logs import stderr

#: Identity columns of a crop, well and treatment profile.
TREATMENT_KEYS = ["compound", "concentration"]
WELL_KEYS = ["plate", "well"]


def feature_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("f_")]


def fold_embeddings(models_dir: str | os.PathLike, folds: pd.DataFrame, log=stderr) -> pd.DataFrame:
    """Features of every held-out crop, each from the model of the fold that held it out: the training job
    wrote them (``test_embeddings.npy``, rows as ``test_predictions.parquet``).

    Returns
    -------
    frame : pandas.DataFrame
        The held-out crops' index columns, their ``fold``, and ``f_0 ... f_k``.
    """
    frames = []
    for fold in folds["fold"]:
        crops = pd.read_parquet(Path(models_dir) / fold / "test_predictions.parquet")
        features = np.load(Path(models_dir) / fold / "test_embeddings.npy")
        if len(features) != len(crops):
            raise ValueError(f"{models_dir}/{fold}: {len(features)} embeddings for {len(crops)} held-out crops")
        frames.append(pd.concat([crops.drop(columns=[c for c in crops if c.startswith("p_")]).assign(fold=fold),
                                 pd.DataFrame(features, columns=[f"f_{i}" for i in range(features.shape[1])])],
                                axis=1))
    frame = pd.concat(frames, ignore_index=True)
    log(f"{models_dir}: {len(frame)} held-out crops of {len(folds)} folds, {features.shape[1]} features")
    return frame


def imagenet_embeddings(architecture: str, weights: str | os.PathLike, index: pd.DataFrame, store,
                        log=stderr) -> pd.DataFrame:
    """Features of every crop from the architecture's ImageNet weights, without training (the study's
    input transform: reversed channels, raw 0..255)."""
    import keras

    from moaflow.feeder import predict
    from moaflow.models import backbone, input_transform

    kernel, bias = input_transform("reversed", "raw")
    inputs = keras.Input(store.shape[1:], dtype="uint8")
    x = keras.layers.Rescaling(1.0, dtype="float32")(inputs)
    transform = keras.layers.Conv2D(3, 1, trainable=False, dtype="float32")
    x = transform(x)
    transform.set_weights([kernel, bias])
    model = keras.Model(inputs, backbone(architecture, store.shape[1], weights)(x))
    features = predict(model, store, np.arange(len(index)), 64)
    log(f"ImageNet features of {architecture}: {len(index)} crops, {features.shape[1]} features")
    return pd.concat([index.reset_index(drop=True),
                      pd.DataFrame(features, columns=[f"f_{i}" for i in range(features.shape[1])])], axis=1)


def treatment_profiles(crops: pd.DataFrame, *, statistic: str = "mean", normalisation: str = "none") -> pd.DataFrame:
    """Well profiles (the ``statistic`` of a well's crops), then treatment profiles (of its wells).

    Parameters
    ----------
    statistic : {"mean", "median"}
    normalisation : {"none", "standardize"}
        ``standardize``: each feature centred and scaled over all treatments.

    Returns
    -------
    profiles : pandas.DataFrame
        One row per treatment: compound, concentration, moa, the batches its wells came from
        (``batches``, ``;``-separated) and the features.
    """
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic={statistic!r}: expected 'mean' or 'median'")
    features = feature_columns(crops)
    wells = crops.groupby(TREATMENT_KEYS + WELL_KEYS, as_index=False).agg(
        {**{f: statistic for f in features}, "moa": "first", "batch": "first"})
    profiles = wells.groupby(TREATMENT_KEYS, as_index=False).agg(
        {**{f: statistic for f in features}, "moa": "first",
         "batch": lambda b: ";".join(sorted(set(map(str, b))))}).rename(columns={"batch": "batches"})
    if normalisation == "standardize":
        values = profiles[features].to_numpy()
        profiles[features] = (values - values.mean(0)) / np.where(values.std(0) > 0, values.std(0), 1)
    elif normalisation != "none":
        raise ValueError(f"normalisation={normalisation!r}: expected 'none' or 'standardize'")
    return profiles


def nearest_neighbour_moa(profiles: pd.DataFrame, *, not_same_batch: bool) -> tuple[pd.DataFrame, dict]:
    """1-NN MoA calls by cosine distance, neighbours restricted to other compounds (and other batches).

    A treatment's neighbours exclude every treatment of its compound and, with
    ``not_same_batch``, every treatment that shares a batch with it. Under that
    rule MoAs present in a single batch have no admissible same-MoA neighbour:
    they are left out (the usual NSCB protocol), and so is any treatment left
    with no candidate at all.

    Returns
    -------
    matches : pandas.DataFrame
        Per scored treatment: compound, concentration, moa, neighbour, neighbour's MoA, correct.
    counts : dict
        ``scored``, ``left_out_moas`` (names), ``left_out_treatments``.
    """
    features = feature_columns(profiles)
    x = profiles[features].to_numpy(dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1)
    distance = 1 - x @ x.T
    compound = profiles["compound"].to_numpy()
    batches = [set(str(b).split(";")) for b in profiles["batches"]]
    moas = profiles["moa"].to_numpy()
    left_out_moas = []
    if not_same_batch:
        per_moa = profiles.groupby("moa")["batches"].apply(lambda b: set(";".join(b).split(";")))
        left_out_moas = sorted(m for m, b in per_moa.items() if len(b) < 2)
    rows, left_out = [], 0
    for i in range(len(profiles)):
        if moas[i] in left_out_moas:
            continue
        allowed = compound != compound[i]
        if not_same_batch:
            allowed &= np.array([not (batches[i] & b) for b in batches])
        allowed &= ~np.isin(moas, left_out_moas)
        if not allowed.any():
            left_out += 1
            continue
        j = np.flatnonzero(allowed)[np.argmin(distance[i, allowed])]
        rows.append({"compound": compound[i], "concentration": profiles["concentration"].iloc[i], "moa": moas[i],
                     "neighbour": f"{compound[j]} {profiles['concentration'].iloc[j]:g}", "neighbour_moa": moas[j],
                     "correct": bool(moas[i] == moas[j])})
    matches = pd.DataFrame(rows, columns=["compound", "concentration", "moa", "neighbour", "neighbour_moa", "correct"])
    return matches, {"scored": len(matches), "left_out_moas": left_out_moas, "left_out_treatments": left_out}


def literature() -> pd.DataFrame:
    """Published NSC/NSCB figures on BBBC021 with their sources (package data)."""
    from importlib import resources

    return pd.read_csv(resources.files("moaflow").joinpath("data/profiling_literature.csv"))


def plot_profile_map(profiles: dict[str, pd.DataFrame], path: str | os.PathLike) -> None:
    """Treatment profiles of each source in 2-D (PCA), coloured by MoA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    sources = list(profiles)
    fig, axes = plt.subplots(1, len(sources), figsize=(4.6 * len(sources), 4.2), squeeze=False)
    moas = sorted({m for p in profiles.values() for m in p["moa"]})
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(moas), 2)))
    for ax, source in zip(axes[0], sources):
        frame = profiles[source]
        values = frame[feature_columns(frame)].to_numpy()
        points = PCA(n_components=2).fit_transform(values) if len(frame) > 2 else np.zeros((len(frame), 2))
        for moa, colour in zip(moas, colours):
            mask = (frame["moa"] == moa).to_numpy()
            ax.scatter(points[mask, 0], points[mask, 1], s=18, color=colour, label=moa)
        ax.set_title(source, fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[0][-1].legend(fontsize=6, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle("Treatment profiles (PCA), coloured by MoA")
    fig.tight_layout()
    save_figure(fig, path)


def profile_dataset(dataset: str, models_root: str | os.PathLike, folds_path, index_path, store_paths: dict,
                    architectures: list[str], inits: list[str], out_dir, *, seed: int = 0,
                    imagenet_weights: dict | None = None, statistic: str = "mean", normalisation: str = "none",
                    log=stderr) -> dict:
    """Embeddings, treatment profiles, NSC/NSCB per source, the literature table and the map (the rule)."""
    from moaflow import folds as folds_module
    from moaflow.feeder import open_store

    out_dir = Path(out_dir)
    folds = folds_module.read_folds(folds_path)
    index = pd.read_parquet(index_path)
    sources: dict[str, pd.DataFrame] = {}
    for architecture in architectures:
        for init in inits:
            models = Path(models_root) / architecture / init / f"seed-{seed}"
            sources[f"{architecture}/{init}"] = fold_embeddings(models, folds, log)
        if imagenet_weights and architecture in imagenet_weights:
            sources[f"{architecture}/imagenet features"] = imagenet_embeddings(
                architecture, imagenet_weights[architecture], index, open_store(store_paths[architecture], log=log),
                log)
    rows, profiles, all_matches = [], {}, []
    for source, crops in sources.items():
        profiles[source] = treatment_profiles(crops, statistic=statistic, normalisation=normalisation)
        for name, not_same_batch in (("NSC", False), ("NSCB", True)):
            matches, counts = nearest_neighbour_moa(profiles[source], not_same_batch=not_same_batch)
            accuracy = float(matches["correct"].mean()) if len(matches) else float("nan")
            rows.append({"source": source, "score": name, "accuracy_percent": 100 * accuracy, **counts,
                         "left_out_moas": ", ".join(counts["left_out_moas"])})
            all_matches.append(matches.assign(source=source, score=name))
            log(f"{source}: {name} {100 * accuracy:.1f} % over {counts['scored']} treatments"
                + (f" ({len(counts['left_out_moas'])} MoA(s) in a single batch left out)"
                   if counts["left_out_moas"] else ""))
    scores = pd.DataFrame(rows)
    write_table(scores, out_dir / "nsc_nscb.csv")
    write_table(pd.concat(all_matches, ignore_index=True), out_dir / "matches.csv")
    ours = scores.pivot_table(index="source", columns="score", values="accuracy_percent").reset_index()
    table = pd.concat([literature(), pd.DataFrame({"method": "this run: " + ours["source"],
                                                   "nsc_percent": ours.get("NSC"), "nscb_percent": ours.get("NSCB"),
                                                   "source": f"moaflow, {dataset}, profiles: {statistic} per well "
                                                             f"then treatment, normalisation {normalisation}"})],
                      ignore_index=True)
    write_table(table, out_dir / "literature.csv")
    plot_profile_map(profiles, out_dir / "profile_map.png")
    summary = {"dataset": dataset, "profiles": {"statistic": statistic, "normalisation": normalisation},
               "profiling": {r["source"]: {} for r in rows}}
    for r in rows:
        summary["profiling"][r["source"]][r["score"]] = r["accuracy_percent"]
    write_json(summary, out_dir / "summary.json")
    return summary
