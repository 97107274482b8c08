"""Every step of the workflow by name: what a Snakemake rule runs, and what ``moaflow <step>`` runs by hand.

A step is one documented function. A rule runs it through the generic script
``workflow/scripts/step.py``: ``params.step`` names it, and the rule's named
inputs, outputs and other params are the function's keyword arguments, by
name. A receipt (``<data>.verified.json``) stands for the data it describes;
unnamed inputs only order the jobs. The command line (`moaflow.cli`) is
generated from the same signatures and docstrings, so a setting goes from the
config schema to the rule's params to the function's keyword, with no flag
layer in between.

Each job's standard output and error go to its log (``log:`` of the rule),
with progress lines and, for bad input, one line naming the file, key or
value at fault (exit status 1).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager

from moaflow.layout import RECEIPT_SUFFIX, data_of
from moaflow.logs import USER_ERRORS, log_file

#: step name -> "module:function". The devtools steps are for the demo, tests and benchmarks.
STEPS = {
    "fetch": "moaflow.datasets.download:download_file",
    "extract-bbbc021": "moaflow.datasets.download:extract_plate",
    "extract-bbbc014": "moaflow.datasets.download:extract_images",
    "extract-crops": "moaflow.datasets.download:extract_crops_archive",
    "convert-weights": "moaflow.datasets.packaged:convert_weights",
    "table-bbbc021": "moaflow.datasets.tables:write_bbbc021_table",
    "table-bbbc014": "moaflow.datasets.tables:write_bbbc014_table",
    "table-crops": "moaflow.datasets.tables:write_crops_table",
    "illumination": "moaflow.preprocess.illumination:plate_illumination",
    "preprocess-plate": "moaflow.preprocess.plates:preprocess_plate_files",
    "gather": "moaflow.preprocess.store:gather_plates",
    "preprocess-bbbc014": "moaflow.preprocess.plates:preprocess_bbbc014_files",
    "preprocess-crops": "moaflow.preprocess.plates:preprocess_crops_files",
    "folds": "moaflow.learn.folds:write_dataset_folds",
    "check-folds": "moaflow.learn.folds:check_folds_file",
    "train": "moaflow.learn.train:train_job",
    "evaluate": "moaflow.analysis.evaluate:evaluate_dataset",
    "evaluate-predictions": "moaflow.analysis.evaluate:evaluate_external",
    "embed-controls": "moaflow.analysis.profiling:embed_controls",
    "profile": "moaflow.analysis.profiling:profile_dataset",
    "interpret": "moaflow.analysis.interpretation:interpret_run",
    "track": "moaflow.tracking:track",
    "resources": "moaflow.analysis.resources:resource_table",
    "show-config": "moaflow.config:show",
    "standin-bbbc021": "moaflow.devtools.standin:write_bbbc021",
    "standin-bbbc014": "moaflow.devtools.standin:write_bbbc014",
    "serve": "moaflow.devtools.serve:serve",
    "demo": "moaflow.devtools.demo:run_demo",
    "rehearse": "moaflow.devtools.rehearsal:run_rehearsal",
    "bench-preprocess": "moaflow.devtools.bench:bench_preprocess",
    "bench-feeder": "moaflow.devtools.bench:bench_feeder",
    "bench-training": "moaflow.devtools.bench:bench_training",
    "project": "moaflow.devtools.projection:project_study",
}


def load(name: str) -> Callable:
    """The function of step ``name`` (its module imported now, and only it)."""
    if name not in STEPS:
        raise ValueError(f"step {name!r}: expected one of {', '.join(STEPS)}")
    module, _, function = STEPS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def summary(name: str) -> str:
    """The first line of a step's docstring, read from its source without importing it (``moaflow --help``)."""
    module, _, function = STEPS[name].partition(":")
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return (ast.get_docstring(node) or "").strip().splitlines()[0]


def limit_threads(threads: int) -> None:
    """Give the process ``threads`` cores: BLAS, OpenMP, OpenCV and the Keras backends.

    Before the frameworks load (their thread pools read the environment once): several parallel jobs
    each starting one thread per machine core halve the throughput.
    """
    for variable in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[variable] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    # TensorFlow's C++ start-up lines (CUDA probing on CPU-only machines) look like failures.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(threads)
    threadpool_limits(limits=threads)


def call(function: Callable, kwargs: dict, log: Callable[[str], None]):
    """Call ``function`` with ``kwargs`` (and ``log`` when it takes one), refusing names it does not take."""
    parameters = inspect.signature(function).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise TypeError(f"{function.__module__}.{function.__name__} takes no {unknown}; it takes "
                        f"{sorted(parameters)}")
    if "log" in parameters:
        kwargs = {**kwargs, "log": log}
    return function(**kwargs)


def _value(value):
    """A Snakemake input/output/param value as a plain Python value; a receipt stands for its data."""
    if isinstance(value, str):
        return data_of(value) if value.endswith(RECEIPT_SUFFIX) else value
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return [_value(v) for v in value]
    return value


def _named(items) -> dict:
    return {name: _value(list(value) if type(value).__name__ == "Namedlist" else value)
            for name, value in items.items()}


@contextmanager
def _output_to(path: str):
    """Standard output and error of this process (Python's and the C libraries') appended to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def run_job(snakemake, from_config: dict | None = None, *, not_arguments: tuple[str, ...] = ()) -> None:
    """Run the step a rule names (``params.step``) with the rule's named files and params; exit 1 on bad input.

    ``from_config`` adds arguments a script read from the config itself (settings that must not be params,
    since a params change makes Snakemake delete and redo the output); ``not_arguments`` names params that
    only the script reads.
    """
    params = _named(snakemake.params)
    name = params.pop("step")
    for key in not_arguments:
        params.pop(key)
    kwargs = {**_named(snakemake.input), **_named(snakemake.output), **params, **(from_config or {})}
    limit_threads(snakemake.threads)
    log_path = snakemake.log[0]
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with _output_to(log_path), log_file(log_path) as log:
        try:
            call(load(name), kwargs, log)
        except USER_ERRORS as exc:
            log(f"moaflow {name}: error: {exc}")
            raise SystemExit(1) from None
