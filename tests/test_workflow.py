"""The whole pipeline end to end: `moaflow demo` on a tiny stand-in, plus rerun behaviour."""

import json
import socket
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from moaflow import standin

from .conftest import BIN, REPO, TINY_BBBC021, pipeline_config, run_snakemake


def test_lint_has_no_findings():
    result = subprocess.run([str(BIN / "snakemake"), "--lint", "--configfile", str(REPO / "config" / "demo.yaml")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_demo_serves_on_loopback_and_stops(demo):
    _, _, port, result = demo
    assert f"127.0.0.1:{port}" in result.stdout
    with socket.socket() as sock:  # the server is gone: nothing listens on the port any more
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_demo_tables_and_crops(demo):
    workdir, config, _, _ = demo
    results = workdir / "results"
    table = pd.read_parquet(results / "bbbc021" / "images.parquet")
    n_treatments = len(standin.select_treatments(TINY_BBBC021["moas"], 2, 1))
    per_plate = (n_treatments + TINY_BBBC021["dmso_wells"]) * TINY_BBBC021["sites"]
    assert len(table) == per_plate * TINY_BBBC021["n_plates"]
    assert all((workdir / p).is_file() for p in table["path_dapi"])
    index = pd.read_parquet(results / "bbbc021" / "crops" / "index.parquet")
    store = np.load(results / "bbbc021" / "crops" / "32.npy", mmap_mode="r")
    assert store.shape == (len(index), 32, 32, 3) and 0 < len(index) <= 4 * (~table["is_dmso"]).sum()
    for plate in config["bbbc021"]["plates"]:
        assert (results / "bbbc021" / "illumination" / f"{plate}.png").is_file()
    assert len(pd.read_parquet(results / "bbbc014" / "crops" / "index.parquet")) == 64 * 16
    assert not list(results.rglob("*.part")) and not list(results.rglob("*.tmp*"))


def test_demo_trained_every_fold(demo):
    workdir, config, _, _ = demo
    folds = pd.read_csv(config["training"]["bbbc021"]["folds_file"], sep="\t")
    for fold in folds["fold"]:
        run = json.loads((workdir / "results" / "bbbc021" / "models" / "resnet50" / "random" / "seed-0" / fold / "run.json").read_text())
        assert run["fold"] == fold and run["n_test"] > 0
    for fold in ("a549", "mcf7"):
        assert (workdir / "results" / "bbbc014" / "models" / "resnet50" / "random" / "seed-0" / fold / "model.keras").is_file()
    assert not (workdir / "results" / "bbbc021" / "checkpoints").exists() or \
        not list((workdir / "results" / "bbbc021" / "checkpoints").rglob("*.keras"))


def test_mlflow_holds_the_parent_and_every_child_after_parallel_jobs(demo):
    from mlflow.tracking import MlflowClient

    workdir, config, _, _ = demo
    runs = json.loads((workdir / "results" / "mlflow" / "runs.json").read_text())
    n_jobs = len(pd.read_csv(config["training"]["bbbc021"]["folds_file"], sep="\t")) + 2
    assert len(runs["children"]) == n_jobs
    client = MlflowClient(f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("moaflow")
    found = client.search_runs([experiment.experiment_id])
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == runs["parent_run_id"]]
    assert len(children) == n_jobs
    parent = client.get_run(runs["parent_run_id"])
    assert parent.data.tags["config_hash"] and parent.data.tags["git_commit"]
    for child in children:
        assert {"architecture", "init", "fold", "fold_group", "git_commit", "config_hash"} <= set(child.data.tags)
        assert len(client.get_metric_history(child.info.run_id, "loss")) == 1   # one epoch
        assert "test_accuracy" in child.data.metrics
        assert {"hp.learning_rate", "n_train"} <= set(child.data.params)


def test_evaluation_and_report(demo):
    workdir, _, _, result = demo
    summary = json.loads((workdir / "results" / "bbbc021" / "evaluation" / "summary.json").read_text())
    assert set(summary["accuracy"]["resnet50/random"]) == {"crop", "image", "treatment"}
    accuracy = pd.read_csv(workdir / "results" / "bbbc021" / "evaluation" / "accuracy.csv")
    assert set(accuracy["level"]) == {"crop", "image", "treatment"}
    deviations = pd.read_csv(workdir / "results" / "bbbc021" / "evaluation" / "deviations.csv")
    assert deviations["differs"].any()                          # a stand-in and random init differ from the paper
    assert (workdir / "results" / "bbbc014" / "evaluation" / "well_accuracy.csv").is_file()
    report = (workdir / "results" / "report.html").read_text(errors="replace")
    for figure in ("learning_curves.png", "confusion_treatment_resnet50_random.png", "conformal.csv",
                   "Uncertainty", "QC"):
        assert figure in report, figure
    assert "report:" in result.stdout


def test_second_run_does_nothing(demo):
    workdir, _, _, _ = demo
    # the same configuration as the demo's run (its hash tags the MLflow runs, so a changed
    # configuration would rightly log again)
    config = yaml.safe_load((workdir / "demo.yaml").read_text())
    again = run_snakemake(workdir, config, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_rerun_continues_where_it_stopped(tmp_path, server, standin_dir):
    config = pipeline_config(server.url, standin_dir, tmp_path)
    run_snakemake(tmp_path, config, "--until", "download_bbbc021_plate")
    before = {p for _, p, _ in server.requests}
    run_snakemake(tmp_path, config, "--until", "bbbc021_image_table")
    after = [p for _, p, _ in server.requests]
    zips = [p for p in after if "images_Week" in p]
    assert len(zips) == len(set(zips)) == TINY_BBBC021["n_plates"]  # no plate fetched twice
    assert before <= set(after)
    assert (tmp_path / "results" / "bbbc021" / "images.parquet").is_file()
