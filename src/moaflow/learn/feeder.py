"""Training batches from the crop store: uint8 rows in the stored layout, straight to the device.

The CPU only gathers rows: casting, channel order, scaling and augmentation run
inside the model (see `moaflow.learn.models`), so a batch moves a quarter of the
bytes float32 would, and one core keeps a GPU fed. The store is read into RAM
when it fits (`open_store`), and Keras prefetches the next batches in worker
threads while the device works on the current one.
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np

from moaflow.logs import stderr


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """The study's class weights ``n_train / (n_classes * n_train_c)`` (0 for absent classes)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = len(labels) / (n_classes * counts[present])
    return weights


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def open_store(path: str | os.PathLike, in_memory: str | bool = "auto", log=stderr) -> np.ndarray:
    """Open a crop store: read into RAM (``True``, or ``"auto"`` when it needs at most half the available
    memory), else memory-mapped (``False``). The choice is logged."""
    mapped = np.load(path, mmap_mode="r")
    size = mapped.nbytes
    if in_memory == "auto":
        in_memory = size <= available_memory() // 2
    if in_memory:
        log(f"{path}: {mapped.shape[0]:,} crops ({size / 2**30:.2f} GiB) read into memory")
        return np.ascontiguousarray(mapped)
    log(f"{path}: {mapped.shape[0]:,} crops ({size / 2**30:.2f} GiB) memory-mapped "
        f"(training.load_into_memory or too large for the available memory)")
    return mapped


class CropBatches(keras.utils.PyDataset):
    """Batches of uint8 crops from an ``(N, S, S, 3)`` store, in the stored channel layout.

    Parameters
    ----------
    store : ndarray
        From `open_store` (in RAM or memory-mapped).
    rows : ndarray of int
        Which rows of ``store`` belong to this set.
    targets : ndarray, optional
        Per-row targets for ``rows`` (one-hot rows, or 0/1 for a sigmoid head);
        None yields images only (prediction).
    batch_size : int
    shuffle : bool
        Reshuffle every epoch; the order of epoch ``e`` depends only on ``(seed, e)``,
        so a resumed run sees the same batches as an uninterrupted one. The trainer
        names the epoch (`set_epoch`, from its ``on_epoch_begin`` callback): Keras'
        own ``on_epoch_end`` calls change nothing, because Keras 3.15 also makes one
        when ``fit`` starts, which would shift every epoch's order by one.
    weights : ndarray, optional
        Per-row sample weights (the class weights).
    full_batches : bool
        Fill the last batch from the start of the epoch's order, as the original's
        looping generator did: every batch has one shape, so a compiled step is reused.
    max_batches : int, optional
        Cap on batches per epoch (quick runs and benchmarks).
    workers : int
        Threads preparing batches ahead of the device (Keras' prefetching; 1: none).
    """

    def __init__(self, store, rows, targets=None, batch_size=32, *, shuffle=False, seed=0, weights=None,
                 full_batches=False, max_batches=None, epoch=0, workers=2, max_queue_size=8):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max_queue_size)
        self.store, self.rows = store, np.asarray(rows)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.full_batches, self.max_batches = full_batches, max_batches
        self._mapped = isinstance(store, np.memmap)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
                      if self.shuffle else np.arange(len(self.rows)))

    def __len__(self):
        n = math.ceil(len(self.rows) / self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def positions(self, i: int) -> np.ndarray:
        """Positions (into ``rows``) of batch ``i``."""
        positions = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        if self.full_batches and len(positions) < self.batch_size:
            positions = np.concatenate([positions, np.resize(self.order, self.batch_size - len(positions))])
        return positions

    def __getitem__(self, i):
        positions = self.positions(i)
        picked = self.rows[positions]
        if self._mapped:   # sequential reads from disk; the batch's order does not matter to SGD
            keep = np.argsort(picked, kind="stable")
            positions, picked = positions[keep], picked[keep]
            images = self.store[picked]
        else:
            images = np.take(self.store, picked, axis=0)
        if self.targets is None:
            return (images,)
        if self.weights is None:
            return images, self.targets[positions]
        return images, self.targets[positions], self.weights[positions]



#: Crops per forward pass when only predicting (held-out predictions, features, occlusion): inference keeps no
#: activations for a backward pass, and a step's fixed cost is paid per batch (measured on 2 CPU cores, ResNet50
#: at 32 px, 512 crops: 18 s at the paper's training batch of 4-8, 3.7 s at 64). Any size gives the same values.
INFERENCE_BATCH = 64


def inference_batch(training_batch: int) -> int:
    """The batch for predicting: `INFERENCE_BATCH`, or the training batch when that is larger."""
    return max(int(training_batch), INFERENCE_BATCH)


def predict(model, store, rows, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
    """Predictions for ``rows`` of ``store`` in order, with every batch the same shape
    (the last one is padded, and the padding dropped), so no step is compiled twice."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        return np.zeros((0, model.outputs[0].shape[-1]), np.float32)
    batches = CropBatches(store, rows, None, batch_size, full_batches=True)
    return np.asarray(model.predict(batches, verbose=0))[: len(rows)]
