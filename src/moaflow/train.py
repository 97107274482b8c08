"""Train one (dataset, architecture, initialisation, fold): Keras 3 only, resumable.

Every epoch ends with a checkpoint (model with optimizer state, and the history
so far) in a folder outside the job's declared outputs; a rerun after a kill
resumes from the last finished epoch and ends with the full history. After
each epoch the held-out test compound is evaluated too (the paper's figure 4).

Outputs (written atomically, all at the end): ``model.keras``, ``history.tsv``,
``test_predictions.parquet``, ``validation_predictions.parquet`` and
``run.json`` (parameters, classes, counts, timings) which the tracking rule
sends to MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from moaflow import folds as folds_module

#: Named hyper-parameter sets. "final": the authors' final commit; "published": the
#: settings just before it (likely behind the published numbers, not confirmed).
BASE = {
    "epochs": 10, "batch_size": 8, "optimizer": "sgd", "learning_rate": 1e-4, "momentum": 0.9,
    "schedule": "constant", "warmup_epochs": 0, "class_weights": True, "augmentation": True,
    "mixed_precision": False, "channel_order": "reversed", "input_scaling": "raw", "head": "softmax",
    "steps_per_epoch": None, "run_eagerly": False, "workers": 1,
}
PRESETS = {
    "final": {},
    "published": {
        "resnet50": {"epochs": 5, "batch_size": 32, "learning_rate": 5e-4},
        "inception_v3": {"epochs": 7, "batch_size": 32, "learning_rate": 5e-4},
        "inception_resnet_v2": {"epochs": 5, "batch_size": 32, "learning_rate": 1e-3},
    },
    "bbbc014": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "class_weights": False,
                "augmentation": False, "channel_order": "stored", "head": "sigmoid"},
    "lab": {"epochs": 30, "batch_size": 32, "optimizer": "adam", "learning_rate": 1e-3, "class_weights": False,
            "augmentation": False, "channel_order": "stored", "input_scaling": "unit"},
}


def hyperparameters(preset: str, architecture: str, overrides: dict | None = None) -> dict:
    """The preset's values for ``architecture``, then ``overrides`` (config), over `BASE`."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    values = dict(BASE)
    chosen = PRESETS[preset]
    values.update(chosen.get(architecture, {}) if any(isinstance(v, dict) for v in chosen.values()) else chosen)
    unknown = sorted(set(overrides or {}) - set(BASE))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown}; expected some of {sorted(BASE)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return values


def _atomic_json(data, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def _optimizer(hyper: dict, steps_per_epoch: int):
    import keras

    rate = hyper["learning_rate"]
    if hyper["schedule"] == "warmup_cosine":
        total = max(1, hyper["epochs"] * steps_per_epoch)
        warmup = min(total - 1, hyper["warmup_epochs"] * steps_per_epoch)
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=rate * 0.01, decay_steps=max(1, total - warmup),
            warmup_target=rate, warmup_steps=warmup)
    elif hyper["schedule"] != "constant":
        raise ValueError(f"schedule={hyper['schedule']!r}: expected 'constant' or 'warmup_cosine'")
    if hyper["optimizer"] == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=hyper["momentum"])
    if hyper["optimizer"] == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    raise ValueError(f"optimizer={hyper['optimizer']!r}: expected 'sgd' or 'adam'")


def _callbacks(test_set, checkpoint_dir: Path, history: list[dict], epochs: int, log: Callable[[str], None]):
    import keras

    class HeldOutAndCheckpoint(keras.callbacks.Callback):
        """Evaluate the held-out set, then checkpoint model + history, atomically, every epoch."""

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            if test_set is not None:
                result = self.model.evaluate(test_set, verbose=0, return_dict=True)
                logs.update({f"test_{k}": v for k, v in result.items()})
            logs["seconds"] = time.monotonic() - self.started
            history.append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}})
            tmp = checkpoint_dir / "model.tmp.keras"
            self.model.save(tmp)
            os.replace(tmp, checkpoint_dir / "model.keras")
            _atomic_json({"epochs_done": epoch + 1, "history": history}, checkpoint_dir / "state.json")
            eta = np.mean([h["seconds"] for h in history]) * (epochs - epoch - 1)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "seconds")
            log(f"epoch {epoch + 1}/{epochs}: {shown} ({logs['seconds']:.1f} s, ETA {eta:.0f} s)")

    return [HeldOutAndCheckpoint()]


