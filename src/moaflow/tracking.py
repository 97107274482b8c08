"""MLflow tracking: live from training jobs when a tracking server is used, completed by one writer at the end.

* With the default SQLite store (``sqlite:///results/mlflow/mlflow.db``) training
  jobs only write files; the ``track_mlflow`` rule, a single process, then logs a
  parent run for the study and one child run per trained fold. No two processes
  write the store at once, so it cannot lock or race its migrations.
* With a tracking server (``MLFLOW_TRACKING_URI=http(s)://...``) the workflow's
  start creates the parent run (`start_parent`), and each training job logs its
  folds live (`LiveRun`): the run is created when the fold starts and its
  metrics arrive epoch by epoch. The end-of-run writer then completes the
  parent and adds what is missing (artifacts, models).

Every child run carries its real start and end time, its fold's crops as an
MLflow dataset input (with its digest), and the experiment is tagged as a
model-training one, so the MLflow UI opens it on its runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import pandas as pd

from moaflow.files import write_json
from moaflow.logs import stderr

DEFAULT_URI = "sqlite:///results/mlflow/mlflow.db"
#: Artifact root for experiments created in a local store (a server chooses its own).
LOCAL_ARTIFACTS = "results/mlflow/artifacts"
#: MLflow's experiment-kind tag: "custom_model_development" opens the experiment on its training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def resolve_uri(configured: str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` (a server named in the environment wins), else the config's, else the default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


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


def _ms(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else None


def _client(uri: str):
    # MlflowClient(uri), not mlflow.set_tracking_uri: that writes MLFLOW_TRACKING_URI into the environment.
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id (created when missing), tagged as a model-training experiment."""
    found = client.get_experiment_by_name(name)
    if found:
        if found.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    location = None if is_server(uri) else Path(LOCAL_ARTIFACTS).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def start_parent(uri: str, experiment: str, config_hash: str, output: str | os.PathLike) -> dict:
    """Create (or reuse the unfinished) parent run of this configuration on a tracking server, before
    any training job starts, and write where it is to ``output`` (what `LiveRun` reads)."""
    client = _client(uri)
    exp = experiment_id(client, experiment, uri)
    running = client.search_runs([exp], filter_string=f"tags.config_hash = '{config_hash}' and "
                                 "tags.`moaflow.level` = 'study' and attributes.status = 'RUNNING'", max_results=1)
    parent = running[0] if running else client.create_run(
        exp, run_name=f"study-{config_hash}", tags={"config_hash": config_hash, "git_commit": git_commit(),
                                                    "moaflow.level": "study"})
    record = {"tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent.info.run_id}
    write_json(record, output)
    return record


def _fold_dataset(run: dict):
    """The fold's crops (train, validation and test rows of the index) as an MLflow dataset input."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    from moaflow.learn import folds

    index = pd.read_parquet(run["index_path"])
    parts = folds.split(index, {"fold": run["fold"], "group_column": run.get("group_column", "compound"),
                                "test_group": run["test_group"], "validation_groups": run["validation_groups"],
                                "excluded_batches": run.get("excluded_batches", "")})
    frames = [index.iloc[rows][["crop_id", "compound", "moa"] if "moa" in index else ["crop_id"]].assign(split=name)
              for name, rows in parts.items()]
    dataset = mlflow.data.from_pandas(pd.concat(frames, ignore_index=True), source=str(run["index_path"]),
                                      name=f"{run.get('dataset', '')}/{run['fold']}")
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])


def _params(run: dict) -> dict:
    return {"architecture": run["architecture"], "init": run.get("init"), "weights": run.get("weights"),
            "fold": run["fold"], "test_group": str(run["test_group"])[:250], "seed": run["seed"],
            "input_size": run.get("input_size"), "n_train": run.get("n_train"), "n_validation": run.get("n_validation"),
            "n_test": run.get("n_test"), "backend": run.get("backend"),
            **{f"hp.{k}": v for k, v in run["hyperparameters"].items()}}


def _tags(run: dict, parent_id: str | None, extra: dict) -> dict:
    tags = {**extra, "moaflow.level": "training", "dataset": str(run.get("dataset", "")),
            "architecture": run["architecture"], "init": str(run.get("init", "")), "fold": run["fold"],
            "fold_group": str(run["test_group"])[:250], "seed": str(run["seed"])}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return tags


class LiveRun:
    """A training fold's child run on a tracking server, logged while the fold trains.

    Created only when the tracking URI is a server; MLflow errors are logged as
    warnings (the end-of-run writer then logs the fold) rather than stopping a
    long training job.
    """

    def __init__(self, uri: str, experiment: str, parent_file: str | os.PathLike | None, run: dict,
                 log: Callable[[str], None] = stderr):
        self.log, self.run_id = log, None
        try:
            self.client = _client(uri)
            parent = json.loads(Path(parent_file).read_text()) if parent_file and Path(parent_file).is_file() else {}
            exp = parent.get("experiment_id") or experiment_id(self.client, experiment, uri)
            created = self.client.create_run(exp, run_name=_run_name(run), start_time=_ms(run["started_at"]),
                                             tags=_tags(run, parent.get("parent_run_id"), {"git_commit": git_commit()}))
            self.run_id = created.info.run_id
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in _params(run).items()])
            self.client.log_inputs(self.run_id, datasets=[_fold_dataset(run)])
            log(f"MLflow: logging live to {uri}, run {self.run_id}")
        except Exception as exc:  # the server is a convenience: training goes on without it
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        self.log(f"WARNING: live MLflow logging failed ({type(exc).__name__}: {exc}); the end-of-run writer "
                 "(rule track_mlflow) will log this fold")
        self.run_id = None

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()
                                                        if v == v])
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            self._warn(exc)

    def finish(self, run: dict) -> None:
        if self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, "FINISHED", end_time=_ms(run["finished_at"]))
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            self._warn(exc)


def _run_name(run: dict) -> str:
    return f"{run.get('dataset', '')}/{run['architecture']}/{run.get('init', '')}/seed-{run['seed']}/{run['fold']}"


def log_study(
    run_dirs: Iterable[str | os.PathLike],
    *,
    tracking_uri: str | None = None,
    experiment: str = "moaflow",
    tags: dict[str, str] | None = None,
    parent_file: str | os.PathLike | None = None,
    parent_artifacts: Iterable[str | os.PathLike] = (),
    parent_metrics: dict[str, float] | None = None,
    log_models: bool = True,
    log: Callable[[str], None] = stderr,
) -> dict:
    """Log (or complete) the parent run and one child run per trained fold folder.

    Parameters
    ----------
    run_dirs : iterable of path
        Folders holding a finished fold's ``run.json`` and ``history.tsv`` (and ``model.keras``).
    tracking_uri : str, optional
        See `resolve_uri`.
    tags : dict
        Tags for every run (git commit, config hash).
    parent_file : path, optional
        Written by `start_parent` when live logging: its parent is completed instead of a new one made.
    parent_metrics, parent_artifacts
        What the parent run carries (study aggregates, figures).

    Returns
    -------
    runs : dict
        ``{"tracking_uri", "experiment_id", "parent_run_id", "children": {folder: run_id}}``
    """
    from mlflow.entities import Metric, Param

    uri = resolve_uri(tracking_uri)
    client = _client(uri)
    exp = experiment_id(client, experiment, uri)
    tags = dict(tags or {})
    live = json.loads(Path(parent_file).read_text()) if parent_file and Path(parent_file).is_file() else None
    if live and live.get("tracking_uri") == uri:
        parent_id = live["parent_run_id"]
    else:
        parent_id = client.create_run(exp, run_name=f"study-{tags.get('config_hash', '')}",
                                      tags={**tags, "moaflow.level": "study"}).info.run_id
    children = {}
    for folder in map(Path, run_dirs):
        run = json.loads((folder / "run.json").read_text())
        child_id = run.get("mlflow_run_id") if run.get("mlflow_tracking_uri") == uri else None
        if child_id:   # logged live: make sure it hangs under this parent, and add the files
            client.set_tag(child_id, "mlflow.parentRunId", parent_id)
        else:
            child_id = client.create_run(exp, run_name=_run_name(run), start_time=_ms(run.get("started_at")),
                                         tags=_tags(run, parent_id, tags)).info.run_id
            history = pd.read_csv(folder / "history.tsv", sep="\t")
            metrics = [Metric(column, float(value), 0, int(row["epoch"]))
                       for _, row in history.iterrows() for column, value in row.items()
                       if column != "epoch" and pd.notna(value)]
            for start in range(0, max(len(metrics), 1), 900):  # MLflow caps a batch at 1000 entries
                client.log_batch(child_id, metrics=metrics[start:start + 900],
                                 params=[Param(k, str(v)) for k, v in _params(run).items()] if start == 0 else [])
            if run.get("index_path") and Path(run["index_path"]).is_file():
                client.log_inputs(child_id, datasets=[_fold_dataset(run)])
        if run.get("test_accuracy") is not None:
            client.log_batch(child_id, metrics=[Metric("final_test_accuracy", float(run["test_accuracy"]), 0, 0)])
        for name in ("run.json", "history.tsv", "test_predictions.parquet", "validation_predictions.parquet"):
            if (folder / name).exists():
                client.log_artifact(child_id, str(folder / name))
        if log_models and (folder / "model.keras").exists():
            client.log_artifact(child_id, str(folder / "model.keras"), artifact_path="model")
        client.set_terminated(child_id, "FINISHED", end_time=_ms(run.get("finished_at")))
        children[str(folder)] = child_id
        log(f"MLflow: {folder} -> run {child_id}")
    if parent_metrics:
        client.log_batch(parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in parent_metrics.items()])
    for key, value in tags.items():
        client.set_tag(parent_id, key, value)
    for artifact in parent_artifacts:
        client.log_artifact(parent_id, str(artifact))
    client.set_terminated(parent_id)
    return {"tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent_id, "children": children}


def track(run_dirs: list[str], output: str | os.PathLike, *, tracking_uri: str | None, experiment: str,
          config_hash: str, summaries: list[str], figures: list[str], parent_file: str | None, log_models: bool,
          log=stderr) -> dict:
    """Log the study to MLflow: a parent run with the summaries' numbers as metrics and the summaries and
    figures as artifacts, and one child run per trained fold (`log_study`); write ``output`` (the run ids).

    Parameters
    ----------
    run_dirs : list of path
        The trained folds' folders.
    output : path
        ``runs.json``: fold folder -> MLflow run id, and the parent's.
    tracking_uri : str, optional
        ``$MLFLOW_TRACKING_URI`` wins; else this, else the local SQLite store.
    experiment : str
        The MLflow experiment.
    config_hash : str
        Tags every run: which configuration produced it.
    summaries : list of path
        Evaluation and profiling ``summary.json`` files; a dataset's are merged (they carry its name).
    figures : list of path
        Further artifacts of the parent run.
    parent_file : path, optional
        The live-logging parent run to complete (with a tracking server).
    log_models : bool
        Copy each fold's model file into MLflow.
    """
    by_dataset: dict[str, dict] = {}
    for path in summaries:
        summary = json.loads(Path(path).read_text())
        by_dataset.setdefault(summary["dataset"], {}).update(summary)
    runs = log_study(run_dirs, tracking_uri=tracking_uri, experiment=experiment,
                     tags={"git_commit": git_commit(), "config_hash": config_hash}, parent_file=parent_file,
                     parent_metrics=flatten_metrics(by_dataset), parent_artifacts=[*summaries, *figures],
                     log_models=log_models, log=log)
    write_json(runs, output)
    return runs
