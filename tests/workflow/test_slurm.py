"""The pipeline through a real single-node SLURM (started here), with the shipped profile.

Marked `slurm`: `pytest -m slurm` selects it. It runs where it can: as root with Debian's munge and
slurm-wlm installed, or with MOAFLOW_TEST_SLURM=1 (which `.ci/run` sets; it installs the packages when
missing, and needs root). Elsewhere it is skipped, and the skip says why. The cluster is private: its
configuration, keys and state live in a temporary folder, and only its own daemons are stopped.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from moaflow import layout
from tests.conftest import BIN, REPO, pipeline_config

pytestmark = pytest.mark.slurm
CLUSTER = REPO / "tests" / "workflow" / "slurm" / "local_cluster.sh"


OPT_IN = "MOAFLOW_TEST_SLURM"


def _why_not() -> str | None:
    """None when this machine can run the SLURM test (installing what is missing if opted in)."""
    check = subprocess.run(["bash", str(CLUSTER), "check"], capture_output=True, text=True)
    if check.returncode == 0:
        return None
    if os.environ.get(OPT_IN) != "1":
        return (f"SLURM test skipped: {check.stdout.strip()}; set {OPT_IN}=1 to run it "
                "(as root; it installs Debian's munge and slurm-wlm if missing)")
    if os.geteuid() != 0:
        pytest.fail(f"{OPT_IN}=1 but not root: the SLURM test needs root ({check.stdout.strip()})")
    subprocess.run(["bash", str(CLUSTER), "install"], check=True)
    return None


def _system_files() -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under the system folders a SLURM or munge install uses."""
    found = {}
    for top in ("/etc", "/run", "/var/run", "/var/lib/slurm", "/var/lib/munge", "/var/log/slurm",
                "/var/log/munge", "/var/spool/slurmd", "/var/spool/slurmctld"):
        for path in Path(top).rglob("*") if Path(top).is_dir() else ():
            try:
                if path.is_file() and not path.is_symlink():
                    stat = path.stat()
                    found[str(path)] = (stat.st_size, stat.st_mtime_ns)
            except OSError:   # a file that vanished between listing and stat (another program's)
                continue
    return found


def _daemons() -> set[tuple[int, str]]:
    """(PID, command line) of every running slurmctld, slurmd, slurmstepd and munged."""
    running = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if line and Path(line.split()[0]).name in ("slurmctld", "slurmd", "slurmstepd", "munged"):
            running.add((int(proc.name), line))
    return running


def test_the_cluster_writes_nothing_outside_its_folder_and_leaves_no_daemon(tmp_path_factory):
    """A whole up/down cycle, checked on the machine: no file under /etc, /run or /var changes, and the
    daemons running afterwards are exactly those running before (none of ours left, none of theirs gone)."""
    reason = _why_not()   # installs the packages first where opted in: that may write to /etc, this may not
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="moaflow-slurm-"))
    files, daemons = _system_files(), _daemons()
    try:
        up = subprocess.run(["bash", str(CLUSTER), "up", str(state)], capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
        assert _daemons() - daemons, "up started no daemon"
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(state)], check=False)
        shutil.rmtree(state, ignore_errors=True)
    after = _system_files()
    changed = sorted(path for path in files.keys() | after.keys() if files.get(path) != after.get(path))
    assert not changed, changed[:20]
    deadline = time.monotonic() + 15   # `down` signals the daemons; they may take a moment to exit
    while _daemons() != daemons and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _daemons() == daemons


