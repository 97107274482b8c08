"""``moaflow demo``: build the stand-in, serve it on 127.0.0.1 and run the whole pipeline on it.

The data is generated from the config's ``standin`` section (regenerated when
those settings or the generator change), served by `moaflow.devtools.serve` on the
configured loopback port, and fetched by the same download code a real run
uses. The server stops when Snakemake ends; the report is built last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from moaflow.devtools import standin
from moaflow.devtools.serve import StandinServer


def build_standin(settings: dict) -> Path:
    """Generate the stand-in of ``settings`` (the config's ``standin`` section) unless it is already there.

    ``bbbc021`` and ``bbbc014`` build those sets (``bbbc021.plate_map: broad`` renders the study's fields of the
    Broad's own image CSV, `moaflow.devtools.rehearsal`); ``cellpainting`` builds the Cell Painting stand-in
    (`moaflow.devtools.cellpainting`) and writes its files' sizes and SHA-256 for the crops dataset of that name
    to ``<out_dir>/standin.yaml``, a config layer for the run; so does ``weights: true`` with stand-in ImageNet
    weights of the downloaded architectures and their MD5s.
    """
    out = Path(settings["out_dir"])
    wanted = {key: settings[key] for key in ("bbbc021", "bbbc014", "cellpainting") if key in settings}
    wanted.update(weights=settings.get("weights", False), version=standin.GENERATOR_VERSION)
    if "cellpainting" in wanted:
        from moaflow.devtools import cellpainting

        wanted["cellpainting_version"] = cellpainting.GENERATOR_VERSION
    stamp = out / "settings.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        print(f"building the stand-in data in {out} ...", flush=True)
        layer = _build_bbbc(out, wanted) if "bbbc021" in wanted else {}
        if "cellpainting" in wanted:
            options = {key: tuple(value) if isinstance(value, list) else value   # YAML lists: the tuples it takes
                       for key, value in wanted["cellpainting"].items()}
            files = cellpainting.write_cellpainting(out, **options)
            layer["crops"] = {"cellpainting": {"download": {"published_files": files["published_files"]}}}
        (out / "standin.yaml").write_text(yaml.safe_dump(layer))
        stamp.write_text(json.dumps(wanted))
    return out


def fetch_first(layers: list[str]) -> list[str]:
    """The crops datasets of these config layers (over config/config.yaml, where there is one) whose metadata is
    still to be fetched (`moaflow.config.pending_downloads`): the workflow's first run only fetches them."""
    from snakemake.utils import update_config

    from moaflow.config import pending_downloads

    config: dict = {}
    for path in [p for p in ["config/config.yaml"] if Path(p).is_file()] + layers:
        update_config(config, yaml.safe_load(Path(path).read_text()) or {})
    if not any((spec or {}).get("download") for spec in (config.get("crops") or {}).values()):
        return []
    config.setdefault("datasets", [])
    config.setdefault("training", {})
    return pending_downloads(config)


def _build_bbbc(out: Path, wanted: dict) -> dict:
    """The BBBC021 and BBBC014 stand-ins (and weights); their config layer."""
    b021, b014 = dict(wanted["bbbc021"]), dict(wanted["bbbc014"])
    if b021.pop("plate_map", "generated") == "broad":
        from moaflow.devtools.rehearsal import write_study_standin

        write_study_standin(out, b021.pop("reference"), shape=tuple(b021.pop("shape")), **b021)
    else:
        standin.write_bbbc021(out, shape=tuple(b021.pop("shape")), **b021)
    standin.write_bbbc014(out, shape=tuple(b014.pop("shape")), **b014)
    layer = {}
    if wanted["weights"]:
        from moaflow.learn import architectures

        files = {name: architectures.get(name).weights.file for name in architectures.downloaded()}
        layer["weights"] = {"published_files": {
            file: {"md5": digest} for file, digest in standin.write_weights(out, files).items()}}
    return layer


def run_demo(configfile: str = "config/demo.yaml", snakefile: str = "Snakefile", cores: int = 2,
             snakemake_args: list[str] | None = None) -> int:
    """Build and serve the stand-in, run snakemake with ``configfile``, then build the report.

    Parameters
    ----------
    configfile : str
        The demo's config (its ``standin`` section says what data to build), layered on config/config.yaml.
    snakefile : str
        The workflow (run from the repository root).
    cores : int
        Snakemake's ``--cores``.
    snakemake_args : list of str, optional
        More arguments for snakemake.

    Returns snakemake's exit status.
    """
    started = time.monotonic()
    config_path = Path(configfile)
    settings = yaml.safe_load(config_path.read_text()).get("standin")
    if not settings:
        raise ValueError(f"{config_path}: no 'standin' section; the demo needs one to build its data")
    out = build_standin(settings)
    env = dict(os.environ)
    snakemake = str(Path(sys.executable).parent / "snakemake")
    layers = [str(config_path)]
    if yaml.safe_load((out / "standin.yaml").read_text()):
        layers.append(str(out / "standin.yaml"))   # the stand-in's published sizes and digests
    command = [snakemake, "--snakefile", snakefile, "--rerun-incomplete", "--configfile", *layers,
               "--cores", str(cores), *(snakemake_args or [])]
    try:
        server = StandinServer(out / "www", settings["port"])
    except OSError as exc:
        raise ValueError(f"{config_path}: cannot serve the stand-in on 127.0.0.1:{settings['port']} ({exc}); "
                         "set standin.port and the base_urls to a free port") from exc
    with server:
        print(f"stand-in served at {server.url}; running: {' '.join(command)}", flush=True)
        fetching = fetch_first(layers)
        result = subprocess.run(command, env=env)
        if result.returncode == 0 and fetching:
            # the first run fetched the sets whose folds come from downloaded metadata (common.smk: PENDING)
            print(f"{', '.join(fetching)} fetched; planning and running the study", flush=True)
            result = subprocess.run(command, env=env)
    if result.returncode != 0:
        return result.returncode
    report = Path("results") / "report.html"
    result = subprocess.run([snakemake, "--snakefile", snakefile, "--configfile", *layers,
                             "--report", str(report)], env=env)
    if result.returncode == 0:
        print(f"demo finished in {time.monotonic() - started:.0f} s; report: {report.resolve()}", flush=True)
    return result.returncode
