"""A Cell Painting stand-in: five channels of whole fields, served like the BBBC stand-ins.

The layout follows the JUMP Cell Painting datasets of the Cell Painting Gallery: one 16-bit TIFF per channel
per site, named as the Opera Phenix writes them (``r02c03f01p01-ch1sk1fk1fl1.tiff``), listed in a load-data
table with ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` and ``FileName_Orig<Channel>`` columns (here
with the compound, concentration, MoA and batch annotations joined in), and one zip per plate holding
``<plate>/``. Plates are batches: each plate has its own brightness per channel (what percentile normalisation to
the plate's DMSO wells removes) and illumination. As in BBBC021, a compound's wells are on one plate (batch) and
the compounds of a MoA on different ones, so that NSCB (nearest neighbour from another batch) can be scored, and
a plate's brightness is a batch effect NSC can mistake for the MoA.

Morphology depends on the MoA in more than the nucleus: each MoA changes one organelle, the DMSO cell's
organelles being

- ``Mito``: a tubular network (a mitochondrial uncoupler fragments it into dots),
- ``ER``: a compact perinuclear ring (an ER stress inducer spreads it through the cell, brighter),
- ``AGP``: actin at the cell cortex (an actin stabiliser adds stress fibres across the cell),

while ``DNA`` (nucleus) and ``RNA`` (nucleoli and cytoplasm) are alike for all. A treatment affects a fraction
of its cells, its strength (the compound's potency times the concentration's). Deterministic given ``seed``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import tifffile

from moaflow.devtools.standin import _zip_dir, illumination_field, to_counts

#: The five Cell Painting channels in the order of their ``ch<n>`` file names.
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")

#: MoA -> (the organelle it changes, example compounds); DMSO is the negative control.
MOAS = {
    "Mitochondrial uncoupler": ("Mito", ("FCCP", "CCCP", "niclosamide")),
    "ER stress inducer": ("ER", ("tunicamycin", "thapsigargin", "brefeldin A")),
    "Actin stabiliser": ("AGP", ("jasplakinolide", "cucurbitacin I", "chondramide")),
}

#: Bumped whenever the generated data changes for the same settings.
GENERATOR_VERSION = 1


def _soft(distance: np.ndarray, sharpness: float = 8.0) -> np.ndarray:
    """1 inside the unit contour, 0 outside, a soft edge."""
    return 1.0 / (1.0 + np.exp(np.clip(sharpness * (distance - 1.0), -30, 30)))


def render_cell(size: int, changed: str | None, rng: np.random.Generator) -> np.ndarray:
    """One cell's five channels (``CHANNELS`` order) on a ``size`` x ``size`` patch, values about 0..1.

    Parameters
    ----------
    size : int
        The patch's side; the cell fills about 80 % of it.
    changed : str or None
        The organelle its treatment changed (``Mito``, ``ER`` or ``AGP``), or None for a DMSO-like cell.
    rng : numpy.random.Generator
        Shapes and positions.
    """
    from skimage.draw import disk, line_aa

    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    elongation, theta = rng.uniform(1.0, 1.5), rng.uniform(0, np.pi)
    u = (xx - c) * np.cos(theta) + (yy - c) * np.sin(theta)
    v = -(xx - c) * np.sin(theta) + (yy - c) * np.cos(theta)
    radius = 0.4 * size * rng.uniform(0.85, 1.05)
    d_cell = np.sqrt((u / (radius * np.sqrt(elongation))) ** 2 + (v / (radius / np.sqrt(elongation))) ** 2)
    d_nucleus = np.hypot(u, v) / (0.38 * radius)
    cell, nucleus = _soft(d_cell), _soft(d_nucleus, 10.0)
    out = np.zeros((len(CHANNELS), size, size), np.float32)
    out[0] = 0.8 * nucleus
    # ER: a ring hugging the nucleus, or spread through the cytoplasm (and brighter) under ER stress
    if changed == "ER":
        out[1] = 0.55 * cell * (1 - 0.7 * nucleus) * (0.7 + 0.3 * rng.random((size, size)))
    else:
        out[1] = 0.5 * np.exp(-(((d_nucleus - 1.35) / 0.25) ** 2)) * cell
    # RNA: nucleoli and a faint cytoplasm, alike for every treatment
    out[2] = 0.15 * cell
    for _ in range(rng.integers(2, 4)):
        centre = c + rng.normal(0, 0.12 * radius, 2)
        rr, cc = disk(tuple(centre), 0.08 * radius, shape=(size, size))
        out[2, rr, cc] += 0.6
    # AGP: cortical actin, plus parallel stress fibres across the cell under an actin stabiliser
    out[3] = 0.45 * np.exp(-(((d_cell - 0.95) / 0.08) ** 2))
    if changed == "AGP":
        angle = rng.uniform(0, np.pi)
        fibres = np.zeros((size, size), np.float32)
        for offset in np.linspace(-0.7, 0.7, 6) * radius:
            dy, dx = np.sin(angle + np.pi / 2) * offset, np.cos(angle + np.pi / 2) * offset
            r0, c0 = c + dy - np.sin(angle) * radius, c + dx - np.cos(angle) * radius
            r1, c1 = c + dy + np.sin(angle) * radius, c + dx + np.cos(angle) * radius
            rr, cc, value = line_aa(*(int(np.clip(round(x), 0, size - 1)) for x in (r0, c0, r1, c1)))
            fibres[rr, cc] = np.maximum(fibres[rr, cc], value)
        out[3] += 0.6 * fibres * cell
    # Mito: tubular filaments in the cytoplasm, or many small dots when fragmented
    mito = np.zeros((size, size), np.float32)
    if changed == "Mito":
        for _ in range(rng.integers(25, 40)):
            centre = c + rng.normal(0, 0.45 * radius, 2)
            rr, cc = disk(tuple(centre), rng.uniform(1.0, 1.8), shape=(size, size))
            mito[rr, cc] = rng.uniform(0.6, 1.0)
    else:
        for _ in range(rng.integers(6, 10)):
            r0, c0 = c + rng.normal(0, 0.4 * radius, 2)
            length, angle = rng.uniform(0.4, 0.8) * radius, rng.uniform(0, 2 * np.pi)
            ends = (r0, c0, r0 + length * np.sin(angle), c0 + length * np.cos(angle))
            rr, cc, value = line_aa(*(int(np.clip(round(x), 0, size - 1)) for x in ends))
            mito[rr, cc] = np.maximum(mito[rr, cc], value * rng.uniform(0.6, 1.0))
    out[4] = mito * cell * (1 - 0.8 * nucleus)
    return out


def render_field(shape: tuple[int, int], changed: str | None, fraction: float, rng: np.random.Generator, *,
                 cells: int = 10, cell_size: int = 48) -> np.ndarray:
    """A field of ``cells`` cells (about; Poisson) at random places, each changed with probability
    ``fraction``: five channels (``CHANNELS`` order), values about 0..1."""
    out = np.zeros((len(CHANNELS), *shape), np.float32)
    for _ in range(max(1, rng.poisson(cells))):
        patch = render_cell(cell_size, changed if rng.random() < fraction else None, rng)
        y, x = (int(rng.integers(0, s - cell_size + 1)) for s in shape)
        out[:, y:y + cell_size, x:x + cell_size] = np.maximum(out[:, y:y + cell_size, x:x + cell_size], patch)
    return out


def _well_name(index: int) -> tuple[str, int, int]:
    """Well ``index`` of the plate's inner wells (rows B-O, columns 02-23) as (name, row, column)."""
    row, column = 2 + index // 22, 2 + index % 22
    return f"{chr(ord('A') + row - 1)}{column:02d}", row, column


