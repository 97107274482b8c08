"""Shared fixtures: a tiny generated stand-in and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from moaflow import config as moaflow_config
from moaflow.datasets import download
from moaflow.datasets.tables import bbbc021_image_table
from moaflow.devtools import standin
from moaflow.devtools.serve import StandinServer
from moaflow.study import BBBC021_PLATES_BY_WEEK

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MOAFLOW_REFERENCE", REPO.parent / "shared" / "reference"))
#: Real BBBC021 crops (the course lab's subset); tests that need them are skipped, saying why, without them.
LAB_SUBSET = Path(os.environ.get("MOAFLOW_LAB_SUBSET", REPO.parent / "shared" / "real" / "bbbc021_lab_subset"))
needs_real_cells = pytest.mark.skipif(not (LAB_SUBSET / "labels.csv").is_file(),
                                      reason=f"real cells not found at {LAB_SUBSET} (set MOAFLOW_LAB_SUBSET)")
LAB_COLUMNS = {k: k for k in ("compound", "concentration", "moa", "plate", "well", "replicate")}


def lab_table():
    from moaflow.datasets.tables import crops_table

    return crops_table(LAB_SUBSET / "images", LAB_SUBSET / "labels.csv", columns=LAB_COLUMNS,
                       filename="bbbc021v1_{index}.png", separator=";", batch_pattern="^(Week[0-9]+)_",
                       log=lambda _: None)


BIN = Path(sys.executable).parent
#: Every setting's default, as the workflow resolves it (the study's own settings).
DEFAULTS = moaflow_config.defaults()
_PRE021, _PRE014 = DEFAULTS["preprocess"]["bbbc021"], DEFAULTS["preprocess"]["bbbc014"]
#: The study's BBBC021 preprocessing as `moaflow.preprocess.plates.preprocess_plate`'s keywords.
STUDY_PREPROCESSING = {"grid": tuple(_PRE021["crop_grid"]), "normalisation": _PRE021["normalisation"],
                       "percentiles": tuple(_PRE021["percentiles"]), "empty_threshold": _PRE021["empty_threshold"],
                       "empty_fraction": _PRE021["empty_fraction"]}
#: The study's BBBC014 preprocessing as `moaflow.preprocess.plates.preprocess_bbbc014`'s keywords.
BBBC014_PREPROCESSING = {"grid": tuple(_PRE014["crop_grid"]), "minmax": _PRE014["minmax"]}
#: The original's empty-crop threshold (on the 0..255 float image).
THRESHOLD = _PRE021["empty_threshold"]
#: A CPU training job's settings as `moaflow.learn.train.train_job` takes them (the config's defaults, on the CPU).
JOB = {"gpus": 0, "allow_cpu": DEFAULTS["training"]["allow_cpu"],
       "load_into_memory": DEFAULTS["training"]["load_into_memory"],
       "checkpoint_minutes": DEFAULTS["training"]["checkpoint_minutes"]}


#: Test files that start the private SLURM cluster: their tests run in one process (pytest-xdist's group).
_CLUSTER_FILES = {"test_slurm.py", "test_local_cluster.py"}


@pytest.hookimpl(tryfirst=True)   # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """One pytest-xdist group for the cluster's tests and the tests reading the demo run, put first: one
    cluster up at a time (its tests compare the system's daemons before and after), the demo, which one of them
    compares with the SLURM run, made once, and the longest unit of work started first."""
    grouped = [item for item in items
               if item.path.name in _CLUSTER_FILES or "demo" in getattr(item, "fixturenames", ())]
    for item in grouped:
        item.add_marker(pytest.mark.xdist_group("cluster"))
    items[:] = grouped + [item for item in items if item not in grouped]


@pytest.hookimpl(optionalhook=True)   # a pytest-xdist hook, in the controlling process
def pytest_xdist_node_collection_finished(node, ids):
    """Stop when pytest-xdist was asked to group and did not: pytest 9.2 made it silently ignore the groups
    (pytest-dev/pytest-xdist#1386), which would run two clusters, or a cluster beside the impostor daemons of
    test_local_cluster.py, at once."""
    if node.config.getoption("dist") != "loadgroup":
        return
    cluster = [i for i in ids if Path(i.split("::")[0]).name in _CLUSTER_FILES]
    if cluster and not all(i.endswith("@cluster") for i in cluster):
        pytest.exit(f"pytest-xdist --dist loadgroup did not group the cluster's tests ({cluster[0]}): check the "
                    f"pytest and pytest-xdist pins in pyproject.toml", returncode=pytest.ExitCode.USAGE_ERROR)


def study(**overrides) -> dict:
    """`STUDY_PREPROCESSING` with some settings changed."""
    return {**STUDY_PREPROCESSING, **overrides}


def flags(**options) -> list[str]:
    """Keyword arguments as the generated command line takes them (``moaflow <step> --name value ...``)."""
    import json

    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)) and not any(isinstance(v, (list, tuple, dict)) for v in value):
            out += [flag, *map(str, value)]
        elif isinstance(value, (dict, list, tuple)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out

#: A stand-in small enough for seconds-long tests, with every structural feature of the real one.
TINY_BBBC021 = dict(n_plates=2, sites=2, dmso_wells=2, moas=["DNA damage", "Eg5 inhibitors"],
                    compounds_per_moa=2, concentrations_per_compound=1, shape=(64, 80), magnification=1.5, seed=7)
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


def tiny_config(workdir: Path, server_url: str) -> dict:
    """The demo config made tiny: the TINY stand-in, 32 px crops, ResNet50 for 2 steps.

    Writes the folds files (they are read at parse time, before any data exists)
    into ``workdir`` and points the config at them with absolute paths.
    """
    from moaflow.learn import folds

    from snakemake.utils import update_config

    # config/demo.yaml layered on config/config.yaml, as `moaflow demo` runs it from the repository
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "config" / "demo.yaml").read_text()))
    treatments = pd.DataFrame(standin.select_treatments(
        TINY_BBBC021["moas"], TINY_BBBC021["compounds_per_moa"], TINY_BBBC021["concentrations_per_compound"]))
    folds.write_folds(folds.leave_one_compound_out(treatments.assign(batch="Week1"), n_validation=1),
                      workdir / "folds_bbbc021.tsv")
    config["bbbc021"]["base_urls"] = [server_url + "BBBC021/"]
    config["bbbc021"]["plates"] = [f"{week}_{numbers[0]}" for week, numbers in
                                   list(BBBC021_PLATES_BY_WEEK.items())[: TINY_BBBC021["n_plates"]]]
    config["bbbc014"]["base_urls"] = [server_url + "BBBC014/"]
    config["download"].update(retries=1, backoff_seconds=0.1)
    config["preprocess"] = {"bbbc021": {"illumination": {"compute": True, "apply": False, "filter_size": 6,
                                                         "downscale": 2}, "input_sizes": [32]},
                            "bbbc014": {"input_sizes": [32]}}
    # Compiled, not eager: a job trains several folds, and after the first compilation a fold takes seconds
    # where eager ResNet50 takes tens of seconds (measured: 4 folds 80 s compiled, 200 s eager).
    quick = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "run_eagerly": False}
    config["profiling"].update(examples_per_moa=1, occlusion_grid=2)   # occlusion maps drawn, at least cost
    config["training"]["architectures"] = ["resnet50"]
    config["training"]["initialisations"] = [{"name": "random", "weights": "none"}]
    config["training"]["bbbc021"] = {"folds_file": str(workdir / "folds_bbbc021.tsv"), "preset": "final",
                                     "hyperparameters": quick, "input_sizes": {"resnet50": 32}}
    config["training"]["bbbc014"] = {"folds_file": str(REPO / "config" / "folds" / "bbbc014.tsv"),
                                     "architectures": ["resnet50"], "preset": "bbbc014",
                                     "hyperparameters": quick, "input_sizes": {"resnet50": 32}}
    # A free-text value a shell would act on if it were not quoted (the marker must never appear).
    config["tracking"]["experiment"] = f"moaflow tiny's $(touch {workdir / 'pwned'})"
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY_BBBC021.items()}
    config["standin"].update(out_dir="results/standin", bbbc021=settings,
                             bbbc014={"shape": list(TINY_BBBC014["shape"]), "dapi_channel": 1, "seed": 7})
    return config


def pipeline_config(server_url: str, standin_dir: Path, workdir: Path) -> dict:
    """`tiny_config` without the stand-in section (the data is served by a fixture)."""
    config = tiny_config(workdir, server_url)
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


def small_training_store(out: Path, sizes: list[int], n_validation: int = 0) -> tuple[Path, Path, Path, pd.DataFrame]:
    """The small stand-in the training tests share (2 MoAs, 4 compounds, 31 crops) as crop stores of ``sizes``,
    with its leave-one-compound-out folds: (crops folder, index path, folds path, index)."""
    from moaflow.learn import folds

    crops, index_path = build_crop_store(
        out, sizes, n_plates=2, sites=1, dmso_wells=2, moas=["Eg5 inhibitors", "DNA damage"], compounds_per_moa=2,
        concentrations_per_compound=1, shape=(96, 120), magnification=2.0, seed=21)
    index = pd.read_parquet(index_path)
    folds.write_folds(folds.leave_one_compound_out(index, n_validation=n_validation), out / "folds.tsv")
    return crops, index_path, out / "folds.tsv", index


def build_crop_store(out: Path, sizes: list[int], controls: bool = False, **standin_settings) -> tuple[Path, Path]:
    """Stand-in -> extraction -> image table -> per-plate preprocessing -> gathered store.

    Uses the pipeline's own functions; returns (folder with <size>.npy, index path).
    With ``controls`` the plates' DMSO crops are gathered as well, into ``out/dmso``.
    """
    from moaflow.datasets import download, tables
    from moaflow.preprocess import plates, store
    from moaflow.files import write_array, write_table

    manifest = standin.write_bbbc021(out, log=lambda _: None, **standin_settings)
    www = out / "www" / "BBBC021"
    for plate in manifest["plates"]:
        download.extract_archive(www / f"BBBC021_v1_images_{plate}.zip", out / "images" / plate,
                                 member_root=plate, log=lambda _: None)
    table = tables.bbbc021_image_table(www / "BBBC021_v1_image.csv", www / "BBBC021_v1_moa.csv", out / "images",
                                       taxol_rule=True)
    for kind in ("crops", "dmso") if controls else ("crops",):
        parts = []
        for plate in manifest["plates"]:
            arrays, index = plates.preprocess_plate(table[table["plate"] == plate], sizes=sizes, **STUDY_PREPROCESSING,
                                                        controls=kind == "dmso")
            for size, array in arrays.items():
                write_array(array, out / f"{plate}.{kind}.{size}.npy")
            write_table(index, out / f"{plate}.{kind}.index.parquet")
            parts.append(plate)
        (out / kind).mkdir()
        for size in sizes:
            index = store.gather([(out / f"{p}.{kind}.{size}.npy", out / f"{p}.{kind}.index.parquet") for p in parts],
                                 out / kind / f"{size}.npy")
        write_table(index, out / kind / "index.parquet")
    return out / "crops", out / "crops" / "index.parquet"


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Run `moaflow demo` once, on 2 cores, with the tiny config: the whole chain."""
    workdir = tmp_path_factory.mktemp("demo")
    probe = StandinServer(workdir)  # borrow a free port
    port = probe.port
    probe.server_close()
    config = tiny_config(workdir, f"http://127.0.0.1:{port}/")
    config["standin"]["port"] = port
    (workdir / "demo.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([str(BIN / "moaflow"), "demo", "--configfile", "demo.yaml", "--cores", "2",
                             "--snakefile", str(REPO / "Snakefile")], cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir, config, port, result


@pytest.fixture(scope="session")
def small_plate(tmp_path_factory):
    """One extracted stand-in plate (64x80 fields) and its image table."""
    out = tmp_path_factory.mktemp("plate")
    manifest = standin.write_bbbc021(out, n_plates=1, sites=2, dmso_wells=3, moas=["Eg5 inhibitors", "Epithelial"],
                                     compounds_per_moa=1, concentrations_per_compound=2, shape=(64, 80),
                                     seed=11, log=lambda _: None)
    plate = manifest["plates"][0]
    www = out / "www" / "BBBC021"
    download.extract_archive(www / f"BBBC021_v1_images_{plate}.zip", out / "images" / plate,
                             member_root=plate, log=lambda _: None)
    table = bbbc021_image_table(www / "BBBC021_v1_image.csv", www / "BBBC021_v1_moa.csv", out / "images",
                                log=lambda _: None, taxol_rule=True)
    return out, table


def direct_study(table, controls=False):
    """The reference formulas transcribed literally, pixel by pixel, in float64 (of the DMSO fields with
    ``controls``).

    Returns, per image number, the uint8 image and the float image before truncation,
    both channels last in stored order (Actin, Tubulin, DAPI).
    """
    def read(row):
        return np.stack([tifffile.imread(row[f"path_{c}"]) for c in ("dapi", "tubulin", "actin")])

    dmso = np.stack([read(r) for _, r in table[table["is_dmso"]].iterrows()])   # (F, 3, M, N)
    a = 2 * np.sqrt(dmso.astype(np.float64) + 3 / 8)
    mean = a.transpose(1, 0, 2, 3).reshape(3, -1).mean(axis=1)
    std = a.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1)
    images = {}
    for _, row in table[table["is_dmso"] == controls].iterrows():
        z = (2 * np.sqrt(read(row).astype(np.float64) + 3 / 8) - mean[:, None, None]) / std[:, None, None]
        scaled = (z - z.min()) / (z.max() - z.min()) * 255
        images[row["image_number"]] = (np.moveaxis(scaled.astype(np.uint8)[[2, 1, 0]], 0, -1),
                                       np.moveaxis(scaled[[2, 1, 0]], 0, -1))
    return images
