"""Reading microscopy images with their content checked before and after decoding.

A field that is not what the study expects gives an error naming the file and
the rule it breaks, instead of a wrong crop: BBBC021 fields are single-channel
16-bit TIFFs of one size per plate, BBBC014 wells 8-bit BMPs. The TIFF header
is read first, so an image that would decode to gigabytes is refused before a
byte of it is decoded.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile

from moaflow.errors import VerificationError

#: The Broad's BBBC021 fields: one channel, 16-bit unsigned counts.
FIELD_DTYPE = np.dtype("uint16")
#: Default cap on an image's pixel count (a real field has 1.3 million).
MAX_PIXELS = 16_000_000


def tiff_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a TIFF's first image, read from its header only.

    Raises
    ------
    VerificationError
        When the file is missing or not a readable TIFF.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return tuple(int(n) for n in page.shape), np.dtype(page.dtype)
    except Exception as exc:  # tifffile raises several types for damaged files
        raise VerificationError(f"{path}: cannot read TIFF header ({type(exc).__name__}: {exc})") from exc


def check_tiff_header(path: str | os.PathLike, *, dtype: np.dtype | str | None = FIELD_DTYPE,
                      shape: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS
                      ) -> tuple[tuple[int, ...], np.dtype]:
    """Check a TIFF's header against what the study expects, without decoding it.

    Parameters
    ----------
    path : path
    dtype : dtype, optional
        Required pixel type (None: any).
    shape : tuple of int, optional
        Required (rows, columns).
    max_pixels : int
        Refuse images with more pixels (decompression bombs).

    Returns
    -------
    shape, dtype
        As read from the header.

    Raises
    ------
    VerificationError
        Naming the file and the rule it breaks.
    """
    found_shape, found_dtype = tiff_header(path)
    if len(found_shape) != 2:
        raise VerificationError(f"{path}: expected a single-channel 2-D image, the header says shape {found_shape}")
    if int(np.prod(found_shape)) > max_pixels:
        raise VerificationError(f"{path}: {found_shape[0]}x{found_shape[1]} = {int(np.prod(found_shape)):,} pixels "
                                f"exceeds the limit of {max_pixels:,} (download.max_image_megapixels)")
    if dtype is not None and found_dtype != np.dtype(dtype):
        raise VerificationError(f"{path}: pixel type {found_dtype}, expected {np.dtype(dtype)} "
                                "(the Broad's fields are 16-bit unsigned counts)")
    if shape is not None and tuple(found_shape) != tuple(shape):
        raise VerificationError(f"{path}: size {found_shape[0]}x{found_shape[1]}, expected {shape[0]}x{shape[1]} "
                                "like the other fields of its plate")
    return found_shape, found_dtype


def read_tiff(path: str | os.PathLike, *, dtype: np.dtype | str | None = FIELD_DTYPE,
              shape: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read one single-channel TIFF after `check_tiff_header`, naming the file when it is damaged.

    Raises
    ------
    VerificationError
        When ``path`` is missing, truncated, of the wrong type or size.
    """
    found_shape, _ = check_tiff_header(path, dtype=dtype, shape=shape, max_pixels=max_pixels)
    try:
        image = tifffile.imread(path)
    except Exception as exc:  # tifffile raises several types for damaged files
        raise VerificationError(f"{path}: cannot decode TIFF ({type(exc).__name__}: {exc})") from exc
    if image.shape != tuple(found_shape):
        raise VerificationError(f"{path}: decoded to shape {image.shape}, the header says {found_shape}")
    return image


def common_shape(paths: Iterable[str | os.PathLike], *, dtype: np.dtype | str | None = FIELD_DTYPE,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The one size shared by all the images at ``paths`` (one plate), read from headers.

    The size most images have is taken as the plate's; every image of another
    size is an error that names it, so the message points at the bad file, not
    at a good one that happened to come first.

    Raises
    ------
    VerificationError
        Listing the files whose size (or type) differs.
    """
    shapes = {Path(p): check_tiff_header(p, dtype=dtype, max_pixels=max_pixels)[0] for p in paths}
    if not shapes:
        raise VerificationError("no images to check")
    (majority, count), = Counter(shapes.values()).most_common(1)
    odd = {p: s for p, s in shapes.items() if s != majority}
    if odd:
        listed = ", ".join(f"{p} ({s[0]}x{s[1]})" for p, s in list(odd.items())[:5])
        raise VerificationError(f"{len(odd)} image(s) differ in size from the {majority[0]}x{majority[1]} of "
                                f"{count} of {len(shapes)} images of this plate: {listed}")
    return majority


def read_gray8(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an 8-bit grayscale image (BBBC014's BMP wells are 8-bit), refusing huge ones before decoding."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise VerificationError(f"{path}: {image.width}x{image.height} pixels exceed the limit of "
                                        f"{max_pixels:,} (download.max_image_megapixels)")
            if image.mode not in ("L", "P", "1"):
                raise VerificationError(f"{path}: image mode {image.mode}, expected 8-bit grayscale")
            return np.asarray(image.convert("L"))
    except VerificationError:
        raise
    except Exception as exc:  # PIL raises several types for damaged files
        raise VerificationError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
