"""Training: one job trains one (dataset, architecture, initialisation, seed) on one or more folds.

Start-up is paid once per job: the framework import, the store read into memory
and the compilation of the training step (every batch has one shape). Between
folds the model and optimizer go back to their initial state
(`moaflow.learn.trainer.Trainer`), so a fold's result does not depend on how
folds were grouped into jobs.

Each fold writes its outputs atomically into its own folder
(`moaflow.layout.FOLD_FILES`, ``run.json`` last): the inference model (no
optimizer state, loads in plain Keras), the history, the held-out and
validation predictions, the held-out crops' pooled features (for profiling)
and occlusion maps of a few of them. A fold whose ``run.json`` carries the
same fingerprint (settings, the data by content, code) is kept when a job reruns; a fold
killed mid-way resumes from its last checkpoint (`moaflow.learn.checkpoints`).

This module imports no framework at load time: the job first sets up its
device environment (`moaflow.learn.devices`), then Keras loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from moaflow import layout
from moaflow.errors import MoaflowError
from moaflow.files import atomic_path, file_digest, write_array, write_json, write_table
from moaflow.learn import folds as folds_module
from moaflow.learn.checkpoints import FoldCheckpoint
from moaflow.learn.devices import CompilationCache, check_devices, prepare_environment
from moaflow.learn.selection import ModelSelection
from moaflow.logs import rate, stderr
from moaflow.tracking import LiveRun, is_server, resolve_uri

#: Part of every fold's fingerprint: bump when a fold's outputs change meaning.
TRAINING_CODE_VERSION = 4   # 4: epoch e's batch order is (seed, e), no longer (seed, e + 1)


class TrainingError(MoaflowError):
    """A fold's model gives unusable (non-finite) predictions."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _file_identity(path) -> dict:
    """A data file by content, not by modification time: a gather that rewrites the same crops (one plate's
    crops redone) must leave every fold's fingerprint as it was, or every fold would train again."""
    return {"path": str(path), "bytes": Path(path).stat().st_size, "blake2b": file_digest(path, "blake2b")}


