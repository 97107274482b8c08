"""Faithful stand-ins for the public BBBC021 and BBBC014 downloads.

The real archives cannot be fetched here, so tests and the demo serve a
generated copy that has the Broad's layout: the real metadata schema and
names, one zip per plate holding ``<Plate>/<file>.tif``, 16-bit TIFFs per
channel, and synthetic cells whose morphology depends on the mechanism of
action. A known smooth multiplicative illumination field is applied per plate
and channel and saved next to the served tree (never inside it) so that
illumination correction can be checked against the truth.

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import tifffile

from moaflow.files import atomic_path
from moaflow.study import BBBC021_PLATES_BY_WEEK

#: Bumped whenever the generated data changes for the same settings (the demo regenerates).
GENERATOR_VERSION = 3

#: Columns of the Broad's ``BBBC021_v1_image.csv``, in their order.
BBBC021_IMAGE_COLUMNS = [
    "TableNumber", "ImageNumber",
    "Image_FileName_DAPI", "Image_PathName_DAPI",
    "Image_FileName_Tubulin", "Image_PathName_Tubulin",
    "Image_FileName_Actin", "Image_PathName_Actin",
    "Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "Replicate",
    "Image_Metadata_Compound", "Image_Metadata_Concentration",
]

#: Channel name -> wavelength suffix in the real file names (``_w1``, ``_w2``, ``_w4``).
BBBC021_CHANNEL_SUFFIX = {"DAPI": "1", "Tubulin": "2", "Actin": "4"}

#: Real wells: rows B-G, columns 02-11 (60 per plate).
BBBC021_ROWS = "BCDEFG"
BBBC021_COLUMNS = range(2, 12)

# Phenotype of each MoA as a shift from the DMSO cell, in units the renderer
# understands (see `_Phenotype`). Chosen so that every class differs from every
# other in at least two visible properties, which a small CNN can pick up.
_PHENOTYPE_KEYS = (
    "density", "cell_size", "nucleus_size", "elongation", "dapi",
    "micronuclei", "tubulin", "tubulin_fibres", "actin", "actin_ring",
)
_MOA_SHIFT = {
    "DMSO":                        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "Actin disruptors":            (0.0, -0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -0.8),
    "Aurora kinase inhibitors":    (-0.3, 0.6, 0.8, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0),
    "Cholesterol-lowering":        (0.0, 0.2, 0.0, 0.5, 0.0, 0.0, 0.4, 0.0, 0.0, 0.5),
    "DNA damage":                  (-0.2, 0.3, 0.4, 0.0, -0.3, 1.0, 0.0, 0.0, 0.0, 0.0),
    "DNA replication":             (-0.4, 0.0, 0.3, 0.0, 0.6, 0.0, 0.0, 0.0, -0.4, 0.0),
    "Eg5 inhibitors":              (0.0, -0.5, -0.4, 0.0, 1.0, 0.0, 0.8, -0.6, 0.0, 0.0),
    "Epithelial":                  (0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0),
    "Kinase inhibitors":           (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -0.4, 0.0, 0.0, 0.0),
    "Microtubule destabilizers":   (0.0, -0.4, 0.0, 0.0, 0.4, 0.3, 1.0, -1.0, 0.0, 0.0),
    "Microtubule stabilizers":     (0.0, 0.0, 0.0, 0.0, 0.0, 0.4, 0.3, 1.0, 0.0, 0.0),
    "Protein degradation":         (-0.5, 0.0, -0.3, 0.0, 0.0, 0.5, -0.5, 0.0, -0.5, 0.0),
    "Protein synthesis":           (-0.7, -0.3, -0.3, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0),
}


_EFFECT_SIZE = 2.0
#: per key: density, cell_size, nucleus_size, elongation, dapi, micronuclei, tubulin, tubulin_fibres, actin, actin_ring
_SHIFT_LOW = np.array([-0.85, -1.2, -1.5, -0.5, -1.2, 0.0, -1.2, -1.0, -1.2, -1.0])
_SHIFT_HIGH = np.array([1.5, 1.5, 1.5, 2.0, 2.0, 3.0, 2.0, 1.0, 2.0, 1.0])


@dataclass(frozen=True)
class _Phenotype:
    """Rendering parameters of one treatment (all relative to the field size)."""

    density: float
    cell_size: float
    nucleus_size: float
    elongation: float
    dapi: float
    micronuclei: float
    tubulin: float
    tubulin_fibres: float
    actin: float
    actin_ring: float


def moa_annotation() -> list[dict]:
    """Return the Broad's published MoA table shipped with moaflow.

    Returns
    -------
    rows : list of dict
        One dict per treatment with keys ``compound``, ``concentration``
        (float) and ``moa``; DMSO is included.
    """
    text = resources.files("moaflow").joinpath("data/BBBC021_v1_moa.csv").read_text()
    return [
        {"compound": r["compound"], "concentration": float(r["concentration"]), "moa": r["moa"]}
        for r in csv.DictReader(io.StringIO(text))
    ]


def phenotype(moa: str, strength: float, compound_jitter: np.ndarray) -> _Phenotype:
    """Phenotype of a treatment: DMSO baseline plus ``strength`` times the MoA shift.

    Parameters
    ----------
    moa : str
        MoA name as in ``BBBC021_v1_moa.csv``.
    strength : float
        0 gives the DMSO cell, 1 the full MoA phenotype.
    compound_jitter : ndarray, shape (10,)
        Small compound-specific offsets so compounds of one MoA are similar,
        not identical (leave-one-compound-out must generalise across them).
    """
    if moa not in _MOA_SHIFT:
        raise ValueError(f"unknown MoA {moa!r}; expected one of {sorted(_MOA_SHIFT)}")
    # Effects strong enough to survive the study's per-field min-max scaling; the
    # clamps keep every parameter physical (positive sizes, contrasts in [0, 1]).
    shift = np.asarray(_MOA_SHIFT[moa]) * strength * _EFFECT_SIZE + compound_jitter
    return _Phenotype(*np.clip(shift, _SHIFT_LOW, _SHIFT_HIGH).tolist())


def illumination_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative illumination field with values in about [0.45, 1].

    A radial vignette around an off-centre optical axis plus a linear tilt,
    like a widefield microscope's uneven lamp. Returned as float32.
    """
    height, width = shape
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    cy, cx = rng.uniform(-0.35, 0.35, size=2)
    tilt_y, tilt_x = rng.uniform(-0.12, 0.12, size=2)
    vignette = 1.0 - rng.uniform(0.25, 0.4) * ((x - cx) ** 2 + (y - cy) ** 2)
    field = vignette + tilt_y * y + tilt_x * x
    field = field - field.min()
    field = 0.45 + 0.55 * field / field.max()
    return field.astype(np.float32)


