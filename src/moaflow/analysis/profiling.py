"""Image-based profiling scores: treatment profiles from network features, and 1-nearest-neighbour MoA
accuracy "not same compound" (NSC) and "not same compound or batch" (NSCB).

Sources of features:

* each trained fold's model embeds the crops of the compound it held out (the
  pooled features before the classifier), so no treatment is embedded by a
  model that saw it in training;
* "ImageNet features, no training": the same architectures with their
  ImageNet weights, untouched, embed every crop.

Profiles are the mean (or median) of a well's crops, then of a treatment's
wells. Optionally the crops' features are first normalised to the DMSO
(negative control) crops of their plate, embedded by the same model: centred
on the plate's DMSO mean (``dmso_center``), then also sphered, i.e. whitened
with the DMSO crops' within-plate covariance (``dmso_sphere``, the typical
variation normalisation of Ando et al. 2017 and DeepProfiler); or the
treatment profiles are standardised per feature (``standardize``). A treatment's
nearest neighbour (cosine distance) must come from another compound (NSC), and
for NSCB also from another batch; MoAs found in a single batch cannot be scored
under NSCB and are left out, with the count stated.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moaflow import layout
from moaflow.files import save_figure, write_json, write_table
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
        crops = pd.read_parquet(layout.fold_file(Path(models_dir) / fold, "test_predictions"))
        features = np.load(layout.fold_file(Path(models_dir) / fold, "test_embeddings"))
        if len(features) != len(crops):
            raise ValueError(f"{models_dir}/{fold}: {len(features)} embeddings for {len(crops)} held-out crops")
        frames.append(pd.concat([crops.drop(columns=[c for c in crops if c.startswith("p_")]).assign(fold=fold),
                                 pd.DataFrame(features, columns=[f"f_{i}" for i in range(features.shape[1])])],
                                axis=1))
    frame = pd.concat(frames, ignore_index=True)
    log(f"{models_dir}: {len(frame)} held-out crops of {len(folds)} folds, {features.shape[1]} features")
    return frame


def imagenet_feature_model(architecture: str, weights: str | os.PathLike, input_size: int, *, channel_order: str,
                           input_scaling: str, channel_adapter: str = "replicate", channels: int = 3):
    """The architecture's ImageNet weights, untrained, from uint8 crops of ``channels`` channels to pooled features.

    ``channel_order``, ``input_scaling`` and ``channel_adapter`` are the run's hyper-parameters (``pretrained``:
    the scaling the weights were trained on), so these features see the crops as the trained networks do.
    """
    from moaflow.learn.models import build_model, embedding_model

    return embedding_model(build_model(architecture, input_size, 2, weights=str(weights), augmentation=False,
                                       channel_order=channel_order, input_scaling=input_scaling,
                                       channel_adapter=channel_adapter, channels=channels))


def embed(model, index: pd.DataFrame, store) -> pd.DataFrame:
    """``index`` with the features ``model`` gives every crop of ``store`` (``f_0 ... f_k``)."""
    from moaflow.learn.feeder import predict

    features = predict(model, store, np.arange(len(index)))
    return pd.concat([index.reset_index(drop=True),
                      pd.DataFrame(features, columns=[f"f_{i}" for i in range(features.shape[1])])], axis=1)


def control_statistics(features: np.ndarray, plates) -> dict[str, np.ndarray]:
    """What normalising to the DMSO crops needs: each plate's mean and the pooled within-plate covariance.

    Parameters
    ----------
    features : ndarray (N, D)
        The DMSO crops' features, from one model.
    plates : array-like of str, length N
        Each crop's plate.

    Returns
    -------
    statistics : dict
        ``plates`` (P,), ``means`` (P, D) float64 and ``covariance`` (D, D)
        float64 (of the features centred on their plate's mean, divided by N - P); or, with fewer crops than
        features (five channels' concatenated features, ``per_channel``), ``factor`` (N, D) instead, those
        centred features divided by sqrt(N - P), whose Gram matrix is the covariance: smaller, and it spheres
        exactly without a D x D eigendecomposition (`sphere_to_controls`).
    """
    features = np.asarray(features, dtype=np.float64)
    plates = np.asarray(plates).astype(str)
    if len(features) != len(plates) or len(features) == 0:
        raise ValueError(f"{len(features)} DMSO feature rows for {len(plates)} plate labels; expected as many, "
                         f"and at least one")
    names, position = np.unique(plates, return_inverse=True)
    means = np.stack([features[position == k].mean(0) for k in range(len(names))])
    centred = features - means[position]
    scale = max(len(features) - len(names), 1)
    if len(features) < features.shape[1]:
        return {"plates": names, "means": means, "factor": centred / np.sqrt(scale)}
    return {"plates": names, "means": means, "covariance": centred.T @ centred / scale}


def sphering_matrix(covariance: np.ndarray, regularisation: float) -> np.ndarray:
    """ZCA whitening ``V diag(1 / sqrt(lambda + epsilon)) V^T`` of a covariance.

    ``epsilon`` is ``regularisation`` times the mean eigenvalue: it keeps
    directions along which the DMSO crops barely vary from being amplified
    without bound (with 0 the sphered controls have exactly the identity
    covariance, and a singular covariance is an error).
    """
    if regularisation < 0:
        raise ValueError(f"regularisation={regularisation}: expected >= 0")
    eigenvalues, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
    eigenvalues = np.clip(eigenvalues, 0, None)
    floor = eigenvalues + regularisation * eigenvalues.mean()
    if floor.min() <= 0:
        raise ValueError("the DMSO covariance is singular (fewer DMSO crops than features, or constant "
                         "features): sphering needs profiling.sphering_regularisation > 0")
    return (vectors / np.sqrt(floor)) @ vectors.T


def center_on_controls(features: np.ndarray, plates, statistics: dict, regularisation: float = 0.0) -> np.ndarray:
    """Each row minus its plate's DMSO mean (``dmso_center``).

    Parameters
    ----------
    features : ndarray (N, D)
    plates : array-like of str, length N
        Each row's plate; every one must have DMSO statistics.
    statistics : dict
        From `control_statistics` of the same model's DMSO features.
    regularisation : float
        Unused (the signature every control normalisation shares).
    """
    plates = np.asarray(plates).astype(str)
    names = np.asarray(statistics["plates"]).astype(str)
    missing = sorted(set(plates) - set(names))
    if missing:
        raise ValueError(f"no DMSO crops for plate(s) {', '.join(missing)}: cannot normalise their crops to DMSO")
    return np.asarray(features, dtype=np.float64) - statistics["means"][np.searchsorted(names, plates)]


def sphere_to_controls(features: np.ndarray, plates, statistics: dict, regularisation: float) -> np.ndarray:
    """`center_on_controls`, then whitened with `sphering_matrix` of the DMSO covariance (``dmso_sphere``).

    From a covariance's ``factor`` (F, with covariance F^T F, of rank r < D) the same whitening is applied
    without forming it: with F = U S V^T, the eigenvalues are S^2 on V's columns and 0 elsewhere, so
    ``x W = x / sqrt(epsilon) + (x V) (1 / sqrt(S^2 + epsilon) - 1 / sqrt(epsilon)) V^T``.
    """
    centred = center_on_controls(features, plates, statistics)
    if "covariance" in statistics:
        return centred @ sphering_matrix(statistics["covariance"], regularisation)
    if regularisation <= 0:
        raise ValueError("the DMSO covariance is singular (fewer DMSO crops than features): sphering needs "
                         "profiling.sphering_regularisation > 0")
    factor = np.asarray(statistics["factor"], dtype=np.float64)
    _, singular, vt = np.linalg.svd(factor, full_matrices=False)
    eigenvalues = singular ** 2
    epsilon = regularisation * eigenvalues.sum() / factor.shape[1]   # times the mean of all D eigenvalues
    if epsilon <= 0:
        raise ValueError("the DMSO features are constant: they cannot be sphered")
    gain = 1 / np.sqrt(eigenvalues + epsilon) - 1 / np.sqrt(epsilon)
    return centred / np.sqrt(epsilon) + ((centred @ vt.T) * gain) @ vt


def standardize(values: np.ndarray) -> np.ndarray:
    """Each column centred and scaled over all rows (treatment profiles, ``standardize``)."""
    return (values - values.mean(0)) / np.where(values.std(0) > 0, values.std(0), 1)


@dataclass(frozen=True)
class FeatureNormalisation:
    """One way to normalise network features before profiles are compared (``profiling.feature_normalisation``).

    Attributes
    ----------
    description : str
        In words, for the literature table and the report; ``{regularisation}`` is filled in.
    controls : callable, optional
        ``controls(features, plates, statistics, regularisation)``: applied to every crop's features
        with the DMSO statistics of its plate, embedded by the same model (it needs the DMSO crops).
    profiles : callable, optional
        ``profiles(values)``: applied to the treatment profiles.
    """

    description: str
    controls: Callable | None = None
    profiles: Callable | None = None

    @property
    def needs_controls(self) -> bool:
        return self.controls is not None


#: The feature normalisations by name: add one here (and its test).
FEATURE_NORMALISATIONS = {
    "none": FeatureNormalisation("none"),
    "standardize": FeatureNormalisation("standardize (each feature over all treatments)", profiles=standardize),
    "dmso_center": FeatureNormalisation("dmso_center (crops centred on their plate's DMSO crops)",
                                        controls=center_on_controls),
    "dmso_sphere": FeatureNormalisation("dmso_sphere (crops centred on their plate's DMSO crops, then sphered with "
                                        "the DMSO covariance, regularisation {regularisation:g})",
                                        controls=sphere_to_controls),
}


def normalisation_method(name: str) -> FeatureNormalisation:
    """The registered feature normalisation ``name``, or an error naming the registered ones."""
    if name not in FEATURE_NORMALISATIONS:
        raise ValueError(f"feature_normalisation={name!r}: expected one of {', '.join(FEATURE_NORMALISATIONS)}")
    return FEATURE_NORMALISATIONS[name]


def control_embeddings(models_dir: str | os.PathLike, folds: pd.DataFrame, index: pd.DataFrame, store,
                       output: str | os.PathLike, *, log=stderr) -> None:
    """Embed the DMSO crops with every fold's trained model and keep what normalising needs.

    Each fold's model embeds its held-out crops (`fold_embeddings`), so the DMSO
    crops must be embedded by that same model for the two to share a feature
    space. Only `control_statistics` are kept per fold (the plates' means and
    the covariance or its factor, float32), in the fold's own folder
    (``<models_dir>/<fold>/dmso_statistics.npz``, `moaflow.layout.FOLD_FILES`) with the fingerprint of the
    model and of the crops' pixels they came from. ``output`` (JSON, written atomically, last) names each
    fold's file and fingerprint; `read_control_statistics` reads the statistics through it.

    A fold whose file carries the same fingerprint is kept, not embedded again: a job stopped part-way (a
    cluster's time limit: 38 folds each embed every DMSO crop) continues where it stopped, and a job rerun
    because its inputs were rewritten with the same content (one plate's crops redone, every training job
    keeping its folds) embeds nothing. The statistics exist once, beside the model they came from.
    """
    import keras

    from moaflow.learn.feeder import predict
    from moaflow.learn.models import embedding_model, load_model

    started, embedded = time.monotonic(), 0
    names, crops = list(folds["fold"]), _crops_fingerprint(index, store)
    entries, plates = [], None
    for n, fold in enumerate(names, 1):
        path = layout.fold_file(Path(models_dir) / fold, "model")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: fold {fold}'s trained model is missing (its training job has not "
                                    f"finished)")
        part = layout.fold_file(Path(models_dir) / fold, "dmso_statistics")
        fingerprint = _control_fingerprint(path, crops)
        statistics = _kept_statistics(part, fingerprint)
        if statistics is None:
            features = predict(embedding_model(load_model(path)), store, np.arange(len(index)))
            statistics = control_statistics(features, index["plate"])
            keras.backend.clear_session()   # one model at a time in memory
            _write_fold_statistics(part, statistics, fingerprint)
            embedded += 1
            done = "embedded"
        else:
            done = "kept (same model and crops)"
        plates = statistics["plates"]
        entries.append({"fold": fold, "statistics": os.path.relpath(part, Path(output).parent),
                        "fingerprint": fingerprint})
        eta = (time.monotonic() - started) / max(embedded, 1) * (len(names) - n) if embedded else 0
        log(f"{models_dir}: fold {n}/{len(names)} ({fold}): {len(index)} DMSO crops of {len(plates)} plate(s) "
            f"{done}, ETA {eta:.0f} s")
    write_json({"crops": crops, "folds": entries}, output)
    log(f"{models_dir}: DMSO statistics of {len(names)} fold(s): {embedded} embedded, {len(names) - embedded} kept")


def _write_fold_statistics(path: Path, statistics: dict[str, np.ndarray], fingerprint: str) -> None:
    """One fold's statistics with their fingerprint, atomically; the covariance or its factor as float32
    (38 folds of 2048 x 2048 are 0.64 GB so; `sphering_matrix` works in float64)."""
    from moaflow.files import atomic_path

    spread = {key: statistics[key].astype(np.float32) for key in ("covariance", "factor") if key in statistics}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, fingerprint=fingerprint, plates=statistics["plates"], means=statistics["means"], **spread)


def _crops_fingerprint(index: pd.DataFrame, store) -> str:
    """The DMSO crops' identity: their plates and every pixel (a digest of the store's bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\n".join(index["plate"].astype(str)).encode())
    for start in range(0, len(store), 4096):   # a memory-mapped store is read in pieces
        digest.update(np.ascontiguousarray(store[start:start + 4096]).tobytes())
    return f"{len(index)}:{digest.hexdigest()}"


def _control_fingerprint(model: Path, crops: str) -> str:
    """What one fold's DMSO statistics depend on: its model file (size, modification time: only training
    writes it, and a training job that keeps a fold leaves it untouched) and the crops."""
    stat = model.stat()
    return f"{model.name}:{stat.st_size}:{stat.st_mtime_ns}:{crops}"


def _kept_statistics(part: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """A fold's statistics from an earlier run, if they came from the same model and crops."""
    if not part.is_file():
        return None
    with np.load(part) as data:
        if str(data["fingerprint"]) != fingerprint:
            return None
        return {key: data[key] for key in ("plates", "means", "covariance", "factor") if key in data}


def embed_controls(models_dir: str | os.PathLike, folds: str | os.PathLike, index: str | os.PathLike,
                   store: str | os.PathLike, output: str | os.PathLike, *, gpus: int, allow_cpu: bool,
                   log=stderr) -> None:
    """Embed the DMSO crops with every fold's trained model (`control_embeddings`): the embed_controls rule.

    Parameters
    ----------
    models_dir : path
        One trained network's folder (``results/<dataset>/models/<architecture>/<init>/seed-<n>``).
    folds : path
        The checked folds.
    index, store : path
        The DMSO crops' index and their store at the architecture's input size.
    output : path
        ``.npz`` of per-fold DMSO statistics.
    gpus, allow_cpu
        As the training job's (`moaflow.learn.devices.check_devices`).
    """
    from moaflow.learn.devices import check_devices, prepare_environment

    prepare_environment(gpus)
    check_devices(gpus, allow_cpu, log)
    from moaflow.learn.feeder import open_store
    from moaflow.learn.folds import read_folds

    control_embeddings(models_dir, read_folds(folds), pd.read_parquet(index), open_store(store, log=log), output,
                       log=log)


def read_control_statistics(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """`control_embeddings`'s folds as fold name -> `control_statistics`, each checked against the fingerprint
    ``path`` recorded: a fold's file rewritten since, or its model trained again, is an error naming the file
    (a change of the DMSO crops reruns the embed_controls job: its store is an input)."""
    path = Path(path)
    manifest = json.loads(path.read_text())
    statistics = {}
    for entry in manifest["folds"]:
        part = path.parent / entry["statistics"]
        model = layout.fold_file(part.parent, "model")
        current = _control_fingerprint(model, manifest["crops"]) if model.is_file() else None
        kept = _kept_statistics(part, entry["fingerprint"]) if current == entry["fingerprint"] else None
        if kept is None:
            state = "are missing" if not part.is_file() else "now come from another model or other DMSO crops"
            raise ValueError(f"{part}: fold {entry['fold']}'s DMSO statistics {state} ({path} records fingerprint "
                             f"{entry['fingerprint']}); run the embed_controls job again")
        statistics[entry["fold"]] = kept
    return statistics


def treatment_profiles(crops: pd.DataFrame, *, statistic: str) -> pd.DataFrame:
    """Well profiles (the ``statistic`` of a well's crops), then treatment profiles (of its wells).

    Parameters
    ----------
    statistic : {"mean", "median"}

    Returns
    -------
    profiles : pandas.DataFrame
        One row per treatment: compound, concentration, moa, the batches its wells came from
        (``batches``, ``;``-separated) and the features.
    """
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic={statistic!r}: expected 'mean' or 'median'")
    features = feature_columns(crops)
    # Features and labels aggregated apart: one wide aggregation of thousands of columns fragments the frame.
    by_well = crops.groupby(TREATMENT_KEYS + WELL_KEYS)
    wells = pd.concat([by_well[["moa", "batch"]].first(), by_well[features].agg(statistic)], axis=1).reset_index()
    by_treatment = wells.groupby(TREATMENT_KEYS)
    profiles = pd.concat([by_treatment["moa"].first(),
                          by_treatment["batch"].agg(lambda b: ";".join(sorted(set(map(str, b))))).rename("batches"),
                          by_treatment[features].agg(statistic)], axis=1).reset_index()
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


def _trained_sources(dataset, networks, seed, folds, method, controls, regularisation, root, log):
    """(source, crop features) of each trained network, each fold's crops normalised with its own statistics."""
    for architecture, init in networks:
        source = f"{architecture}/{init}"
        crops = fold_embeddings(layout.seed_dir(dataset, architecture, init, seed, root), folds, log)
        if method.needs_controls:
            crops = _normalised_to_controls(crops, read_control_statistics(controls[source]), method,
                                            regularisation, source, log)
        yield source, crops


def _imagenet_sources(index, stores, imagenet_weights, inputs, method, control_index, control_stores,
                      regularisation, log):
    """(source, crop features) of each architecture's untrained ImageNet weights (one model embeds every crop,
    the DMSO crops included)."""
    from moaflow.learn.feeder import open_store, predict

    for architecture, weights in imagenet_weights.items():
        source = f"{architecture}/imagenet features"
        store = open_store(stores[architecture], log=log)
        model = imagenet_feature_model(architecture, weights, store.shape[1], channels=store.shape[-1],
                                       **inputs[architecture])
        crops = embed(model, index, store)
        log(f"ImageNet features of {architecture}: {len(index)} crops")
        if method.needs_controls:
            dmso = predict(model, open_store(control_stores[architecture], log=log), np.arange(len(control_index)))
            log(f"ImageNet features of {architecture}: {len(control_index)} DMSO crops")
            crops = _normalised_to_controls(crops, {None: control_statistics(dmso, control_index["plate"])}, method,
                                            regularisation, source, log)
        yield source, crops


def score_sources(sources, *, statistic: str, method: FeatureNormalisation, log=stderr):
    """Treatment profiles and NSC/NSCB of each source: (scores rows, profiles by source, matches)."""
    rows, profiles, all_matches = [], {}, []
    for source, crops in sources:
        broken = int((~np.isfinite(crops[feature_columns(crops)].to_numpy())).any(axis=1).sum())
        if broken:
            # A NaN distance would pick an arbitrary neighbour: stop instead of scoring noise.
            raise ValueError(f"{source}: {broken} of {len(crops)} crops have non-finite (NaN or inf) features")
        frame = treatment_profiles(crops, statistic=statistic)
        if method.profiles is not None:
            features = feature_columns(frame)
            frame[features] = method.profiles(frame[features].to_numpy())
        profiles[source] = frame
        for name, not_same_batch in (("NSC", False), ("NSCB", True)):
            matches, counts = nearest_neighbour_moa(frame, not_same_batch=not_same_batch)
            accuracy = float(matches["correct"].mean()) if len(matches) else float("nan")
            rows.append({"source": source, "score": name, "accuracy_percent": 100 * accuracy, **counts,
                         "left_out_moas": ", ".join(counts["left_out_moas"])})
            all_matches.append(matches.assign(source=source, score=name))
            log(f"{source}: {name} {100 * accuracy:.1f} % over {counts['scored']} treatments"
                + (f" ({len(counts['left_out_moas'])} MoA(s) in a single batch left out)"
                   if counts["left_out_moas"] else ""))
    return rows, profiles, all_matches


def profile_dataset(dataset: str, folds: str | os.PathLike, index: str | os.PathLike, stores: dict,
                    networks: list[list[str]], out_dir: str | os.PathLike, *, seed: int,
                    statistic: str, feature_normalisation: str, sphering_regularisation: float, inputs: dict,
                    imagenet_weights: dict | None = None, controls: dict | None = None,
                    control_index: str | os.PathLike | None = None, control_stores: dict | None = None,
                    root: str = layout.ROOT, log=stderr) -> dict:
    """Embeddings, treatment profiles, NSC/NSCB per source, the literature table and the map (the rule).

    Parameters
    ----------
    dataset : str
        The dataset's name (the layout's folders, the tables' captions).
    folds, index : path
        The checked folds and the crop index.
    stores : dict
        Architecture -> its crop store (the ImageNet sources embed every crop).
    networks : list of (architecture, initialisation)
        The trained networks; their held-out crops' features are read from each fold's folder.
    out_dir : path
        ``nsc_nscb.csv``, ``matches.csv``, ``literature.csv``, ``profile_map.png``, ``summary.json``.
    seed : int
        Which seed's networks.
    statistic : {"mean", "median"}
        Of a well's crops, then of a treatment's wells.
    feature_normalisation : str
        A name of `FEATURE_NORMALISATIONS`.
    sphering_regularisation : float
        See `sphering_matrix`.
    inputs : dict
        Architecture -> ``{"channel_order", "input_scaling", "channel_adapter"}`` (the run's hyper-parameters),
        for the ImageNet sources.
    imagenet_weights : dict, optional
        Architecture -> its ImageNet weights file: adds the "ImageNet features, no training" source.
    controls : dict, optional
        With a normalisation that needs DMSO: source (``architecture/init``) -> its `control_embeddings` file.
    control_index : path, optional
        The DMSO crops' index.
    control_stores : dict, optional
        Architecture -> its DMSO crop store (for the ImageNet sources).
    """
    from moaflow.learn import folds as folds_module

    method = normalisation_method(feature_normalisation)
    if method.needs_controls:
        _check_controls(networks, imagenet_weights or {}, controls or {}, control_index, control_stores or {},
                        feature_normalisation)
    fold_table = folds_module.read_folds(folds)
    crop_index = pd.read_parquet(index)
    dmso_index = pd.read_parquet(control_index) if method.needs_controls else None
    sources = [*_trained_sources(dataset, networks, seed, fold_table, method, controls or {},
                                 sphering_regularisation, root, log),
               *_imagenet_sources(crop_index, stores, imagenet_weights or {}, inputs, method, dmso_index,
                                  control_stores or {}, sphering_regularisation, log)]
    rows, profiles, matches = score_sources(sources, statistic=statistic, method=method, log=log)
    return _write_profiling(dataset, rows, profiles, matches, out_dir, statistic=statistic,
                            normalisation=feature_normalisation, regularisation=sphering_regularisation)


def _check_controls(networks, imagenet_weights, controls, control_index, control_stores, name) -> None:
    """A normalisation to DMSO needs each network's DMSO statistics, the DMSO crops' index and, for the ImageNet
    sources, the DMSO crop stores: name what is missing."""
    missing = [f"the DMSO statistics of {a}/{i} (controls)" for a, i in networks if f"{a}/{i}" not in controls]
    if control_index is None:
        missing.append("the DMSO crops' index (control_index)")
    missing += [f"the DMSO crops of {a} (control_stores)" for a in imagenet_weights if a not in control_stores]
    if missing:
        raise ValueError(f"feature_normalisation {name} needs {' and '.join(missing)}")


def describe_normalisation(normalisation: str, regularisation: float) -> str:
    """The feature normalisation in words (the literature table and the report name it)."""
    return normalisation_method(normalisation).description.format(regularisation=regularisation)


def _write_profiling(dataset, rows, profiles, matches, out_dir, *, statistic, normalisation, regularisation) -> dict:
    """The scores, matches, literature table, profile map and summary, into ``out_dir``."""
    out_dir = Path(out_dir)
    scores = pd.DataFrame(rows).assign(normalisation=normalisation)
    write_table(scores, out_dir / "nsc_nscb.csv")
    write_table(pd.concat(matches, ignore_index=True), out_dir / "matches.csv")
    ours = scores.pivot_table(index="source", columns="score", values="accuracy_percent").reset_index()
    setting = describe_normalisation(normalisation, regularisation)
    table = pd.concat([literature(), pd.DataFrame({"method": "this run: " + ours["source"],
                                                   "nsc_percent": ours.get("NSC"), "nscb_percent": ours.get("NSCB"),
                                                   "source": f"moaflow, {dataset}, profiles: {statistic} per well "
                                                             f"then treatment, normalisation {setting}"})],
                      ignore_index=True)
    write_table(table, out_dir / "literature.csv")
    plot_profile_map(profiles, out_dir / "profile_map.png")
    settings = {"statistic": statistic, "normalisation": normalisation}
    if normalisation_method(normalisation).needs_controls:
        settings["sphering_regularisation"] = regularisation
    summary = {"dataset": dataset, "profiles": settings, "profiling": {r["source"]: {} for r in rows}}
    for r in rows:
        summary["profiling"][r["source"]][r["score"]] = r["accuracy_percent"]
    write_json(summary, out_dir / "summary.json")
    return summary


def _normalised_to_controls(crops: pd.DataFrame, statistics: dict, method: FeatureNormalisation,
                            regularisation: float, source: str, log=stderr) -> pd.DataFrame:
    """``method.controls`` per fold: each fold's crops with its own model's DMSO statistics (``None``: one model
    embedded every crop)."""
    log(f"{source}: features normalised to the DMSO crops of their plate, {method.description.format(regularisation=regularisation)}")
    features = feature_columns(crops)
    values = np.array(crops[features], dtype=np.float64)   # a writable copy
    if None in statistics:
        parts = [(np.ones(len(crops), bool), statistics[None])]
    else:
        folds = crops["fold"].to_numpy()
        missing = sorted(set(folds) - set(statistics))
        if missing:
            raise ValueError(f"fold(s) {', '.join(missing)}: no DMSO statistics in the control embeddings file")
        parts = [(folds == fold, statistics[fold]) for fold in pd.unique(folds)]
    for rows, fold_statistics in parts:
        values[rows] = method.controls(values[rows], crops.loc[rows, "plate"], fold_statistics, regularisation)
    return pd.concat([crops.drop(columns=features), pd.DataFrame(values, columns=features, index=crops.index)],
                     axis=1)
