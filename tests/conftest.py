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


def build_crop_store(out: Path, sizes: list[int], **standin_settings) -> tuple[Path, Path]:
    """Stand-in -> extraction -> image table -> per-plate preprocessing -> gathered store.

    Uses the pipeline's own functions; returns (folder with <size>.npy, index path).
    """
    from moaflow import download, image_table, preprocess

    manifest = standin.write_bbbc021(out, log=lambda _: None, **standin_settings)
    www = out / "www" / "BBBC021"
    for plate in manifest["plates"]:
        download.extract_archive(www / f"BBBC021_v1_images_{plate}.zip", out / "images" / plate,
                                 member_root=plate, log=lambda _: None)
    table = image_table.bbbc021_image_table(www / "BBBC021_v1_image.csv", www / "BBBC021_v1_moa.csv", out / "images")
    parts = []
    for plate in manifest["plates"]:
        arrays, index = preprocess.preprocess_plate(table[table["plate"] == plate], sizes=sizes)
        for size, array in arrays.items():
            preprocess.write_array(array, out / f"{plate}.{size}.npy")
        image_table.write_table(index, out / f"{plate}.index.parquet")
        parts.append(plate)
    crops = out / "crops"
    crops.mkdir()
    for size in sizes:
        index = preprocess.gather([(out / f"{p}.{size}.npy", out / f"{p}.index.parquet") for p in parts],
                                  crops / f"{size}.npy")
    image_table.write_table(index, crops / "index.parquet")
    return crops, crops / "index.parquet"
