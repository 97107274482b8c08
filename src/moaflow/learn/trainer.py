"""The compiled model a training job reuses fold after fold, and what happens after every epoch.

`Trainer` builds and compiles one model per job (one compilation), keeps its
initial state, and returns to it between folds, so a fold's result does not
depend on how folds were grouped into jobs. `EpochEnd` predicts the held-out
and validation crops after every epoch, records the history line (losses,
accuracies, images/s, ETA), feeds the model selection, logs to a live MLflow
run and checkpoints the fold when one is due.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from moaflow.learn.feeder import predict
from moaflow.learn.models import StudyAugmentation, build_model, embedding_model


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
    """

    def __init__(self, store, architecture: str, n_classes: int, *, weights, hyper: dict, seed: int,
                 steps_per_epoch: int):
        self.store, self.hyper = store, hyper
        keras.utils.set_random_seed(seed)
        keras.config.set_dtype_policy(hyper["precision"])
        self.model = build_model(architecture, store.shape[1], n_classes, weights=weights, head=hyper["head"],
                                 augmentation=hyper["augmentation"], channel_order=hyper["channel_order"],
                                 input_scaling=hyper["input_scaling"], seed=seed)
        loss = "categorical_crossentropy" if hyper["head"] == "softmax" else "binary_crossentropy"
        self.model.compile(optimizer=optimizer(hyper, steps_per_epoch), loss=loss, metrics=["accuracy"],
                           run_eagerly=hyper["run_eagerly"])
        self.model.optimizer.build(self.model.trainable_variables)
        self.augmentation = next((la for la in self.model.layers if isinstance(la, StudyAugmentation)), None)
        # The pooled features before the head, sharing the model's weights: built (and compiled) once per job.
        self.features = embedding_model(self.model)
        self.initial = self.state()

    def state(self) -> dict[str, list[np.ndarray]]:
        """Weights, optimizer variables and the augmentation's random state, as arrays."""
        state = {"model": [np.array(w) for w in self.model.get_weights()],
                 "optimizer": [keras.ops.convert_to_numpy(v) for v in self.model.optimizer.variables]}
        if self.augmentation is not None:
            state["augmentation"] = [keras.ops.convert_to_numpy(self.augmentation.seed_generator.state)]
        return state

    def restore(self, state: dict[str, list[np.ndarray]]) -> None:
        self.model.set_weights(state["model"])
        for variable, value in zip(self.model.optimizer.variables, state["optimizer"]):
            variable.assign(value)
        if self.augmentation is not None:
            self.augmentation.seed_generator.state.assign(state["augmentation"][0])

    def reset(self) -> None:
        """Back to the initial weights, optimizer state and augmentation seed."""
        self.restore(self.initial)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return predict(self.model, self.store, rows, self.hyper["batch_size"])

    def embed(self, rows: np.ndarray) -> np.ndarray:
        return predict(self.features, self.store, rows, self.hyper["batch_size"])


class EpochEnd(keras.callbacks.Callback):
    """After every epoch: held-out predictions, the history line, model selection, live logging, checkpoint.

    Parameters
    ----------
    trainer : Trainer
    fold : moaflow.learn.train.FoldRun
        The fold being trained: its splits, labels, history, selection, checkpoint and live run.
    images_per_epoch : int
    log : callable
    """

    def __init__(self, trainer: Trainer, fold, images_per_epoch: int, log):
        super().__init__()
        self.trainer, self.fold, self.images_per_epoch, self.log = trainer, fold, images_per_epoch, log
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.monotonic()

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
        fold.selection.observe(epoch + 1, predicted, logs.get("val_accuracy"), self.trainer.model.get_weights)
        done, epochs = epoch + 1, fold.epochs
        mean_time = np.mean([h["seconds"] for h in fold.history[-5:]])
        shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items() if k not in ("seconds", "images_per_second"))
        self.log(f"epoch {done}/{epochs}: {shown} ({logs['seconds']:.1f} s, {logs['images_per_second']:,.0f} "
                 f"images/s, ETA {mean_time * (epochs - done):.0f} s)")
        if done < epochs and fold.checkpoint.due():
            fold.save_checkpoint(self.trainer, done)
