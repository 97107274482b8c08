"""The compiled model a training job reuses fold after fold, and what happens after every epoch.

`Trainer` builds and compiles one model per job (one compilation), keeps its
initial state, and returns to it between folds, so a fold's result does not
depend on how folds were grouped into jobs. With a frozen body and no
augmentation (`FrozenFeatures`) every crop's features are the same in every
epoch and fold, so they are computed once per job and only the head trains on
them: the same model, the same numbers, a fraction of the work. `EpochEnd`
predicts the held-out and validation crops after every epoch, records the
history line (losses, accuracies, images/s, ETA), feeds the model selection,
logs to a live MLflow run and checkpoints the fold when one is due.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from moaflow.learn.feeder import CropBatches, inference_batch, predict
from moaflow.learn import adapters
from moaflow.learn.models import StudyAugmentation, build_model, embedding_model, head_layers
from moaflow.logs import rate


def optimizer(hyper: dict, steps_per_epoch: int):
    """The hyper-parameters' optimizer and learning-rate schedule."""
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


def loss_and_accuracy(probabilities: np.ndarray, labels: np.ndarray, head: str) -> tuple[float, float]:
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


class Trainer:
    """One compiled model reused fold after fold.

    Parameters
    ----------
    store : ndarray
        The crop store (its side is the input size).
    architecture, weights
        See `moaflow.learn.models.build_model`.
    n_classes : int
    hyper : dict
        Resolved hyper-parameters (`moaflow.learn.presets`).
    seed : int
        Seeds the initial weights and the augmentation.
    steps_per_epoch : int
        For the learning-rate schedule.
    log : callable

    Attributes
    ----------
    model : keras.Model
        The whole network (what a fold saves, and the occlusion maps use).
    network : keras.Model
        What ``fit`` trains: the whole model here, only its head in `FrozenFeatures`.
    """

    def __init__(self, store, architecture: str, n_classes: int, *, weights, hyper: dict, seed: int,
                 steps_per_epoch: int, log=lambda _: None):
        self.store, self.hyper = store, hyper
        keras.utils.set_random_seed(seed)
        keras.config.set_dtype_policy(hyper["precision"])
        self.model = build_model(architecture, store.shape[1], n_classes, weights=weights, head=hyper["head"],
                                 augmentation=hyper["augmentation"], channel_order=hyper["channel_order"],
                                 input_scaling=hyper["input_scaling"], transfer=hyper["transfer"], seed=seed,
                                 channels=store.shape[-1], channel_adapter=hyper["channel_adapter"])
        self.loss = "categorical_crossentropy" if hyper["head"] == "softmax" else "binary_crossentropy"
        self.model.compile(optimizer=optimizer(hyper, steps_per_epoch), loss=self.loss, metrics=["accuracy"],
                           run_eagerly=hyper["run_eagerly"])
        self.model.optimizer.build(self.model.trainable_variables)
        self.augmentation = next((la for la in self.model.layers if isinstance(la, StudyAugmentation)), None)
        # The pooled features before the head, sharing the model's weights: built (and compiled) once per job.
        self.features = embedding_model(self.model)
        self.network = self.model
        self._prepare(steps_per_epoch, log)
        self._build_loss_and_metrics()
        self.initial = self.state()

    def _build_loss_and_metrics(self) -> None:
        """Build the loss and metrics now, from shapes. Otherwise the first ``fit`` draws a batch of the first
        fold's data to build them, and with prefetching workers that fold's first epoch then starts one batch
        late: the job's first fold would train differently from the same fold later in a job (or packed)."""
        network = self.network
        images = np.zeros((1, *network.inputs[0].shape[1:]), network.inputs[0].dtype)
        targets = np.zeros((1, network.outputs[0].shape[-1]), np.float32)
        network._symbolic_build(data_batch=(images, targets))   # what fit does first (Keras has no public call)

    def _prepare(self, steps_per_epoch: int, log) -> None:
        """What a variant sets up before the initial state is taken (nothing here)."""

    def state(self) -> dict[str, list[np.ndarray]]:
        """Weights, optimizer variables and the augmentation's random state, as arrays."""
        state = {"model": [np.array(w) for w in self.network.get_weights()],
                 "optimizer": [keras.ops.convert_to_numpy(v) for v in self.network.optimizer.variables]}
        if self.augmentation is not None:
            state["augmentation"] = [keras.ops.convert_to_numpy(self.augmentation.seed_generator.state)]
        return state

    def restore(self, state: dict[str, list[np.ndarray]]) -> None:
        self.network.set_weights(state["model"])
        for variable, value in zip(self.network.optimizer.variables, state["optimizer"]):
            variable.assign(value)
        if self.augmentation is not None:
            self.augmentation.seed_generator.state.assign(state["augmentation"][0])

    def reset(self) -> None:
        """Back to the initial weights, optimizer state and augmentation seed."""
        self.restore(self.initial)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return predict(self.model, self.store, rows, inference_batch(self.hyper["batch_size"]))

    def embed(self, rows: np.ndarray) -> np.ndarray:
        return predict(self.features, self.store, rows, inference_batch(self.hyper["batch_size"]))

    def batches(self, rows: np.ndarray, targets: np.ndarray, weights: np.ndarray | None, seed: int) -> CropBatches:
        """An epoch's shuffled full batches of the training rows (what ``network.fit`` reads)."""
        return CropBatches(self.store, rows, targets, self.hyper["batch_size"], shuffle=True, seed=seed,
                           weights=weights, full_batches=True, max_batches=self.hyper["steps_per_epoch"])