def train_fold(
    store_path: str | os.PathLike,
    index_path: str | os.PathLike,
    folds_path: str | os.PathLike,
    fold: str,
    *,
    architecture: str,
    weights: str | None,
    hyper: dict,
    seed: int,
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    dataset: str = "",
    init: str = "",
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Train, checkpointing every epoch, and write the fold's outputs.

    Parameters
    ----------
    store_path, index_path : path
        The crop store of the architecture's input size and its index.
    folds_path : path
        The folds file; ``fold`` names a row.
    architecture, weights
        See `moaflow.models.build_model`.
    hyper : dict
        From `hyperparameters`.
    seed : int
        Seeds Python, NumPy and the backend (``keras.utils.set_random_seed``),
        the batch order and the augmentation.
    out_dir : path
        Receives the outputs listed in the module docstring.
    checkpoint_dir : path
        Per-epoch checkpoints; a run finding one resumes from it.
    dataset, init : str
        Recorded in ``run.json`` for tracking.

    Returns
    -------
    history : pandas.DataFrame
        One row per epoch.
    """
    store = np.load(store_path, mmap_mode="r")
    index = pd.read_parquet(index_path)
    if len(store) != len(index):
        raise ValueError(f"{store_path}: {len(store)} crops but {index_path} has {len(index)} rows")
    table = folds_module.read_folds(folds_path)
    rows = table[table["fold"] == fold]
    if rows.empty:
        raise ValueError(f"{folds_path}: no fold named {fold!r}")
    fold_row = rows.iloc[0].to_dict()
    if hyper["head"] == "softmax":
        classes = sorted(index["moa"].unique())
        labels = index["moa"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    else:
        classes = ["negative", "positive"]
        labels = index["label"].to_numpy().astype(int)
    return fit_and_save(
        store, index, labels, classes, folds_module.split(index, fold_row), architecture=architecture,
        weights=weights, hyper=hyper, seed=seed, out_dir=out_dir, checkpoint_dir=checkpoint_dir, log=log,
        record={"dataset": dataset, "init": init, "fold": fold, "test_group": fold_row["test_group"],
                "validation_groups": fold_row["validation_groups"]})


def train_folder(
    root: str | os.PathLike,
    *,
    architecture: str,
    input_size: int,
    hyper: dict,
    weights: str | None = None,
    validation_fraction: float = 0.25,
    seed: int = 0,
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Train on a class-per-folder image set (``root/<class>/<image>``), like the lab's data,
    with a seeded, class-stratified validation split. Same outputs as `train_fold`."""
    from moaflow.datasets import folder_dataset

    images, labels, classes, validation = folder_dataset(root, input_size, validation_fraction=validation_fraction,
                                                         seed=seed)
    index = pd.DataFrame({"crop_id": np.arange(len(labels)), "moa": [classes[i] for i in labels]})
    train_rows = np.setdiff1d(np.arange(len(labels)), validation)
    parts = {"train": train_rows, "validation": validation, "test": np.zeros(0, dtype=int)}
    return fit_and_save(images, index, labels, classes, parts, architecture=architecture, weights=weights,
                        hyper=hyper, seed=seed, out_dir=out_dir,
                        checkpoint_dir=checkpoint_dir or Path(out_dir) / "checkpoint", log=log,
                        record={"dataset": str(root), "init": "", "fold": "folder", "test_group": "",
                                "validation_groups": f"{len(validation)} images"})


def fit_and_save(
    store,
    index: pd.DataFrame,
    labels: np.ndarray,
    classes: list[str],
    parts: dict[str, np.ndarray],
    *,
    architecture: str,
    weights: str | None,
    hyper: dict,
    seed: int,
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    record: dict,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Build (or resume), fit, predict and write the outputs for one split of ``store``.

    ``store`` is an (N, S, S, 3) uint8 array (memory-mapped or not), ``labels``
    integer classes per row, ``parts`` the ``train``/``validation``/``test``
    row positions; ``record`` goes into ``run.json``.
    """
    import keras

    from moaflow.datasets import CropBatches, class_weights
    from moaflow.models import build_model

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    if hyper["mixed_precision"]:
        keras.config.set_dtype_policy("mixed_float16")
    if hyper["head"] == "softmax":
        targets = np.eye(len(classes), dtype=np.float32)[labels]
        loss = "categorical_crossentropy"
    else:
        targets = labels.astype(np.float32)[:, None]
        loss = "binary_crossentropy"
    train_rows = parts["train"]
    sample_weights = None
    if hyper["class_weights"]:
        sample_weights = class_weights(labels[train_rows], len(classes))[labels[train_rows]]

    common = dict(channel_order=hyper["channel_order"], workers=hyper["workers"])
    train_set = CropBatches(store, train_rows, targets[train_rows], hyper["batch_size"], shuffle=True, seed=seed,
                            weights=sample_weights, max_batches=hyper["steps_per_epoch"], **common)
    val_set, test_set = (CropBatches(store, parts[k], targets[parts[k]], hyper["batch_size"], **common)
                         if len(parts[k]) else None for k in ("validation", "test"))

    state_path = checkpoint_dir / "state.json"
    history: list[dict] = []
    initial_epoch = 0
    if state_path.exists() and (checkpoint_dir / "model.keras").exists():
        state = json.loads(state_path.read_text())
        history, initial_epoch = state["history"], state["epochs_done"]
        model = keras.models.load_model(checkpoint_dir / "model.keras")
        log(f"resuming from the checkpoint after epoch {initial_epoch}")
    else:
        model = build_model(architecture, store.shape[1], len(classes), weights=weights, head=hyper["head"],
                            augmentation=hyper["augmentation"], input_scaling=hyper["input_scaling"], seed=seed)
        model.compile(optimizer=_optimizer(hyper, len(train_set)), loss=loss, metrics=["accuracy"],
                      run_eagerly=hyper["run_eagerly"])
    log(f"{architecture} {record.get('fold', '')}: {len(train_rows)} training, {len(parts['validation'])} "
        f"validation, {len(parts['test'])} test images; {len(classes)} classes; input {store.shape[1]}")
    started = time.monotonic()
    if initial_epoch < hyper["epochs"]:
        train_set.set_epoch(initial_epoch)
        model.fit(train_set, validation_data=val_set, epochs=hyper["epochs"], initial_epoch=initial_epoch,
                  callbacks=_callbacks(test_set, checkpoint_dir, history, hyper["epochs"], log), verbose=0)
    seconds = time.monotonic() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {}
    for name, batches in (("test", test_set), ("validation", val_set)):
        positions = parts[name]
        probabilities = (model.predict(batches, verbose=0) if batches is not None
                         else np.zeros((0, len(classes) if hyper["head"] == "softmax" else 1)))
        if hyper["head"] == "sigmoid":
            probabilities = np.concatenate([1 - probabilities, probabilities], axis=1)
        frame = index.iloc[positions].reset_index(drop=True).copy()
        frame.insert(0, "split", name)
        frame["true"] = [classes[i] for i in labels[positions]]
        for k, c in enumerate(classes):
            frame[f"p_{c}"] = probabilities[:, k].astype(np.float64)
        frames[name] = frame
    model_tmp = out_dir / "model.tmp.keras"
    model.save(model_tmp)
    for name, frame in frames.items():
        frame.to_parquet(out_dir / f"{name}_predictions.parquet.tmp", index=False)
    pd.DataFrame(history).to_csv(out_dir / "history.tsv.tmp", sep="\t", index=False)

    def accuracy(name):
        frame = frames[name]
        if frame.empty:
            return None
        return float(np.mean(frame[[f"p_{c}" for c in classes]].to_numpy().argmax(1) == labels[parts[name]]))

    run = {
        **record, "architecture": architecture, "weights": weights, "seed": seed, "hyperparameters": hyper,
        "classes": classes, "input_size": int(store.shape[1]), "n_train": int(len(train_rows)),
        "n_validation": int(len(parts["validation"])), "n_test": int(len(parts["test"])),
        "train_seconds": seconds, "backend": keras.backend.backend(), "keras_version": keras.__version__,
        "test_accuracy": accuracy("test"), "validation_accuracy": accuracy("validation"),
    }
    os.replace(model_tmp, out_dir / "model.keras")
    for name in frames:
        os.replace(out_dir / f"{name}_predictions.parquet.tmp", out_dir / f"{name}_predictions.parquet")
    os.replace(out_dir / "history.tsv.tmp", out_dir / "history.tsv")
    _atomic_json(run, out_dir / "run.json")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # done: the outputs supersede the checkpoint
    shown = run["test_accuracy"] if run["test_accuracy"] is not None else run["validation_accuracy"]
    log(f"done: {'held-out' if run['test_accuracy'] is not None else 'validation'} accuracy "
        f"{shown if shown is None else round(shown, 3)} after {len(history)} epochs")
    return pd.DataFrame(history)
