"""Illumination correction, CellProfiler style.

CellProfiler's "Regular / All / median filter / rescale by robust minimum /
apply by division": per plate and channel, average every field, smooth the
average with a median filter, divide by its 2nd percentile (clipping below it)
so the function is >= 1, and divide each field by it. As DeepProfiler does, the
average may be down-scaled before smoothing, which makes a large filter cheap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from pathlib import Path

import numpy as np
import pandas as pd
from skimage.filters import median
from skimage.morphology import disk
from skimage.transform import downscale_local_mean, resize

from moaflow.errors import MetadataError
from moaflow.datasets.images import common_shape, read_tiff
from moaflow.files import save_figure, write_array
from moaflow.logs import stderr
from moaflow.study import BBBC021_CHANNELS


def mean_image(paths: Iterable[str | os.PathLike], log: Callable[[str], None] | None = None,
               label: str = "") -> np.ndarray:
    """Average of the images at ``paths`` (float64), read one at a time.

    Parameters
    ----------
    paths : iterable of path
        Images of one plate and channel.
    log : callable, optional
        Receives progress lines (about every 10 %).
    """
    paths = list(paths)
    if not paths:
        raise ValueError(f"{label}: no images to average")
    shape = common_shape(paths)   # from the headers: a field of another size is named before any decoding
    # Integer counts sum exactly (and twice as fast) in uint32: 65,537 16-bit fields fit.
    total = np.zeros(shape, np.uint32)
    start = time.monotonic()
    step = max(1, len(paths) // 10)
    for n, path in enumerate(paths, 1):
        np.add(total, read_tiff(path, shape=shape), out=total, casting="unsafe")
        if log and (n % step == 0 or n == len(paths)):
            eta = (time.monotonic() - start) / n * (len(paths) - n)
            log(f"{label}: {n}/{len(paths)} images averaged, ETA {eta:.0f} s")
    return total / np.float64(len(paths))


def illumination_function(
    average: np.ndarray,
    filter_size: float,
    downscale: int = 1,
    *,
    robust_percentile: float,
) -> np.ndarray:
    """Smooth illumination function from a plate's average image.

    Parameters
    ----------
    average : ndarray, shape (M, N)
        Mean of all fields of one plate and channel.
    filter_size : float
        CellProfiler's median filter size, in pixels of the down-scaled image.
        As in CellProfiler it becomes sigma = size / 2.35 and a disk of radius
        round(sigma).
    downscale : int
        Average-pool the image by this factor before smoothing (1: none).
    robust_percentile : float
        Percentile (0-100) taken as the robust minimum: 2 means the 2nd
        percentile, not ``np.percentile(x, 0.02)``.

    Returns
    -------
    function : ndarray, shape (M, N), float32
        Values >= 1; divide a field by it to correct it.
    """
    if filter_size <= 0 or downscale < 1:
        raise ValueError(f"filter_size={filter_size!r} must be > 0 and downscale={downscale!r} >= 1")
    small = downscale_local_mean(average, (downscale, downscale)) if downscale > 1 else average
    radius = max(1, int(round(filter_size / 2.35)))
    smoothed = median(small.astype(np.float32), footprint=disk(radius), mode="reflect")
    if downscale > 1:
        smoothed = resize(smoothed, average.shape, order=1, mode="edge", anti_aliasing=False)
    robust_minimum = np.percentile(smoothed, robust_percentile)
    if robust_minimum <= 0:
        raise ValueError(f"robust minimum {robust_minimum!r} is not positive: is the plate empty?")
    return (np.maximum(smoothed, robust_minimum) / robust_minimum).astype(np.float32)


def coefficient_of_variation(image: np.ndarray, block: int = 8) -> float:
    """CV of ``image`` after block-averaging: how uneven its smooth component is."""
    pooled = downscale_local_mean(image.astype(np.float64), (block, block))
    return float(pooled.std() / pooled.mean())


def plot_functions(functions: dict[str, np.ndarray], path: str | os.PathLike, title: str) -> None:
    """Save one heat map per channel of the illumination functions (for the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(functions), figsize=(4.2 * len(functions), 3.4), squeeze=False)
    for ax, (channel, function) in zip(axes[0], functions.items()):
        im = ax.imshow(function, cmap="viridis")
        ax.set_title(f"{channel}: max/min {function.max() / function.min():.2f}")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def plate_illumination(table: str | os.PathLike, plate: str, functions: list[str], figure: str | os.PathLike, *,
                       filter_size: float, downscale: int, robust_percentile: float,
                       log=stderr) -> dict[str, np.ndarray]:
    """Illumination functions of every channel of one plate, from all the fields of it the study reads
    (CellProfiler's "All" mode over them: the annotated fields and the DMSO ones; extraction writes no other).

    Parameters
    ----------
    table : path
        The BBBC021 field table (its channel paths).
    plate : str
        The plate.
    functions : list of path
        Where each channel's function goes (``.npy``), in `moaflow.study.BBBC021_CHANNELS` order.
    figure : path
        The QC figure of the three functions.
    filter_size, downscale, robust_percentile
        See `illumination_function`.
    """
    if len(functions) != len(BBBC021_CHANNELS):
        raise ValueError(f"functions: {len(functions)} paths, expected one per channel {BBBC021_CHANNELS}")
    frame = pd.read_parquet(table)
    rows = frame[frame["plate"] == plate]
    if rows.empty:
        raise MetadataError(f"{table}: no fields for plate {plate!r}")
    computed = {}
    for channel in BBBC021_CHANNELS:
        average = mean_image(rows[f"path_{channel.lower()}"], log=log, label=f"{plate} {channel}")
        computed[channel] = illumination_function(average, filter_size, downscale,
                                                  robust_percentile=robust_percentile)
    for path, function in zip(functions, computed.values()):
        write_array(function, path)
    plot_functions(computed, figure, f"Illumination functions, {plate} ({len(rows)} fields)")
    return computed
