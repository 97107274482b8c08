"""The training-ready crop store: one memory-mappable uint8 ``.npy`` per input size, plus its index.

Row ``i`` of ``<size>.npy`` (shape ``(N, size, size, 3)``) is described by
row ``i`` of ``index.parquet`` (``crop_id == i``). Per-plate parts are gathered
into one store here; training reads it with `open_store`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from moaflow.files import atomic_path, write_table
from moaflow.logs import stderr


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
    shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
    with atomic_path(array_path) as tmp:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        offset = 0
        for array in arrays:
            store[offset: offset + len(array)] = array
            offset += len(array)
        store.flush()
        del store
    index = pd.concat(indexes, ignore_index=True)
    index.insert(0, "crop_id", np.arange(len(index)))
    return index


def gather_plates(prefixes: list[str], sizes: list[int], output_dir: str | os.PathLike, log=stderr) -> pd.DataFrame:
    """Gather per-plate crops into one store per size: ``<output_dir>/<size>.npy`` and ``index.parquet``.

    Parameters
    ----------
    prefixes : list of str
        The plates' parts, in order (``<prefix>.<size>.npy`` and ``<prefix>.index.parquet``).
    sizes : list of int
        The input sizes.
    output_dir : path
        The store's folder.
    """
    out = Path(output_dir)
    index = None
    for size in sizes:
        index = gather([(f"{p}.{size}.npy", f"{p}.index.parquet") for p in prefixes], out / f"{size}.npy")
    write_table(index, out / "index.parquet")
    log(f"{len(index)} crops from {len(prefixes)} plate(s) at sizes {sizes}")
    return index
