"""Where every output lives under ``results/``: the one place that spells a path.

The Snakemake rules and the package both call these functions, so a rule's
declared output and the file a stage function reads or writes cannot drift
apart. Each function takes its parts as strings: given Snakemake wildcards
(``"{dataset}"``) it returns the rule's pattern, given values the concrete path.
``root`` is the results folder (tests pass a temporary one).

A trained fold's folder holds `FOLD_FILES`; ``run.json`` is written last, so a
fold folder with it is complete.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The results folder, relative to the working directory (git-ignored).
ROOT = "results"
#: The receipt a verified download or extraction writes beside its data: the rule's declared output.
RECEIPT_SUFFIX = ".verified.json"
#: What one trained fold leaves in its folder (`fold_dir`), by role.
FOLD_FILES = {
    "model": "model.keras",
    "history": "history.tsv",
    "test_predictions": "test_predictions.parquet",
    "validation_predictions": "validation_predictions.parquet",
    "test_embeddings": "test_embeddings.npy",
    "test_occlusion": "test_occlusion.npz",
    "run": "run.json",
    # written later, by the DMSO embedding job (`moaflow.analysis.profiling.control_embeddings`): kept with
    # the model it came from, so a rerun that keeps the fold keeps them too
    "dmso_statistics": "dmso_statistics.npz",
}


def _join(*parts) -> str:
    return os.path.join(*map(str, parts))


def receipt(path) -> str:
    """The receipt of a verified file or folder (``<path>.verified.json``)."""
    return f"{path}{RECEIPT_SUFFIX}"


def data_of(receipt_path) -> str:
    """The file or folder a receipt describes: `receipt`'s inverse."""
    text = str(receipt_path)
    if not text.endswith(RECEIPT_SUFFIX):
        raise ValueError(f"{text}: not a receipt (expected a name ending in {RECEIPT_SUFFIX})")
    return text[: -len(RECEIPT_SUFFIX)]


# ------------------------------------------------------------------ data

def raw(dataset, filename, root=ROOT) -> str:
    """A downloaded file (metadata CSV, plate zip, BBBC014 archive)."""
    return _join(root, dataset, "raw", filename)


def plate_images(plate, root=ROOT) -> str:
    """The extracted TIFFs of one BBBC021 plate."""
    return _join(root, "bbbc021", "images", plate)


def images_dir(dataset, root=ROOT) -> str:
    """Extracted images: one folder per plate (BBBC021) or the image folder itself (BBBC014)."""
    return _join(root, dataset, "images")


def image_table(dataset, root=ROOT) -> str:
    """One row per field (BBBC021), well (BBBC014) or crop (a crops dataset)."""
    return _join(root, dataset, "images.parquet")


def illumination(plate, channel, root=ROOT) -> str:
    return _join(root, "bbbc021", "illumination", f"{plate}_{channel}.npy")


def illumination_figure(plate, root=ROOT) -> str:
    return _join(root, "bbbc021", "illumination", f"{plate}.png")


# ------------------------------------------------------------------ crop stores

def store_dir(dataset, kind="crops", root=ROOT) -> str:
    """A crop store's folder: ``crops`` (treatments) or ``dmso`` (BBBC021's negative controls)."""
    return _join(root, dataset, kind)


def store(dataset, size, kind="crops", root=ROOT) -> str:
    """The uint8 crops at one input size, (N, size, size, 3), memory-mappable."""
    return _join(store_dir(dataset, kind, root), f"{size}.npy")


def store_index(dataset, kind="crops", root=ROOT) -> str:
    """Row i describes crop i of every size's store."""
    return _join(store_dir(dataset, kind, root), "index.parquet")


def plate_part(plate, kind="crops", root=ROOT) -> str:
    """Prefix of one plate's crops before gathering (``<prefix>.<size>.npy``, ``<prefix>.index.parquet``)."""
    return _join(store_dir("bbbc021", kind, root), "plates", plate)


# ------------------------------------------------------------------ training

def generated_folds(dataset, root=ROOT) -> str:
    """Folds a crops dataset's rule generates from its metadata."""
    return _join(root, dataset, "folds.generated.tsv")


def folds(dataset, root=ROOT) -> str:
    """The folds checked against the crop index (what training reads)."""
    return _join(root, dataset, "folds.tsv")


def weights_dir(root=ROOT) -> str:
    return _join(root, "weights")


def weights(architecture, root=ROOT) -> str:
    """An architecture's ImageNet weights (notop), fetched or converted once."""
    return _join(weights_dir(root), f"{architecture}_notop.h5")


def seed_dir(dataset, architecture, init, seed, root=ROOT) -> str:
    """One trained network: every fold of (architecture, initialisation, seed)."""
    return _join(root, dataset, "models", architecture, init, f"seed-{seed}")


def fold_dir(dataset, architecture, init, seed, fold, root=ROOT) -> str:
    return _join(seed_dir(dataset, architecture, init, seed, root), fold)


def fold_file(folder, role: str) -> Path:
    """A file of a trained fold's folder by role (`FOLD_FILES`)."""
    return Path(folder) / FOLD_FILES[role]


def job_summary(dataset, architecture, init, seed, chunk, root=ROOT) -> str:
    """A training job's summary: the train rule's declared output."""
    return _join(seed_dir(dataset, architecture, init, seed, root), "jobs", f"{chunk}.json")


def checkpoints(dataset, architecture, init, seed, root=ROOT) -> str:
    """Per-fold checkpoints, outside the outputs so that a killed job's cleanup keeps them."""
    return _join(root, dataset, "checkpoints", architecture, init, f"seed-{seed}")


# ------------------------------------------------------------------ analysis

def evaluation(dataset, name="", root=ROOT) -> str:
    return _join(root, dataset, "evaluation", name) if name else _join(root, dataset, "evaluation")


def profiling(dataset, name="", root=ROOT) -> str:
    return _join(root, dataset, "profiling", name) if name else _join(root, dataset, "profiling")


def control_statistics(dataset, architecture, init, seed, root=ROOT) -> str:
    """Which DMSO statistics profiling reads, per fold (each fold's own file beside its model, and its
    fingerprint): the embed_controls rule's output."""
    return _join(root, dataset, "profiling", "controls", architecture, init, f"seed-{seed}.json")


def interpretation(dataset, architecture, init, root=ROOT) -> str:
    return _join(root, dataset, "interpretation", f"{architecture}_{init}.png")


def mlflow(name="", root=ROOT) -> str:
    return _join(root, "mlflow", name) if name else _join(root, "mlflow")


def log(stage, name, root=ROOT) -> str:
    """A job's log: progress lines and its one-line error."""
    return _join(root, "logs", stage, f"{name}.log")


def benchmark_folder(root=ROOT) -> str:
    return _join(root, "benchmarks")


def benchmark(rule, name, root=ROOT) -> str:
    """A job's cost record (Snakemake's ``benchmark:``: seconds, peak memory, I/O), by rule."""
    return _join(benchmark_folder(root), rule, f"{name}.tsv")


def resources(root=ROOT) -> str:
    """Every job's cost records gathered, per rule (the report's Resources)."""
    return _join(root, "resources.csv")


def disk_usage(root=ROOT) -> str:
    """The disk used under each results folder at the end of a run."""
    return _join(root, "disk_usage.csv")


def report(root=ROOT) -> str:
    return _join(root, "report.html")
