"""Benchmarks (not tests): throughput of preprocessing against bare TIFF reading.

``moaflow bench-preprocess`` builds full-size (1024x1280) stand-in plates,
then times, on the same files and with a warm page cache for both:

* bare read + decode of every TIFF a step reads (tifffile), and
* the step itself: the illumination pass (all fields of a plate) and the
  normalise + crop + resize pass (DMSO fields for statistics, annotated
  fields to 224, 299 and 256),

for 1 process (plates in turn) and 2 processes (one plate each), and prints
fields/s and the ratio step / bare read.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pandas as pd
import tifffile

from moaflow import download, illumination, image_table, preprocess, standin
from moaflow.study import BBBC021_CHANNELS

SIZES = [224, 299, 256]


def _bare_read(paths: list[str]) -> None:
    for path in paths:
        tifffile.imread(path)


def _illumination_pass(fields: pd.DataFrame) -> None:
    for channel in BBBC021_CHANNELS:
        average = illumination.mean_image(fields[f"path_{channel.lower()}"])
        illumination.illumination_function(average, filter_size=24, downscale=4)


def _preprocess_pass(fields: pd.DataFrame) -> None:
    preprocess.preprocess_plate(fields, sizes=SIZES)


def _paths(fields: pd.DataFrame) -> list[str]:
    return [p for c in BBBC021_CHANNELS for p in fields[f"path_{c.lower()}"]]


def _timed(job):
    from threadpoolctl import threadpool_limits

    function, argument = job
    start = time.perf_counter()
    with threadpool_limits(limits=1):  # one core per process, as each Snakemake job declares
        function(argument)
    return time.perf_counter() - start


def _run(jobs, processes: int) -> float:
    start = time.perf_counter()
    if processes == 1:
        for job in jobs:
            _timed(job)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_timed, jobs)
    return time.perf_counter() - start


def prepare(out: Path, plates: int = 2) -> pd.DataFrame:
    """Full-size stand-in plates of about 200 fields each (a real plate has 240), extracted."""
    www = out / "www" / "BBBC021"
    if not (www / "BBBC021_v1_image.csv").exists():
        standin.write_bbbc021(out, n_plates=plates, sites=4, dmso_wells=6, compounds_per_moa=2,
                              concentrations_per_compound=2, shape=(1024, 1280), seed=5)
    table = image_table.bbbc021_image_table(www / "BBBC021_v1_image.csv", www / "BBBC021_v1_moa.csv",
                                            out / "images")
    for plate in table["plate"].unique():
        if not (out / "images" / plate).exists():
            download.extract_archive(www / f"BBBC021_v1_images_{plate}.zip", out / "images" / plate,
                                     member_root=plate, log=lambda _: None)
    return table


def bench_preprocess(out: str | Path, repeats: int = 2) -> list[dict]:
    """Time bare reads and the two preprocessing passes; print and return the rows."""
    out = Path(out)
    table = prepare(out)
    plates = [table[table["plate"] == p] for p in table["plate"].unique()]
    _bare_read([p for f in plates for p in _paths(f)])  # warm the page cache for both sides
    rows = []
    for step, function in (("illumination", _illumination_pass), ("normalise+crop+resize", _preprocess_pass)):
        for processes in (1, 2):
            best_bare = best_step = float("inf")
            for _ in range(repeats):
                best_bare = min(best_bare, _run([(_bare_read, _paths(f)) for f in plates], processes))
                best_step = min(best_step, _run([(function, f) for f in plates], processes))
            n_fields = sum(len(f) for f in plates)
            rows.append({"step": step, "processes": processes, "fields": n_fields,
                         "bare_fields_per_s": n_fields / best_bare, "step_fields_per_s": n_fields / best_step,
                         "ratio": best_bare / best_step})
    frame = pd.DataFrame(rows)
    print("Full-size 1024x1280 fields (3 TIFFs each), warm page cache, best of", repeats)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
    return rows


def bench_training(store_dir: str | Path, sizes: dict[str, int], *, steps: int = 50, batch_size: int = 32,
                   warmup: int = 5, workers: int = 4) -> list[dict]:
    """Training throughput per architecture: the real memory-mapped store vs synthetic in-memory data.

    Both runs use the same model, batch size and `CropBatches` input path; the
    synthetic array lives in RAM, so the ratio shows whether feeding data from
    the store is the bottleneck. Prints images/s; on a GPU run it with
    ``KERAS_BACKEND=jax`` where TensorFlow is not installed.
    """
    import keras
    import numpy as np

    from moaflow.datasets import CropBatches
    from moaflow.models import build_model

    rows = []
    for architecture, size in sizes.items():
        store = np.load(Path(store_dir) / f"{size}.npy", mmap_mode="r")
        n = min(len(store), batch_size * (steps + warmup))
        picks = np.random.default_rng(0).choice(len(store), size=n, replace=len(store) < n)
        synthetic = np.random.default_rng(1).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        targets = np.eye(12, dtype=np.float32)[np.arange(n) % 12]
        result = {"architecture": architecture, "input": size, "batch": batch_size, "backend": keras.backend.backend()}
        for name, source, chosen in (("synthetic", synthetic, np.arange(n)), ("store", store, picks)):
            model = build_model(architecture, size, 12, weights=None)
            model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss="categorical_crossentropy")
            data = CropBatches(source, chosen, targets, batch_size, shuffle=True, workers=workers,
                               max_batches=warmup + steps)
            times = []

            class Clock(keras.callbacks.Callback):
                def on_train_batch_end(self, batch, logs=None):
                    times.append(time.perf_counter())

            model.fit(data, epochs=1, verbose=0, callbacks=[Clock()])
            timed = times[warmup:]
            result[f"{name}_images_per_s"] = batch_size * (len(timed) - 1) / (timed[-1] - timed[0])
        result["ratio"] = result["store_images_per_s"] / result["synthetic_images_per_s"]
        rows.append(result)
        print(pd.DataFrame([result]).to_string(index=False, float_format=lambda v: f"{v:,.2f}"), flush=True)
    return rows
