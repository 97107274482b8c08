"""The Snakemake workflow end to end on the tiny stand-in served over loopback HTTP."""

import json
import subprocess

import pandas as pd

from moaflow import standin

from .conftest import BIN, REPO, TINY_BBBC021, pipeline_config, run_snakemake


def test_lint_has_no_findings(tmp_path):
    result = subprocess.run([str(BIN / "snakemake"), "--lint", "--configfile", str(REPO / "config" / "demo.yaml")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_download_extract_and_table_then_nothing_to_do(tmp_path, server, standin_dir):
    config = pipeline_config(server.url, standin_dir)
    run_snakemake(tmp_path, config)

    table = pd.read_parquet(tmp_path / "results" / "bbbc021" / "images.parquet")
    n_treatments = len(standin.select_treatments(TINY_BBBC021["moas"], 2, 1))
    per_plate = (n_treatments + TINY_BBBC021["dmso_wells"]) * TINY_BBBC021["sites"]
    assert len(table) == per_plate * TINY_BBBC021["n_plates"]
    for column in ("path_dapi", "path_tubulin", "path_actin"):
        assert all((tmp_path / p).is_file() for p in table[column])
    wells = pd.read_parquet(tmp_path / "results" / "bbbc014" / "images.parquet")
    assert len(wells) == 96 and all((tmp_path / p).is_file() for p in wells["path_fitc"])
    # one download job per file, each through the loopback server
    fetched = {p for _, p, _ in server.requests}
    assert len(fetched) == 2 + TINY_BBBC021["n_plates"] + 2
    assert not list((tmp_path / "results").rglob("*.part"))

    # preprocessing: one store per input size, index rows = array rows, illumination figures
    import numpy as np

    sizes = config["preprocess"]["bbbc021"]["input_sizes"]
    index = pd.read_parquet(tmp_path / "results" / "bbbc021" / "crops" / "index.parquet")
    for size in sizes:
        store = np.load(tmp_path / "results" / "bbbc021" / "crops" / f"{size}.npy", mmap_mode="r")
        assert store.shape == (len(index), size, size, 3) and store.dtype == np.uint8
    assert 0 < len(index) <= 4 * (~table["is_dmso"]).sum()
    for plate in config["bbbc021"]["plates"]:
        assert (tmp_path / "results" / "bbbc021" / "illumination" / f"{plate}.png").is_file()
    index014 = pd.read_parquet(tmp_path / "results" / "bbbc014" / "crops" / "index.parquet")
    assert len(index014) == 64 * 16

    again = run_snakemake(tmp_path, config, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    dry = run_snakemake(tmp_path, config, "--summary")
    assert "update pending" not in dry.stdout


def test_rerun_continues_where_it_stopped(tmp_path, server, standin_dir):
    config = pipeline_config(server.url, standin_dir)
    run_snakemake(tmp_path, config, "--until", "download_bbbc021_plate")
    before = {p for _, p, _ in server.requests}
    run_snakemake(tmp_path, config)
    after = [p for _, p, _ in server.requests]
    zips = [p for p in after if "images_Week" in p]
    assert len(zips) == len(set(zips)) == TINY_BBBC021["n_plates"]  # no plate fetched twice
    assert before <= set(after)


def test_demo_command_serves_runs_and_stops(tmp_path):
    import socket

    import yaml

    from moaflow.serve import StandinServer

    probe = StandinServer(tmp_path)  # borrow a free port
    port = probe.port
    probe.server_close()
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    base = f"http://127.0.0.1:{port}/"
    config["bbbc021"]["base_urls"] = [base + "BBBC021/"]
    config["bbbc014"]["base_urls"] = [base + "BBBC014/"]
    settings = {k: v for k, v in TINY_BBBC021.items()}
    settings["shape"] = list(settings["shape"])
    config["standin"].update(port=port, bbbc021=settings, bbbc014={"shape": [48, 64], "dapi_channel": 1, "seed": 1})
    config["bbbc021"]["plates"] = ["Week1_22123", "Week2_24121"]
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))

    result = subprocess.run([str(BIN / "moaflow"), "demo", "--configfile", "demo.yaml",
                             "--snakefile", str(REPO / "Snakefile")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "results" / "bbbc021" / "images.parquet").is_file()
    assert (tmp_path / "results" / "bbbc014" / "images.parquet").is_file()
    assert f"127.0.0.1:{port}" in result.stdout
    with socket.socket() as sock:  # the server is gone: nothing listens on the port any more
        assert sock.connect_ex(("127.0.0.1", port)) != 0
