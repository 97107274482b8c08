"""The pipeline through a real single-node SLURM (started here), with the shipped profile.

Marked `slurm`: `pytest -m slurm` selects it; CI runs it. Needs root (apt-get, daemons).
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from .conftest import BIN, REPO, pipeline_config

pytestmark = pytest.mark.slurm
CLUSTER = REPO / "tests" / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-state")
    subprocess.run(["bash", str(CLUSTER), "up", str(state)], check=True)
    yield state
    subprocess.run(["bash", str(CLUSTER), "down", str(state)], check=False)


def local_profile(directory: Path, gpu: int = 0) -> Path:
    """The shipped SLURM profile, with its placeholders filled for the local one-node cluster."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"].pop("slurm_account")
    profile["default-resources"].update(slurm_partition="local", mem_mb=1500, runtime=30)
    profile["set-resources"]["train"].update(slurm_partition="local", gpu=gpu, mem_mb=3000, runtime=30)
    if not gpu:
        profile["set-resources"]["train"].pop("cpus_per_gpu")
    profile["set-threads"]["train"] = 1
    profile.update({"slurm-no-account": True, "slurm-status-command": "squeue", "jobs": 4,
                    "slurm-init-seconds-before-status-checks": 2, "slurm-keep-successful-logs": True})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(profile))
    return directory


def snakemake(workdir: Path, config: dict, profile: Path, *args: str) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
                           "--configfile", str(workdir / "config.yaml"), "--profile", str(profile), *args],
                          cwd=workdir, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory, standin_dir):
    from moaflow.serve import StandinServer

    workdir = tmp_path_factory.mktemp("slurm-run")
    with StandinServer(standin_dir / "www") as server:
        config = pipeline_config(server.url, standin_dir, workdir)
        result = snakemake(workdir, config, local_profile(workdir / "profile"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return workdir, config, result


def test_jobs_went_through_slurm(slurm_run):
    workdir, config, result = slurm_run
    jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T|%k"], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    completed = [comment for state, comment in (line.split("|", 1) for line in jobs) if state == "COMPLETED"]
    for rule in ("download_bbbc021_plate", "preprocess_bbbc021_plate", "train", "evaluate_bbbc021", "track_mlflow"):
        assert any(rule in comment for comment in completed), (rule, jobs[:5])
    n_folds = len(pd.read_csv(config["training"]["bbbc021"]["folds_file"], sep="\t"))
    assert sum("rule_train" in c for c in completed) >= n_folds + 2
    assert list((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))


def test_outputs_equal_the_local_run(slurm_run, demo):
    workdir, _, _ = slurm_run
    local = demo[0]
    for relative in ("results/bbbc021/images.parquet", "results/bbbc021/crops/index.parquet",
                     "results/bbbc014/crops/index.parquet", "results/bbbc021/folds.tsv"):
        a, b = workdir / relative, local / relative
        if relative.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
        else:
            assert a.read_bytes() == b.read_bytes(), relative
    for relative in ("results/bbbc021/crops/32.npy", "results/bbbc014/crops/32.npy"):
        assert np.array_equal(np.load(workdir / relative), np.load(local / relative)), relative
    ours = json.loads((workdir / "results/bbbc021/evaluation/summary.json").read_text())
    theirs = json.loads((local / "results/bbbc021/evaluation/summary.json").read_text())
    assert ours["accuracy"].keys() == theirs["accuracy"].keys()
    for key, levels in ours["accuracy"].items():                           # same seed, same CPU results
        assert levels == pytest.approx(theirs["accuracy"][key], abs=1e-6), key


def test_mlflow_lost_no_run_under_slurm(slurm_run):
    from mlflow.tracking import MlflowClient

    workdir, config, _ = slurm_run
    runs = json.loads((workdir / "results" / "mlflow" / "runs.json").read_text())
    n_jobs = len(pd.read_csv(config["training"]["bbbc021"]["folds_file"], sep="\t")) + 2
    client = MlflowClient(f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("moaflow").experiment_id])
    assert len([r for r in found if r.data.tags.get("mlflow.parentRunId") == runs["parent_run_id"]]) == n_jobs


def test_gpu_rule_is_submitted_with_a_gpu_request(slurm_run):
    """No GPU here, so SLURM refuses the job: what matters is what the plugin asked sbatch for."""
    workdir, config, _ = slurm_run
    target = next((workdir / "results" / "bbbc021" / "models").rglob("run.json")).relative_to(workdir)
    result = snakemake(workdir, config, local_profile(workdir / "gpu-profile", gpu=1), str(target),
                       "--forcerun", "train", "--verbose", "--retries", "0")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "sbatch" in output and "--gpus=1" in output, output[-3000:]
    assert "gres" in output.lower()          # SLURM's refusal: this node has no GPU
