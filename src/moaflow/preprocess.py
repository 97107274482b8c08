"""Normalise, crop and resize fields into training-ready uint8 arrays.

The study's normalisation (Kensert et al. 2019), per plate: Anscombe transform
``2 * sqrt(x + 3/8)`` of every pixel; per channel, subtract the mean and divide
by the standard deviation of all DMSO pixels of the plate; then min-max scale
each field to 0..255 with one min and max over its three channels and truncate
to uint8. Channels are stored as (Actin, Tubulin, DAPI), like the original's
8-bit images.

Since everything but the per-field min-max is a fixed monotone function of the
raw 16-bit value per channel, each field is normalised with one lookup table
per channel built from exactly the same float64 expressions, so the result is
bit-identical to evaluating the formulas pixel by pixel, at a fraction of the
cost. Resizing uses exact area weights (what OpenCV's ``INTER_AREA`` does when
down-scaling) as sparse matrices applied to the whole field at once.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse

from moaflow.download import VerificationError
from moaflow.illumination import read_tiff

#: Channels as read (the image table's path columns) and as stored (the study's order).
READ_ORDER = ("DAPI", "Tubulin", "Actin")
STUDY_ORDER = ("Actin", "Tubulin", "DAPI")
INDEX_COLUMNS = ["plate", "batch", "well", "site", "replicate", "compound", "concentration", "moa",
                 "treatment", "image_number"]


def anscombe(x: np.ndarray) -> np.ndarray:
    """Anscombe transform ``2 * sqrt(x + 3/8)`` in float64 (variance-stabilises Poisson counts)."""
    return 2.0 * np.sqrt(np.asarray(x, dtype=np.float64) + 3.0 / 8.0)


# ------------------------------------------------------------------ fields

def read_field(row, order: tuple[str, ...] = READ_ORDER) -> np.ndarray:
    """Read one field's channels into a (channels, rows, columns) array.

    ``row`` is a mapping with ``path_<channel>`` entries (an image-table row).
    A damaged TIFF raises `moaflow.download.VerificationError` naming the file.
    """
    channels = [read_tiff(row[f"path_{c.lower()}"]) for c in order]
    shapes = {c.shape for c in channels}
    if len(shapes) != 1:
        raise ValueError(f"{row['path_dapi']}: channels differ in shape {sorted(shapes)}")
    return np.stack(channels)


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


def study_normalise(field: np.ndarray, mean: np.ndarray, std: np.ndarray,
                    illumination: np.ndarray | None = None) -> np.ndarray:
    """The study's normalisation of one field.

    Parameters
    ----------
    field : ndarray (C, M, N), uint16
        Raw counts, channels in `READ_ORDER`.
    mean, std : ndarray (C,)
        From `dmso_statistics` of the field's plate.
    illumination : ndarray (C, M, N), optional
        Divide by it before the Anscombe transform (not in the original study).

    Returns
    -------
    image : ndarray (C, M, N), uint8
        Channels in `STUDY_ORDER` (channels first: crops and resizing work per channel).
    """
    if illumination is not None:
        z = (anscombe(field / illumination) - mean[:, None, None]) / std[:, None, None]
        lo, hi = z.min(), z.max()
        scaled = ((z - lo) / (hi - lo) * 255).astype(np.uint8)
        return _to_study_order(scaled)
    # Fast path: one lookup table per channel over the field's value range.
    lows = field.reshape(field.shape[0], -1).min(axis=1)
    highs = field.reshape(field.shape[0], -1).max(axis=1)
    tables = [(anscombe(np.arange(lo, hi + 1)) - m) / s for lo, hi, m, s in zip(lows, highs, mean, std)]
    lo = min(t[0] for t in tables)   # monotone: each channel's min/max sits at its min/max count
    hi = max(t[-1] for t in tables)
    out = np.empty(field.shape, np.uint8)
    for c, (table, low) in enumerate(zip(tables, lows)):
        lut = ((table - lo) / (hi - lo) * 255).astype(np.uint8)
        np.take(lut, field[c] - low, out=out[c])
    return _to_study_order(out)


def percentile_statistics(fields: list[np.ndarray], percentiles: tuple[float, float],
                          illumination: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel low/high percentiles of the plate's DMSO pixels (the alternative normalisation)."""
    lows, highs = [], []
    for c in range(fields[0].shape[0]):
        stack = np.stack([f[c] for f in fields]).astype(np.float64)
        if illumination is not None:
            stack = stack / illumination[c]
        lo, hi = np.percentile(stack, percentiles)
        lows.append(lo)
        highs.append(hi)
    return np.array(lows), np.array(highs)