class FrozenFeatures(Trainer):
    """A frozen body without augmentation: each crop's features computed once per job, the head trained on them.

    The body runs in inference mode whatever the fold (`moaflow.learn.models.build_model` with ``transfer:
    frozen``), so its features of a crop never change; the head layer is the whole model's own, so the
    saved model and the occlusion maps are the trained network itself.
    """

    def _prepare(self, steps_per_epoch: int, log) -> None:
        started = time.monotonic()
        self.cached = predict(self.features, self.store, np.arange(len(self.store)),
                              inference_batch(self.hyper["batch_size"]))
        log(f"frozen body: features of {len(self.store):,} crops computed once ({time.monotonic() - started:.0f} s); "
            "the head trains on them")
        inputs = x = keras.Input((self.cached.shape[1],), name="features")
        for layer in head_layers(self.model):   # the whole model's own layers: training them trains it
            x = layer(x)
        self.network = keras.Model(inputs, x, name=f"{self.model.name}_head")
        # A step of the head alone takes microseconds: a whole epoch's steps per call, not one call per step.
        self.network.compile(optimizer=optimizer(self.hyper, steps_per_epoch), loss=self.loss, metrics=["accuracy"],
                             run_eagerly=self.hyper["run_eagerly"], steps_per_execution=max(1, steps_per_epoch))
        self.network.optimizer.build(self.network.trainable_variables)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        # The head alone on features in memory: one call, no prediction loop (its overhead would dominate).
        if len(rows) == 0:
            return np.zeros((0, self.network.outputs[0].shape[-1]), np.float32)
        return keras.ops.convert_to_numpy(self.network(self.cached[rows], training=False))

    def embed(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.cached[rows])

    def batches(self, rows: np.ndarray, targets: np.ndarray, weights: np.ndarray | None, seed: int) -> CropBatches:
        # Batches of features in memory take microseconds: no prefetching threads.
        return CropBatches(self.cached, rows, targets, self.hyper["batch_size"], shuffle=True, seed=seed,
                           weights=weights, full_batches=True, max_batches=self.hyper["steps_per_epoch"], workers=1)


def trainer_for(hyper: dict) -> type[Trainer]:
    """`FrozenFeatures` when the body is frozen and nothing changes its input between epochs (no augmentation,
    no trainable adapter layers in front of it), else `Trainer`."""
    cached = (hyper["transfer"] == "frozen" and not hyper["augmentation"]
              and not adapters.trains_in_front(hyper["channel_adapter"]))
    return FrozenFeatures if cached else Trainer


class EpochEnd(keras.callbacks.Callback):
    """After every epoch: held-out predictions, the history line, model selection, live logging, checkpoint.

    Parameters
    ----------
    trainer : Trainer
    fold : moaflow.learn.train.FoldRun
        The fold being trained: its splits, labels, history, selection, checkpoint and live run.
    batches : CropBatches
        The fold's training batches: each epoch's order is set here, before Keras reads a batch of it.
    log : callable
    """

    def __init__(self, trainer: Trainer, fold, batches: CropBatches, log):
        super().__init__()
        self.trainer, self.fold, self.batches, self.log = trainer, fold, batches, log
        self.images_per_epoch = len(batches) * trainer.hyper["batch_size"]
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
        self.started = time.monotonic()

    def trained(self, epoch: int, logs: dict, seconds: float) -> None:
        """The end of an epoch trained outside ``fit`` (`moaflow.learn.packed`), its training ``seconds`` long."""
        self.started = time.monotonic() - seconds
        self.on_epoch_end(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        fold, head = self.fold, self.trainer.hyper["head"]
        seconds = time.monotonic() - self.started
        logs = {k: float(v) for k, v in (logs or {}).items()}
        logs["images_per_second"] = self.images_per_epoch / seconds
        predicted = {name: self.trainer.predict(fold.parts[name]) for name in ("test", "validation")}
        for name, short in (("test", "test"), ("validation", "val")):
            if len(fold.parts[name]):
                loss, accuracy = loss_and_accuracy(predicted[name], fold.labels[fold.parts[name]], head)
                logs.update({f"{short}_loss": loss, f"{short}_accuracy": accuracy})
        logs["seconds"] = time.monotonic() - self.started
        fold.history.append({"epoch": epoch + 1, **logs})
        if fold.live is not None:
            fold.live.epoch(epoch + 1, logs)
        fold.selection.observe(epoch + 1, predicted, logs.get("val_accuracy"), self.trainer.network.get_weights)
        done, epochs = epoch + 1, fold.epochs
        mean_time = np.mean([h["seconds"] for h in fold.history[-5:]])
        shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items() if k not in ("seconds", "images_per_second"))
        self.log(f"epoch {done}/{epochs}: {shown} ({logs['seconds']:.1f} s, {rate(logs['images_per_second'])} "
                 f"images/s, ETA {mean_time * (epochs - done):.0f} s)")
        if done < epochs and fold.checkpoint.due():
            fold.save_checkpoint(self.trainer, done)
