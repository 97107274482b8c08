"""MLflow: live logging to a real tracking server (started here, on 127.0.0.1), and the end-of-run writer."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from moaflow import tracking
from moaflow.learn import folds
from moaflow.learn.presets import hyperparameters

from tests.conftest import BIN, JOB, flags, small_training_store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 in its own session (so it can be stopped by its own PID)."""
    port = _free_port()
    process = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                "--backend-store-uri", f"sqlite:///{root}/store.db", "--artifacts-destination",
                                str(root / "artifacts"), "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"),
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def _stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)   # its own session: the server and its workers, nothing else
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, stopped by its own PID afterwards."""
    process, url = _start_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    _stop_server(process)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    crops, index_path, folds_path, _ = small_training_store(tmp_path_factory.mktemp("tracking-store"), [64])
    return crops / "64.npy", index_path, folds_path


def _train(small_store, tmp_path, epochs, env):
    store, index, folds_path = small_store
    fold = folds.read_folds(folds_path).iloc[0]["fold"]
    options = flags(store=store, index=index, folds=folds_path, fold_names=[fold], architecture="lab_cnn",
                    weights="none", hyper=hyperparameters("lab", "lab_cnn", {"epochs": epochs, "batch_size": 4}),
                    seed=0, models_dir=tmp_path / "models", checkpoints_dir=tmp_path / "ck",
                    tracking={"uri": None, "experiment": "live-test", "parent_file": None},
                    **{**JOB, "checkpoint_minutes": 0})
    command = [sys.executable, "-m", "moaflow", "train", *options]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True), tmp_path / "models" / fold


def test_a_training_job_logs_epochs_live_to_a_tracking_server(mlflow_server, small_store, tmp_path):
    """Before: nothing showed in MLflow until the whole run ended. After: epoch metrics arrive while the job runs."""
    from mlflow.tracking import MlflowClient

    process, fold_dir = _train(small_store, tmp_path, 8, dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server))
    client = MlflowClient(mlflow_server)
    seen_while_running = None
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("live-test")
        if experiment:
            for run in client.search_runs([experiment.experiment_id]):
                epochs = client.get_metric_history(run.info.run_id, "loss")
                if epochs and process.poll() is None:
                    seen_while_running = (run.info.run_id, len(epochs))
        if seen_while_running:
            break
        time.sleep(0.3)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert seen_while_running, "no epoch metric was visible while the job ran"
    run_id, epochs_seen = seen_while_running
    assert 1 <= epochs_seen < 8
    record = json.loads((fold_dir / "run.json").read_text())
    assert record["mlflow_run_id"] == run_id
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and len(client.get_metric_history(run_id, "loss")) == 8
    started = int(datetime.fromisoformat(record["started_at"]).timestamp() * 1000)
    assert finished.info.start_time == started and finished.info.end_time > finished.info.start_time
    inputs = finished.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest and inputs[0].dataset.name.endswith(record["fold"])
    experiment = client.get_experiment_by_name("live-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # The end-of-run writer completes: one parent, the live run attached to it, not logged twice.
    parent_file = tmp_path / "parent.json"
    tracking.start_parent(mlflow_server, "live-test", "abc123", parent_file)
    runs = tracking.track([fold_dir], tmp_path / "runs.json", tracking_uri=mlflow_server, experiment="live-test",
                          config_hash="abc123", summaries=[], figures=[], parent_file=parent_file, log_models=False,
                          log=lambda _: None)
    assert runs["children"][str(fold_dir)] == run_id
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == runs["parent_run_id"]
    assert len(client.get_metric_history(run_id, "loss")) == 8
    assert client.get_run(runs["parent_run_id"]).info.status == "FINISHED"


def test_a_tracking_server_that_goes_away_mid_run_is_a_warning_not_a_failed_job(small_store, tmp_path):
    """The server is stopped once the first epoch shows: the job finishes its fold, warns, and leaves the
    fold for the end-of-run writer."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "server"
    root.mkdir()
    server, url = _start_server(root)
    try:
        env = dict(os.environ, MLFLOW_TRACKING_URI=url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                   MLFLOW_HTTP_REQUEST_TIMEOUT="5")
        process, fold_dir = _train(small_store, tmp_path, 6, env)
        client, deadline = MlflowClient(url), time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("live-test")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                break
            time.sleep(0.2)
    finally:
        _stop_server(server)
    assert process.poll() is None, "the job ended before the server was stopped: nothing was tested"
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "WARNING: live MLflow logging failed" in err and "track_mlflow" in err
    run = json.loads((fold_dir / "run.json").read_text())
    assert len(pd.read_csv(fold_dir / "history.tsv", sep="\t")) == 6 and run["test_accuracy"] is not None


def test_the_end_writer_gives_runs_their_real_times_and_data(small_store, tmp_path):
    """With the SQLite store (no server) jobs write files only; the writer logs each fold with its own times."""
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process, fold_dir = _train(small_store, tmp_path, 2, env)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    record = json.loads((fold_dir / "run.json").read_text())
    assert "mlflow_run_id" not in record
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = tracking.log_study([fold_dir], tracking_uri=uri, experiment="files", log_models=False, log=lambda _: None)
    client = MlflowClient(uri)
    child = client.get_run(runs["children"][str(fold_dir)])
    assert child.info.start_time == int(datetime.fromisoformat(record["started_at"]).timestamp() * 1000)
    assert child.info.end_time == int(datetime.fromisoformat(record["finished_at"]).timestamp() * 1000)
    assert child.inputs.dataset_inputs[0].dataset.digest
    assert client.get_experiment_by_name("files").tags["mlflow.experimentKind"] == "custom_model_development"
