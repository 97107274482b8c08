"""The study's per-plate normalisation of 16-bit fields to 8 bit, and a percentile alternative.

The study (Kensert et al. 2019), per plate: Anscombe transform
``2 * sqrt(x + 3/8)`` of every pixel; per channel, subtract the mean and divide
by the standard deviation of all DMSO pixels of the plate; then min-max scale
each field to 0..255 with one min and max over its three channels and truncate
to uint8. Channels come out as (Actin, Tubulin, DAPI), the original's 8-bit
images.

Everything but the per-field min-max is a fixed monotone function of the raw
16-bit value per channel, so each field is normalised with one lookup table per
channel built from exactly the same float64 expressions: bit-identical to
evaluating the formulas pixel by pixel, at a fraction of the cost.

Each normaliser also returns which values exceed the empty-crop threshold
*before* truncation to uint8, as the original tests them (``> 255 / 5.1`` on
the float image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moaflow.study import BBBC021_CHANNELS, BBBC021_STORED_ORDER


def anscombe(x: np.ndarray) -> np.ndarray:
    """Anscombe transform ``2 * sqrt(x + 3/8)`` in float64 (variance-stabilises Poisson counts)."""
    return 2.0 * np.sqrt(np.asarray(x, dtype=np.float64) + 3.0 / 8.0)


def to_stored_order(channels_first: np.ndarray) -> np.ndarray:
    """Reorder a (DAPI, Tubulin, Actin) channels-first array to the stored (Actin, Tubulin, DAPI)."""
    return channels_first[[BBBC021_CHANNELS.index(c) for c in BBBC021_STORED_ORDER]]


def dmso_statistics(fields: list[np.ndarray], illumination: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of the Anscombe-transformed DMSO pixels.

    Parameters
    ----------
    fields : list of ndarray, each (C, M, N)
        The plate's DMSO fields.
    illumination : ndarray (C, M, N), optional
        Divide each field by it first.

    Returns
    -------
    mean, std : ndarray, shape (C,)
        Population statistics (``ddof=0``, as ``numpy.std``).

    Notes
    -----
    Without illumination correction the pixels are integer counts, so the
    statistics come from one histogram per channel: the Anscombe transform is
    evaluated once per distinct count instead of once per pixel.
    """
    if not fields:
        raise ValueError("no DMSO fields on this plate: the study normalisation needs them")
    means, stds = [], []
    for c in range(fields[0].shape[0]):
        if illumination is None and np.issubdtype(fields[0].dtype, np.integer):
            counts = np.zeros(1, np.int64)
            for field in fields:
                h = np.bincount(field[c].ravel())
                if len(h) > len(counts):
                    h[: len(counts)] += counts
                    counts = h
                else:
                    counts[: len(h)] += h
            values = anscombe(np.arange(len(counts)))
            n = counts.sum()
            mean = counts @ values / n
            means.append(mean)
            stds.append(np.sqrt(counts @ (values - mean) ** 2 / n))
        else:
            stack = np.stack([f[c] for f in fields]).astype(np.float64)
            if illumination is not None:
                stack /= illumination[c]
            transformed = anscombe(stack)
            means.append(transformed.mean())
            stds.append(transformed.std())
    return np.array(means), np.array(stds)


def study_normalise(field: np.ndarray, mean: np.ndarray, std: np.ndarray, illumination: np.ndarray | None, *,
                    threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The study's normalisation of one field.

    Parameters
    ----------
    field : ndarray (C, M, N), uint16
        Raw counts, channels in `moaflow.study.BBBC021_CHANNELS` order.
    mean, std : ndarray (C,)
        From `dmso_statistics` of the field's plate.
    illumination : ndarray (C, M, N) or None
        Divide by it before the Anscombe transform (not in the original study).
    threshold : float
        Values of the 0..255 float image above it are flagged in ``above``
        (``preprocess.bbbc021.empty_threshold``).

    Returns
    -------
    image : ndarray (C, M, N), uint8
        Channels in stored order (Actin, Tubulin, DAPI), channels first.
    above : ndarray (C, M, N), bool
        Where the float image, before truncation, exceeds ``threshold``.
    """
    if illumination is not None:
        z = (anscombe(field / illumination) - mean[:, None, None]) / std[:, None, None]
        lo, hi = z.min(), z.max()
        scaled = (z - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(z)
        return to_stored_order(scaled.astype(np.uint8)), to_stored_order(scaled > threshold)
    # Fast path: one lookup table per channel over the field's value range.
    lows = field.reshape(field.shape[0], -1).min(axis=1)
    highs = field.reshape(field.shape[0], -1).max(axis=1)
    tables = [(anscombe(np.arange(lo, hi + 1)) - m) / s for lo, hi, m, s in zip(lows, highs, mean, std)]
    lo = min(t[0] for t in tables)   # monotone: each channel's min/max sits at its min/max count
    hi = max(t[-1] for t in tables)
    image = np.zeros(field.shape, np.uint8)
    above = np.zeros(field.shape, bool)
    if hi > lo:   # a constant field stays zero and empty, as the original's NaNs do
        for c, (table, low) in enumerate(zip(tables, lows)):
            scaled = (table - lo) / (hi - lo) * 255
            np.take(scaled.astype(np.uint8), field[c] - low, out=image[c])
            # monotone, so "above the threshold" is "above one count" per channel
            np.greater_equal(field[c], low + np.searchsorted(scaled, threshold, side="right"), out=above[c])
    return to_stored_order(image), to_stored_order(above)


def percentile_statistics(fields: list[np.ndarray], illumination: np.ndarray | None = None, *,
                          percentiles: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel low/high percentiles of the plate's DMSO pixels (the alternative normalisation)."""
    if not fields:
        raise ValueError("no DMSO fields on this plate: the percentile normalisation needs them")
    lows, highs = [], []
    for c in range(fields[0].shape[0]):
        stack = np.stack([f[c] for f in fields]).astype(np.float64)
        if illumination is not None:
            stack = stack / illumination[c]
        lo, hi = np.percentile(stack, percentiles)
        lows.append(lo)
        highs.append(hi)
    return np.array(lows), np.array(highs)


def percentile_normalise(field: np.ndarray, low: np.ndarray, high: np.ndarray, illumination: np.ndarray | None,
                         *, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale each channel linearly so the plate's DMSO percentiles map to 0 and 255, clipped."""
    values = field.astype(np.float64)   # in float32 a value at the high percentile truncates to 254
    if illumination is not None:
        values = values / illumination
    scaled = np.clip((values - low[:, None, None]) / (high - low)[:, None, None] * 255, 0, 255)
    return to_stored_order(scaled.astype(np.uint8)), to_stored_order(scaled > threshold)


@dataclass(frozen=True)
class Normalisation:
    """One way to map a plate's 16-bit fields to 8 bit (``preprocess.<dataset>.normalisation``).

    Attributes
    ----------
    statistics : callable
        ``statistics(dmso_fields, illumination, **options)``: the plate's statistics from its DMSO fields.
    normalise : callable
        ``normalise(field, *statistics, illumination, threshold=...)`` -> (uint8 image in stored order,
        where the float image exceeded ``threshold`` before truncation).
    options : tuple of str
        The ``preprocess.<dataset>`` settings ``statistics`` takes as keywords.
    """

    statistics: Callable
    normalise: Callable
    options: tuple[str, ...] = ()


#: The image normalisations by name: add one here (and its test).
NORMALISATIONS = {
    "study": Normalisation(dmso_statistics, study_normalise),
    "percentile": Normalisation(percentile_statistics, percentile_normalise, options=("percentiles",)),
}
