"""Where a network looks: occlusion-sensitivity maps of held-out crops, one figure per architecture.

The map of a crop for a class is how much the class probability drops when
each patch of the crop is blanked out (set to 0); the channel occlusion, how much
it drops when each channel is (for screens of many channels: which one a class
is read from). It needs only forward passes,
so it works the same on every Keras backend and for every architecture (the
lab CNN has no global pooling, so class activation maps would not apply to it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from moaflow import layout
from moaflow.files import save_figure
from moaflow.logs import stderr
from moaflow.study import BBBC021_STORED_ORDER


def occlude(images: np.ndarray, grid: int = 8) -> np.ndarray:
    """Every image with each of ``grid`` x ``grid`` patches set to 0 in every channel: (N * grid * grid, S, S, C)."""
    n, size = len(images), images.shape[1]
    edges = np.linspace(0, size, grid + 1).astype(int)
    occluded = np.repeat(images[:, None], grid * grid, axis=1)   # (N, grid*grid, S, S, C)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        occluded[:, k, edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 0
    return occluded.reshape(-1, *images.shape[1:])


def _predictor(predict):
    """A function from uint8 images to class probabilities (a Keras model's ``predict``, or such a function)."""
    if hasattr(predict, "predict"):
        model = predict
        return lambda x: model.predict(x, verbose=0)
    return predict


def occlusion_maps(predict, images: np.ndarray, classes: np.ndarray, *, grid: int = 8) -> np.ndarray:
    """Occlusion sensitivity of ``images`` (N, S, S, C) uint8 for ``classes`` (N,): (N, grid, grid) drops in
    class probability when each patch is set to 0 (larger = more important).

    ``predict`` maps a uint8 image array to class probabilities (a Keras model's ``predict``, or the
    training job's compiled one).
    """
    n, predict = len(images), _predictor(predict)
    baseline = np.asarray(predict(images))[np.arange(n), classes]
    probabilities = np.asarray(predict(occlude(images, grid)))
    per_patch = probabilities.reshape(n, grid * grid, -1)[np.arange(n), :, classes]
    return (baseline[:, None] - per_patch).reshape(n, grid, grid)


def channel_occlusion(predict, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Which channel a class is read from: (N, C) drops in class probability when each channel of the whole
    crop is set to 0 (larger = more important), from C forward passes per crop.

    Examples
    --------
    A "network" that reads the class from the second channel's brightness only:

    >>> images = np.zeros((1, 4, 4, 3), np.uint8); images[..., 1] = 200
    >>> reads_channel_1 = lambda x: np.stack([1 - x[..., 1].mean((1, 2)) / 255, x[..., 1].mean((1, 2)) / 255], 1)
    >>> channel_occlusion(reads_channel_1, images, np.array([1])).round(2)
    array([[0.  , 0.78, 0.  ]])
    """
    n, channels, predict = len(images), images.shape[-1], _predictor(predict)
    baseline = np.asarray(predict(images))[np.arange(n), classes]
    blanked = np.repeat(images[:, None], channels, axis=1)       # (N, C, S, S, C): copy k without channel k
    for k in range(channels):
        blanked[:, k, ..., k] = 0
    probabilities = np.asarray(predict(blanked.reshape(-1, *images.shape[1:]))).reshape(n, channels, -1)
    return baseline[:, None] - probabilities[np.arange(n), :, classes]


def pick_examples(predictions: pd.DataFrame, per_class: int = 3, seed: int = 0) -> pd.DataFrame:
    """A few held-out crops per true class, from the one fold that calls most of that class right (so one
    model is loaded per class), correctly called crops first, seeded."""
    columns = [c for c in predictions.columns if c.startswith("p_")]
    called = np.asarray([c[2:] for c in columns])[predictions[columns].to_numpy().argmax(1)]
    frame = predictions.assign(correct=called == predictions["true"].to_numpy())
    picked = []
    for _, group in frame.groupby("true"):
        best = group.groupby("fold")["correct"].mean().sort_values(ascending=False, kind="stable").index[0]
        group = group[group["fold"] == best].sample(frac=1, random_state=seed)
        picked.append(group.sort_values("correct", ascending=False, kind="stable").head(per_class))
    return pd.concat(picked, ignore_index=True)


def plot_maps(images: np.ndarray, maps: np.ndarray, labels: list[str], path, title: str,
              channel_names=BBBC021_STORED_ORDER, channel_drops: np.ndarray | None = None) -> None:
    """Per crop: each of its C channels (with the class probability lost when that channel is blanked, if
    ``channel_drops`` (N, C) is given) and the occlusion map over the crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.transform import resize

    channels = images.shape[-1]
    if len(channel_names) != channels:
        raise ValueError(f"{len(channel_names)} channel names {list(channel_names)} for crops of {channels} channels")
    fig, axes = plt.subplots(len(images), channels + 1, figsize=(2 * (channels + 1), 2.1 * len(images)), squeeze=False)
    for row, (image, heat, label) in enumerate(zip(images, maps, labels)):
        for c in range(channels):
            axes[row][c].imshow(image[..., c], cmap="gray")
            name = channel_names[c] if row == 0 else ""
            # the class probability's change when the channel is blanked (negative: the channel mattered)
            drop = "" if channel_drops is None else f"{chr(10) if name else ''}blanked: {-channel_drops[row][c]:+.2f}"
            axes[row][c].set_title(name + drop, fontsize=7)
        axes[row][channels].imshow(image.mean(-1), cmap="gray")
        axes[row][channels].imshow(resize(heat, image.shape[:2], order=0), cmap="inferno", alpha=0.55)
        axes[row][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][channels].set_title("occlusion map", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=70)


def interpret_run(models_dir: str | os.PathLike, store: str | os.PathLike, output: str | os.PathLike, *,
                  architecture: str, per_class: int, channel_names: list[str], log=stderr) -> None:
    """Figure of the occlusion maps the training jobs computed: a few held-out crops per MoA, each mapped by
    the model of the fold that held it out.

    Parameters
    ----------
    models_dir : path
        One trained network's folder (every fold of an architecture, initialisation and seed).
    store : path
        The crop store the network trained on (the crops are drawn from it).
    output : path
        The figure.
    architecture : str
        For the title.
    per_class : int
        Crops per MoA (``profiling.examples_per_moa``).
    channel_names : list of str
        The store's channels in order, as the figure names them.
    """
    from moaflow.learn.feeder import open_store

    models_dir = Path(models_dir)
    folders = sorted(p.parent for p in models_dir.glob(f"*/{layout.FOLD_FILES['test_occlusion']}"))
    if not folders:
        raise FileNotFoundError(f"{models_dir}: no {layout.FOLD_FILES['test_occlusion']} in any fold "
                                "(profiling.examples_per_moa)")
    predictions = pd.concat([pd.read_parquet(layout.fold_file(f, "test_predictions")) for f in folders],
                            ignore_index=True)
    maps, drops = {}, {}
    for folder in folders:
        with np.load(layout.fold_file(folder, "test_occlusion")) as data:
            maps.update(zip(data["crop_id"].tolist(), data["maps"]))
            if "channels" in data:   # folds trained before channel occlusion was computed have none
                drops.update(zip(data["crop_id"].tolist(), data["channels"]))
    examples = pick_examples(predictions[predictions["crop_id"].isin(list(maps))], per_class)
    labels = [f"{t}\n{c} {k:g}" for t, c, k in zip(examples["true"], examples["compound"], examples["concentration"])]
    crop_ids = examples["crop_id"].to_numpy()
    crops = open_store(store, log=log)
    have_drops = all(i in drops for i in crop_ids)
    plot_maps(np.asarray(crops[crop_ids]), np.stack([maps[i] for i in crop_ids]), labels, output,
              f"{architecture}: where held-out crops' true MoA is read (occlusion maps)", channel_names,
              np.stack([drops[i] for i in crop_ids]) if have_drops else None)
    log(f"occlusion maps of {len(labels)} held-out crops -> {output}"
        + ("" if have_drops else " (without channel occlusion: some folds were trained before it was computed)"))
