"""Shared fixtures: a tiny generated stand-in and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moaflow import standin
from moaflow.serve import StandinServer

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MOAFLOW_REFERENCE", REPO.parent / "shared" / "reference"))
BIN = Path(sys.executable).parent

#: A stand-in small enough for seconds-long tests, with every structural feature of the real one.
TINY_BBBC021 = dict(n_plates=2, sites=2, dmso_wells=2, moas=["DNA damage", "Eg5 inhibitors"],
                    compounds_per_moa=2, concentrations_per_compound=1, shape=(64, 80), seed=7)
TINY_BBBC014 = dict(shape=(48, 64), dapi_channel=1, seed=7)


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standin")
    standin.write_bbbc021(out, log=lambda _: None, **TINY_BBBC021)
    standin.write_bbbc014(out, log=lambda _: None, **TINY_BBBC014)
    return out


@pytest.fixture
def server(standin_dir):
    with StandinServer(standin_dir / "www") as srv:
        yield srv


def pipeline_config(server_url: str, standin_dir: Path) -> dict:
    """The demo config pointed at a test server and the tiny stand-in."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    manifest = yaml.safe_load((standin_dir / "truth" / "bbbc021" / "manifest.json").read_text())
    config["bbbc021"]["base_urls"] = [server_url + "BBBC021/"]
    config["bbbc021"]["plates"] = manifest["plates"]
    config["bbbc014"]["base_urls"] = [server_url + "BBBC014/"]
    config["download"].update(retries=1, backoff_seconds=0.1)
    del config["standin"]
    return config


def run_snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the repository's Snakefile in ``workdir`` with ``config`` as its config file."""
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(configfile), "--cores", "2", *args],
        cwd=workdir, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
