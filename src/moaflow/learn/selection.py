"""Which model gives a fold's reported predictions: the ``model_selection`` hyper-parameter, as one object.

* ``last``: the model after the last epoch (the paper);
* ``best_validation``: the epoch best on the validation compounds, its weights restored;
* ``mean_last``: the mean of the last ``selection_epochs`` epochs' predictions.

`ModelSelection` sees every epoch's held-out predictions, keeps what its rule
needs, goes into and comes out of a checkpoint with the fold, and at the end
gives the reported predictions and says in words which model they came from.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RULES = ("last", "best_validation", "mean_last")


class ModelSelection:
    """One fold's model selection (see the module docstring).

    Parameters
    ----------
    rule : str
        One of `RULES`.
    epochs : int
        The fold's epochs.
    selection_epochs : int
        Epochs averaged by ``mean_last``.
    """

    def __init__(self, rule: str, epochs: int, selection_epochs: int):
        if rule not in RULES:
            raise ValueError(f"model_selection={rule!r}: expected one of {RULES}")
        self.rule, self.epochs = rule, epochs
        self.first_averaged = max(1, epochs - selection_epochs + 1)
        self.best_accuracy, self.best_epoch = -1.0, 0
        self.best_weights: list[np.ndarray] | None = None
        self.sums: dict[str, np.ndarray] = {}

    def observe(self, epoch: int, predicted: dict[str, np.ndarray], validation_accuracy: float | None,
                weights: Callable[[], list[np.ndarray]]) -> None:
        """After epoch ``epoch`` (1-based): its held-out predictions by split, and the model's weights on demand."""
        if self.rule == "best_validation" and validation_accuracy is not None \
                and validation_accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch = validation_accuracy, epoch
            self.best_weights = [np.array(w) for w in weights()]
        if self.rule == "mean_last" and epoch >= self.first_averaged:
            for name, values in predicted.items():
                self.sums[name] = self.sums.get(name, 0) + values

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What a checkpoint keeps: JSON-able numbers and arrays."""
        arrays = {f"mean_{k}": v for k, v in self.sums.items() if isinstance(v, np.ndarray)}
        if self.best_weights is not None:
            arrays.update({f"best_weights_{i}": w for i, w in enumerate(self.best_weights)})
        return {"best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch}, arrays

    def restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Back to what `state` gave (a resumed fold)."""
        self.best_accuracy, self.best_epoch = state["best_accuracy"], state["best_epoch"]
        self.sums = {k[len("mean_"):]: v for k, v in arrays.items() if k.startswith("mean_")}
        count = sum(k.startswith("best_weights_") for k in arrays)
        self.best_weights = [arrays[f"best_weights_{i}"] for i in range(count)] if count else None

    def choose(self, set_weights: Callable[[list[np.ndarray]], None]) -> str:
        """Put the chosen weights in place (``best_validation``); say which model the predictions come from."""
        if self.rule == "best_validation" and self.best_weights is not None:
            set_weights(self.best_weights)
            return f"best_validation (epoch {self.best_epoch}, validation accuracy {self.best_accuracy:.3f})"
        if self.rule == "mean_last":
            return f"mean of epochs {self.first_averaged}-{self.epochs}"
        return f"last (epoch {self.epochs})"

    def predictions(self, name: str, predict: Callable[[], np.ndarray]) -> np.ndarray:
        """The reported predictions of split ``name``: the averaged ones (``mean_last``), else ``predict()``."""
        if self.rule == "mean_last" and name in self.sums:
            return self.sums[name] / (self.epochs - self.first_averaged + 1)
        return predict()
