"""Progress logs and one-line errors, shared by the command line and the Snakemake scripts."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from moaflow.errors import MoaflowError

#: What a user's bad input raises (as opposed to a bug, which keeps its traceback).
USER_ERRORS = (MoaflowError, ValueError, FileNotFoundError)


def stderr(line: str) -> None:
    """Print one progress line to standard error, at once."""
    print(line, file=sys.stderr, flush=True)


@contextmanager
def log_file(path: str | os.PathLike | None) -> Iterator[Callable[[str], None]]:
    """A line logger appending to ``path`` (flushed per line), or to stderr when ``path`` is None."""
    if path is None:
        yield stderr
        return
    with open(path, "a") as handle:
        def log(line: str) -> None:
            handle.write(line + "\n")
            handle.flush()
        yield log


@contextmanager
def one_line_errors(what: str, log: Callable[[str], None] = stderr) -> Iterator[None]:
    """Turn a user error into ``"<what>: error: <message>"`` on ``log`` and exit status 1."""
    try:
        yield
    except USER_ERRORS as exc:
        log(f"{what}: error: {exc}")
        if log is not stderr:
            stderr(f"{what}: error: {exc}")
        raise SystemExit(1) from None
