"""The real study's wall time projected from a full-count rehearsal, a real-size fraction and measured GPU rates.

A rehearsal on 2 CPU cores cannot time the real study, but it measures what does not depend on the GPU: the
data path at the real field size (on a fraction of the plates, scaled by fields), and everything after the
models at the study's full counts (profiling, evaluation, tracking, report; interpretation runs the models, and
at the rehearsal's shrunk input sizes, so its figure is a lower bound). `project_study`
adds the GPU work computed from measured training rates (``moaflow bench-training`` on a GPU) and schedules
the jobs on G GPUs:

- training: each job costs its fixed part (start-up, compilation, saving) once, and each of its folds
  ``epochs`` passes over the fold's training crops at the measured images/s;
- the DMSO embeddings: each fold's model embeds every DMSO crop once, timed at the *training* rate, an upper
  bound (a forward pass costs about a third of a training step);
- jobs go to GPUs longest first (LPT); embeddings start after all training (a barrier, so a bound too).

CPU stages run on ``cores`` cores: a stage's wall time is its job-seconds over the cores, and at least its
longest job. Downloads are left out (they depend on the network, and the stand-in's zips hold only the
fields the study reads). BBBC014 is left out (6 jobs, one a network, of 2 folds on 1,024 crops).
"""

from __future__ import annotations

import heapq
import json
import os
from pathlib import Path

import pandas as pd

from moaflow.analysis.resources import read_benchmarks
from moaflow.logs import stderr

#: Rules of the data path whose cost grows with the fields read (measured at the real size on a fraction).
DATA_PATH_RULES = ("extract_bbbc021_plate", "illumination_bbbc021", "preprocess_bbbc021_plate",
                   "preprocess_bbbc021_dmso_plate", "gather_bbbc021", "gather_bbbc021_dmso")
#: Rules not projected from the CPU: network-bound or done on the GPU from measured rates instead.
NOT_FROM_CPU = ("download_bbbc021_plate", "download_bbbc021_metadata", "download_bbbc014_file", "fetch_weights",
                "train", "embed_controls")


def training_job_seconds(images_per_second: float, fixed_seconds: float, folds: int, epochs: int,
                         train_crops: float) -> float:
    """One training job: its fixed cost once, and ``epochs`` passes over ``train_crops`` for each of its folds."""
    return fixed_seconds + folds * epochs * train_crops / images_per_second


def makespan(durations: list[float], workers: int) -> float:
    """Wall time of independent jobs on ``workers`` identical workers, longest job first to the least loaded."""
    loads = [0.0] * max(1, workers)
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + duration)
    return max(loads)


def cpu_stage_seconds(job_seconds: float, longest_job: float, cores: int) -> float:
    """A CPU stage's wall time on ``cores``: its job-seconds spread over them, but no less than its longest job."""
    return max(job_seconds / cores, longest_job)


def _cpu_stages(records: pd.DataFrame, cores: int) -> float:
    """Wall time of the CPU stages in ``records`` (one per rule) run one after another on ``cores``."""
    return sum(cpu_stage_seconds(group["s"].sum(), group["s"].max(), cores) for _, group in records.groupby("rule"))


def _run_counts(run: Path) -> dict:
    """Counts of a rehearsal run: fields and plates from its record, crops and folds from its outputs."""
    record = run / "rehearsal.json"
    if not record.exists():
        raise FileNotFoundError(f"{record}: no rehearsal record (`moaflow rehearse` writes it)")
    summary = json.loads(record.read_text())
    counts = {"fields": summary["fields"], "plates": summary["plates"]}
    data = run / "results" / "bbbc021"
    if (data / "crops" / "index.parquet").exists():
        counts["crops"] = len(pd.read_parquet(data / "crops" / "index.parquet", columns=["plate"]))
        counts["dmso_crops"] = len(pd.read_parquet(data / "dmso" / "index.parquet", columns=["plate"]))
    if (data / "folds.tsv").exists():
        counts["folds"] = len(pd.read_csv(data / "folds.tsv", sep="\t"))
    return counts


def _training_jobs(run: Path) -> pd.DataFrame:
    """The BBBC021 training jobs of a run, from their receipts (``models/<arch>/<init>/seed-<n>/jobs/*.json``):
    architecture, initialisation and the number of folds the job trained."""
    rows = []
    for path in sorted((run / "results" / "bbbc021" / "models").glob("*/*/seed-*/jobs/part-*-of-*.json")):
        rows.append({"architecture": path.parts[-5], "init": path.parts[-4],
                     "folds": len(json.loads(path.read_text())["folds"])})
    if not rows:
        raise FileNotFoundError(f"no BBBC021 training job receipts under {run / 'results' / 'bbbc021' / 'models'}")
    return pd.DataFrame(rows)