def render_cells(
    shape: tuple[int, int], pheno: _Phenotype, rng: np.random.Generator, magnification: float = 1.0
) -> np.ndarray:
    """Render one field of synthetic MCF-7-like cells.

    Parameters
    ----------
    shape : tuple of int
        (rows, columns) of the field.
    pheno : _Phenotype
        What the cells look like.
    rng : numpy.random.Generator
        Source of cell positions and shapes.
    magnification : float
        Cells this many times larger (and proportionally fewer, same coverage)
        than at the real 1024x1280 scale: small stand-ins keep visible morphology.

    Returns
    -------
    channels : ndarray, shape (3, rows, columns), float32
        Noise-free signal for (DAPI, Tubulin, Actin), roughly 0..1.
    """
    height, width = shape
    scale = np.sqrt(height * width / (1024 * 1280)) * magnification  # real fields are 1024x1280
    out = np.zeros((3, height, width), dtype=np.float32)
    n_cells = max(1, int(rng.poisson(45 * (1.0 + pheno.density) / magnification**2)))
    cell_radius = 34.0 * scale * (1.0 + 0.5 * pheno.cell_size)
    nucleus_ratio = 0.45 * (1.0 + 0.4 * pheno.nucleus_size)
    elongation = 1.0 + 0.9 * max(pheno.elongation, -0.5)
    fibres = 0.5 + 0.5 * pheno.tubulin_fibres
    ring = 0.5 + 0.5 * pheno.actin_ring
    for _ in range(n_cells):
        radius = max(2.0, cell_radius * rng.uniform(0.8, 1.2))
        a, b = radius * np.sqrt(elongation), radius / np.sqrt(elongation)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        theta = rng.uniform(0, np.pi)
        half = int(np.ceil(max(a, b) * 1.3)) + 2
        y0, y1 = max(0, int(cy) - half), min(height, int(cy) + half + 1)
        x0, x1 = max(0, int(cx) - half), min(width, int(cx) + half + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        d_cell = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        d_nuc = d_cell / nucleus_ratio
        soft = lambda d, k=8.0: 1.0 / (1.0 + np.exp(np.clip(k * (d - 1.0), -30, 30)))  # noqa: E731
        body, nucleus = soft(d_cell), soft(d_nuc, 10.0)
        angle = np.arctan2(v, u)
        # DAPI: nucleus, brightness and compaction per phenotype.
        out[0, y0:y1, x0:x1] += (0.55 * (1.0 + 0.6 * pheno.dapi)) * nucleus
        # Tubulin: cytoplasm with radial fibres whose contrast is the phenotype.
        fibre_pattern = 1.0 + fibres * np.cos(14.0 * angle + 3.0 * d_cell)
        out[1, y0:y1, x0:x1] += (0.3 * (1.0 + 0.7 * pheno.tubulin)) * body * (1 - 0.6 * nucleus) * fibre_pattern
        # Actin: cortical ring at the cell edge plus diffuse cytoplasm.
        cortex = np.exp(-(((d_cell - 0.95) / (0.08 + 0.1 * (1 - ring))) ** 2))
        out[2, y0:y1, x0:x1] += (0.35 * (1.0 + 0.6 * pheno.actin)) * (ring * cortex + 0.3 * body)
        # Micronuclei: small DAPI blobs around the nucleus (DNA damage, mitotic slips).
        for _ in range(rng.poisson(max(0.0, 3.0 * pheno.micronuclei))):
            r = nucleus_ratio * rng.uniform(1.1, 1.6)
            phi = rng.uniform(0, 2 * np.pi)
            mu, mv = r * np.cos(phi), r * np.sin(phi)
            blob = np.exp(-(((u / a - mu) ** 2 + (v / b - mv) ** 2) / (2 * 0.06**2)))
            out[0, y0:y1, x0:x1] += 0.6 * blob
    return out


def to_counts(signal: np.ndarray, illumination: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera model: illuminated background + signal, a camera offset, shot noise; uint16.

    The background (out-of-focus light, medium autofluorescence) is shaded by
    the illumination like the cells are, as in a real widefield image.
    """
    expected = 40.0 + illumination * (250.0 + 3200.0 * signal)
    noisy = expected + rng.normal(0.0, 1.0, size=expected.shape).astype(np.float32) * np.sqrt(expected)
    return np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)


def _field_uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16))).upper()


def _zip_dir(source_dir: Path, archive: Path, arcname_root: str) -> None:
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(source_dir.iterdir()):
            # A fixed timestamp keeps archives byte-identical for a given seed.
            info = zipfile.ZipInfo(f"{arcname_root}/{path.name}", date_time=(2019, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())


def select_treatments(
    moas: list[str] | None, compounds_per_moa: int, concentrations_per_compound: int
) -> list[dict]:
    """Pick real treatments from the MoA table.

    For each MoA (all 12 when ``moas`` is None), the first ``compounds_per_moa``
    compounds in alphabetical order, each at its ``concentrations_per_compound``
    highest concentrations. Taxol is skipped: the study keeps it only on Week1
    D0 wells, which a small stand-in does not reproduce.
    """
    table = [r for r in moa_annotation() if r["moa"] != "DMSO" and r["compound"] != "taxol"]
    known = sorted({r["moa"] for r in table})
    moas = known if moas is None else moas
    unknown = sorted(set(moas) - set(known))
    if unknown:
        raise ValueError(f"unknown MoA(s) {unknown}; expected names from BBBC021_v1_moa.csv: {known}")
    chosen = []
    for moa in moas:
        compounds = sorted({r["compound"] for r in table if r["moa"] == moa})[:compounds_per_moa]
        for compound in compounds:
            concs = sorted((r["concentration"] for r in table if r["compound"] == compound), reverse=True)
            chosen += [{"compound": compound, "concentration": c, "moa": moa}
                       for c in concs[:concentrations_per_compound]]
    return chosen


def _format_concentration(value: float) -> str:
    # The image CSV writes concentrations the short way (0.003, 1, 0).
    return f"{value:g}"


def write_bbbc021(
    out_dir: str | os.PathLike,
    *,
    n_plates: int = 3,
    sites: int = 4,
    dmso_wells: int = 6,
    moas: list[str] | None = None,
    compounds_per_moa: int = 2,
    concentrations_per_compound: int = 2,
    shape: tuple[int, int] = (1024, 1280),
    magnification: float = 1.0,
    seed: int = 0,
    log=print,
) -> dict:
    """Write a BBBC021-shaped stand-in.

    Layout::

        out_dir/www/BBBC021/BBBC021_v1_image.csv
        out_dir/www/BBBC021/BBBC021_v1_moa.csv
        out_dir/www/BBBC021/BBBC021_v1_images_<Plate>.zip   (holds <Plate>/<file>.tif)
        out_dir/truth/bbbc021/illumination_<Plate>_<Channel>.npy
        out_dir/truth/bbbc021/manifest.json

    Parameters
    ----------
    out_dir : path
        Folder to write into; ``www/`` is what a server exposes.
    n_plates : int
        Plates, one per week in order (Week1_22123, Week2_24121, ...): plates are also batches.
    sites : int
        Fields of view per well (4 in the real data).
    dmso_wells : int
        DMSO wells per plate (6 in the real data).
    moas, compounds_per_moa, concentrations_per_compound
        Which real treatments to place, see `select_treatments`. Every plate carries every selected
        treatment once; the plate's ordinal is the replicate id.
    shape : tuple of int
        Field size (rows, columns). The real 1024x1280 or smaller with the same 4:5 aspect.
    magnification : float
        See `render_cells`; 1 gives real-scale cells.
    seed : int
        Makes the output byte-identical across runs.

    Returns the manifest: plates, treatments and the number of fields written.
    """
    _check_field_shape(shape)
    treatments = select_treatments(moas, compounds_per_moa, concentrations_per_compound)
    weeks, wells = _weeks_and_wells(n_plates, len(treatments), dmso_wells)
    out_dir = Path(out_dir)
    www, truth = out_dir / "www" / "BBBC021", out_dir / "truth" / "bbbc021"
    www.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    phenotypes = treatment_phenotypes(treatments, seed)
    rows, plates = [], []
    for p in range(n_plates):
        week = weeks[p]
        plate = f"{week}_{BBBC021_PLATES_BY_WEEK[week][0]}"
        plates.append(plate)
        plate_rng = np.random.default_rng([seed, p])
        illumination = _plate_illumination(truth, plate, shape, plate_rng)
        # Shuffle the layout per plate, DMSO included, so position is not a label.
        layout = [dict(t) for t in treatments] + [DMSO] * dmso_wells
        order = plate_rng.permutation(len(wells))[: len(layout)]
        fields = [(wells[w], site, treatment) for treatment, w in zip(layout, sorted(order))
                  for site in range(1, sites + 1)]
        with _plate_zip(out_dir, www, plate) as staging:
            for well, site, treatment in fields:
                signal = render_cells(shape, phenotypes[(treatment["compound"], treatment["concentration"])],
                                      plate_rng, magnification)
                names = _write_field(staging, well, site, signal, illumination, plate_rng)
                rows.append(_image_row(len(rows) + 1, p + 1, week, plate, well, p + 1, treatment, names))
        log(f"stand-in BBBC021: plate {p + 1}/{n_plates} ({plate}) written")
    shutil.rmtree(out_dir / "staging", ignore_errors=True)
    manifest = {"plates": plates, "treatments": treatments, "fields": len(rows), "shape": list(shape),
                "magnification": magnification, "seed": seed}
    _write_metadata(www, truth, rows, manifest)
    return manifest


def _weeks_and_wells(n_plates: int, n_treatments: int, dmso_wells: int) -> tuple[list[str], list[str]]:
    """The weeks (one plate each) and a plate's wells, once the plates and wells asked for fit."""
    weeks = list(BBBC021_PLATES_BY_WEEK)
    if not 1 <= n_plates <= len(weeks):
        raise ValueError(f"n_plates={n_plates}: expected 1..{len(weeks)} (one plate per week)")
    wells = [f"{r}{c:02d}" for r in BBBC021_ROWS for c in BBBC021_COLUMNS]
    if n_treatments + dmso_wells > len(wells):
        raise ValueError(f"{n_treatments} treatments + {dmso_wells} DMSO wells do not fit the {len(wells)} wells of "
                         "a plate")
    return weeks, wells


def _check_field_shape(shape) -> None:
    height, width = shape
    if height <= 0 or width <= 0 or abs(width / height - 1.25) > 0.02:
        raise ValueError(f"shape={shape!r}: expected positive (rows, columns) with the real 4:5 aspect, e.g. (1024, 1280)")


#: A DMSO well of a stand-in plate.
DMSO = {"compound": "DMSO", "concentration": 0.0, "moa": "DMSO"}


def treatment_phenotypes(treatments: list[dict], seed: int) -> dict[tuple[str, float], _Phenotype]:
    """(compound, concentration) -> how its cells look, DMSO included: each compound its own small jitter of its
    MoA's phenotype (drawn in compound order from ``seed``), stronger at higher concentrations."""
    master = np.random.default_rng(seed)
    compounds = sorted({t["compound"] for t in treatments})
    jitter = {c: master.normal(0, 0.08, size=len(_PHENOTYPE_KEYS)) for c in compounds}
    phenotypes = {("DMSO", 0.0): phenotype("DMSO", 0.0, np.zeros(len(_PHENOTYPE_KEYS)))}
    for compound in compounds:
        concs = sorted(t["concentration"] for t in treatments if t["compound"] == compound)
        moa = next(t["moa"] for t in treatments if t["compound"] == compound)
        for rank, conc in enumerate(concs):
            strength = 1.0 if len(concs) == 1 else 0.6 + 0.4 * rank / (len(concs) - 1)
            phenotypes[(compound, conc)] = phenotype(moa, strength, jitter[compound])
    return phenotypes


@contextmanager
def _plate_zip(out_dir: Path, www: Path, plate: str):
    """A staging folder for a plate's TIFFs, zipped as the Broad's ``BBBC021_v1_images_<Plate>.zip`` after."""
    staging = out_dir / "staging" / plate
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    _zip_dir(staging, www / f"BBBC021_v1_images_{plate}.zip", plate)
    shutil.rmtree(staging)


def _plate_illumination(truth: Path, plate: str, shape, rng) -> dict[str, np.ndarray]:
    """A plate's illumination field per channel, saved as the truth (outside the served tree)."""
    illumination = {ch: illumination_field(shape, rng) for ch in BBBC021_CHANNEL_SUFFIX}
    for ch, field in illumination.items():
        np.save(truth / f"illumination_{plate}_{ch}.npy", field)
    return illumination


def _write_field(staging: Path, well: str, site: int, signal: np.ndarray, illumination: dict, rng,
                 names: dict[str, str] | None = None) -> dict[str, str]:
    """One field's three 16-bit TIFFs (the real names when given, else ``<well>_s<site>_w<n><UUID>.tif``)."""
    written = {}
    for c_index, (ch, suffix) in enumerate(BBBC021_CHANNEL_SUFFIX.items()):
        name = names[ch] if names else f"{well}_s{site}_w{suffix}{_field_uuid(rng)}.tif"
        tifffile.imwrite(staging / name, to_counts(signal[c_index], illumination[ch], rng))
        written[ch] = name
    return written


def _image_row(image_number: int, table_number: int, week: str, plate: str, well: str, replicate: int,
               treatment: dict, names: dict[str, str]) -> dict:
    """A row of the image CSV, in the Broad's columns."""
    return {"TableNumber": table_number, "ImageNumber": image_number,
            "Image_FileName_DAPI": names["DAPI"], "Image_PathName_DAPI": f"{week}/{plate}",
            "Image_FileName_Tubulin": names["Tubulin"], "Image_PathName_Tubulin": f"{week}/{plate}",
            "Image_FileName_Actin": names["Actin"], "Image_PathName_Actin": f"{week}/{plate}",
            "Image_Metadata_Plate_DAPI": plate, "Image_Metadata_Well_DAPI": well, "Replicate": replicate,
            "Image_Metadata_Compound": treatment["compound"],
            "Image_Metadata_Concentration": _format_concentration(treatment["concentration"])}


def _write_metadata(www: Path, truth: Path, rows: list[dict], manifest: dict) -> None:
    """The image CSV, the (real) MoA CSV and the truth's manifest."""
    with open(www / "BBBC021_v1_image.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=BBBC021_IMAGE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shutil.copyfile(resources.files("moaflow").joinpath("data/BBBC021_v1_moa.csv"), www / "BBBC021_v1_moa.csv")
    (truth / "manifest.json").write_text(json.dumps(manifest, indent=1))


# --------------------------------------------------------------------------- BBBC014

#: Rows of the BBBC014 plate per cell line (rows A-D MCF7, E-H A549).
BBBC014_CELL_LINES = {"MCF7": "ABCD", "A549": "EFGH"}


def bbbc014_file_name(channel: int, row: str, column: int) -> str:
    """Real BBBC014 file name, ``Channel {c}-{NN}-{Row}-{Col:02d}-00.Bmp``, NN row-major 01..96."""
    index = "ABCDEFGH".index(row) * 12 + column
    return f"Channel {channel}-{index:02d}-{row}-{column:02d}-00.Bmp"


def translocation_fraction(column: int) -> float:
    """Fraction of NF-kB in the nucleus: rises with TNF-alpha, highest in column 1."""
    return float(0.1 + 0.8 / (1.0 + np.exp((column - 6.5) * 1.1)))


def write_bbbc014(
    out_dir: str | os.PathLike,
    *,
    shape: tuple[int, int] = (1024, 1360),
    dapi_channel: int = 1,
    seed: int = 0,
    log=print,
) -> dict:
    """Write a BBBC014-shaped stand-in: one 96-well plate, 2 channels, 8-bit BMPs.

    Layout::

        out_dir/www/BBBC014/BBBC014_v1_images.zip   (holds BBBC014_v1_images/*.Bmp)
        out_dir/www/BBBC014/BBBC014_v1_platemap_all.txt
        out_dir/truth/bbbc014/manifest.json

    NF-kB (FITC) moves from the cytoplasm into the nucleus as the TNF-alpha
    concentration rises (column 1 highest, see `translocation_fraction`).

    Parameters
    ----------
    out_dir : path
        Folder to write into; ``www/`` is what a server exposes.
    shape : tuple of int
        Image size (rows, columns), the real 1024x1360 or smaller with its aspect.
    dapi_channel : int
        Which ``Channel N`` holds DAPI (sources disagree).
    seed : int
        Makes the output byte-identical across runs.
    """
    from PIL import Image

    height, width = shape
    if abs(width / height - 1360 / 1024) > 0.02:
        raise ValueError(f"shape={shape!r}: expected the real 1024x1360 aspect (rows, columns)")
    if dapi_channel not in (1, 2):
        raise ValueError(f"dapi_channel={dapi_channel!r}: expected 1 or 2")
    out_dir = Path(out_dir)
    www = out_dir / "www" / "BBBC014"
    truth = out_dir / "truth" / "bbbc014"
    staging = out_dir / "staging" / "BBBC014_v1_images"
    shutil.rmtree(staging, ignore_errors=True)
    for d in (www, truth, staging):
        d.mkdir(parents=True, exist_ok=True)
    scale = np.sqrt(height * width / (1024 * 1360))
    platemap = ["Well\tCellLine\tTNFalphaRank"]
    for line, rows in BBBC014_CELL_LINES.items():
        radius = (30.0 if line == "MCF7" else 40.0) * scale
        for row in rows:
            for column in range(1, 13):
                rng = np.random.default_rng([seed, ord(row), column])
                nuclear = translocation_fraction(column)
                dapi = np.zeros(shape, np.float32)
                fitc = np.zeros(shape, np.float32)
                for _ in range(rng.poisson(40)):
                    r = radius * rng.uniform(0.8, 1.2)
                    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
                    half = int(r * 1.4) + 2
                    y0, y1 = max(0, int(cy) - half), min(height, int(cy) + half + 1)
                    x0, x1 = max(0, int(cx) - half), min(width, int(cx) + half + 1)
                    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
                    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
                    nucleus = 1.0 / (1.0 + np.exp(np.clip(12 * (d - 0.45), -30, 30)))
                    cytoplasm = 1.0 / (1.0 + np.exp(np.clip(10 * (d - 1.0), -30, 30))) - nucleus
                    dapi[y0:y1, x0:x1] += 0.8 * nucleus
                    fitc[y0:y1, x0:x1] += 0.7 * (nuclear * nucleus / 0.2 + (1 - nuclear) * cytoplasm / 0.8) * 0.25
                for channel, signal in ((dapi_channel, dapi), (3 - dapi_channel, fitc)):
                    counts = 8 + 200 * signal + rng.normal(0, 3, size=shape)
                    image = np.clip(np.rint(counts), 0, 255).astype(np.uint8)
                    Image.fromarray(image).save(staging / bbbc014_file_name(channel, row, column), format="BMP")
                platemap.append(f"{row}{column:02d}\t{line}\t{column}")
        log(f"stand-in BBBC014: {line} rows written")
    _zip_dir(staging, www / "BBBC014_v1_images.zip", "BBBC014_v1_images")
    shutil.rmtree(out_dir / "staging", ignore_errors=True)
    (www / "BBBC014_v1_platemap_all.txt").write_text("\n".join(platemap) + "\n")
    manifest = {"wells": 96, "images": 192, "shape": list(shape), "dapi_channel": dapi_channel, "seed": seed}
    (truth / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def tree_digest(root: str | os.PathLike) -> str:
    """SHA-256 over every file's relative path and bytes under ``root`` (for determinism checks)."""
    digest = hashlib.sha256()
    root = Path(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- ImageNet weights

def write_weights(out_dir: str | os.PathLike, files: dict[str, str], *, seed: int = 0, log=print) -> dict[str, str]:
    """Write stand-in notop weights files with the shapes of the real ImageNet ones, in Keras' legacy
    HDF5 layout (what ``keras.applications`` loads), under ``out_dir/www/weights/<file>``.

    Parameters
    ----------
    files : dict
        architecture -> path under the base URL (the config's ``weights.files``).

    Returns
    -------
    md5 : dict
        path -> MD5 of the written file (what a config's ``weights.published_files`` would hold).
    """
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    from moaflow.learn.architectures import body

    digests = {}
    rng = np.random.default_rng(seed)
    for architecture, relative in files.items():
        model = body(architecture, 75)
        # Like real weights, variances (BatchNorm's moving ones, an input Normalization's) are positive: a negative
        # one gives NaN features.
        model.set_weights([(1 + np.abs(values) if w.path.endswith("variance") else values).astype(w.dtype)
                           for w in model.weights for values in [rng.normal(0, 0.05, w.shape)]])
        path = Path(out_dir) / "www" / "weights" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, model)
        digests[relative] = hashlib.md5(path.read_bytes()).hexdigest()
        log(f"stand-in weights: {architecture} ({model.count_params():,} values) -> {path}")
        keras.backend.clear_session()
    return digests


# --------------------------------------------------------------------------- multi-channel crops

def render_organelles(rng: np.random.Generator, size: int, fragmented: bool) -> np.ndarray:
    """One grey channel of a cell's organelle: many small dots (fragmented, as mitochondria under stress) or a few
    long filaments (tubular), on 0..1."""
    from skimage.draw import disk, line_aa

    image = np.zeros((size, size), np.float32)
    if fragmented:
        for _ in range(rng.integers(18, 30)):
            rr, cc = disk(tuple(rng.uniform(3, size - 3, 2)), rng.uniform(1.0, 2.0), shape=image.shape)
            image[rr, cc] = rng.uniform(0.6, 1.0)
    else:
        for _ in range(rng.integers(3, 6)):
            r0, c0, r1, c1 = rng.integers(2, size - 2, 4)
            rr, cc, value = line_aa(r0, c0, r1, c1)
            image[rr, cc] = np.maximum(image[rr, cc], value * rng.uniform(0.6, 1.0))
    return image


def write_multichannel_crops(out_dir: str | os.PathLike, channels: list[str], *, deciding: str, size: int = 64,
                             compounds_per_moa: int = 2, wells_per_compound: int = 3, crops_per_well: int = 6,
                             control_wells: int = 0, per_channel_files: bool = True, seed: int = 0) -> dict:
    """A pre-cropped set of ``len(channels)`` channels whose two MoAs differ in one channel only (``deciding``:
    fragmented dots against filaments), the others the same random cells for both, with its metadata table.

    ``control_wells`` wells of DMSO per plate (compound and MoA ``DMSO``, both kinds of cell in the deciding
    channel) are added for profiling's normalisation. Written as one grey PNG per channel per crop (``per_channel_files``: Cell Painting's way) or one multi-page
    TIFF per crop (one page per channel), under ``out_dir/images``, and ``out_dir/metadata.csv``.

    Returns
    -------
    settings : dict
        The config's ``crops.<name>`` section for it (``images``, ``metadata``, ``filename``, ``columns``,
        ``channels``).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    wells = [(moa, fragmented, f"{moa}-{c}", c, w) for moa, fragmented in (("fragmenting", True), ("tubular", False))
             for c in range(compounds_per_moa) for w in range(wells_per_compound)]
    wells += [("DMSO", None, "DMSO", 9, w) for w in range(2 * control_wells)]   # two plates: P0 and P1
    for moa, fragmented, compound, c, w in wells:
        for k in range(crops_per_well):
            stem = f"{moa[:4]}{c}_w{w}_{k}"
            planes = []
            for name in channels:
                if name == deciding:
                    kind = rng.random() < 0.5 if fragmented is None else fragmented
                    plane = render_organelles(rng, size, kind)
                else:   # the same kind of cell whatever the MoA: blobs and background noise
                    plane = render_organelles(rng, size, rng.random() < 0.5) * 0.5
                plane = np.clip(plane + rng.normal(0.05, 0.03, plane.shape), 0, 1)
                planes.append((plane * 255).astype(np.uint8))
            if per_channel_files:
                for name, plane in zip(channels, planes):
                    Image.fromarray(plane).save(out / "images" / f"{stem}_{name}.png")
            else:
                tifffile.imwrite(out / "images" / f"{stem}.tif", np.stack(planes))
            rows.append({"stem": stem, "compound": compound, "concentration": 0.0 if fragmented is None else 1.0,
                         "moa": moa, "plate": f"P{w % 2}", "well": f"{'BCDEFG'[w]}{c + 2:02d}",
                         "replicate": w + 1})
    with open(out / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    filename = ({name: f"{{stem}}_{name}.png" for name in channels} if per_channel_files else "{stem}.tif")
    return {"images": str(out / "images"), "metadata": str(out / "metadata.csv"), "filename": filename,
            "columns": {k: k for k in ("compound", "concentration", "moa", "plate", "well", "replicate")},
            "channels": list(channels)}
