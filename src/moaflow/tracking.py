"""MLflow tracking: one writer logs every finished training job.

Design (parallel jobs must not lose runs): training jobs only write files
(``run.json``, ``history.tsv``, ``model.keras``); the ``track_mlflow`` rule,
a single process, then creates a parent run for the study invocation and one
child run per job with its parameters, per-epoch metrics, tags and artifacts.
No two processes ever write the tracking store at once, so an embedded SQLite
store cannot lock or race its migrations, and a rerun of the rule logs a new
parent with the current results. ``MLFLOW_TRACKING_URI`` switches to a server.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

DEFAULT_URI = "sqlite:///results/mlflow/mlflow.db"
#: Artifact root for experiments created in a local store (a server chooses its own).
LOCAL_ARTIFACTS = "results/mlflow/artifacts"


def git_commit(directory: str | os.PathLike = ".") -> str:
    """The checkout's commit, or ``"unknown"`` outside a git repository."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten_metrics(data, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested summaries as ``a.b.c`` metric names (for the parent run)."""
    out = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten_metrics(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and data == data:
        out[prefix.replace("/", ".")] = float(data)
    return out


def _flatten(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: str(value)[:6000]}


def log_study(
    run_dirs: Iterable[str | os.PathLike],
    *,
    tracking_uri: str | None = None,
    experiment: str = "moaflow",
    tags: dict[str, str] | None = None,
    parent_params: dict | None = None,
    parent_artifacts: Iterable[str | os.PathLike] = (),
    parent_metrics: dict[str, float] | None = None,
    log_models: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Log a parent run and one child run per training job folder.

    Parameters
    ----------
    run_dirs : iterable of path
        Folders holding a finished job's ``run.json`` and ``history.tsv``
        (and ``model.keras``).
    tracking_uri : str, optional
        The config's store; ``$MLFLOW_TRACKING_URI`` wins when set, `DEFAULT_URI` when neither is.
    tags : dict
        Tags for every run (git commit, config hash).
    parent_params, parent_metrics, parent_artifacts
        What the parent run carries (configuration, study aggregates, figures).

    Returns
    -------
    runs : dict
        ``{"tracking_uri", "experiment_id", "parent_run_id", "children": {folder: run_id}}``
    """
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    # A tracking server named in the environment wins over the config's store.
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or DEFAULT_URI
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found:
        experiment_id = found.experiment_id
    else:
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = Path(LOCAL_ARTIFACTS).resolve().as_uri() if local else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    tags = dict(tags or {})
    parent = client.create_run(experiment_id, run_name=f"study-{tags.get('config_hash', '')}",
                               tags={**tags, "moaflow.level": "study"})
    parent_id = parent.info.run_id
    if parent_params:
        client.log_batch(parent_id, params=[Param(k, v) for k, v in _flatten("", parent_params).items()][:100])
    children = {}
    for folder in run_dirs:
        folder = Path(folder)
        run = json.loads((folder / "run.json").read_text())
        history = pd.read_csv(folder / "history.tsv", sep="\t")
        child_tags = {**tags, "mlflow.parentRunId": parent_id, "moaflow.level": "training",
                      "dataset": str(run.get("dataset", "")), "architecture": run["architecture"],
                      "init": str(run.get("init", "")), "fold": run["fold"], "fold_group": str(run["test_group"])}
        child = client.create_run(experiment_id, run_name=f"{run.get('dataset', '')}/{run['architecture']}/"
                                  f"{run.get('init', '')}/{run['fold']}", tags=child_tags)
        child_id = child.info.run_id
        params = {"architecture": run["architecture"], "init": run.get("init"), "weights": run.get("weights"),
                  "fold": run["fold"], "test_group": run["test_group"], "seed": run["seed"],
                  "input_size": run["input_size"], "n_train": run["n_train"], "n_validation": run["n_validation"],
                  "n_test": run["n_test"], **{f"hp.{k}": v for k, v in run["hyperparameters"].items()}}
        metrics = [Metric(column, float(value), 0, int(row["epoch"]))
                   for _, row in history.iterrows() for column, value in row.items()
                   if column != "epoch" and pd.notna(value)]
        if run.get("test_accuracy") is not None:
            metrics.append(Metric("final_test_accuracy", float(run["test_accuracy"]), 0, int(len(history))))
        for start in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 entries
            client.log_batch(child_id, metrics=metrics[start:start + 900],
                             params=[Param(k, str(v)) for k, v in params.items()] if start == 0 else [])
        for name in ("run.json", "history.tsv", "test_predictions.parquet", "validation_predictions.parquet"):
            if (folder / name).exists():
                client.log_artifact(child_id, str(folder / name))
        if log_models and (folder / "model.keras").exists():
            client.log_artifact(child_id, str(folder / "model.keras"), artifact_path="model")
        client.set_terminated(child_id)
        children[str(folder)] = child_id
        log(f"MLflow: {folder} -> run {child_id}")
    if parent_metrics:
        client.log_batch(parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in parent_metrics.items()])
    for artifact in parent_artifacts:
        client.log_artifact(parent_id, str(artifact))
    client.set_terminated(parent_id)
    return {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_id, "children": children}


def track(run_dirs, output, *, tracking_uri: str | None = None, experiment: str = "moaflow", config_hash: str = "",
          summaries=(), artifacts=(), log_models: bool = True, log=print) -> dict:
    """Log the study (`log_study`) with the evaluation summaries as the parent's metrics; write ``output``."""
    from moaflow.io import write_json

    metrics = flatten_metrics({Path(p).parent.parent.name: json.loads(Path(p).read_text()) for p in summaries})
    runs = log_study(run_dirs, tracking_uri=tracking_uri, experiment=experiment,
                     tags={"git_commit": git_commit(), "config_hash": config_hash}, parent_metrics=metrics,
                     parent_artifacts=artifacts, log_models=log_models, log=log)
    write_json(runs, output)
    return runs