def fingerprint(**parts) -> str:
    """Digest of everything that decides a fold's result (settings, data identity, code version)."""
    return hashlib.sha256(json.dumps({"code": TRAINING_CODE_VERSION, **parts}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


@dataclass
class FoldRun:
    """One fold while it trains: its splits and targets, history, model selection, checkpoint and live run."""

    row: dict
    parts: dict[str, np.ndarray]
    classes: list[str]
    labels: np.ndarray
    targets: np.ndarray
    epochs: int
    selection: ModelSelection
    checkpoint: FoldCheckpoint
    history: list[dict] = field(default_factory=list)
    epochs_done: int = 0
    started_at: str = field(default_factory=_now)
    live: LiveRun | None = None

    def save_checkpoint(self, trainer, done: int) -> None:
        numbers, arrays = self.selection.state()
        self.checkpoint.save(trainer.state(), {"epochs_done": done, "history": self.history, "selection": numbers,
                                               "started_at": self.started_at}, arrays)

    def resume(self, trainer, log) -> None:
        """Continue from this fold's checkpoint, if it has one (the trainer's state included)."""
        loaded = self.checkpoint.load(trainer.initial)
        if loaded is None:
            return
        trainer_state, state, arrays = loaded
        trainer.restore(trainer_state)
        self.history, self.epochs_done, self.started_at = state["history"], state["epochs_done"], state["started_at"]
        self.selection.restore(state["selection"], arrays)
        log(f"resuming from the checkpoint after epoch {self.epochs_done}")


def _labels(index: pd.DataFrame, head: str) -> tuple[list[str], np.ndarray]:
    """Class names and each crop's class number: MoAs (softmax), or the BBBC014 label (sigmoid)."""
    if head == "softmax":
        classes = sorted(index["moa"].unique())
        return classes, index["moa"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return ["negative", "positive"], index["label"].to_numpy().astype(int)


def _check_folds(table: pd.DataFrame, fold_names: list[str], hyper: dict, folds_path) -> None:
    unknown = sorted(set(fold_names) - set(table["fold"]))
    if unknown:
        raise ValueError(f"{folds_path}: no fold(s) named {unknown}")
    if hyper["model_selection"] == "best_validation":
        empty = [f for f in fold_names if not table.loc[table["fold"] == f, "validation_groups"].iloc[0]]
        if empty:
            raise ValueError(f"model_selection best_validation needs validation compounds, but fold(s) {empty} of "
                             f"{folds_path} have none (moaflow folds --validation-compounds N)")


def train_job(
    store: str | os.PathLike,
    index: str | os.PathLike,
    folds: str | os.PathLike,
    fold_names: list[str],
    *,
    architecture: str,
    weights: str | None,
    hyper: dict,
    seed: int,
    models_dir: str | os.PathLike,
    checkpoints_dir: str | os.PathLike,
    gpus: int,
    allow_cpu: bool,
    load_into_memory: str | bool,
    checkpoint_minutes: float,
    pack_folds: int = 1,
    compilation_cache: str | None = None,
    dataset: str = "",
    init: str = "",
    receipt: str | os.PathLike | None = None,
    tracking: dict | None = None,
    occlusion: dict | None = None,
    log: Callable[[str], None] = stderr,
) -> dict:
    """Train ``fold_names`` with one compiled model, one after the other or packed (``pack_folds``).

    Parameters
    ----------
    store, index, folds : path
        The crop store of the architecture's input size, its index and the folds file.
    fold_names : list of str
        The folds (rows of ``folds``) this job trains.
    architecture, weights
        See `moaflow.learn.models.build_model` (``weights``: a notop file, or none/random).
    hyper : dict
        Resolved hyper-parameters (`moaflow.learn.presets.hyperparameters`).
    seed : int
        Seeds the initial weights, the batch order and the augmentation.
    models_dir, checkpoints_dir : path
        Each fold's outputs go to ``models_dir/<fold>/``, its checkpoints (removed once it is done) to
        ``checkpoints_dir/<fold>/``.
    gpus, allow_cpu
        GPUs this job was given (>= 1 stops at once when none is visible, 0 hides GPUs); train on the CPU
        although a GPU was asked for (``training.allow_cpu``).
    load_into_memory, checkpoint_minutes
        See `moaflow.learn.feeder.open_store`; a fold's checkpoint at most this often (0: every epoch).
    pack_folds, compilation_cache
        Folds trained at once in one compiled step (JAX; `moaflow.learn.packed`; 1: one by one), and JAX's
        persistent compilation cache folder shared by the run's jobs (`moaflow.learn.devices.CompilationCache`).
    dataset, init : str
        Recorded in ``run.json`` for tracking.
    receipt : path, optional
        The job's summary (the rule's output; also returned): per fold its fingerprint, whether it was kept, its accuracy.
    tracking, occlusion : dict, optional
        ``uri``, ``experiment`` and ``parent_file``: with a tracking server each fold is logged live;
        ``examples`` and ``grid``: occlusion maps of that many held-out crops per fold.
    """
    prepare_environment(gpus)
    device = check_devices(gpus, allow_cpu, log)   # first: it imports Keras with the start-up noise filtered
    cache = CompilationCache(compilation_cache, log=log)
    crop_index, table = pd.read_parquet(index), folds_module.read_folds(folds)
    _check_folds(table, fold_names, hyper, folds)
    classes, labels = _labels(crop_index, hyper["head"])
    identity = _identity(store, index, weights, architecture=architecture, hyper=hyper, seed=seed, classes=classes)
    models_dir, checkpoints_dir = Path(models_dir), Path(checkpoints_dir)
    kept, todo = _kept_folds(table, fold_names, identity, models_dir, log)
    summary = {"folds": kept, "device": device}
    if todo:
        record = {"dataset": dataset, "init": init, "architecture": architecture, "weights": weights, "seed": seed,
                  "index_path": str(index), **device}
        summary["folds"].update(_train_folds(store, crop_index, labels, classes, todo, architecture=architecture,
                                             weights=weights, hyper=hyper, seed=seed, models_dir=models_dir,
                                             checkpoints_dir=checkpoints_dir, load_into_memory=load_into_memory,
                                             checkpoint_minutes=checkpoint_minutes, pack_folds=pack_folds,
                                             record=record, tracking=tracking, occlusion=occlusion, log=log))
    summary["compilation_cache"] = cache.summary(log)
    if receipt is not None:
        write_json(summary, receipt)
    return summary


def _identity(store, index, weights, **settings) -> dict:
    """What decides a fold's result besides its row: the data's identity and the settings (the fingerprint's)."""
    return {"store": _file_identity(store), "index": hashlib.sha256(Path(index).read_bytes()).hexdigest(),
            "weights": _file_identity(weights) if weights and Path(str(weights)).is_file() else weights, **settings}


def _kept_folds(table: pd.DataFrame, fold_names: list[str], identity: dict, models_dir: Path, log):
    """Folds whose ``run.json`` has the same fingerprint (kept: name -> summary), and the others to train
    (their folds-file row and fingerprint)."""
    kept, todo = {}, []
    for fold in fold_names:
        row = table[table["fold"] == fold].iloc[0].to_dict()
        print_ = fingerprint(fold=row, **identity)
        run_path = layout.fold_file(models_dir / fold, "run")
        run = json.loads(run_path.read_text()) if run_path.is_file() else {}
        if run.get("fingerprint") == print_:
            log(f"{fold}: already trained with these settings and data; kept")
            kept[fold] = {"fingerprint": print_, "kept": True, "test_accuracy": run["test_accuracy"]}
        else:
            todo.append((row, print_))
    return kept, todo


def _train_folds(store_path, index, labels, classes, todo, *, architecture, weights, hyper, seed, models_dir,
                 checkpoints_dir, load_into_memory, checkpoint_minutes, pack_folds, record, tracking, occlusion,
                 log) -> dict:
    """Train the ``todo`` folds (row, fingerprint) with one `Trainer`, one by one or in packs
    (`moaflow.learn.packed`); per fold: fingerprint and accuracy."""
    from moaflow.learn.feeder import open_store
    from moaflow.learn.packed import pack_size, packs
    from moaflow.learn.trainer import trainer_for

    store = open_store(store_path, load_into_memory, log)
    if len(store) != len(index):
        raise ValueError(f"{store_path}: {len(store)} crops but its index has {len(index)} rows")
    steps = int(np.ceil(len(folds_module.split(index, todo[0][0])["train"]) / hyper["batch_size"]))
    if hyper["steps_per_epoch"]:
        steps = min(steps, hyper["steps_per_epoch"])
    trainer = trainer_for(hyper)(store, architecture, len(classes), weights=weights, hyper=hyper, seed=seed,
                                 steps_per_epoch=steps, log=log)
    done, size, n = {}, pack_size(pack_folds, trainer, log), 0
    settings = dict(hyper=hyper, seed=seed, models_dir=models_dir, checkpoints_dir=checkpoints_dir,
                    checkpoint_minutes=checkpoint_minutes, record=record, tracking=tracking, occlusion=occlusion,
                    log=log)
    # A fold's last step (compressing its model, run.json) overlaps the next fold's training.
    with ThreadPoolExecutor(max_workers=1) as finishing:
        pending = []
        for pack in packs(todo, size):
            log(f"fold{'s' if len(pack) > 1 else ''} {n + 1}{f'-{n + len(pack)}' if len(pack) > 1 else ''}"
                f"/{len(todo)} of this job: {', '.join(row['fold'] for row, _ in pack)}")
            n += len(pack)
            trained = (_train_pack(trainer, index, labels, classes, pack, **settings) if len(pack) > 1 else
                       [_train_fold(trainer, index, labels, classes, *pack[0], **settings)])
            for (row, print_), run in zip(pack, trained):
                pending.append(finishing.submit(finish_fold, models_dir / row["fold"], checkpoints_dir / row["fold"],
                                                run))
                done[row["fold"]] = {"fingerprint": print_, "kept": False, "test_accuracy": run["test_accuracy"]}
        for future in pending:
            future.result()   # an error finishing a fold fails the job
    return done


def _start_fold(trainer, index, labels, classes, row, *, hyper, checkpoint, record, tracking, log) -> FoldRun:
    """The fold's splits and targets, the trainer reset (or resumed from the fold's checkpoint), its live run."""
    parts = folds_module.split(index, row)
    targets = (np.eye(len(classes), dtype=np.float32)[labels] if hyper["head"] == "softmax"
               else labels.astype(np.float32)[:, None])
    fold = FoldRun(row=row, parts=parts, classes=classes, labels=labels, targets=targets, epochs=hyper["epochs"],
                   selection=ModelSelection(hyper["model_selection"], hyper["epochs"], hyper["selection_epochs"]),
                   checkpoint=checkpoint)
    trainer.reset()
    fold.resume(trainer, log)
    log(f"{record['architecture']} {row['fold']}: {len(parts['train'])} training, {len(parts['validation'])} "
        f"validation, {len(parts['test'])} test images; {len(classes)} classes; input {trainer.store.shape[1]}; "
        f"batch {hyper['batch_size']}; precision {hyper['precision']}")
    uri = resolve_uri((tracking or {}).get("uri"))
    if tracking and is_server(uri):
        fold.live = LiveRun(uri, tracking["experiment"], tracking.get("parent_file"),
                            _record(record, fold, hyper, classes, trainer), log)
    return fold


def _record(record: dict, fold: FoldRun, hyper: dict, classes: list[str], trainer) -> dict:
    row, parts = fold.row, fold.parts
    return {**record, "fold": row["fold"], "test_group": row["test_group"], "validation_groups": row["validation_groups"],
            "group_column": row["group_column"], "excluded_batches": row["excluded_batches"], "hyperparameters": hyper,
            "classes": classes, "input_size": int(trainer.store.shape[1]), "n_train": int(len(parts["train"])),
            "n_validation": int(len(parts["validation"])), "n_test": int(len(parts["test"])),
            "started_at": fold.started_at}


def _training_batches(trainer, fold: FoldRun, hyper: dict, seed: int):
    """The fold's training batches (`moaflow.learn.feeder.CropBatches`), with its class weights."""
    from moaflow.learn.feeder import class_weights

    rows = fold.parts["train"]
    weights = None
    if hyper["class_weights"]:
        weights = class_weights(fold.labels[rows], len(fold.classes))[fold.labels[rows]]
    return trainer.batches(rows, fold.targets[rows], weights, seed)


def _fit(trainer, fold: FoldRun, hyper: dict, seed: int, log) -> float:
    """Train the fold's remaining epochs; seconds taken."""
    from moaflow.learn.trainer import EpochEnd

    train_set = _training_batches(trainer, fold, hyper, seed)
    started = time.monotonic()
    if fold.epochs_done < fold.epochs:
        # shuffle=False: CropBatches shuffles by (seed, epoch), the epoch set by EpochEnd; Keras' own shuffle
        # would reorder batches from Python's global random state, so a fold would depend on what ran before it.
        trainer.network.fit(train_set, epochs=fold.epochs, initial_epoch=fold.epochs_done, verbose=0, shuffle=False,
                            callbacks=[EpochEnd(trainer, fold, train_set, log)])
    return time.monotonic() - started


def _predictions(trainer, fold: FoldRun, index, classes, record: dict, head: str, name: str) -> pd.DataFrame:
    """One split's reported predictions as a table: the index's columns, split, fold, true class, ``p_<class>``."""
    positions = fold.parts[name]
    probabilities = fold.selection.predictions(name, lambda: trainer.predict(positions))
    broken = int((~np.isfinite(probabilities)).any(axis=1).sum())
    if broken:
        # NaN scores would pass as wrong answers (argmax of NaN is 0): stop, naming the fold.
        raise TrainingError(f"{record['architecture']} fold {fold.row['fold']}: {broken} of {len(positions)} "
                            f"{name} predictions are not finite (NaN or inf) after {len(fold.history)} epoch(s): "
                            f"training diverged (learning rate, precision) or the initial weights are broken")
    if head == "sigmoid":
        probabilities = np.concatenate([1 - probabilities, probabilities], axis=1)
    frame = index.iloc[positions].reset_index(drop=True).copy()
    frame.insert(0, "split", name)
    frame["fold"] = fold.row["fold"]
    frame["true"] = [classes[i] for i in fold.labels[positions]]
    for k, c in enumerate(classes):
        frame[f"p_{c}"] = probabilities[:, k].astype(np.float64)
    return frame


def _accuracy(frame: pd.DataFrame, classes: list[str]) -> float | None:
    if frame.empty:
        return None
    return float(np.mean(np.asarray(classes)[frame[[f"p_{c}" for c in classes]].to_numpy().argmax(1)]
                         == frame["true"].to_numpy()))


def _train_fold(trainer, index, labels, classes, row, print_, *, hyper, seed, models_dir: Path,
                checkpoints_dir: Path, checkpoint_minutes: float, record: dict, tracking: dict | None,
                occlusion: dict | None, log) -> dict:
    """Train one fold and write its outputs (but ``run.json``, which `finish_fold` writes); its run record."""
    record = {**record, "fingerprint": print_, "packed_folds": 1}
    fold = _start_fold(trainer, index, labels, classes, row, hyper=hyper, record=record, tracking=tracking, log=log,
                       checkpoint=FoldCheckpoint(checkpoints_dir / row["fold"], checkpoint_minutes))
    seconds = _fit(trainer, fold, hyper, seed, log)
    return _conclude_fold(trainer, fold, index, classes, seconds, hyper=hyper, out_dir=models_dir / row["fold"],
                          record=record, tracking=tracking, occlusion=occlusion, log=log)


def _train_pack(trainer, index, labels, classes, pack, *, hyper, seed, models_dir: Path, checkpoints_dir: Path,
                checkpoint_minutes: float, record: dict, tracking: dict | None, occlusion: dict | None,
                log) -> list[dict]:
    """Train a pack of folds (row, fingerprint) together (`moaflow.learn.packed.PackedFolds`), then write
    each fold's outputs as `_train_fold` does; their run records (``packed_folds``: the pack's size)."""
    from moaflow.learn.packed import PackedFolds

    packer, folds, batches, records = None, [], [], []
    for row, print_ in pack:
        records.append({**record, "fingerprint": print_, "packed_folds": len(pack)})
        fold = _start_fold(trainer, index, labels, classes, row, hyper=hyper, record=records[-1], tracking=tracking,
                           log=log, checkpoint=FoldCheckpoint(checkpoints_dir / row["fold"], checkpoint_minutes))
        batches.append(_training_batches(trainer, fold, hyper, seed))
        packer = packer or PackedFolds(trainer, batches[0][0])
        packer.capture()   # the fold's starting state: the initial one, or its checkpoint's
        folds.append(fold)
    seconds = packer.train(folds, batches, log)
    runs = []
    for k, (fold, fold_record) in enumerate(zip(folds, records)):
        packer.load(k)
        runs.append(_conclude_fold(trainer, fold, index, classes, seconds, hyper=hyper,
                                   out_dir=models_dir / fold.row["fold"], record=fold_record, tracking=tracking,
                                   occlusion=occlusion, log=log))
    return runs


def _conclude_fold(trainer, fold: FoldRun, index, classes, seconds: float, *, hyper, out_dir: Path, record: dict,
                   tracking: dict | None, occlusion: dict | None, log) -> dict:
    """After the fold's last epoch (its state in the trainer's model): the model selection, its outputs
    and its run record."""
    chosen = fold.selection.choose(trainer.network.set_weights)
    frames = {name: _predictions(trainer, fold, index, classes, record, hyper["head"], name)
              for name in ("test", "validation")}
    _write_fold_outputs(trainer, fold, frames, index, out_dir, occlusion)
    measured = [h["images_per_second"] for h in fold.history[1:]] or [h["images_per_second"] for h in fold.history]
    run = {**_record(record, fold, hyper, classes, trainer), "train_seconds": seconds,
           "images_per_second": float(np.median(measured)) if measured else None,
           "dtype_policy": hyper["precision"], "jit_compile": bool(getattr(trainer.network, "jit_compile", False)),
           "run_eagerly": bool(hyper["run_eagerly"]), "batch_size": hyper["batch_size"], "model_selection": chosen,
           "test_accuracy": _accuracy(frames["test"], classes),
           "validation_accuracy": _accuracy(frames["validation"], classes), "finished_at": _now()}
    if fold.live is not None:
        fold.live.finish(run)
        run.update(mlflow_run_id=fold.live.run_id, mlflow_tracking_uri=resolve_uri(tracking.get("uri")))
    accuracy = run["test_accuracy"]
    log(f"done: held-out accuracy {accuracy if accuracy is None else round(accuracy, 3)} ({chosen}) after "
        f"{len(fold.history)} epochs, {rate(run['images_per_second'])} images/s")
    return run


def _write_fold_outputs(trainer, fold: FoldRun, frames: dict, index: pd.DataFrame, out_dir: Path,
                        occlusion: dict | None) -> None:
    """The inference model, the held-out crops' features and occlusion maps, the predictions and the history."""
    from moaflow.analysis.interpretation import channel_occlusion, occlusion_maps
    from moaflow.learn.feeder import inference_batch, predict
    from moaflow.learn.models import inference_model

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.fold_file(out_dir, "model")) as tmp:
        inference_model(trainer.model).save(tmp)
    # Profiling's features of the held-out crops, from this fold's model: no query is embedded by a model
    # that trained on it. Rows follow the test predictions.
    test = fold.parts["test"]
    write_array(trainer.embed(test).astype(np.float32), layout.fold_file(out_dir, "test_embeddings"))
    if occlusion and occlusion["examples"] and len(test):
        # Occlusion maps of a few held-out crops (the report's interpretation), with the model still in memory.
        rows = test[:: max(1, len(test) // occlusion["examples"])][: occlusion["examples"]]
        targets = fold.labels[rows] if trainer.hyper["head"] == "softmax" else np.zeros(len(rows), int)
        batch = inference_batch(trainer.hyper["batch_size"])
        images = np.asarray(trainer.store[rows])

        def predicted(x):
            return predict(trainer.model, x, np.arange(len(x)), batch)

        np.savez(layout.fold_file(out_dir, "test_occlusion"), crop_id=index["crop_id"].to_numpy()[rows],
                 maps=occlusion_maps(predicted, images, targets, grid=occlusion["grid"]),
                 channels=channel_occlusion(predicted, images, targets))
    for name, frame in frames.items():
        write_table(frame, layout.fold_file(out_dir, f"{name}_predictions"))
    write_table(pd.DataFrame(fold.history), layout.fold_file(out_dir, "history"))


def finish_fold(out_dir: Path, checkpoint_dir: Path, run: dict) -> None:
    """Compress the fold's saved model, then write ``run.json`` (last: a fold with it is complete) and drop
    the checkpoint. Run in a thread while the next fold trains: DEFLATE takes seconds for the large networks."""
    compress_keras(layout.fold_file(out_dir, "model"))
    write_json(run, layout.fold_file(out_dir, "run"))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def compress_keras(path: Path) -> None:
    """Rewrite a ``.keras`` archive with DEFLATE (Keras reads it the same way), atomically; about 8 % smaller."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
            for info in source.infolist():
                with source.open(info) as member, out.open(info.filename, "w", force_zip64=True) as copy:
                    shutil.copyfileobj(member, copy, 1 << 22)
