"""The study's projection: measured CPU stages, GPU work from measured rates, jobs scheduled on G GPUs."""

import json

import pandas as pd
import pytest

from moaflow.devtools.projection import cpu_stage_seconds, makespan, project_study, training_job_seconds


def test_jobs_go_longest_first_to_the_least_loaded_worker():
    assert makespan([5, 4, 3, 3, 3], 2) == 10   # 5 | 4, then 3 to the 4, 3 to the 5, 3 to the 7 (the best is 9)
    assert makespan([5, 4, 3, 3, 3], 1) == 18
    assert makespan([5, 4, 3], 10) == 5


def test_a_cpu_stage_takes_its_job_seconds_over_the_cores_but_no_less_than_its_longest_job():
    assert cpu_stage_seconds(1600, 30, 16) == 100
    assert cpu_stage_seconds(160, 30, 16) == 30


def test_a_training_job_pays_its_fixed_cost_once_and_every_epoch_of_every_fold():
    assert training_job_seconds(100, 20, folds=10, epochs=10, train_crops=1000) == 20 + 10 * 10 * 10


def _benchmark(path, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t100\n")


@pytest.fixture()
def runs(tmp_path):
    """A finished full-count run (2 architectures x 1 init, jobs of 2 and 1 folds) and a real-size fraction."""
    full, fraction = tmp_path / "full", tmp_path / "fraction"
    (full / "rehearsal.json").parent.mkdir(parents=True)
    (full / "rehearsal.json").write_text(json.dumps({"fields": 100, "plates": 10}))
    (fraction / "rehearsal.json").parent.mkdir(parents=True)
    (fraction / "rehearsal.json").write_text(json.dumps({"fields": 10, "plates": 1}))
    data = full / "results" / "bbbc021"
    for name, rows in (("crops", 300), ("dmso", 200)):
        (data / name).mkdir(parents=True)
        pd.DataFrame({"plate": ["p"] * rows}).to_parquet(data / name / "index.parquet")
    pd.DataFrame({"fold": ["a", "b", "c"]}).to_csv(data / "folds.tsv", sep="\t", index=False)
    for architecture in ("small", "large"):
        jobs = data / "models" / architecture / "imagenet" / "seed-0" / "jobs"
        jobs.mkdir(parents=True)
        (jobs / "part-01-of-02.json").write_text(json.dumps({"folds": ["a", "b"]}))
        (jobs / "part-02-of-02.json").write_text(json.dumps({"folds": ["c"]}))
    bench = full / "results" / "benchmarks"
    _benchmark(bench / "train" / "bbbc021" / "small" / "imagenet" / "seed-0" / "part-01-of-02.tsv", 9999)
    _benchmark(bench / "illumination_bbbc021" / "p.tsv", 9999)      # measured at the fraction instead
    _benchmark(bench / "evaluate_bbbc014" / "bbbc014.tsv", 9999)     # BBBC014 is not projected
    _benchmark(bench / "profile" / "bbbc021" / "a.tsv", 40)
    _benchmark(bench / "profile" / "bbbc021" / "b.tsv", 40)
    _benchmark(bench / "report_tables" / "report.tsv", 7)
    _benchmark(bench / "interpret_bbbc021_small_imagenet" / "bbbc021.tsv", 11)
    _benchmark(fraction / "results" / "benchmarks" / "illumination_bbbc021" / "p.tsv", 30)
    _benchmark(fraction / "results" / "benchmarks" / "preprocess_bbbc021_plate" / "p.tsv", 50)
    _benchmark(fraction / "results" / "benchmarks" / "download_bbbc021_plate" / "p.tsv", 9999)
    return full, fraction


RATES = {"small": {"images_per_second": 10, "fixed_seconds": 5},
         "large": {"images_per_second": 5, "fixed_seconds": 15}}


def test_the_projection_adds_measured_cpu_stages_to_gpu_work_scheduled_on_each_gpu_count(runs, tmp_path):
    full, fraction = runs
    table = project_study(full, fraction, RATES, gpus=[1, 4], cores=2, epochs=1, out=tmp_path / "p.csv")
    hours = table.set_index(["gpus", "stage"])["hours"] * 3600
    # the fraction's 80 job-seconds x 10 (fields) over 2 cores; downloads left out
    assert hours[1, "data path (CPU, real size)"] == pytest.approx(400)
    # 200 training crops a fold (300 x 2/3): small jobs 5 + 2 x 20 and 5 + 20, large 15 + 2 x 40 and 15 + 40
    assert hours[1, "training (GPU)"] == pytest.approx(45 + 25 + 95 + 55)
    assert hours[4, "training (GPU)"] == pytest.approx(95)
    # each fold's model embeds the 200 DMSO crops: small 5 + 3 x 20, large 15 + 3 x 40
    assert hours[1, "DMSO embeddings (GPU)"] == pytest.approx(65 + 135)
    assert hours[4, "DMSO embeddings (GPU)"] == pytest.approx(135)
    # profiling 80 job-seconds on 2 cores (40, its longest job), the report 7; training and BBBC014 left out
    assert hours[1, "after the models (CPU)"] == pytest.approx(47)
    assert hours[1, "interpretation (CPU, rehearsal input sizes)"] == pytest.approx(11)
    assert hours[4, "total"] == pytest.approx(400 + 95 + 135 + 11 + 47)
    assert pd.read_csv(tmp_path / "p.csv").shape == (12, 4)


def test_an_architecture_without_a_measured_rate_is_named(runs):
    full, fraction = runs
    with pytest.raises(ValueError, match="no measured rate for large"):
        project_study(full, fraction, {"small": RATES["small"]})


def test_a_rate_without_its_fixed_cost_is_named(runs):
    full, fraction = runs
    with pytest.raises(ValueError, match=r"gpu_rates\['small'\].*fixed_seconds"):
        project_study(full, fraction, {**RATES, "small": {"images_per_second": 10}})


def test_an_unfinished_run_is_refused(runs):
    full, fraction = runs
    (full / "results" / "bbbc021" / "crops" / "index.parquet").unlink()
    with pytest.raises(ValueError, match="not a finished full-count rehearsal"):
        project_study(full, fraction, RATES)
