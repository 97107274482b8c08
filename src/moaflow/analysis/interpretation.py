"""Where a network looks: occlusion-sensitivity maps of held-out crops, one figure per architecture.

The map of a crop for a class is how much the class probability drops when
each patch of the crop is blanked out (set to 0). It needs only forward passes,
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
    """Every image with each of ``grid`` x ``grid`` patches set to 0: (N * grid * grid, S, S, 3)."""
    n, size = len(images), images.shape[1]
    edges = np.linspace(0, size, grid + 1).astype(int)
    occluded = np.repeat(images[:, None], grid * grid, axis=1)   # (N, grid*grid, S, S, 3)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        occluded[:, k, edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 0
    return occluded.reshape(-1, *images.shape[1:])


def occlusion_maps(predict, images: np.ndarray, classes: np.ndarray, *, grid: int = 8) -> np.ndarray:
    """Occlusion sensitivity of ``images`` (N, S, S, 3) uint8 for ``classes`` (N,): (N, grid, grid) drops in
    class probability when each patch is set to 0 (larger = more important).

    ``predict`` maps a uint8 image array to class probabilities (a Keras model's ``predict``, or the
    training job's compiled one).
    """
    n = len(images)
    if hasattr(predict, "predict"):
        model = predict
        predict = lambda x: model.predict(x, verbose=0)   # noqa: E731
    baseline = np.asarray(predict(images))[np.arange(n), classes]
    probabilities = np.asarray(predict(occlude(images, grid)))
    per_patch = probabilities.reshape(n, grid * grid, -1)[np.arange(n), :, classes]
    return (baseline[:, None] - per_patch).reshape(n, grid, grid)


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
              channel_names=BBBC021_STORED_ORDER) -> None:
    """Per crop: its three channels and the occlusion map over the crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.transform import resize

    fig, axes = plt.subplots(len(images), 4, figsize=(8, 2.1 * len(images)), squeeze=False)
    for row, (image, heat, label) in enumerate(zip(images, maps, labels)):
        for c in range(3):
            axes[row][c].imshow(image[..., c], cmap="gray")
            axes[row][c].set_title(channel_names[c] if row == 0 else "", fontsize=8)
        axes[row][3].imshow(image.mean(-1), cmap="gray")
        axes[row][3].imshow(resize(heat, image.shape[:2], order=0), cmap="inferno", alpha=0.55)
        axes[row][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][3].set_title("occlusion map", fontsize=8)
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
    maps = {}
    for folder in folders:
        with np.load(layout.fold_file(folder, "test_occlusion")) as data:
            maps.update(zip(data["crop_id"].tolist(), data["maps"]))
    examples = pick_examples(predictions[predictions["crop_id"].isin(list(maps))], per_class)
    labels = [f"{t}\n{c} {k:g}" for t, c, k in zip(examples["true"], examples["compound"], examples["concentration"])]
    crop_ids = examples["crop_id"].to_numpy()
    crops = open_store(store, log=log)
    plot_maps(np.asarray(crops[crop_ids]), np.stack([maps[i] for i in crop_ids]), labels, output,
              f"{architecture}: where held-out crops' true MoA is read (occlusion maps)", channel_names)
    log(f"occlusion maps of {len(labels)} held-out crops -> {output}")
