"""The study at its real size, rehearsed on a stand-in: the Broad's own plate map, every count real.

`write_study_standin` renders synthetic cells (MoA-dependent, as the demo's) for
the fields of the Broad's real ``BBBC021_v1_image.csv`` on all 55 plates, with
the real file names, folders and zip names, and serves them beside the real
CSVs (byte-identical: their size and SHA-256 are the config's). Only the fields
the study reads are rendered (treatments with an MoA after the taxol rule, and
DMSO): the other fields of the CSV are absent from the zips, which the pipeline
never asks for. A field may be smaller than the real 1024x1280 (``shape``, same
4:5 aspect); counts never change.

`run_rehearsal` builds that stand-in (once), serves it and a stand-in of the
ImageNet weights on 127.0.0.1, and runs the real ``config/config.yaml`` with
``config/rehearsal.yaml`` over it (download locations, and on the CPU a
shrunk model compute) through a profile, then gathers every job's
benchmark into ``results/resources.csv``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from moaflow.devtools import standin

#: The Broad's metadata files the stand-in serves unchanged.
METADATA = ("BBBC021_v1_image.csv", "BBBC021_v1_moa.csv")


def study_fields(image_csv, moa_csv) -> pd.DataFrame:
    """The fields the study reads (its image table: MoA-annotated after the taxol rule, and DMSO), with the
    CSV's file names, plate folders and table numbers."""
    from moaflow.datasets.tables import bbbc021_image_table

    table = bbbc021_image_table(image_csv, moa_csv, ".", taxol_rule=True, log=lambda _: None)
    csv = pd.read_csv(image_csv, low_memory=False)
    names = csv.iloc[table["image_number"]][[f"Image_FileName_{c}" for c in standin.BBBC021_CHANNEL_SUFFIX]]
    return table.assign(**{c: names[f"Image_FileName_{c}"].to_numpy() for c in standin.BBBC021_CHANNEL_SUFFIX})


def _render_plate(job) -> str:
    """One plate's zip: its study fields' TIFFs under ``<Plate>/``, with the real names."""
    out_dir, plate, index, fields, phenotypes, shape, magnification, seed = job
    www, truth = Path(out_dir) / "www" / "BBBC021", Path(out_dir) / "truth" / "bbbc021"
    rng = np.random.default_rng([seed, index])
    illumination = standin._plate_illumination(truth, plate, shape, rng)
    with standin._plate_zip(Path(out_dir), www, plate) as staging:
        for row in fields.itertuples():
            signal = standin.render_cells(shape, phenotypes[(row.compound, row.concentration)], rng, magnification)
            standin._write_field(staging, row.well, row.site, signal, illumination, rng,
                                 names={c: getattr(row, c) for c in standin.BBBC021_CHANNEL_SUFFIX})
    return plate