def treatments(moas: int, compounds_per_moa: int, concentrations: list[float], seed: int) -> list[dict]:
    """The stand-in's treatments: compound, concentration, MoA, the organelle it changes and its strength."""
    rng = np.random.default_rng(seed)
    rows = []
    for moa, (organelle, compounds) in list(MOAS.items())[:moas]:
        if compounds_per_moa > len(compounds):
            raise ValueError(f"compounds_per_moa={compounds_per_moa}: the stand-in names at most {len(compounds)} a MoA")
        for compound in compounds[:compounds_per_moa]:
            potency = rng.uniform(0.85, 1.0)
            for k, concentration in enumerate(sorted(concentrations)):
                strength = potency * (0.65 + 0.35 * k / max(1, len(concentrations) - 1))
                rows.append({"compound": compound, "concentration": concentration, "moa": moa,
                             "organelle": organelle, "strength": strength})
    return rows


def plate_of(moa: int, compound: int, plates: int) -> int:
    """The plate (batch) that holds a compound's wells: the compounds of one MoA on consecutive plates."""
    return (moa + compound) % plates


def write_cellpainting(out_dir: str | Path, *, plates: int = 3, moas: int = 3, compounds_per_moa: int = 2,
                       concentrations: tuple[float, ...] = (1.0, 10.0), replicates: int = 2, dmso_wells: int = 2,
                       sites: int = 2,
                       shape: tuple[int, int] = (256, 256), cells: int = 10, cell_size: int = 48,
                       seed: int = 0, log=print) -> dict:
    """Write the stand-in under ``out_dir/www/CellPainting/``: ``load_data.csv`` and one ``<plate>.zip`` a plate.

    Parameters
    ----------
    out_dir : path
        Where to write (``www/`` is what to serve).
    plates : int
        Plates, each its own batch, each holding ``dmso_wells`` wells of DMSO and the compounds `plate_of` puts
        there.
    moas, compounds_per_moa : int
        MoAs (of `MOAS`) and compounds of each.
    concentrations : tuple of float
        Each compound's concentrations (µM); the highest is the strongest.
    replicates : int
        Wells a treatment (compound and concentration), on its compound's plate.
    sites : int
        Fields a well.
    shape : tuple of int
        A field's (rows, columns).
    cells, cell_size : int
        Cells a field (on average) and a cell's patch side, in pixels.
    seed : int
        Everything follows from it.

    Returns
    -------
    settings : dict
        ``metadata`` and ``archives`` (the file names served) and ``published_files`` (their size and SHA-256),
        for the config's ``crops.<name>.download``.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    www = out / "www" / "CellPainting"
    shutil.rmtree(www, ignore_errors=True)
    www.mkdir(parents=True)
    chosen = treatments(moas, compounds_per_moa, list(concentrations), seed)
    moa_names = list(dict.fromkeys(t["moa"] for t in chosen))
    compounds = {m: list(dict.fromkeys(t["compound"] for t in chosen if t["moa"] == m)) for m in moa_names}
    dmso = {"compound": "DMSO", "concentration": 0.0, "moa": "DMSO", "organelle": None, "strength": 0.0}
    rows, archives = [], []
    for p in range(plates):
        wells = [t for t in chosen for _ in range(replicates)
                 if plate_of(moa_names.index(t["moa"]), compounds[t["moa"]].index(t["compound"]), plates) == p]
        wells += [dmso] * dmso_wells
        plate = f"CPSTANDIN{p + 1:03d}"
        rows += _write_plate(out / "staging" / plate, www / f"{plate}.zip", plate, f"Batch{p + 1}", wells, rng,
                             sites=sites, shape=shape, cells=cells, cell_size=cell_size)
        archives.append(f"{plate}.zip")
        log(f"cell painting stand-in: plate {p + 1}/{plates} ({len(wells) * sites} fields) -> {www / archives[-1]}")
    with contextlib.suppress(OSError):
        (out / "staging").rmdir()   # when empty: another stand-in may share the folder
    with open(www / "load_data.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    published = {name: {"bytes": (www / name).stat().st_size,
                        "sha256": hashlib.sha256((www / name).read_bytes()).hexdigest()}
                 for name in ["load_data.csv", *archives]}
    return {"metadata": "load_data.csv", "archives": archives, "published_files": published}


def _write_plate(staging: Path, archive: Path, plate: str, batch: str, wells: list[dict], rng, *, sites: int,
                 shape: tuple[int, int], cells: int, cell_size: int) -> list[dict]:
    """One plate's fields as 16-bit TIFFs, zipped as ``archive`` (holding ``<plate>/``); its load-data rows."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # each plate its own brightness per channel (a batch effect) and illumination
    gain = rng.uniform(0.6, 1.4, len(CHANNELS))
    illumination = [illumination_field(shape, rng) for _ in CHANNELS]
    rows = []
    for w, treatment in enumerate(wells):
        well, r, c = _well_name(w)
        for site in range(1, sites + 1):
            signal = render_field(shape, treatment["organelle"], treatment["strength"], rng, cells=cells,
                                  cell_size=cell_size)
            names = {}
            for k, channel in enumerate(CHANNELS):
                names[channel] = f"r{r:02d}c{c:02d}f{site:02d}p01-ch{k + 1}sk1fk1fl1.tiff"
                tifffile.imwrite(staging / names[channel], to_counts(signal[k] * gain[k], illumination[k], rng))
            rows.append({"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                         **{f"FileName_Orig{ch}": names[ch] for ch in CHANNELS},
                         "Metadata_Batch": batch, "Metadata_Compound": treatment["compound"],
                         "Metadata_Concentration": treatment["concentration"], "Metadata_MoA": treatment["moa"],
                         "Metadata_Replicate": wells[:w + 1].count(treatment)})
    _zip_dir(staging, archive, plate)
    shutil.rmtree(staging)
    return rows


def crops_settings(download: dict, base_url: str) -> dict:
    """The config's ``crops.<name>`` section for the stand-in served at ``base_url`` (its ``download`` from
    `write_cellpainting`)."""
    return {"download": {"base_urls": [base_url], **download},
            "filename": {ch: f"{{Metadata_Plate}}/{{FileName_Orig{ch}}}" for ch in CHANNELS},
            "columns": {"compound": "Metadata_Compound", "concentration": "Metadata_Concentration",
                        "moa": "Metadata_MoA", "plate": "Metadata_Plate", "well": "Metadata_Well",
                        "replicate": "Metadata_Replicate", "site": "Metadata_Site", "batch": "Metadata_Batch"},
            "channels": list(CHANNELS), "control_compound": "DMSO", "normalisation": "percentile",
            "crop_grid": [2, 2]}
