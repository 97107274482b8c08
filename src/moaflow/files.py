"""Atomic file writes: an output appears complete or not at all.

Every writer in moaflow goes through `atomic_path`: it writes a temporary file
beside the target (same folder, so the final rename is atomic; same suffix,
so writers that pick a format from it still work) and renames it into place
only when the write finished. An interrupted job therefore never leaves a
half-written file under an output's name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` when the block succeeds.

    The temporary file is removed when the block raises, and ``path`` keeps
    whatever it held before.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = (path.name[: -len(path.suffix)], path.suffix) if path.suffix else (path.name, "")
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's content, read in 4 MB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_json(data, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically (numpy scalars become floats)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=float))


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``table`` as parquet, or as CSV/TSV for those suffixes, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            table.to_csv(tmp, index=False)
        elif path.suffix == ".tsv":
            table.to_csv(tmp, sep="\t", index=False)
        else:
            table.to_parquet(tmp, index=False)


def write_array(array: np.ndarray, path: str | os.PathLike) -> None:
    """Save ``array`` as ``.npy`` (memory-mappable), atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def save_figure(figure, path: str | os.PathLike, dpi: int = 90) -> None:
    """Save a matplotlib figure atomically (the format follows the suffix) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=dpi)
    finally:
        plt.close(figure)


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put a completed ``staging`` folder in place of ``target``; the old ``target`` goes only after.

    Between the two renames the old folder waits as ``.<target>.old``; `restore_folder`
    puts it back if the process died just then.
    """
    import shutil

    staging, target = Path(staging), Path(target)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_folder(target: str | os.PathLike) -> None:
    """Undo a `replace_folder` interrupted between its two renames."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)
