"""Training: one job trains one (dataset, architecture, initialisation, seed) on one or more folds.

Start-up is paid once per job: the framework import, the store read into memory
and the compilation of the training step (every batch has one shape). Between
folds the model and optimizer go back to their initial state, so a fold's
result does not depend on how folds were grouped into jobs.

Each fold writes its outputs atomically into its own folder (``run.json``
last): ``model.keras`` (inference model, no optimizer state, loads in plain
Keras), ``history.tsv``, ``test_predictions.parquet``,
``validation_predictions.parquet``, ``test_embeddings.npy`` (the held-out crops' pooled features, for profiling)
and ``test_occlusion.npz`` (occlusion maps of a few of them). A fold whose ``run.json`` carries the
same fingerprint (settings, data and code) is kept when a job reruns; a fold
killed mid-way resumes from its last checkpoint (model, optimizer, augmentation
state and history) under ``checkpoints/``, written at most every
``checkpoint_minutes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from moaflow.learn import folds as folds_module
from moaflow.errors import MoaflowError
from moaflow.files import atomic_path, replace_folder, restore_folder, write_array, write_json, write_table
from moaflow.logs import quiet_framework_startup, stderr
from moaflow.tracking import LiveRun, is_server, resolve_uri

#: Part of every fold's fingerprint: bump when a fold's outputs change meaning.
TRAINING_CODE_VERSION = 3
INSTALL_HINT = ("install a GPU build: pip install 'moaflow[tensorflow-cuda]' (TensorFlow), or "
                "pip install 'moaflow[jax-cuda]' and set KERAS_BACKEND=jax, or pip install 'moaflow[torch]' "
                "(CUDA wheels on Linux) and set KERAS_BACKEND=torch; or set training.allow_cpu: true to train "
                "on the CPU on purpose")


class DeviceError(MoaflowError):
    """A job that asked for a GPU sees none."""


class TrainingError(MoaflowError):
    """A fold's model gives unusable (non-finite) predictions."""


def visible_devices() -> list[dict]:
    """The devices the Keras backend sees: kind (cpu/gpu), name and memory (GiB, where the backend says)."""
    import keras

    backend = keras.backend.backend()
    devices = []
    if backend == "jax":
        import jax

        for d in jax.devices():
            kind = "gpu" if d.platform in ("gpu", "cuda", "rocm") else d.platform
            memory = None
            if kind == "gpu":
                stats = d.memory_stats() or {}
                memory = stats.get("bytes_limit")
            devices.append({"kind": kind, "name": d.device_kind, "memory_gb": memory and round(memory / 2**30, 1)})
    elif backend == "torch":
        import torch

        devices.append({"kind": "cpu", "name": "cpu", "memory_gb": None})
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"kind": "gpu", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    elif backend == "tensorflow":
        import tensorflow as tf

        for d in tf.config.list_physical_devices():
            name = d.name
            if d.device_type == "GPU":
                name = tf.config.experimental.get_device_details(d).get("device_name", d.name)
            devices.append({"kind": d.device_type.lower(), "name": name, "memory_gb": None})
    else:
        devices.append({"kind": "unknown", "name": backend, "memory_gb": None})
    return devices


