"""Batches for Keras streamed from memory-mapped crop arrays, and class-per-folder image sets.

`CropBatches` reads only the rows of a batch from the ``.npy`` store (sorted,
so reads are sequential within a batch), converts them to float32, reorders
channels, and returns ``(images, labels, sample_weights)``. Sample weights
carry the study's class weights, which works with every Keras backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import keras
import numpy as np

from moaflow import crops

#: stored channel order of the BBBC021 store -> what the network sees
CHANNEL_ORDERS = {
    "stored": [0, 1, 2],     # (Actin, Tubulin, DAPI) for BBBC021; (zeros, DAPI, FITC) for BBBC014
    "reversed": [2, 1, 0],   # what the original network saw after OpenCV's BGR read: (DAPI, Tubulin, Actin)
}


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """The study's class weights ``n_train / (n_classes * n_train_c)`` (0 for absent classes)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = len(labels) / (n_classes * counts[present])
    return weights


class CropBatches(keras.utils.PyDataset):
    """Batches of crops from a memory-mapped ``(N, S, S, 3)`` uint8 store.

    Parameters
    ----------
    store : ndarray
        Usually ``numpy.load(path, mmap_mode="r")``.
    rows : ndarray of int
        Which rows of ``store`` belong to this set.
    targets : ndarray
        Per-row targets for ``rows`` (one-hot rows, or 0/1 for a sigmoid head).
    batch_size : int
    shuffle : bool
        Reshuffle every epoch; the order of epoch ``e`` depends only on ``(seed, e)``,
        so a resumed run sees the same batches as an uninterrupted one.
    weights : ndarray, optional
        Per-row sample weights.
    channel_order : str
        Key of `CHANNEL_ORDERS`.
    max_batches : int, optional
        Cap on batches per epoch (quick runs and benchmarks).
    """

    def __init__(self, store, rows, targets, batch_size, *, shuffle=False, seed=0, weights=None,
                 channel_order="stored", max_batches=None, epoch=0, **kwargs):
        super().__init__(**kwargs)
        self.store, self.rows, self.targets = store, np.asarray(rows), np.asarray(targets, dtype=np.float32)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order={channel_order!r}: expected one of {sorted(CHANNEL_ORDERS)}")
        self.channels = CHANNEL_ORDERS[channel_order]
        self.max_batches = max_batches
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
                      if self.shuffle else np.arange(len(self.rows)))

    def __len__(self):
        n = math.ceil(len(self.rows) / self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __getitem__(self, i):
        positions = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        images = self.store[self.rows[positions]].astype(np.float32)[..., self.channels]
        if self.weights is None:
            return images, self.targets[positions]
        return images, self.targets[positions], self.weights[positions]

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)


# ----------------------------------------------------------------- class-per-folder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def folder_dataset(root: str | os.PathLike, input_size: int, *, validation_fraction: float = 0.25, seed: int = 0):
    """Load a class-per-folder image set (``root/<class>/<image>``) like the lab's data.

    Images are read as RGB, resized to ``input_size`` squares by area
    interpolation and kept as uint8. The validation split is stratified by
    class and seeded.

    Returns
    -------
    images : ndarray (N, S, S, 3) uint8
    labels : ndarray (N,) int
    classes : list of str
        Folder names, sorted; ``labels`` index into it.
    validation : ndarray of int
        Positions of the validation images.
    """
    from PIL import Image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root}: expected one sub-folder per class (at least 2), found {classes}")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{root / name}: no images ({sorted(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as im:
                    rgb = np.asarray(im.convert("RGB"))
            except Exception as exc:  # PIL raises several types for damaged files
                raise ValueError(f"{path}: cannot read image ({exc})") from exc
            images.append(crops.resize_area(rgb, input_size))
            labels.append(label)
    labels = np.array(labels)
    rng = np.random.default_rng(seed)
    validation = []
    for label in range(len(classes)):
        members = rng.permutation(np.flatnonzero(labels == label))
        validation.extend(members[: int(round(validation_fraction * len(members)))])
    return np.stack(images), labels, classes, np.sort(np.array(validation, dtype=int))
