"""Benchmarks (not tests): preprocessing against bare TIFF reading, and the training feeder and job
against bare Keras (``moaflow bench-training``; the GPU figures need a GPU).

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

import json
import multiprocessing
import time
from pathlib import Path

import pandas as pd
import tifffile

from moaflow.datasets import download, tables
from moaflow.preprocess import illumination, plates
from moaflow.devtools import standin
from moaflow.study import BBBC021_CHANNELS

def study_preprocessing() -> dict:
    """The study's BBBC021 preprocessing settings: the config's defaults."""
    from moaflow.config import defaults

    return defaults()["preprocess"]["bbbc021"]


def _bare_read(paths: list[str]) -> None:
    for path in paths:
        tifffile.imread(path)


def _illumination_pass(fields: pd.DataFrame) -> None:
    for channel in BBBC021_CHANNELS:
        average = illumination.mean_image(fields[f"path_{channel.lower()}"])
        settings = study_preprocessing()["illumination"]
        illumination.illumination_function(average, settings["filter_size"], settings["downscale"],
                                           robust_percentile=settings["robust_percentile"])


def _preprocess_pass(fields: pd.DataFrame) -> None:
    pre = study_preprocessing()
    plates.preprocess_plate(fields, sizes=pre["input_sizes"], grid=tuple(pre["crop_grid"]),
                            normalisation=pre["normalisation"], percentiles=tuple(pre["percentiles"]),
                            empty_threshold=pre["empty_threshold"], empty_fraction=pre["empty_fraction"])


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
    table = tables.bbbc021_image_table(www / "BBBC021_v1_image.csv", www / "BBBC021_v1_moa.csv",
                                            out / "images", taxol_rule=True)
    for plate in table["plate"].unique():
        if not (out / "images" / plate).exists():
            download.extract_archive(www / f"BBBC021_v1_images_{plate}.zip", out / "images" / plate,
                                     member_root=plate, log=lambda _: None)
    return table


def bench_preprocess(out: str | Path, repeats: int = 2) -> list[dict]:
    """Time preprocessing against bare TIFF read+decode on full-size stand-in plates; print and return the rows.

    Parameters
    ----------
    out : path
        Where the full-size stand-in goes (kept for later runs).
    repeats : int
        Timed passes of each kind.
    """
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


# ------------------------------------------------------------------ training

def synthetic_study(out: str | Path, size: int, *, compounds: int = 38, crops_per_compound: int = 126,
                    moas: int = 12, seed: int = 0) -> tuple[Path, Path, Path]:
    """A crop store shaped like the real study's (38 compounds over 12 MoAs, about 4,800 crops) with random
    pixels, its index and leave-one-compound-out folds: for throughput, the content does not matter.

    Returns the store, index and folds paths.
    """
    import numpy as np

    from moaflow.learn import folds
    from moaflow.files import write_array, write_table

    out = Path(out)
    store = out / f"{size}.npy"
    index_path, folds_path = out / "index.parquet", out / "folds.tsv"
    n = compounds * crops_per_compound
    if not store.exists():
        write_array(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8), store)
    if not index_path.exists():
        compound = np.repeat([f"compound-{i:02d}" for i in range(compounds)], crops_per_compound)
        moa = np.repeat([f"moa-{i % moas:02d}" for i in range(compounds)], crops_per_compound)
        write_table(pd.DataFrame({"crop_id": range(n), "compound": compound, "moa": moa, "batch": "Week1",
                                  "concentration": 1.0, "replicate": 1, "image_number": np.arange(n) // 4}),
                    index_path)
        folds.write_folds(folds.leave_one_compound_out(pd.read_parquet(index_path)), folds_path)
    return store, index_path, folds_path


def bench_feeder(sizes=(224, 299), *, crops: int = 4788, batch_size: int = 128, repeats: int = 3) -> list[dict]:
    """Images/s of the feeder alone (no model): shuffled full batches gathered from an in-RAM store of
    uint8 crops, on one core (one thread, no prefetch workers), best of ``repeats`` epochs.

    Parameters
    ----------
    sizes : tuple of int
        Input sizes timed.
    crops : int
        Crops in the synthetic store (the real study's count).
    batch_size : int
    repeats : int
        Epochs timed; the best is reported.
    """
    import numpy as np
    from threadpoolctl import threadpool_limits

    from moaflow.learn.feeder import CropBatches

    rows = []
    for size in sizes:
        store = np.random.default_rng(0).integers(0, 256, (crops, size, size, 3), dtype=np.uint8)
        targets = np.eye(12, dtype=np.float32)[np.arange(crops) % 12]
        batches = CropBatches(store, np.arange(crops), targets, batch_size, shuffle=True, full_batches=True,
                              weights=np.ones(crops), workers=1)
        best = float("inf")
        with threadpool_limits(limits=1):
            for epoch in range(repeats):
                batches.set_epoch(epoch)
                started = time.perf_counter()
                for i in range(len(batches)):
                    images, _, _ = batches[i]
                best = min(best, time.perf_counter() - started)
        rows.append({"input": size, "batch": batch_size, "crops": crops,
                     "images_per_s": len(batches) * batch_size / best,
                     "MB_per_s": len(batches) * batch_size * size * size * 3 / best / 1e6})
        del store
    print("Feeder alone (uint8 batches from RAM, one core):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:,.0f}"), flush=True)
    return rows


def bench_training(architectures: list[str], out: str = "results/bench/training", batch_size: int = 128,
                   precision: str = "mixed_bfloat16", epochs: int = 2, folds: int = 2,
                   folds_per_job: int | None = None, packs: list[int] | None = None, steps: int = 100) -> list[dict]:
    """Benchmark training: the train job against a bare ``model.fit``, and the study's GPU-hours from it.

    Per architecture (at its registry input size): the train rule's own code (`moaflow.learn.train.train_job`:
    feeder, compiled step, held-out predictions, outputs) against a bare ``model.fit`` on synthetic in-memory
    tensors of the same shape, backend and precision, in the same process. Reports both images/s, their
    ratio, and the job's fixed cost (wall time less its epochs: start-up, compilation, final predictions,
    saving), then `estimate_study` with ``folds_per_job``. Needs a GPU to mean much.

    Parameters
    ----------
    architectures : list of str
        Registered architectures, each at its registry input size.
    out : path
        Where the synthetic study-shaped stores and the runs go.
    batch_size : int
    precision : str
        The Keras dtype policy.
    epochs : int
        Epochs per fold (the first pays the compilation).
    folds : int
        Folds per benchmark job.
    folds_per_job : int, optional
        For the study's estimate (default: the config's ``training.folds_per_job``).
    packs : list of int, optional
        The packed case instead (`bench_packing`): batch 8 single (a first and a second job), packed by
        each of these K, and batch ``batch_size``, at ``precision`` (float32 for the paper's own setting).
    steps : int
        The packed case: batches per fold and epoch at most.
    """
    if packs:
        return bench_packing(architectures, out, packs=packs, precision=precision, epochs=epochs, steps=steps,
                             large_batch=batch_size)
    import keras
    import numpy as np

    from moaflow.learn import architectures as registry
    from moaflow.learn import train
    from moaflow.learn.presets import hyperparameters

    rows = []
    for architecture in architectures:
        size = registry.get(architecture).input_size
        store, index_path, folds_path = synthetic_study(out, size)
        names = list(pd.read_csv(folds_path, sep="\t")["fold"][:folds])
        hyper = hyperparameters("final", architecture, {"epochs": epochs, "batch_size": batch_size,
                                                        "precision": precision})
        started = time.perf_counter()
        train.train_job(store, index_path, folds_path, names, architecture=architecture, weights=None, hyper=hyper,
                        seed=0, models_dir=Path(out) / "models" / architecture,
                        checkpoints_dir=Path(out) / "checkpoints" / architecture, gpus=0, allow_cpu=True,
                        load_into_memory=True, checkpoint_minutes=1e9, log=lambda line: print(line, flush=True))
        wall = time.perf_counter() - started
        histories = [pd.read_csv(Path(out) / "models" / architecture / n / "history.tsv", sep="\t") for n in names]
        steady = np.median([v for h in histories for v in h["images_per_second"].iloc[1:]]
                           or [v for h in histories for v in h["images_per_second"]])
        epoch_seconds = float(np.median([v for h in histories for v in h["seconds"].iloc[1:]]
                                        or [v for h in histories for v in h["seconds"]]))
        n_train = json.loads((Path(out) / "models" / architecture / names[0] / "run.json").read_text())["n_train"]

        bare = bare_fit_rate(architecture, size, n_train, batch_size, precision)
        keras.config.set_dtype_policy("float32")
        row = {"architecture": architecture, "input": size, "batch": batch_size, "precision": precision,
               "backend": keras.backend.backend(), "rule_images_per_s": steady, "bare_images_per_s": bare,
               # wall time less steady-state epochs: start-up, compilation, final predictions, saving
               "ratio": steady / bare, "job_fixed_seconds": wall - sum(map(len, histories)) * epoch_seconds,
               "epoch_seconds": epoch_seconds, "n_train": n_train}
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:,.2f}"), flush=True)
        keras.backend.clear_session()
    from moaflow.config import defaults

    estimate_study(rows, folds_per_job=folds_per_job or defaults()["training"]["folds_per_job"],
                   epochs=hyperparameters("final", architectures[0])["epochs"])
    return rows


def _timed_job(out: Path, name: str, architecture: str, size: int, hyper: dict, n_folds: int, pack_folds: int,
               cache: Path) -> dict:
    """One train job (the rule's code) of ``n_folds`` synthetic folds: its throughput, epoch time and fixed cost.

    Throughput is the job's: images of every fold trained in an epoch's time (K folds at once when packed),
    from the epochs after the first (which compiles). The fixed cost is the job's wall time less its steady
    epochs: start-up, compilation (or loading it from ``cache``), predictions after the last epoch, saving.
    """
    import numpy as np

    from moaflow.learn import train

    store, index_path, folds_path = synthetic_study(out, size)
    names = list(pd.read_csv(folds_path, sep="\t")["fold"][:n_folds])
    models = out / "models" / architecture / name
    receipt = models / "job.json"
    job = dict(architecture=architecture, weights=None, hyper=hyper, seed=0, models_dir=models,
               checkpoints_dir=out / "checkpoints" / name, gpus=0, allow_cpu=True, load_into_memory=True,
               checkpoint_minutes=1e9, pack_folds=pack_folds, compilation_cache=str(cache), receipt=receipt,
               log=lambda line: print(line, flush=True))
    # Each job in its own process, as on a cluster: it imports the framework and compiles (or loads from the
    # cache) itself. Forked, so registry entries added by the caller are there; this process never imports
    # the framework, which makes the fork safe.
    child = multiprocessing.get_context("fork").Process(target=train.train_job,
                                                        args=(store, index_path, folds_path, names), kwargs=job)
    started = time.perf_counter()
    child.start()
    child.join()
    wall = time.perf_counter() - started
    if child.exitcode != 0:
        raise RuntimeError(f"benchmark job {name} of {architecture} failed (exit status {child.exitcode})")
    summary = json.loads(receipt.read_text())
    histories = [pd.read_csv(models / n / "history.tsv", sep="\t") for n in names]
    run = json.loads((models / names[0] / "run.json").read_text())
    packed, epochs = run["packed_folds"], len(histories[0])
    steady = [e for e in range(epochs) if e > 0] or [0]
    # Folds trained together share an epoch's time: their rates add up; folds one after the other do not.
    rate = float(np.median([packed * np.mean([h["images_per_second"].iloc[e] for h in histories]) for e in steady]))
    images = n_folds * min(hyper["steps_per_epoch"], -(-run["n_train"] // hyper["batch_size"])) * hyper["batch_size"]
    epoch_seconds = images / rate   # all the job's folds, one epoch
    return {"job": name, "architecture": architecture, "input": size, "batch": hyper["batch_size"],
            "packed_folds": packed, "precision": hyper["precision"], "images_per_s": rate,
            "fixed_seconds": wall - epochs * epoch_seconds, "wall_seconds": wall,
            "backend": summary["device"]["backend"], "compiled": summary["compilation_cache"]["compiled"],
            "loaded": summary["compilation_cache"]["loaded"]}


def bench_packing(architectures: list[str], out: str | Path, *, packs: list[int], precision: str = "float32",
                  epochs: int = 2, steps: int = 100, large_batch: int = 128) -> list[dict]:
    """The paper's batch 8 single, packed K at a time, and a large batch, per architecture, on one device.

    Per architecture, at its registry input size, with a fresh compilation cache: batch 8 one fold at a
    time, twice (the first job compiles, the second loads the programs: their fixed costs), then batch 8
    with ``packs`` folds packed (each K its own job of K folds), then batch ``large_batch``; all at
    ``precision``, ``epochs`` epochs of at most ``steps`` batches per fold. Packing needs the JAX backend:
    elsewhere the packed rows say ``packed_folds`` 1. The table is printed and written to ``out/packing.csv``.
    """
    import shutil

    from moaflow.learn import architectures as registry
    from moaflow.learn.presets import hyperparameters

    rows = []
    for architecture in architectures:
        size = registry.get(architecture).input_size
        cache = Path(out) / "compilation-cache" / architecture
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(Path(out) / "models" / architecture, ignore_errors=True)

        def hyper(batch):
            return hyperparameters("final", architecture, {"epochs": epochs, "batch_size": batch,
                                                           "precision": precision, "steps_per_epoch": steps})

        jobs = [("batch-8 first job", 8, 2, 1), ("batch-8 second job", 8, 2, 1),
                *[(f"batch-8 packed {k}", 8, k, k) for k in packs], (f"batch-{large_batch}", large_batch, 2, 1)]
        for name, batch, n_folds, pack in jobs:
            rows.append(_timed_job(Path(out), name, architecture, size, hyper(batch), n_folds, pack, cache))
    frame = pd.DataFrame(rows)
    frame["of_large_batch"] = frame["images_per_s"] / frame.groupby("architecture")["images_per_s"].transform("last")
    frame.to_csv(Path(out) / "packing.csv", index=False)
    print(f"Training throughput (the train job's own code, one process per job; images/s of the job; "
          f"{Path(out) / 'packing.csv'}):")
    print(frame.drop(columns=["wall_seconds"]).to_string(index=False, float_format=lambda v: f"{v:,.2f}"),
          flush=True)
    return frame.to_dict("records")


def bare_fit_rate(architecture: str, size: int, n_train: int, batch_size: int, precision: str) -> float:
    """Images/s of a bare ``model.fit`` of the same model on in-memory uint8 tensors (Keras' own array feeding),
    its second epoch (the first compiles)."""
    import keras
    import numpy as np

    from moaflow.learn.models import build_model

    keras.config.set_dtype_policy(precision)
    model = build_model(architecture, size, 12, weights=None)
    model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss="categorical_crossentropy")
    n = (n_train // batch_size) * batch_size
    x = np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.eye(12, dtype=np.float32)[np.arange(n) % 12]
    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            times.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter())

    model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0, shuffle=False, callbacks=[Clock()])
    return n / (times[3] - times[2])


def estimate_study(rows: list[dict], *, folds_per_job: int | None, epochs: int, folds: int = 38, inits: int = 2,
                   crops: int = 4788) -> dict:
    """GPU-hours of the BBBC021 study (38 folds, ImageNet and random, about 4,800 crops) from `bench_training`'s
    measurements, at ``epochs`` per fold and ``folds_per_job``.

    Each job costs its fixed part once; each fold ``epochs`` epochs, whose time is scaled from the
    benchmark's training set to ``crops * (folds - 1) / folds`` training crops (held-out prediction included).
    """
    per_job = folds_per_job or folds
    jobs = -(-folds // per_job)
    n_train = crops * (folds - 1) / folds
    total, parts = 0.0, {}
    for row in rows:
        fold_seconds = epochs * row["epoch_seconds"] * n_train / row["n_train"]
        seconds = inits * (jobs * row["job_fixed_seconds"] + folds * fold_seconds)
        parts[row["architecture"]] = seconds / 3600
        total += seconds
    estimate = {"gpu_hours": total / 3600, "per_architecture_hours": parts, "jobs": jobs * inits * len(rows),
                "folds_per_job": per_job, "epochs": epochs}
    print(f"Estimated BBBC021 study: {estimate['gpu_hours']:.2f} GPU-hours over {estimate['jobs']} jobs "
          f"({per_job} folds per job, {epochs} epochs): "
          + ", ".join(f"{a} {h:.2f} h" for a, h in parts.items()), flush=True)
    return estimate