def check_devices(gpus: int, allow_cpu: bool, log: Callable[[str], None] = stderr) -> dict:
    """What this job computes on; stop at once when it asked for a GPU and sees none.

    Parameters
    ----------
    gpus : int
        GPUs the job's rule declares (``training.resources.gpu``).
    allow_cpu : bool
        ``training.allow_cpu``: train on the CPU on purpose although a GPU was asked for.

    Raises
    ------
    DeviceError
        With the install hint, when ``gpus >= 1``, no GPU is visible and CPU training is not allowed.
    """
    with quiet_framework_startup():
        import keras

        devices = visible_devices()
    found = [d for d in devices if d["kind"] == "gpu"]
    report = {"backend": keras.backend.backend(), "keras_version": keras.__version__, "devices": devices,
              "gpus_requested": gpus, "gpus_visible": len(found)}
    shown = ", ".join(f"{d['kind']}:{d['name']}" + (f" ({d['memory_gb']} GiB)" if d["memory_gb"] else "")
                      for d in devices)
    log(f"Keras {keras.__version__}, backend {report['backend']}; devices: {shown}")
    if gpus >= 1 and not found:
        if not allow_cpu:
            raise DeviceError(f"this job asked for {gpus} GPU(s) (training.resources.gpu) but the "
                              f"{report['backend']} backend sees none ({shown}): {INSTALL_HINT}")
        log(f"WARNING: {gpus} GPU(s) asked for, none visible: training on the CPU (training.allow_cpu: true)")
    return report


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _file_identity(path) -> dict:
    stat = Path(path).stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(**parts) -> str:
    """Digest of everything that decides a fold's result (settings, data identity, code version)."""
    return hashlib.sha256(json.dumps({"code": TRAINING_CODE_VERSION, **parts}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


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


def _loss_and_accuracy(probabilities: np.ndarray, labels: np.ndarray, head: str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of predictions (unweighted), as Keras would report them."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    eps = 1e-7
    if head == "sigmoid":
        p = np.clip(probabilities[:, 0], eps, 1 - eps)
        loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        return float(loss), float(np.mean((p >= 0.5) == labels))
    p = np.clip(probabilities[np.arange(len(labels)), labels], eps, 1)
    return float(-np.mean(np.log(p))), float(np.mean(probabilities.argmax(1) == labels))


class _Trainer:
    """One compiled model reused fold after fold (see the module docstring)."""

    def __init__(self, store, architecture: str, n_classes: int, *, weights, hyper: dict, seed: int,
                 steps_per_epoch: int, log):
        import keras

        from moaflow.learn.models import StudyAugmentation, build_model, embedding_model

        self.store, self.hyper, self.log = store, hyper, log
        keras.utils.set_random_seed(seed)
        keras.config.set_dtype_policy(hyper["precision"])
        self.model = build_model(architecture, store.shape[1], n_classes, weights=weights, head=hyper["head"],
                                 augmentation=hyper["augmentation"], channel_order=hyper["channel_order"],
                                 input_scaling=hyper["input_scaling"], seed=seed)
        loss = "categorical_crossentropy" if hyper["head"] == "softmax" else "binary_crossentropy"
        self.model.compile(optimizer=_optimizer(hyper, steps_per_epoch), loss=loss, metrics=["accuracy"],
                           run_eagerly=hyper["run_eagerly"])
        self.model.optimizer.build(self.model.trainable_variables)
        self.augmentation = next((la for la in self.model.layers if isinstance(la, StudyAugmentation)), None)
        # The pooled features before the head, sharing the model's weights: built (and compiled) once per job.
        self.features = embedding_model(self.model)
        self.initial = self._state()

    def _state(self) -> dict[str, list[np.ndarray]]:
        import keras

        state = {"model": [np.array(w) for w in self.model.get_weights()],
                 "optimizer": [keras.ops.convert_to_numpy(v) for v in self.model.optimizer.variables]}
        if self.augmentation is not None:
            state["augmentation"] = [keras.ops.convert_to_numpy(self.augmentation.seed_generator.state)]
        return state

    def _restore(self, state: dict[str, list[np.ndarray]]) -> None:
        self.model.set_weights(state["model"])
        for variable, value in zip(self.model.optimizer.variables, state["optimizer"]):
            variable.assign(value)
        if self.augmentation is not None:
            self.augmentation.seed_generator.state.assign(state["augmentation"][0])

    def reset(self) -> None:
        """Back to the initial weights, optimizer state and augmentation seed."""
        self._restore(self.initial)

    def save_checkpoint(self, directory: Path, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Model, optimizer and augmentation state, the run's state and arrays, swapped in as a whole."""
        staging = directory.with_name(directory.name + ".next")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        current = self._state()
        np.savez(staging / "state.npz", **{f"{k}_{i}": v for k, values in current.items() for i, v in
                                           enumerate(values)}, **{f"extra_{k}": v for k, v in arrays.items()})
        write_json(state, staging / "state.json")
        replace_folder(staging, directory)

    def load_checkpoint(self, directory: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
        restore_folder(directory)
        if not (directory / "state.json").is_file():
            return None
        state = json.loads((directory / "state.json").read_text())
        with np.load(directory / "state.npz") as data:
            restored = {k: [data[f"{k}_{i}"] for i in range(len(v))] for k, v in self.initial.items()}
            arrays = {k[len("extra_"):]: data[k] for k in data.files if k.startswith("extra_")}
        self._restore(restored)
        return state, arrays


def train_job(
    store_path: str | os.PathLike,
    index_path: str | os.PathLike,
    folds_path: str | os.PathLike,
    fold_names: list[str],
    *,
    architecture: str,
    weights: str | None,
    hyper: dict,
    seed: int,
    models_dir: str | os.PathLike,
    checkpoints_dir: str | os.PathLike,
    dataset: str = "",
    init: str = "",
    gpus: int = 0,
    allow_cpu: bool = True,
    load_into_memory: str | bool = "auto",
    checkpoint_minutes: float = 10.0,
    receipt: str | os.PathLike | None = None,
    tracking: dict | None = None,
    occlusion: dict | None = None,
    log: Callable[[str], None] = stderr,
) -> dict:
    """Train ``fold_names`` one after the other with one compiled model.

    Parameters
    ----------
    store_path, index_path : path
        The crop store of the architecture's input size and its index.
    folds_path : path
        The folds file; ``fold_names`` name its rows.
    architecture, weights
        See `moaflow.learn.models.build_model`.
    hyper : dict
        From `moaflow.study.hyperparameters`.
    seed : int
        Seeds the initial weights, the batch order and the augmentation.
    models_dir : path
        Each fold's outputs go to ``models_dir/<fold>/``.
    checkpoints_dir : path
        Per-fold checkpoints (``checkpoints_dir/<fold>/``), removed once the fold is done.
    dataset, init : str
        Recorded in ``run.json`` for tracking.
    gpus, allow_cpu
        See `check_devices`.
    load_into_memory : "auto" or bool
        See `moaflow.learn.feeder.open_store`.
    checkpoint_minutes : float
        Checkpoint a fold when this long has passed since its last checkpoint (0: every epoch).
    receipt : path, optional
        Where to write the job's summary (the Snakemake rule's output).
    tracking : dict, optional
        ``uri``, ``experiment`` and ``parent_file``: with a tracking server each fold is logged live
        (`moaflow.tracking.LiveRun`).
    occlusion : dict, optional
        ``examples`` and ``grid``: occlusion maps of that many held-out crops per fold
        (``test_occlusion.npz``, for the report's interpretation).

    Returns
    -------
    summary : dict
        Per fold: fingerprint, whether it was kept from an earlier run, held-out accuracy.
    """
    device = check_devices(gpus, allow_cpu, log)   # first: it imports Keras with the start-up noise filtered
    from moaflow.learn.feeder import open_store

    index = pd.read_parquet(index_path)
    table = folds_module.read_folds(folds_path)
    unknown = sorted(set(fold_names) - set(table["fold"]))
    if unknown:
        raise ValueError(f"{folds_path}: no fold(s) named {unknown}")
    if hyper["model_selection"] == "best_validation":
        empty = [f for f in fold_names if not table.loc[table["fold"] == f, "validation_groups"].iloc[0]]
        if empty:
            raise ValueError(f"model_selection best_validation needs validation compounds, but fold(s) {empty} of "
                             f"{folds_path} have none (moaflow folds --validation-compounds N)")
    if hyper["head"] == "softmax":
        classes = sorted(index["moa"].unique())
        labels = index["moa"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    else:
        classes = ["negative", "positive"]
        labels = index["label"].to_numpy().astype(int)
    identity = {"store": _file_identity(store_path), "index": hashlib.sha256(Path(index_path).read_bytes()).hexdigest(),
                "weights": _file_identity(weights) if weights and Path(str(weights)).is_file() else weights,
                "architecture": architecture, "hyper": hyper, "seed": seed, "classes": classes}
    models_dir, checkpoints_dir = Path(models_dir), Path(checkpoints_dir)
    todo, summary = [], {"folds": {}, "device": device}
    for fold in fold_names:
        fold_row = table[table["fold"] == fold].iloc[0].to_dict()
        print_ = fingerprint(fold=fold_row, **identity)
        run_path = models_dir / fold / "run.json"
        if run_path.is_file() and json.loads(run_path.read_text()).get("fingerprint") == print_:
            log(f"{fold}: already trained with these settings and data; kept")
            summary["folds"][fold] = {"fingerprint": print_, "kept": True,
                                      "test_accuracy": json.loads(run_path.read_text())["test_accuracy"]}
        else:
            todo.append((fold, fold_row, print_))
    if todo:
        store = open_store(store_path, load_into_memory, log)
        if len(store) != len(index):
            raise ValueError(f"{store_path}: {len(store)} crops but {index_path} has {len(index)} rows")
        first_parts = folds_module.split(index, todo[0][1])
        steps = int(np.ceil(len(first_parts["train"]) / hyper["batch_size"]))
        if hyper["steps_per_epoch"]:
            steps = min(steps, hyper["steps_per_epoch"])
        trainer = _Trainer(store, architecture, len(classes), weights=weights, hyper=hyper, seed=seed,
                           steps_per_epoch=steps, log=log)
        # A fold's last step (compressing its model, run.json) overlaps the next fold's training.
        with ThreadPoolExecutor(max_workers=1) as finishing:
            pending = []
            for n, (fold, fold_row, print_) in enumerate(todo, 1):
                log(f"fold {n}/{len(todo)} of this job: {fold}")
                run = _train_fold(trainer, index, labels, classes, fold_row, hyper=hyper, seed=seed,
                                  out_dir=models_dir / fold, checkpoint_dir=checkpoints_dir / fold,
                                  checkpoint_minutes=checkpoint_minutes, log=log, tracking=tracking,
                                  occlusion=occlusion,
                                  record={"dataset": dataset, "init": init, "architecture": architecture,
                                          "weights": weights, "seed": seed, "fingerprint": print_,
                                          "index_path": str(index_path), **device})
                pending.append(finishing.submit(finish_fold, models_dir / fold, checkpoints_dir / fold, run))
                summary["folds"][fold] = {"fingerprint": print_, "kept": False, "test_accuracy": run["test_accuracy"]}
            for future in pending:
                future.result()   # an error finishing a fold fails the job
    if receipt is not None:
        write_json(summary, receipt)
    return summary


def _train_fold(trainer: _Trainer, index: pd.DataFrame, labels: np.ndarray, classes: list[str], fold_row: dict, *,
                hyper: dict, seed: int, out_dir: Path, checkpoint_dir: Path, checkpoint_minutes: float,
                record: dict, log, tracking: dict | None = None, occlusion: dict | None = None) -> dict:
    import keras

    from moaflow.learn.feeder import CropBatches, class_weights, predict

    store, model, head = trainer.store, trainer.model, hyper["head"]
    parts = folds_module.split(index, fold_row)
    train_rows = parts["train"]
    targets = (np.eye(len(classes), dtype=np.float32)[labels] if head == "softmax"
               else labels.astype(np.float32)[:, None])
    sample_weights = None
    if hyper["class_weights"]:
        sample_weights = class_weights(labels[train_rows], len(classes))[labels[train_rows]]
    train_set = CropBatches(store, train_rows, targets[train_rows], hyper["batch_size"], shuffle=True, seed=seed,
                            weights=sample_weights, full_batches=True, max_batches=hyper["steps_per_epoch"])
    trainer.reset()
    history: list[dict] = []
    initial_epoch = 0
    selection = {"best_accuracy": -1.0, "best_epoch": 0}
    kept = {"best": None, "mean": {}}   # best weights; summed predictions of the last epochs
    resumed = trainer.load_checkpoint(checkpoint_dir)
    started_at = _now()
    if resumed is not None:
        state, arrays = resumed
        history, initial_epoch, selection = state["history"], state["epochs_done"], state["selection"]
        started_at = state.get("started_at", started_at)
        kept["mean"] = {k[len("mean_"):]: v for k, v in arrays.items() if k.startswith("mean_")}
        if "best_weights_0" in arrays:
            kept["best"] = [arrays[f"best_weights_{i}"] for i in range(sum(k.startswith("best_weights_")
                                                                         for k in arrays))]
        log(f"resuming from the checkpoint after epoch {initial_epoch}")
    epochs = hyper["epochs"]
    log(f"{record['architecture']} {fold_row['fold']}: {len(train_rows)} training, {len(parts['validation'])} "
        f"validation, {len(parts['test'])} test images; {len(classes)} classes; input {store.shape[1]}; "
        f"batch {hyper['batch_size']}; precision {hyper['precision']}")
    last_checkpoint = time.monotonic()
    first_last_epoch = max(1, epochs - hyper["selection_epochs"] + 1)
    record = {**record, "fold": fold_row["fold"], "test_group": fold_row["test_group"],
              "validation_groups": fold_row["validation_groups"], "group_column": fold_row["group_column"],
              "excluded_batches": fold_row["excluded_batches"], "hyperparameters": hyper, "classes": classes,
              "input_size": int(store.shape[1]), "n_train": int(len(train_rows)),
              "n_validation": int(len(parts["validation"])), "n_test": int(len(parts["test"])),
              "started_at": started_at}
    live = None
    if tracking and is_server(resolve_uri(tracking.get("uri"))):
        live = LiveRun(resolve_uri(tracking.get("uri")), tracking["experiment"], tracking.get("parent_file"),
                       record, log)

    class EpochEnd(keras.callbacks.Callback):
        """Held-out predictions, model selection and (time-based) checkpoints after every epoch."""

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            nonlocal last_checkpoint
            seconds = time.monotonic() - self.started
            logs = {k: float(v) for k, v in (logs or {}).items()}
            logs["images_per_second"] = len(train_set) * hyper["batch_size"] / seconds
            predicted = {name: predict(model, store, parts[name], hyper["batch_size"])
                         for name in ("test", "validation")}
            for name, short in (("test", "test"), ("validation", "val")):
                loss, accuracy = _loss_and_accuracy(predicted[name], labels[parts[name]], head)
                if len(parts[name]):
                    logs.update({f"{short}_loss": loss, f"{short}_accuracy": accuracy})
            logs["seconds"] = time.monotonic() - self.started
            history.append({"epoch": epoch + 1, **logs})
            if live is not None:
                live.epoch(epoch + 1, logs)
            if hyper["model_selection"] == "best_validation" and logs["val_accuracy"] > selection["best_accuracy"]:
                selection.update(best_accuracy=logs["val_accuracy"], best_epoch=epoch + 1)
                kept["best"] = [np.array(w) for w in model.get_weights()]
            if hyper["model_selection"] == "mean_last" and epoch + 1 >= first_last_epoch:
                for name, values in predicted.items():
                    kept["mean"][name] = kept["mean"].get(name, 0) + values
            done = epoch + 1
            mean_time = np.mean([h["seconds"] for h in history[-5:]])
            shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items() if k not in ("seconds", "images_per_second"))
            log(f"epoch {done}/{epochs}: {shown} ({logs['seconds']:.1f} s, {logs['images_per_second']:,.0f} "
                f"images/s, ETA {mean_time * (epochs - done):.0f} s)")
            if done < epochs and time.monotonic() - last_checkpoint >= 60 * checkpoint_minutes:
                arrays = {f"mean_{k}": v for k, v in kept["mean"].items() if isinstance(v, np.ndarray)}
                if kept["best"] is not None:
                    arrays.update({f"best_weights_{i}": w for i, w in enumerate(kept["best"])})
                trainer.save_checkpoint(checkpoint_dir, {"epochs_done": done, "history": history,
                                                         "selection": selection, "started_at": started_at}, arrays)
                last_checkpoint = time.monotonic()

    started = time.monotonic()
    if initial_epoch < epochs:
        train_set.set_epoch(initial_epoch)
        # shuffle=False: CropBatches shuffles by (seed, epoch); Keras' own shuffle would reorder batches
        # from Python's global random state, so a fold would depend on what ran before it.
        model.fit(train_set, epochs=epochs, initial_epoch=initial_epoch, callbacks=[EpochEnd()], verbose=0,
                  shuffle=False)
    seconds = time.monotonic() - started

    # The model whose predictions are reported (training.<dataset>.hyperparameters.model_selection).
    if hyper["model_selection"] == "best_validation" and kept["best"] is not None:
        model.set_weights(kept["best"])
        chosen = f"best_validation (epoch {selection['best_epoch']}, validation accuracy " \
                 f"{selection['best_accuracy']:.3f})"
    elif hyper["model_selection"] == "mean_last":
        chosen = f"mean of epochs {first_last_epoch}-{epochs}"
    else:
        chosen = f"last (epoch {epochs})"
    frames = {}
    for name in ("test", "validation"):
        positions = parts[name]
        if hyper["model_selection"] == "mean_last" and name in kept["mean"]:
            probabilities = kept["mean"][name] / (epochs - first_last_epoch + 1)
        else:
            probabilities = predict(model, store, positions, hyper["batch_size"])
        broken = int((~np.isfinite(probabilities)).any(axis=1).sum())
        if broken:
            # NaN scores would pass as wrong answers (argmax of NaN is 0): stop, naming the fold.
            raise TrainingError(f"{record['architecture']} fold {fold_row['fold']}: {broken} of {len(positions)} "
                                f"{name} predictions are not finite (NaN or inf) after {len(history)} epoch(s): "
                                f"training diverged (learning rate, precision) or the initial weights are broken")
        if head == "sigmoid":
            probabilities = np.concatenate([1 - probabilities, probabilities], axis=1)
        frame = index.iloc[positions].reset_index(drop=True).copy()
        frame.insert(0, "split", name)
        frame["fold"] = fold_row["fold"]
        frame["true"] = [classes[i] for i in labels[positions]]
        for k, c in enumerate(classes):
            frame[f"p_{c}"] = probabilities[:, k].astype(np.float64)
        frames[name] = frame

    def accuracy(name):
        frame = frames[name]
        if frame.empty:
            return None
        return float(np.mean(frame[[f"p_{c}" for c in classes]].to_numpy().argmax(1) == labels[parts[name]]))

    from moaflow.analysis.interpretation import occlusion_maps
    from moaflow.learn.models import inference_model

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.keras") as tmp:
        inference_model(model).save(tmp)
    # Profiling's features of the held-out crops, from this fold's model: no query is embedded by a model
    # that trained on it. Rows follow test_predictions.parquet.
    write_array(predict(trainer.features, store, parts["test"], hyper["batch_size"]).astype(np.float32),
                out_dir / "test_embeddings.npy")
    if occlusion and occlusion["examples"] and len(parts["test"]):
        # Occlusion maps of a few held-out crops (the report's interpretation), with the model still in memory.
        rows = parts["test"][:: max(1, len(parts["test"]) // occlusion["examples"])][: occlusion["examples"]]
        images = np.asarray(store[rows])
        targets = labels[rows] if head == "softmax" else np.zeros(len(rows), int)   # sigmoid: p(positive)
        maps = occlusion_maps(lambda x: _padded_predict(model, x, hyper["batch_size"]), images, targets,
                              grid=occlusion["grid"])
        np.savez(out_dir / "test_occlusion.npz", crop_id=index["crop_id"].to_numpy()[rows], maps=maps)
    for name, frame in frames.items():
        write_table(frame, out_dir / f"{name}_predictions.parquet")
    write_table(pd.DataFrame(history), out_dir / "history.tsv")
    measured = [h["images_per_second"] for h in history[1:]] or [h["images_per_second"] for h in history]
    run = {
        **record, "train_seconds": seconds, "images_per_second": float(np.median(measured)) if measured else None,
        "dtype_policy": hyper["precision"], "jit_compile": bool(getattr(model, "jit_compile", False)),
        "run_eagerly": bool(hyper["run_eagerly"]), "batch_size": hyper["batch_size"], "model_selection": chosen,
        "test_accuracy": accuracy("test"), "validation_accuracy": accuracy("validation"), "finished_at": _now(),
    }
    if live is not None:
        live.finish(run)
        run.update(mlflow_run_id=live.run_id, mlflow_tracking_uri=resolve_uri(tracking.get("uri")))
    log(f"done: held-out accuracy {run['test_accuracy'] if run['test_accuracy'] is None else round(run['test_accuracy'], 3)}"
        f" ({chosen}) after {len(history)} epochs, {run['images_per_second'] or 0:,.0f} images/s")
    return run


def _padded_predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    from moaflow.learn.feeder import predict

    return predict(model, images, np.arange(len(images)), batch_size)


def finish_fold(out_dir: Path, checkpoint_dir: Path, run: dict) -> None:
    """Compress the fold's saved model, then write ``run.json`` (last: a fold with it is complete) and drop
    the checkpoint. Run in a thread while the next fold trains: DEFLATE takes seconds for the large networks."""
    compress_keras(out_dir / "model.keras")
    write_json(run, out_dir / "run.json")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def compress_keras(path: Path) -> None:
    """Rewrite a ``.keras`` archive with DEFLATE (Keras reads it the same way), atomically; about 8 % smaller."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
            for info in source.infolist():
                with source.open(info) as member, out.open(info.filename, "w", force_zip64=True) as copy:
                    shutil.copyfileobj(member, copy, 1 << 22)