def write_study_standin(out_dir: str | os.PathLike, reference: str | os.PathLike, *, shape: tuple[int, int],
                        magnification: float = 1.0, seed: int = 0, plates: list[str] | None = None,
                        processes: int = 2, log=print) -> dict:
    """Render the stand-in of the whole study (see the module docstring) into ``out_dir/www/BBBC021``.

    Parameters
    ----------
    out_dir : path
        Folder to write into; ``www/`` is what a server exposes.
    reference : path
        Folder holding the Broad's ``BBBC021_v1_image.csv`` and ``BBBC021_v1_moa.csv``.
    shape : tuple of int
        Field size (rows, columns): 1024x1280 as the real fields, or smaller with their aspect.
    magnification : float
        See `moaflow.devtools.standin.render_cells`.
    seed : int
        Makes the output byte-identical across runs.
    plates : list of str, optional
        Render only these plates (a measured fraction of the study); default all 55.
    processes : int
        Plates rendered in parallel.

    Returns the manifest: plates, fields rendered, fields in the CSV, shape.
    """
    standin._check_field_shape(shape)
    out_dir, reference = Path(out_dir), Path(reference)
    www = out_dir / "www" / "BBBC021"
    for folder in (www, out_dir / "truth" / "bbbc021"):
        folder.mkdir(parents=True, exist_ok=True)
    for name in METADATA:
        shutil.copyfile(reference / name, www / name)
    fields = study_fields(www / METADATA[0], www / METADATA[1])
    treatments = fields[~fields["is_dmso"]][["compound", "concentration", "moa"]].drop_duplicates()
    phenotypes = standin.treatment_phenotypes(treatments.to_dict("records"), seed)
    study_plates = sorted(fields["plate"].unique())
    unknown = sorted(set(plates or []) - set(study_plates))
    if unknown:
        raise ValueError(f"standin.bbbc021.plates: {unknown} are not plates of {reference / METADATA[0]}")
    plates = sorted(plates or study_plates)
    fields = fields[fields["plate"].isin(plates)]
    # A plate's random stream is its place among all plates: a fraction renders the same fields as the whole.
    jobs = [(out_dir, plate, study_plates.index(plate), fields[fields["plate"] == plate], phenotypes,
             tuple(shape), magnification, seed) for plate in plates]
    started = time.monotonic()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for n, plate in enumerate(pool.imap(_render_plate, jobs), 1):
            eta = (time.monotonic() - started) / n * (len(plates) - n)
            log(f"study stand-in: plate {n}/{len(plates)} ({plate}) written, ETA {eta:.0f} s")
    shutil.rmtree(out_dir / "staging", ignore_errors=True)
    manifest = {"plates": plates, "fields": int(len(fields)), "treatment_fields": int((~fields["is_dmso"]).sum()),
                "dmso_fields": int(fields["is_dmso"].sum()),
                "csv_fields": int(len(pd.read_csv(www / METADATA[0], usecols=["ImageNumber"]))),
                "shape": list(shape), "magnification": magnification, "seed": seed}
    (out_dir / "truth" / "bbbc021" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


class DiskSampler:
    """Samples the disk used under a folder every ``interval`` seconds, in a thread; keeps the peak."""

    def __init__(self, folder: Path, interval: float = 15.0):
        self.folder, self.interval = Path(folder), interval
        self.peak_bytes, self.peak_at, self.samples = 0, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def sample(self) -> int:
        from moaflow.analysis.resources import disk_usage

        used = int(disk_usage(self.folder)["bytes"].sum()) if self.folder.exists() else 0
        elapsed = time.monotonic() - self._started
        self.samples.append((round(elapsed, 1), used))
        if used > self.peak_bytes:
            self.peak_bytes, self.peak_at = used, elapsed
        return used

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def _layers(run_dir: Path, out: Path, configfile: Path, plates, data_path_only: bool) -> list[str]:
    """The config layers over config/config.yaml: the override, the stand-in's weights' MD5s, and for a fraction
    of plates (or the data path alone) a generated layer saying so."""
    from moaflow.config import defaults

    layers = [str(configfile.resolve()), str((out / "standin.yaml").resolve())]
    generated = {}
    if plates:
        generated["bbbc021"] = {"plates": list(plates)}
    if data_path_only:
        # the data path at the study's own input sizes (beside the override's shrunk ones, which training reads)
        shrunk = yaml.safe_load(configfile.read_text())["preprocess"]["bbbc021"]["input_sizes"]
        sizes = sorted(set(defaults()["preprocess"]["bbbc021"]["input_sizes"]) | set(shrunk))
        generated["preprocess"] = {"bbbc021": {"input_sizes": sizes}}
    if generated:
        (run_dir / "generated.yaml").write_text(yaml.safe_dump(generated))
        layers.append(str((run_dir / "generated.yaml").resolve()))
    return layers


def _data_path_targets(plates: list[str]) -> list[str]:
    from moaflow import layout

    return [layout.store_index("bbbc021"), layout.store_index("bbbc021", "dmso"),
            *[layout.illumination_figure(p) for p in plates]]


def run_rehearsal(configfile: str = "config/rehearsal.yaml", profile: str = "profiles/local",
                  shape: list[int] | None = None, plates: list[str] | None = None, data_path_only: bool = False,
                  snakefile: str = "Snakefile") -> int:
    """Build the study's stand-in, serve it on 127.0.0.1 and run the pipeline over it through a profile.

    Runs in its own folder, ``<standin.out_dir>/run-<shape>[-<n>-plates]`` (its ``results/`` is the run's),
    samples the disk used there every 15 s, and writes ``rehearsal.json`` there: counts, wall time, peak and
    final disk, and the disk by folder at the end (each run's record is also appended to ``rehearsals.jsonl``).

    Parameters
    ----------
    configfile : str
        The override over config/config.yaml (download locations, the CPU's shrunk model compute) with the
        ``standin`` section saying what to build.
    profile : str
        Snakemake profile (profiles/local, or profiles/slurm on a cluster).
    shape : list of int, optional
        Field size (rows, columns) instead of the override's ``standin.bbbc021.shape``.
    plates : list of str, optional
        Only these plates (a measured fraction), instead of all 55.
    data_path_only : bool
        Stop at the crop stores (download, extraction, illumination, crops), at the study's input sizes too:
        the disk figure of the data path.
    snakefile : str
        The workflow (run from the repository root).

    Returns snakemake's exit status.
    """
    from moaflow.devtools.demo import build_standin
    from moaflow.devtools.serve import StandinServer

    repo, configfile = Path.cwd(), Path(configfile)
    settings = yaml.safe_load(configfile.read_text())["standin"]
    bbbc021 = settings["bbbc021"]
    bbbc021["shape"] = list(shape or bbbc021["shape"])
    if plates:
        bbbc021["plates"] = sorted(plates)
    name = "x".join(map(str, bbbc021["shape"])) + (f"-{len(plates)}-plates" if plates else "")
    base = Path(settings["out_dir"])
    settings["out_dir"] = str(base / f"standin-{name}")
    out = build_standin(settings)
    run_dir = base / f"run-{name}{'-data-path' if data_path_only else ''}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config").exists():   # the Snakefile's configfile and the folds, as from the repository
        (run_dir / "config").symlink_to(repo / "config")
    manifest = json.loads((out / "truth" / "bbbc021" / "manifest.json").read_text())
    targets = _data_path_targets(manifest["plates"]) if data_path_only else []
    snakemake, layers = str(Path(sys.executable).parent / "snakemake"), _layers(run_dir, out, configfile, plates,
                                                                                data_path_only)
    command = [snakemake, *targets, "--snakefile", str(repo / snakefile), "--profile", str(repo / profile),
               "--configfile", *layers]
    started = time.monotonic()
    with StandinServer(out / "www", settings["port"]) as server, DiskSampler(run_dir / "results") as disk:
        print(f"stand-in {out} served at {server.url}; in {run_dir}: {shlex.join(command)}", flush=True)
        status = subprocess.run(command, cwd=run_dir).returncode
    if status == 0 and not data_path_only:
        status = subprocess.run([snakemake, "--snakefile", str(repo / snakefile), "--report", "results/report.html",
                                 "--configfile", *layers], cwd=run_dir).returncode
    summary = {"status": status, "shape": bbbc021["shape"], "plates": len(manifest["plates"]),
               "fields": manifest["fields"], "wall_seconds": round(time.monotonic() - started),
               "peak_disk_gb": round(disk.peak_bytes / 1e9, 3), "peak_at_seconds": round(disk.peak_at),
               "final_disk_gb": round(disk.samples[-1][1] / 1e9, 3), "data_path_only": data_path_only,
               "disk_samples": disk.samples}
    if data_path_only and status == 0:   # the whole run's table is the resources rule's; here, the data path's
        from moaflow.analysis.resources import resource_table

        results = run_dir / "results"
        resource_table(results / "benchmarks", results / "resources.csv", results / "disk_usage.csv")
    (run_dir / "rehearsal.json").write_text(json.dumps(summary, indent=1))
    # Every run's record is kept: a rerun (a no-op, or one that resumes) does not hide the first run's figures.
    with open(run_dir / "rehearsals.jsonl", "a") as history:
        history.write(json.dumps({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary}) + "\n")
    print(f"rehearsal {'finished' if status == 0 else f'FAILED ({status})'} in {summary['wall_seconds']} s; "
          f"peak disk {summary['peak_disk_gb']} GB, at the end {summary['final_disk_gb']} GB ({run_dir})", flush=True)
    return status
