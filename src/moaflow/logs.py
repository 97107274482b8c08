"""Progress logs and one-line errors, shared by the command line and the Snakemake scripts."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from moaflow.errors import MoaflowError

#: What a user's bad input raises (as opposed to a bug, which keeps its traceback).
USER_ERRORS = (MoaflowError, ValueError, FileNotFoundError)


def rate(per_second: float | None) -> str:
    """A rate as a person reads it: thousands separated, and two significant digits below 10 (a slow CPU
    step says 0.4, not 0)."""
    if per_second is None:
        return "-"
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.2g}"


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


#: TensorFlow's start-up lines on a machine without a usable GPU: not errors, but they look like failures.
_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|Could not find cuda drivers"
    r"|failed call to cuInit|This TensorFlow binary is optimized|To enable the following instructions"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered"
    r"|TF-TRT Warning|Memory patch applied")


@contextmanager
def quiet_framework_startup() -> Iterator[None]:
    """Drop TensorFlow's known start-up lines (oneDNN notice, CUDA probing) from the process's standard
    error while the block runs; every other line, a real error included, is passed on afterwards.

    The device list a training job logs says plainly whether a GPU was found.
    """
    fd = 2   # where the C++ libraries write, whatever Python's sys.stderr is
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if not _STARTUP_NOISE.search(line):
                    print(line, file=sys.stderr)
            sys.stderr.flush()
