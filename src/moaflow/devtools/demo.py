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

    ``bbbc021.plate_map: broad`` renders the study's fields of the Broad's own image CSV
    (`moaflow.devtools.rehearsal`); ``weights: true`` adds stand-in ImageNet weights of the downloaded
    architectures and writes their MD5s to ``<out_dir>/standin.yaml``, a config layer for the run.
    """
    out = Path(settings["out_dir"])
    wanted = {"bbbc021": settings["bbbc021"], "bbbc014": settings["bbbc014"],
              "weights": settings.get("weights", False), "version": standin.GENERATOR_VERSION}
    stamp = out / "settings.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        print(f"building the stand-in data in {out} ...", flush=True)
        b021, b014 = dict(settings["bbbc021"]), dict(settings["bbbc014"])
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
        (out / "standin.yaml").write_text(yaml.safe_dump(layer))
        stamp.write_text(json.dumps(wanted))
    return out


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
    command = [snakemake, "--snakefile", snakefile, "--rerun-incomplete", "--configfile", str(config_path),
               "--cores", str(cores), *(snakemake_args or [])]
    try:
        server = StandinServer(out / "www", settings["port"])
    except OSError as exc:
        raise ValueError(f"{config_path}: cannot serve the stand-in on 127.0.0.1:{settings['port']} ({exc}); "
                         "set standin.port and the base_urls to a free port") from exc
    with server:
        print(f"stand-in served at {server.url}; running: {' '.join(command)}", flush=True)
        result = subprocess.run(command, env=env)
    if result.returncode != 0:
        return result.returncode
    report = Path("results") / "report.html"
    result = subprocess.run([snakemake, "--snakefile", snakefile, "--configfile", str(config_path),
                             "--report", str(report)], env=env)
    if result.returncode == 0:
        print(f"demo finished in {time.monotonic() - started:.0f} s; report: {report.resolve()}", flush=True)
    return result.returncode