def _gpu_jobs(jobs: pd.DataFrame, gpu_rates: dict, full: dict, epochs: int) -> tuple[list, list]:
    """Seconds of each training job and of each network's DMSO embedding job at the measured GPU rates."""
    unknown = sorted(set(jobs["architecture"]) - set(gpu_rates))
    if unknown:
        raise ValueError(f"gpu_rates: no measured rate for {', '.join(unknown)} (expected keys "
                         f"images_per_second and fixed_seconds per architecture)")
    for architecture in set(jobs["architecture"]):
        rate = gpu_rates[architecture]
        if not isinstance(rate, dict) or not all(isinstance(rate.get(key), (int, float)) and rate[key] > 0
                                                 for key in ("images_per_second", "fixed_seconds")):
            raise ValueError(f"gpu_rates[{architecture!r}] = {rate!r}: expected positive numbers "
                             "images_per_second and fixed_seconds")
    train_crops = full["crops"] * (full["folds"] - 1) / full["folds"]
    training, embedding = [], []
    for (architecture, init), group in jobs.groupby(["architecture", "init"]):
        rate = gpu_rates[architecture]
        for folds in group["folds"]:
            training.append(training_job_seconds(rate["images_per_second"], rate["fixed_seconds"], folds, epochs,
                                                 train_crops))
        embedding.append(rate["fixed_seconds"] + full["folds"] * full["dmso_crops"] / rate["images_per_second"])
    return training, embedding


def project_study(full_run: str | os.PathLike, fraction_run: str | os.PathLike, gpu_rates: dict,
                  gpus: list[int] = (1, 4, 8, 24), cores: int = 16, epochs: int = 10,
                  out: str | None = None) -> pd.DataFrame:
    """Project the real BBBC021 study's wall time on G GPUs and ``cores`` CPU cores, stage by stage.

    Parameters
    ----------
    full_run : path
        A finished full-count rehearsal (``results/rehearsal/run-<shape>``): counts, training jobs, and the
        CPU stages after the models, as measured.
    fraction_run : path
        A data-path rehearsal at the real field size on a fraction of the plates (``--shape 1024 1280
        --plates ... --data-path-only``): its data-path job-seconds are scaled by the fields read.
    gpu_rates : dict
        Per architecture, measured on the GPU: ``{"resnet50": {"images_per_second": 4565, "fixed_seconds":
        28}, ...}`` (``moaflow bench-training``'s ``rule_images_per_s`` and ``job_fixed_seconds``).
    gpus : list of int
        GPU counts to project for (1: one node; more: SLURM dispatching the jobs to that many GPUs).
    cores : int
        CPU cores for the CPU stages.
    epochs : int
        Epochs per fold (the study's 10).
    out : path, optional
        Where to write the table as CSV.
    """
    full_run, fraction_run = Path(full_run), Path(fraction_run)
    full, fraction = _run_counts(full_run), _run_counts(fraction_run)
    missing = [key for key in ("crops", "dmso_crops", "folds") if key not in full]
    if missing:
        raise ValueError(f"{full_run}: not a finished full-count rehearsal (no {', '.join(missing)})")
    scale = full["fields"] / fraction["fields"]
    records = read_benchmarks(fraction_run / "results" / "benchmarks")
    data_path = records[records["rule"].isin(DATA_PATH_RULES)]
    data_job_seconds = data_path["s"].sum() * scale
    # the longest plate at the real size, as measured (the fraction holds the plate with the most fields)
    data_longest = data_path["s"].max()

    after = read_benchmarks(full_run / "results" / "benchmarks")
    after = after[~after["rule"].isin(DATA_PATH_RULES + NOT_FROM_CPU) & ~after["job"].str.contains("bbbc014")]
    # occlusion runs the models: measured at the rehearsal's shrunk input sizes, so a lower bound
    interpretation = after[after["rule"].str.startswith("interpret_")]
    after = after[~after["rule"].str.startswith("interpret_")]

    training, embedding = _gpu_jobs(_training_jobs(full_run), gpu_rates, full, epochs)

    rows = []
    for count in gpus:
        stages = {
            "data path (CPU, real size)": cpu_stage_seconds(data_job_seconds, data_longest, cores),
            "training (GPU)": makespan(training, count),
            "DMSO embeddings (GPU)": makespan(embedding, count),
            "interpretation (CPU, rehearsal input sizes)": _cpu_stages(interpretation, cores),
            "after the models (CPU)": _cpu_stages(after, cores),
        }
        rows += [{"gpus": count, "cores": cores, "stage": stage, "hours": seconds / 3600}
                 for stage, seconds in stages.items()]
        rows.append({"gpus": count, "cores": cores, "stage": "total", "hours": sum(stages.values()) / 3600})
    table = pd.DataFrame(rows)
    stderr(f"projection: {full['fields']} fields ({scale:.1f}x the fraction's {fraction['fields']}), "
           f"{full['crops']} crops, {full['dmso_crops']} DMSO crops, {full['folds']} folds, {len(training)} "
           f"training jobs, {len(embedding)} embedding jobs, {epochs} epochs\n"
           + table.pivot(index="stage", columns="gpus", values="hours").reindex(table["stage"].unique())
           .round(2).to_string())
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
    return table
