"""Cutting fields into crops and resizing them exactly as the original code did (OpenCV's INTER_AREA)."""

from __future__ import annotations

import cv2
import numpy as np


def crop_boxes(shape: tuple[int, int], grid: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Non-overlapping crops on a ``grid`` (rows, columns), relative to the field size.

    A 1024x1280 field with grid (2, 2) gives four 512x640 crops, row-major.

    Raises
    ------
    ValueError
        When the grid cuts the field into crops smaller than one pixel.
    """
    rows, columns = shape
    gr, gc = grid
    if gr < 1 or gc < 1 or rows // gr < 1 or columns // gc < 1:
        raise ValueError(f"crop grid {list(grid)} cuts a {rows}x{columns} field into {rows // max(gr, 1)}x"
                         f"{columns // max(gc, 1)} crops; expected a grid of at most {rows}x{columns} "
                         "(preprocess.<dataset>.crop_grid)")
    h, w = rows // gr, columns // gc
    return [(slice(i * h, (i + 1) * h), slice(j * w, (j + 1) * w)) for i in range(gr) for j in range(gc)]


def is_empty(above: np.ndarray, max_fraction: float = 0.002) -> bool:
    """The study's empty-crop rule: at most ``max_fraction`` of a crop's values exceed the threshold.

    ``above`` flags, per value (every channel included), whether the float
    image exceeded the threshold before truncation (see `moaflow.preprocess.intensity`).
    """
    return np.count_nonzero(above) / above.size <= max_fraction


def resize_area(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a (rows, columns[, channels]) uint8 image with ``cv2.resize(..., INTER_AREA)``, as the study did
    (beyond four channels, each channel on its own).

    ``size`` is a square side or (rows, columns).
    """
    rows, columns = (size, size) if isinstance(size, int) else size
    if image.ndim == 3 and image.shape[2] > 4:
        # OpenCV's area resizing of more than four channels is not each channel's (measured: 6 channels differ
        # from six grey resizes); each channel is resized as the grey image it is.
        return np.stack([resize_area(image[..., c], (rows, columns)) for c in range(image.shape[2])], axis=-1)
    return cv2.resize(np.ascontiguousarray(image), (columns, rows), interpolation=cv2.INTER_AREA)


def field_crops(image: np.ndarray, above: np.ndarray, grid: tuple[int, int], sizes: list[int],
                max_fraction: float = 0.002) -> tuple[list[int], dict[int, np.ndarray]]:
    """The kept crops of one normalised field, resized to each square size.

    Parameters
    ----------
    image : ndarray (C, M, N), uint8
        A normalised field, channels first.
    above : ndarray (C, M, N), bool
        Its values above the empty-crop threshold, before truncation.
    grid : tuple of int
        Crops per field as (rows, columns).
    sizes : list of int
        Square sides to produce.
    max_fraction : float
        See `is_empty`.

    Returns
    -------
    kept : list of int
        Row-major grid positions of the crops that are not empty.
    crops : dict of int to ndarray (K, size, size, C), uint8
        Channels last, as Keras expects.
    """
    boxes = crop_boxes(image.shape[1:], grid)
    kept = [k for k, (rs, cs) in enumerate(boxes) if not is_empty(above[:, rs, cs], max_fraction)]
    channels_last = np.moveaxis(image, 0, -1)
    crops = {size: np.empty((len(kept), size, size, image.shape[0]), np.uint8) for size in sizes}
    for n, k in enumerate(kept):
        rs, cs = boxes[k]
        crop = channels_last[rs, cs]
        for size in sizes:
            crops[size][n] = resize_area(crop, size).reshape(size, size, -1)
    return kept, crops