def percentile_normalise(field: np.ndarray, low: np.ndarray, high: np.ndarray,
                         illumination: np.ndarray | None = None) -> np.ndarray:
    """Scale each channel linearly so the plate's DMSO percentiles map to 0 and 255, clipped."""
    values = field.astype(np.float32)
    if illumination is not None:
        values = values / illumination
    scaled = (values - low[:, None, None]) / (high - low)[:, None, None] * 255
    return _to_study_order(np.clip(scaled, 0, 255).astype(np.uint8))


def _to_study_order(channels_first: np.ndarray) -> np.ndarray:
    return channels_first[[READ_ORDER.index(c) for c in STUDY_ORDER]]


# ------------------------------------------------------------------ crops

def crop_boxes(shape: tuple[int, int], grid: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Non-overlapping crops on a ``grid`` (rows, columns), relative to the field size.

    A 1024x1280 field with grid (2, 2) gives four 512x640 crops, row-major.
    """
    rows, columns = shape
    gr, gc = grid
    h, w = rows // gr, columns // gc
    return [(slice(i * h, (i + 1) * h), slice(j * w, (j + 1) * w)) for i in range(gr) for j in range(gc)]


def is_empty(crop: np.ndarray, threshold: float = 255 / 5.1, max_fraction: float = 0.002) -> bool:
    """The study's empty-crop rule: at most ``max_fraction`` of its values exceed ``threshold``.

    The fraction is over all values of the crop, every channel included.
    """
    return np.count_nonzero(crop > threshold) / crop.size <= max_fraction


@lru_cache(maxsize=64)
def area_weights(n_in: int, n_out: int) -> scipy.sparse.csr_matrix:
    """Sparse (n_out, n_in) matrix of area-interpolation weights.

    Output pixel ``i`` covers ``[i * s, (i + 1) * s)`` of the input with
    ``s = n_in / n_out``; its weight on input pixel ``j`` is the overlap of that
    interval with ``[j, j + 1)``, divided by ``s``. Rows sum to 1. For
    down-scaling this is OpenCV's ``INTER_AREA``; for up-scaling it is
    nearest-neighbour-like box sampling.
    """
    scale = n_in / n_out
    rows, cols, vals = [], [], []
    for i in range(n_out):
        start, stop = i * scale, (i + 1) * scale
        for j in range(int(np.floor(start)), min(n_in, int(np.ceil(stop)))):
            overlap = min(stop, j + 1) - max(start, j)
            if overlap > 1e-12:
                rows.append(i)
                cols.append(j)
                vals.append(overlap / scale)
    return scipy.sparse.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(n_out, n_in))


@lru_cache(maxsize=64)
def _block_weights(n_in: int, n_out: int, blocks: int):
    """Weights that resize each of ``blocks`` consecutive runs of ``n_in`` rows to ``n_out``.

    Area weights repeat with a period of ``n_in / g`` inputs and ``n_out / g``
    outputs (``g = gcd(n_in, n_out)``): 512 -> 224 is 16 rows -> 7 rows, 32 times.
    A short period is applied as a small dense matrix over reshaped blocks (BLAS);
    a long one (512 -> 299 has none) as one sparse block-diagonal matrix.
    """
    g = math.gcd(n_in, n_out)
    if n_in // g <= 64:
        return area_weights(n_in // g, n_out // g).toarray().astype(np.float32), blocks * g
    return scipy.sparse.block_diag([area_weights(n_in, n_out)] * blocks, format="csr"), None


def _resize_rows(x: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Area-resize axis 0 of a 2-D float32 array made of blocks of ``n_in`` rows, each to ``n_out``."""
    weights, periods = _block_weights(n_in, n_out, x.shape[0] // n_in)
    if periods is None:
        return weights @ x
    return np.matmul(weights, x.reshape(periods, weights.shape[1], x.shape[1])).reshape(-1, x.shape[1])


def _resize_columns(x: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Area-resize axis 1 of a 2-D float32 array made of blocks of ``n_in`` columns, each to ``n_out``."""
    weights, periods = _block_weights(n_in, n_out, x.shape[1] // n_in)
    if periods is None:
        return (weights @ np.ascontiguousarray(x.T)).T
    # One GEMM: every row cut into periods, times the small weight matrix; no transpose copy.
    return (x.reshape(-1, weights.shape[1]) @ weights.T).reshape(x.shape[0], -1)


def _resize_plane(plane: np.ndarray, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
    """Resize every (rows[0] x columns[0]) tile of a 2-D float32 plane to (rows[1] x columns[1])
    by area interpolation; uint8 out, rounded to nearest."""
    if _block_weights(columns[0], columns[1], plane.shape[1] // columns[0])[1] is not None:
        resized = _resize_rows(_resize_columns(plane, *columns), *rows)   # GEMM first, on the big plane
    else:
        resized = _resize_columns(_resize_rows(plane, *rows), *columns)   # shrink rows before transposing
    np.rint(resized, out=resized)
    np.clip(resized, 0, 255, out=resized)
    return resized.astype(np.uint8)


def resize_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (C, M, N) uint8 image to ``size`` (rows, columns) by area interpolation, rounded."""
    return np.stack([_resize_plane(plane.astype(np.float32), (image.shape[1], size[0]), (image.shape[2], size[1]))
                     for plane in image])


def crops_at_sizes(image: np.ndarray, grid: tuple[int, int], sizes: list[int]) -> dict[int, np.ndarray]:
    """Cut a (C, M, N) image into the grid's crops and resize every crop to each square size.

    All crops of a field are resized in one pass: block-diagonal area weights
    map the whole field to a grid of resized crops.

    Returns
    -------
    crops : dict of int to ndarray (K, size, size, C), uint8
        K = rows x columns of the grid, row-major; channels last, as Keras expects.
    """
    c, m, n = image.shape
    gr, gc = grid
    h, w = m // gr, n // gc
    full = {size: np.empty((c, gr * size, gc * size), np.uint8) for size in sizes}
    for k in range(c):
        plane = image[k, : h * gr, : w * gc].astype(np.float32)   # converted once for every size
        for size in sizes:
            full[size][k] = _resize_plane(plane, (h, size), (w, size))
    return {size: f.reshape(c, gr, size, gc, size).transpose(1, 3, 2, 4, 0).reshape(gr * gc, size, size, c)
            for size, f in full.items()}


# ------------------------------------------------------------------ plates

def preprocess_plate(
    fields: pd.DataFrame,
    *,
    sizes: list[int],
    grid: tuple[int, int] = (2, 2),
    normalisation: str = "study",
    percentiles: tuple[float, float] = (1.0, 99.9),
    illumination: np.ndarray | None = None,
    empty_threshold: float = 255 / 5.1,
    empty_fraction: float = 0.002,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """Normalise, crop and resize the annotated fields of one plate.

    Parameters
    ----------
    fields : pandas.DataFrame
        The plate's rows of the image table, DMSO fields included (they
        provide the normalisation statistics and are not cropped).
    sizes : list of int
        Square input sizes to produce (224, 299, 256 ...).
    grid : tuple of int
        Crops per field as (rows, columns).
    normalisation : {"study", "percentile"}
    percentiles : tuple of float
        For ``"percentile"``: DMSO percentiles mapped to 0 and 255.
    illumination : ndarray (3, M, N), optional
        Illumination functions in `READ_ORDER`; fields are divided by them.
    empty_threshold, empty_fraction : float
        See `is_empty`.

    Returns
    -------
    arrays : dict of int to ndarray (K, size, size, 3) uint8
    index : pandas.DataFrame
        K rows, one per kept crop, in array order: `INDEX_COLUMNS` plus ``crop``.
    """
    log = log or (lambda _: None)
    plate = fields["plate"].iloc[0]
    dmso = fields[fields["is_dmso"]]
    annotated = fields[~fields["is_dmso"]]
    started = time.monotonic()
    dmso_fields = [read_field(r) for _, r in dmso.iterrows()]
    if normalisation == "study":
        stats = dmso_statistics(dmso_fields, illumination)
        normalise = study_normalise
    elif normalisation == "percentile":
        if not dmso_fields:
            raise ValueError(f"plate {plate}: no DMSO fields for the percentile normalisation")
        stats = percentile_statistics(dmso_fields, percentiles, illumination)
        normalise = percentile_normalise
    else:
        raise ValueError(f"normalisation={normalisation!r}: expected 'study' or 'percentile'")
    del dmso_fields
    log(f"{plate}: DMSO statistics from {len(dmso)} fields")
    kept = {size: [] for size in sizes}
    records = []
    step = max(1, len(annotated) // 10)
    for n, (_, row) in enumerate(annotated.iterrows(), 1):
        image = normalise(read_field(row), *stats, illumination)
        boxes = crop_boxes(image.shape[1:], grid)
        keep = [k for k, (rs, cs) in enumerate(boxes)
                if not is_empty(image[:, rs, cs], empty_threshold, empty_fraction)]
        if keep:
            resized = crops_at_sizes(image, grid, sizes)
            for size in sizes:
                kept[size].append(resized[size][keep])
            records.extend({**{c: row[c] for c in INDEX_COLUMNS}, "crop": k} for k in keep)
        if n % step == 0 or n == len(annotated):
            elapsed = time.monotonic() - started
            log(f"{plate}: {n}/{len(annotated)} fields, {len(records)} crops kept, "
                f"ETA {elapsed / n * (len(annotated) - n):.0f} s")
    arrays = {size: (np.concatenate(kept[size]) if kept[size] else np.zeros((0, size, size, 3), np.uint8))
              for size in sizes}
    return arrays, pd.DataFrame.from_records(records, columns=INDEX_COLUMNS + ["crop"])


def preprocess_bbbc014(
    wells: pd.DataFrame,
    *,
    sizes: list[int],
    grid: tuple[int, int] = (4, 4),
    log: Callable[[str], None] | None = None,
) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """BBBC014 as in the study: RGB (zeros, DAPI, FITC), resize to a square, grid crops,
    Anscombe on channels 2-3 and one min-max over them per image, to uint8.

    The square's side is the image's row count (1024 for the real 1024x1360),
    so smaller stand-ins keep the geometry. Only labelled wells (label >= 0) are used.
    """
    from PIL import Image

    log = log or (lambda _: None)
    labelled = wells[wells["label"] >= 0]
    kept = {size: [] for size in sizes}
    records = []
    for n, (_, row) in enumerate(labelled.iterrows(), 1):
        channels = []
        for column in ("path_dapi", "path_fitc"):
            try:
                with Image.open(row[column]) as im:
                    channels.append(np.asarray(im.convert("L")))
            except Exception as exc:  # PIL raises several types for damaged files
                raise VerificationError(f"{row[column]}: cannot read image ({exc})") from exc
        side = channels[0].shape[0]
        rgb = np.zeros((3, side, side), np.uint8)   # (zeros, DAPI, FITC), channels first
        rgb[1:] = resize_area(np.stack(channels), (side, side))
        values = anscombe(rgb[1:])
        lo, hi = values.min(), values.max()
        rgb[1:] = ((values - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
        resized = crops_at_sizes(rgb, grid, sizes)
        for size in sizes:
            kept[size].append(resized[size])
        records.extend({"well": row["well"], "row": row["row"], "column": row["column"],
                        "cell_line": row["cell_line"], "label": row["label"], "crop": k}
                       for k in range(grid[0] * grid[1]))
        if n % 16 == 0 or n == len(labelled):
            log(f"BBBC014: {n}/{len(labelled)} wells")
    arrays = {size: np.concatenate(kept[size]) for size in sizes}
    return arrays, pd.DataFrame.from_records(records)


# ------------------------------------------------------------------ store

def write_array(array: np.ndarray, path: str | os.PathLike) -> None:
    """Save ``array`` as ``.npy`` (memory-mappable), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def gather(parts: list[tuple[str | os.PathLike, str | os.PathLike]], array_path: str | os.PathLike
           ) -> pd.DataFrame:
    """Concatenate per-plate arrays into one memory-mapped store, atomically.

    Parameters
    ----------
    parts : list of (array path, index path)
        Per-plate ``.npy`` arrays and their index tables, in order.
    array_path : path
        The combined ``.npy``.

    Returns
    -------
    index : pandas.DataFrame
        The combined index with ``crop_id`` = row in the array.
    """
    arrays = [np.load(a, mmap_mode="r") for a, _ in parts]
    indexes = [pd.read_parquet(i) for _, i in parts]
    for (a_path, i_path), array, index in zip(parts, arrays, indexes):
        if len(array) != len(index):
            raise ValueError(f"{a_path}: {len(array)} crops but {i_path} has {len(index)} rows")
    total = sum(len(a) for a in arrays)
    shape = (total, *arrays[0].shape[1:])
    array_path = Path(array_path)
    tmp = array_path.with_name(array_path.name + ".tmp.npy")
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    offset = 0
    for array in arrays:
        store[offset: offset + len(array)] = array
        offset += len(array)
    store.flush()
    del store
    os.replace(tmp, array_path)
    index = pd.concat(indexes, ignore_index=True)
    index.insert(0, "crop_id", np.arange(len(index)))
    return index