@pytest.fixture(scope="module")
def cluster():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp folder: the munge user must be able to reach the socket's folder.
    state = Path(tempfile.mkdtemp(prefix="moaflow-slurm-"))
    up = subprocess.run(["bash", str(CLUSTER), "up", str(state)], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    try:
        yield {"SLURM_CONF": up.stdout.strip(),
               "PATH": f"{state / 'bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(state)], check=False)
        shutil.rmtree(state, ignore_errors=True)


def local_profile(directory: Path, gpu: int = 0) -> Path:
    """The shipped SLURM profile, with its placeholders filled for the local one-node cluster."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"].pop("slurm_account")
    profile["default-resources"].update(slurm_partition="local", mem_mb=1500, runtime=30)
    gpu_rules = [rule for rule, resources in profile["set-resources"].items() if "gpu" in resources]
    assert {"train", "embed_controls"} <= set(gpu_rules)
    for rule in gpu_rules:   # the GPU rules: training, and each fold's model embedding the DMSO crops
        profile["set-resources"][rule].update(slurm_partition="local", gpu=gpu, mem_mb=3000, runtime=30)
        if not gpu:
            profile["set-resources"][rule].pop("cpus_per_gpu")
        profile["set-threads"][rule] = 1
    profile.update({"slurm-no-account": True, "slurm-status-command": "squeue", "jobs": 4,
                    "slurm-init-seconds-before-status-checks": 2, "slurm-keep-successful-logs": True})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(profile))
    return directory


def snakemake(workdir: Path, config: dict, profile: Path, cluster: dict, *args: str) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, **cluster)   # PATH: the cluster's srun, then this environment's moaflow
    return subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
                           "--configfile", str(workdir / "config.yaml"), "--profile", str(profile), *args],
                          cwd=workdir, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory, standin_dir):
    from moaflow.devtools.serve import StandinServer

    workdir = tmp_path_factory.mktemp("slurm-run")
    with StandinServer(standin_dir / "www") as server:
        config = pipeline_config(server.url, standin_dir, workdir)
        config["datasets"] = ["bbbc021"]   # BBBC014's chain runs the same rules; the local demo test runs it
        result = snakemake(workdir, config, local_profile(workdir / "profile"), cluster)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return workdir, config, result, cluster


def test_jobs_went_through_slurm(slurm_run):
    workdir, config, result, cluster = slurm_run
    jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T|%k"], capture_output=True, text=True,
                          check=True, env=dict(os.environ, **cluster)).stdout.splitlines()
    completed = [comment for state, comment in (line.split("|", 1) for line in jobs) if state == "COMPLETED"]
    for rule in ("extract_bbbc021_plate", "preprocess_bbbc021_plate", "preprocess_bbbc021_dmso_plate", "train",
                 "embed_controls", "evaluate_bbbc021", "profile_bbbc021", "track_mlflow"):
        assert any(rule in comment for comment in completed), (rule, jobs[:5])
    # Downloads run on the submit host (localrules): compute nodes often have no internet.
    assert not any("download" in comment for comment in completed)
    assert list((workdir / "results" / "bbbc021" / "raw").glob("*.zip.verified.json"))
    folds = pd.read_csv(config["training"]["bbbc021"]["folds_file"], sep="\t")["fold"]
    # one training job per (dataset, architecture, initialisation): all its folds in one process
    assert sum("rule_train" in c for c in completed) == 1
    for fold in folds:
        assert (workdir / "results" / "bbbc021" / "models" / "resnet50" / "random" / "seed-0" / fold / "run.json").is_file()
    assert list((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))


def test_outputs_equal_the_local_run(slurm_run, demo):
    workdir = slurm_run[0]
    local = demo[0]
    for relative in ("results/bbbc021/images.parquet", "results/bbbc021/crops/index.parquet",
                     "results/bbbc021/folds.tsv"):
        a, b = workdir / relative, local / relative
        if relative.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
        else:
            assert a.read_bytes() == b.read_bytes(), relative
    for relative in ("results/bbbc021/crops/32.npy", "results/bbbc021/dmso/32.npy"):
        assert np.array_equal(np.load(workdir / relative), np.load(local / relative)), relative
    ours = json.loads((workdir / "results/bbbc021/evaluation/summary.json").read_text())
    theirs = json.loads((local / "results/bbbc021/evaluation/summary.json").read_text())
    assert ours["accuracy"].keys() == theirs["accuracy"].keys()
    for key, levels in ours["accuracy"].items():                           # same seed, same CPU results
        if key != "published":
            assert levels == pytest.approx(theirs["accuracy"][key], abs=1e-6), key


def test_mlflow_lost_no_run_under_slurm(slurm_run):
    from mlflow.tracking import MlflowClient

    workdir, config = slurm_run[:2]
    runs = json.loads((workdir / "results" / "mlflow" / "runs.json").read_text())
    n_jobs = len(pd.read_csv(config["training"]["bbbc021"]["folds_file"], sep="\t"))
    client = MlflowClient(f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name(config["tracking"]["experiment"]).experiment_id])
    assert len([r for r in found if r.data.tags.get("mlflow.parentRunId") == runs["parent_run_id"]]) == n_jobs


def _sbatch_calls(output: str) -> dict[str, str]:
    """The sbatch command lines the plugin logged (--verbose: "sbatch call: sbatch …"; a refused job's report
    puts the call on the line after "sbatch call:"), by rule name (from the job's --comment)."""
    calls = {}
    for call in re.findall(r"sbatch call:\s*(sbatch [^\n]*)", output):
        comment = re.search(r"--comment '?rule_([A-Za-z0-9_]+?)(?:_wildcards_|'|\s)", call)
        assert comment, call
        calls[comment.group(1)] = call
    return calls


def test_gpu_rules_ask_sbatch_for_gpus_and_cpu_rules_do_not(slurm_run):
    """No GPU here, so SLURM refuses the GPU jobs: what matters is what the plugin asked sbatch for, for each
    GPU rule of the shipped profile (with its gpu_model and cpus_per_gpu) and for a CPU rule."""
    workdir, config, _, cluster = slurm_run
    profile = local_profile(workdir / "gpu-profile", gpu=1)
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    for rule in ("train", "embed_controls"):
        settings["set-resources"][rule]["gpu_model"] = "a100"
    (profile / "config.yaml").write_text(yaml.safe_dump(settings))
    # Two runs, each refused at submission: a forced embed_controls job (its training up to date), then a
    # forced CPU job (check_folds, which runs) and the training job after it (refused).
    train_job = str(next((workdir / "results" / "bbbc021" / "models").rglob("jobs/*.json")).relative_to(workdir))
    output = ""
    for targets in ([layout.control_statistics("bbbc021", "resnet50", "random", 0)],
                    [layout.folds("bbbc021"), train_job]):
        result = snakemake(workdir, config, profile, cluster, *targets, "--forcerun", *targets, "--verbose",
                           "--retries", "0", "--keep-going")
        output += result.stdout + result.stderr
        assert result.returncode != 0 and "gres" in (result.stdout + result.stderr).lower(), output[-3000:]
    calls = _sbatch_calls(output)
    assert {"train", "embed_controls"} <= calls.keys(), (calls.keys(), output[-3000:])
    for rule in ("train", "embed_controls"):
        shipped = settings["set-resources"][rule]
        assert f"--gpus=a100:{shipped['gpu']}" in calls[rule], calls[rule]
        assert f"--cpus-per-gpu={shipped['cpus_per_gpu']}" in calls[rule], calls[rule]
    if "check_folds" in calls:   # the accepted CPU job's call (logged at debug level)
        assert "--gpus" not in calls["check_folds"] and "--cpus-per-task" in calls["check_folds"], calls["check_folds"]
    # ... and as SLURM holds it: the CPU job ran, asking for no GPU (gres) of any kind
    jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%k|%b"], capture_output=True, text=True,
                          check=True, env=dict(os.environ, **cluster)).stdout.splitlines()
    folds_jobs = [line.split("|") for line in jobs if "check_folds" in line]
    assert folds_jobs, jobs
    latest = max(folds_jobs, key=lambda job: int(job[0]))
    assert "gpu" not in latest[2].lower(), latest
