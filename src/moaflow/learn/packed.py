"""Several folds of one job trained side by side in one compiled step (JAX), each exactly as it trains alone.

The study's faithful setting (batch 8, float32) leaves most of a GPU idle. `PackedFolds` trains K folds of one
job at once: the folds share the model's *program*, not its numbers. Each fold keeps its own weights,
optimizer slots, BatchNorm statistics, augmentation random state and metrics, stacked along a leading axis,
and one ``jax.vmap`` of Keras' own stateless ``train_step`` advances every fold by one batch of its own
``batch_size`` crops, its own class weights and its own batch order. The device sees batch-8K work; every
fold sees the paper's batch of 8.

A fold that has fewer batches in an epoch than the others (a smaller training set), or that is further along
after a resume, sits the step out: its state is carried over unchanged (a masked update), so its numbers are
those of the fold trained alone. After each epoch every fold's state is loaded into the model in turn and
the usual `moaflow.learn.trainer.EpochEnd` runs for it (held-out predictions, history, model selection,
checkpoint), so checkpoints, resume, outputs and MLflow runs stay per fold, as without packing.

Only the JAX backend can do this (``jax.vmap`` over Keras' stateless API); `pack_size` says what a job will
do, and other backends train folds one by one, saying so.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from moaflow.learn.trainer import EpochEnd, FrozenFeatures, Trainer


def pack_size(requested: int, trainer: Trainer, log) -> int:
    """How many folds this job trains at once: ``requested`` (``training.pack_folds``) where it can be done,
    else 1, logged with the reason (another backend, or a frozen body whose head trains in microseconds)."""
    if requested <= 1:
        return 1
    backend = keras.backend.backend()
    if backend != "jax":
        log(f"training.pack_folds={requested}: packed folds need the JAX backend (KERAS_BACKEND=jax); "
            f"the {backend} backend trains the folds one by one")
        return 1
    if isinstance(trainer, FrozenFeatures):
        log(f"training.pack_folds={requested}: a frozen body trains only its head on cached features "
            "(microseconds a step); the folds train one by one")
        return 1
    return requested


def packs(items: list, size: int) -> list[list]:
    """``items`` in consecutive packs of at most ``size``, as even as possible (sizes differ by at most 1),
    so a job compiles at most two packed programs (the persistent compilation cache keeps both).

    >>> [len(p) for p in packs(list(range(10)), 4)]
    [4, 3, 3]
    """
    if size < 1:
        raise ValueError(f"pack size {size}: expected at least 1")
    count = -(-len(items) // size)
    out, start = [], 0
    for i in range(count):   # the first len % count packs take one more
        end = start + len(items) // count + (i < len(items) % count)
        out.append(items[start:end])
        start = end
    return out


def _values(variables) -> list:
    return [keras.ops.convert_to_tensor(v.value) for v in variables]


class PackedFolds:
    """Train a pack of folds of one `Trainer` together.

    Parameters
    ----------
    trainer : Trainer
        The job's trainer (its model is compiled; its initial state is what every fold starts from).
    sample : tuple
        One training batch (images, targets[, weights]): the shape of a sitting-out fold's blank batch.
    """

    def __init__(self, trainer: Trainer, sample: tuple):
        import jax
        import jax.numpy as jnp

        self.trainer, self.model = trainer, trainer.network
        self.jnp = jnp
        self.slots: list[tuple] = []
        self.state = None
        self.blank = tuple(np.zeros_like(np.asarray(part)) for part in sample)   # a sitting-out fold's batch

        def masked_step(state, data, active):
            _, new = self.model.train_step(state, data)
            return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)

        stepped = jax.vmap(masked_step)
        # run_eagerly (tests, debugging) as Keras would: the same step, not compiled.
        self.step = stepped if trainer.hyper["run_eagerly"] else jax.jit(stepped, donate_argnums=0)

    def _variables(self) -> list[list]:
        model = self.model
        return [model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
                model.metrics_variables]

    def capture(self) -> None:
        """Take the model's current state (a fold just started or resumed) as the next fold's slot."""
        self.slots.append(tuple(_values(group) for group in self._variables()))

    def load(self, k: int) -> None:
        """Put fold ``k``'s state into the model's variables (its weights, optimizer, BatchNorm statistics,
        random state and metrics)."""
        for group, values in zip(self._variables(), self.state):
            for variable, value in zip(group, values):
                variable.assign(value[k])

    def train(self, folds: list, batches: list, log) -> float:
        """Train ``folds`` (`moaflow.learn.train.FoldRun`, one captured slot each, in order) to their last
        epoch, each on its own ``batches`` (`CropBatches`); every epoch of every fold ends with its
        `EpochEnd`. Returns the seconds taken.

        Afterwards `load` puts a fold's final state into the model.
        """
        import jax

        jnp = self.jnp
        if len(self.slots) != len(folds):
            raise ValueError(f"{len(self.slots)} captured slot(s) for {len(folds)} fold(s)")
        self.state = jax.tree.map(lambda *a: jnp.stack(a), *self.slots)
        self.slots = []   # the stacked state is the only copy (K large networks' weights and optimizer slots)
        self.model.reset_metrics()
        zero_metrics = _values(self.model.metrics_variables)
        ends = [EpochEnd(self.trainer, fold, b, log) for fold, b in zip(folds, batches)]
        started = time.monotonic()
        log(f"{len(folds)} folds packed in one compiled step (training.pack_folds): "
            + ", ".join(f.row["fold"] for f in folds))
        for epoch in range(min(f.epochs_done for f in folds), folds[0].epochs):
            training = np.array([f.epochs_done <= epoch for f in folds])
            for k in np.flatnonzero(training):
                ends[k].on_epoch_begin(epoch)
            self.state = self._reset_metrics(self.state, zero_metrics, training)
            counts = np.array([len(b) if t else 0 for b, t in zip(batches, training)])
            epoch_started = time.monotonic()
            for i in range(int(counts.max())):
                active = i < counts
                data = tuple(np.stack(parts) for parts in zip(*[
                    batches[k][i] if active[k] else self.blank for k in range(len(folds))]))
                self.state = self.step(self.state, data, active)
            jax.block_until_ready(self.state)
            seconds = time.monotonic() - epoch_started
            for k in np.flatnonzero(training):
                self.load(k)
                ends[k].trained(epoch, self._logs(), seconds)
                folds[k].epochs_done = epoch + 1
        return time.monotonic() - started

    def _reset_metrics(self, state, zero_metrics: list, training: np.ndarray):
        """Metrics back to zero for the folds starting an epoch (Keras resets them every epoch)."""
        jnp = self.jnp
        trainable, non_trainable, optimizer, metrics = state
        mask = jnp.asarray(training)
        metrics = [jnp.where(mask.reshape((-1,) + (1,) * zero.ndim), zero[None], m)
                   for m, zero in zip(metrics, zero_metrics)]
        return trainable, non_trainable, optimizer, metrics

    def _logs(self) -> dict:
        """The loaded fold's epoch logs (loss, accuracy), from its metrics, as ``fit`` reports them."""
        return {k: float(v) for k, v in self.model.get_metrics_result().items()}
