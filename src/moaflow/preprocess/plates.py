"""Per-plate preprocessing: fields -> normalised 8-bit crops at every input size, plus their index.

The steps are in `moaflow.preprocess.intensity` (the study's normalisation) and
`moaflow.preprocess.crops` (grid crops, the empty-crop rule, OpenCV's area resizing);
this module runs them over a plate (BBBC021) or the BBBC014 wells and writes
the per-plate arrays that `moaflow.preprocess.store` gathers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from moaflow.preprocess import crops, intensity
from moaflow.datasets import images
from moaflow.errors import MetadataError, VerificationError
from moaflow.files import write_array, write_table
from moaflow.logs import stderr
from moaflow.study import BBBC021_CHANNELS

#: Index columns of a BBBC021 crop (with ``crop``, its grid position, and ``source``, its DAPI file).
INDEX_COLUMNS = ["plate", "batch", "well", "site", "replicate", "compound", "concentration", "moa",
                 "treatment", "image_number"]


def read_field(row, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read one field's channels into a (channels, rows, columns) array, in `BBBC021_CHANNELS` order.

    ``row`` is a mapping with ``path_<channel>`` entries (an image-table row).
    A damaged TIFF, or one of the wrong type or size, raises
    `moaflow.errors.VerificationError` naming the file.
    """
    return np.stack([images.read_tiff(row[f"path_{c.lower()}"], shape=shape) for c in BBBC021_CHANNELS])


def preprocess_plate(
    fields: pd.DataFrame,
    *,
    sizes: list[int],
    grid: tuple[int, int],
    normalisation: str,
    percentiles: tuple[float, float],
    empty_threshold: float,
    empty_fraction: float,
    illumination: np.ndarray | None = None,
    controls: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """Normalise, crop and resize the annotated fields of one plate (or, with ``controls``, its DMSO fields).

    Parameters
    ----------
    fields : pandas.DataFrame
        The plate's rows of the image table, DMSO fields included (they
        provide the normalisation statistics and are not cropped).
    sizes : list of int
        Square input sizes to produce (224, 299, 256 ...).
    grid : tuple of int
        Crops per field as (rows, columns).
    normalisation : str
        A name of `moaflow.preprocess.intensity.NORMALISATIONS` (``"study"``, ``"percentile"``).
    percentiles : tuple of float
        For ``"percentile"``: DMSO percentiles mapped to 0 and 255.
    illumination : ndarray (3, M, N), optional
        Illumination functions in `BBBC021_CHANNELS` order; fields are divided by them.
    empty_threshold, empty_fraction : float
        A crop is dropped when at most ``empty_fraction`` of its values exceed
        ``empty_threshold`` on the float 0..255 image, before truncation.
    controls : bool
        Crop the DMSO fields instead of the annotated ones, normalised the
        same way (profiling normalises treatment profiles to them; they are
        never a class).

    Returns
    -------
    arrays : dict of int to ndarray (K, size, size, 3) uint8
    index : pandas.DataFrame
        K rows, one per kept crop, in array order: `INDEX_COLUMNS`, ``crop`` and ``source``.
    """
    log = log or (lambda _: None)
    plate = fields["plate"].iloc[0]
    # Every field of the plate must have one size: checked from the headers first, naming any odd file.
    shape = images.common_shape([p for c in BBBC021_CHANNELS for p in fields[f"path_{c.lower()}"]])
    crops.crop_boxes(shape, grid)   # a grid too fine for the field is an error before any work
    dmso = fields[fields["is_dmso"]]
    if dmso.empty:
        raise MetadataError(f"plate {plate}: no DMSO fields, which normalise its images")
    annotated = dmso if controls else fields[~fields["is_dmso"]]
    if normalisation not in intensity.NORMALISATIONS:
        raise ValueError(f"normalisation={normalisation!r}: expected one of {sorted(intensity.NORMALISATIONS)}")
    method = intensity.NORMALISATIONS[normalisation]
    dmso_fields = [read_field(r, shape) for _, r in dmso.iterrows()]
    options = {"percentiles": percentiles}
    stats = method.statistics(dmso_fields, illumination, **{k: options[k] for k in method.options})
    log(f"{plate}: DMSO statistics from {len(dmso)} fields")
    # The DMSO fields are in memory already: cropping them (controls) reads no TIFF twice.
    fields_read = iter(dmso_fields) if controls else (read_field(r, shape) for _, r in annotated.iterrows())
    del dmso_fields
    progress = _Progress(plate, "DMSO fields" if controls else "fields", len(annotated), log)
    kept, records, dropped = {size: [] for size in sizes}, [], 0
    for (_, row), field in zip(annotated.iterrows(), fields_read):
        image, above = method.normalise(field, *stats, illumination, threshold=empty_threshold)
        positions, resized = crops.field_crops(image, above, grid, sizes, empty_fraction)
        dropped += grid[0] * grid[1] - len(positions)
        for size in sizes:
            kept[size].append(resized[size])
        records.extend({**{c: row[c] for c in INDEX_COLUMNS}, "crop": k, "source": row["path_dapi"]}
                       for k in positions)
        progress.step(len(records))
    if dropped:
        log(f"{plate}: {dropped} nearly empty crop(s) dropped (at most {empty_fraction:g} of values above "
            f"{empty_threshold:.4g}, the study's rule)")
    arrays = {size: (np.concatenate(kept[size]) if kept[size] else np.zeros((0, size, size, 3), np.uint8))
              for size in sizes}
    return arrays, pd.DataFrame.from_records(records, columns=INDEX_COLUMNS + ["crop", "source"])


class _Progress:
    """A plate's progress line about every tenth of its fields: done, crops kept, ETA."""

    def __init__(self, plate: str, what: str, total: int, log):
        self.plate, self.what, self.total, self.log = plate, what, total, log
        self.done, self.every, self.started = 0, max(1, total // 10), time.monotonic()

    def step(self, crops_kept: int) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            eta = (time.monotonic() - self.started) / self.done * (self.total - self.done)
            self.log(f"{self.plate}: {self.done}/{self.total} {self.what}, {crops_kept} crops kept, ETA {eta:.0f} s")


def preprocess_plate_files(table: str | os.PathLike, plate: str, output_prefix: str | os.PathLike, *,
                           sizes: list[int], grid: tuple[int, int], normalisation: str,
                           percentiles: tuple[float, float], empty_threshold: float, empty_fraction: float,
                           illumination: list[str] | None = None, controls: bool = False, log=stderr) -> None:
    """Normalise, crop and resize one BBBC021 plate (`preprocess_plate`) into ``<prefix>.<size>.npy`` and
    ``<prefix>.index.parquet``.

    Parameters
    ----------
    table : path
        The BBBC021 field table.
    plate : str
        The plate.
    output_prefix : path
        Where its arrays and index go.
    sizes : list of int
        Square input sizes (``preprocess.bbbc021.input_sizes``).
    grid : tuple of int
        Crops per field, rows x columns (``crop_grid``).
    normalisation : str
        The image normalisation (`moaflow.preprocess.intensity.NORMALISATIONS`).
    percentiles : tuple of float
        The DMSO percentiles mapped to 0 and 255 (``percentile`` normalisation).
    empty_threshold, empty_fraction : float
        A crop is dropped when at most ``empty_fraction`` of its values exceed ``empty_threshold``.
    illumination : list of path, optional
        The plate's illumination functions (``.npy``, one per channel in `moaflow.study.BBBC021_CHANNELS`
        order) to divide the fields by; empty or None: no correction.
    controls : bool
        Crop the plate's DMSO fields instead of its treatments.
    """
    frame = pd.read_parquet(table)
    fields = frame[frame["plate"] == plate]
    if fields.empty:
        raise MetadataError(f"{table}: no fields for plate {plate!r}")
    functions = np.stack([np.load(path) for path in illumination]) if illumination else None
    arrays, index = preprocess_plate(fields, sizes=sizes, grid=tuple(grid), normalisation=normalisation,
                                     percentiles=tuple(percentiles), empty_threshold=empty_threshold,
                                     empty_fraction=empty_fraction, illumination=functions, controls=controls,
                                     log=log)
    for size, array in arrays.items():
        write_array(array, f"{output_prefix}.{size}.npy")
    write_table(index, f"{output_prefix}.index.parquet")


def preprocess_bbbc014(
    wells: pd.DataFrame,
    *,
    sizes: list[int],
    grid: tuple[int, int],
    minmax: str,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """BBBC014 as the original code: RGB (zeros, DAPI, FITC), area-resized to a square, grid crops,
    then Anscombe on channels 2-3 and one min-max over them to uint8.

    The square's side is the image's row count (1024 for the real 1024x1360),
    so smaller stand-ins keep the geometry. ``minmax="crop"`` (the original)
    scales each crop on its own, ``"well"`` the whole well at once. Only
    labelled wells (label >= 0) are used.
    """
    if minmax not in ("crop", "well"):
        raise ValueError(f"minmax={minmax!r}: expected 'crop' (the original) or 'well'")
    log = log or (lambda _: None)
    labelled = wells[wells["label"] >= 0]
    kept = {size: [] for size in sizes}
    records = []

    def to_uint8(counts: np.ndarray) -> np.ndarray:
        # The original's arithmetic, in its float32 and its order of operations, so the bytes agree.
        x = 2.0 * np.sqrt(counts.astype(np.float32) + 3.0 / 8.0)
        lo, hi = x.min(), x.max()
        return (((x - lo) * 255) / (hi - lo) if hi > lo else np.zeros_like(x)).astype(np.uint8)

    for n, (_, row) in enumerate(labelled.iterrows(), 1):
        dapi, fitc = (images.read_gray8(row[c]) for c in ("path_dapi", "path_fitc"))
        if dapi.shape != fitc.shape:
            raise VerificationError(f"{row['path_fitc']}: size {fitc.shape} differs from its DAPI image's {dapi.shape}")
        side = dapi.shape[0]
        rgb = np.zeros((side, dapi.shape[1], 3), np.uint8)   # (zeros, DAPI, FITC), channels last
        rgb[..., 1], rgb[..., 2] = dapi, fitc
        square = crops.resize_area(rgb, side)
        boxes = crops.crop_boxes(square.shape[:2], grid)
        if minmax == "well":
            square[..., 1:] = to_uint8(square[..., 1:])
        for k, (rs, cs) in enumerate(boxes):
            crop = square[rs, cs].copy()
            if minmax == "crop":
                crop[..., 1:] = to_uint8(crop[..., 1:])
            for size in sizes:
                kept[size].append(crops.resize_area(crop, size).reshape(1, size, size, 3))
            records.append({"well": row["well"], "row": row["row"], "column": row["column"],
                            "cell_line": row["cell_line"], "label": row["label"], "crop": k,
                            "source": row["path_fitc"]})
        if n % 16 == 0 or n == len(labelled):
            log(f"BBBC014: {n}/{len(labelled)} wells")
    arrays = {size: np.concatenate(kept[size]) for size in sizes}
    return arrays, pd.DataFrame.from_records(records)


def preprocess_bbbc014_files(table: str | os.PathLike, output_dir: str | os.PathLike, *, sizes: list[int],
                              grid: tuple[int, int], minmax: str, log=stderr) -> None:
    """BBBC014's labelled wells as crops (`preprocess_bbbc014`): ``<output_dir>/<size>.npy`` and ``index.parquet``.

    Parameters
    ----------
    table : path
        The BBBC014 well table.
    output_dir : path
        The crop store's folder.
    sizes : list of int
        Square input sizes.
    grid : tuple of int
        Crops per well, rows x columns.
    minmax : {"crop", "well"}
        Min-max scale each crop (the original) or the whole well.
    """
    arrays, index = preprocess_bbbc014(pd.read_parquet(table), sizes=sizes, grid=tuple(grid), minmax=minmax, log=log)
    out = Path(output_dir)
    for size, array in arrays.items():
        write_array(array, out / f"{size}.npy")
    index.insert(0, "crop_id", range(len(index)))
    write_table(index, out / "index.parquet")


def _read_image(path: Path) -> np.ndarray:
    """A PNG (RGB, or grey) or TIFF file's pixels; a damaged file raises `VerificationError` naming it."""
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            return tifffile.imread(path)
        except Exception as exc:  # tifffile raises several types for damaged files
            raise VerificationError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    from PIL import Image

    try:
        with Image.open(path) as opened:
            if opened.mode not in ("RGB", "RGBA", "L"):
                raise VerificationError(f"{path}: image mode {opened.mode}, expected 8-bit RGB or grey")
            return np.asarray(opened.convert("RGB") if opened.mode == "RGBA" else opened)
    except VerificationError:
        raise
    except Exception as exc:  # PIL raises several types for damaged files
        raise VerificationError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


#: Pixel types a crop file may have: 8-bit, or 16-bit when the set is normalised (``crops.<name>.normalisation``).
EIGHT_BIT, ANY_DEPTH = (np.uint8,), (np.uint8, np.uint16)


def read_crop(path: str | os.PathLike, channels: int = 3, depths: tuple = EIGHT_BIT) -> np.ndarray:
    """One pre-cropped image as (rows, columns, channels) of one of ``depths``: an RGB PNG (3 channels), or a
    TIFF holding its channels last or as pages (a multi-page TIFF, one page per channel)."""
    path = Path(path)
    image = _read_image(path)
    if image.ndim == 3 and image.shape[0] == channels and image.shape[-1] != channels:
        image = np.moveaxis(image, 0, -1)   # pages: one per channel
    if image.ndim == 2 and channels == 1:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != channels or image.dtype not in depths:
        raise VerificationError(f"{path}: shape {image.shape} and type {image.dtype}, expected (rows, columns, "
                                f"{channels}) {'/'.join(np.dtype(d).name for d in depths)} (or {channels} pages)")
    return image


def read_channel_files(paths: list[str], depths: tuple = EIGHT_BIT) -> np.ndarray:
    """One crop from one grey file per channel (Cell Painting's way) as (rows, columns, channels)."""
    planes = []
    names = "/".join(np.dtype(d).name for d in depths)
    for path in map(Path, paths):
        plane = _read_image(path)
        expected = planes[0].shape if planes else plane.shape   # every channel the size of the first
        if plane.ndim != 2 or plane.dtype not in depths or plane.shape != expected:
            raise VerificationError(f"{path}: shape {plane.shape} and type {plane.dtype}, expected one grey {names} "
                                    f"channel of the size of the crop's first channel file ({paths[0]})")
        planes.append(plane)
    return np.stack(planes, axis=-1)


def _table_crop(table: pd.DataFrame, n: int, channels: int, depths: tuple) -> np.ndarray:
    """Row ``n``'s crop: one file, or one per channel (``channel_files``)."""
    path = table["source"].iloc[n]
    if "channel_files" not in table:
        return read_crop(path, channels, depths)
    files = list(table["channel_files"].iloc[n])
    if len(files) != channels:
        raise VerificationError(f"{path}: {len(files)} channel files, expected {channels} (the crops "
                                "dataset's channels)")
    return read_channel_files(files, depths)


def plate_percentiles(table: pd.DataFrame, reference: np.ndarray, *, channels: int,
                      percentiles: tuple[float, float], sample: int = 200, seed: int = 0) -> dict:
    """Per plate, each channel's low and high percentile over (a seeded sample of at most ``sample``) reference
    crops of that plate (its control crops, or all of them): what `preprocess_crops` scales to 0 and 255.

    Raises
    ------
    MetadataError
        A plate without reference crops.
    """
    rng = np.random.default_rng(seed)
    scaling = {}
    table = table.reset_index(drop=True)   # once: rows are positions below
    for plate, rows in table.groupby("plate").groups.items():
        rows = [r for r in rows if reference[r]]
        if not rows:
            raise MetadataError(f"plate {plate}: no reference crops to take its intensity percentiles from")
        picked = rng.choice(rows, min(sample, len(rows)), replace=False)
        pixels = np.stack([_table_crop(table, r, channels, ANY_DEPTH) for r in picked])
        low, high = np.percentile(pixels.reshape(-1, channels).astype(np.float64), percentiles, axis=0)
        scaling[plate] = (low, np.maximum(high, low + 1))
    return scaling


def preprocess_crops(table: pd.DataFrame, *, sizes: list[int], channels: int = 3, scaling: dict | None = None,
                     grid: tuple[int, int] = (1, 1), log: Callable[[str], None] | None = None
                     ) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """A set's files cut into ``grid`` crops and resized (OpenCV INTER_AREA, as the study) to each square size, in
    table order.

    Every file must have the size of the first; channels stay as stored in the files: one file per crop
    (``source``), or one per channel (``channel_files``, from `moaflow.datasets.tables.crops_table`). Files are
    8-bit, unless ``scaling`` (plate -> per-channel low and high, `plate_percentiles`) maps each channel of
    8- or 16-bit crops linearly so that low is 0 and high 255, clipped. With a ``grid`` of (rows, columns)
    other than (1, 1) each file is a field cut like BBBC021's (`moaflow.preprocess.crops.crop_boxes`): its
    crops follow one another row-major, ``crop`` giving the position.
    """
    log = log or (lambda _: None)
    per_file = grid[0] * grid[1]
    arrays = {size: np.empty((len(table) * per_file, size, size, channels), np.uint8) for size in sizes}
    shape = boxes = None
    step = max(1, len(table) // 10)
    table = table.reset_index(drop=True)
    for n, path in enumerate(table["source"]):
        image = _table_crop(table, n, channels, EIGHT_BIT if scaling is None else ANY_DEPTH)
        if scaling is not None:
            low, high = scaling[table["plate"].iloc[n]]
            image = np.clip((image.astype(np.float64) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
        if shape is None:
            shape, boxes = image.shape, crops.crop_boxes(image.shape[:2], grid)
        elif image.shape != shape:
            raise VerificationError(f"{path}: size {image.shape[:2]}, the set's first file has {shape[:2]}")
        for k, (rows, columns) in enumerate(boxes):
            for size in sizes:
                arrays[size][n * per_file + k] = crops.resize_area(image[rows, columns], size).reshape(
                    size, size, channels)
        if (n + 1) % step == 0 or n + 1 == len(table):
            log(f"{n + 1}/{len(table)} files read{f', cut into {grid[0]}x{grid[1]} crops' if per_file > 1 else ''}"
                f" and resized to {sizes}")
    index = table.drop(columns=["channel_files"], errors="ignore").reset_index(drop=True)
    index = index.loc[index.index.repeat(per_file)].reset_index(drop=True)
    index.insert(0, "crop_id", np.arange(len(index)))
    index["crop"] = np.tile(np.arange(per_file), len(table))
    return arrays, index


def preprocess_crops_files(table: str | os.PathLike, output_dir: str | os.PathLike, *, sizes: list[int],
                           channels: int = 3, control_compound: str | None = None,
                           controls_dir: str | os.PathLike | None = None, normalisation: str = "none",
                           percentiles: tuple[float, float] = (0.1, 99.9), grid: tuple[int, int] = (1, 1),
                           log=stderr) -> None:
    """A pre-cropped set resized into the crop store (`preprocess_crops`): ``<output_dir>/<size>.npy`` and
    ``index.parquet``; with a ``control_compound``, its crops into a store of their own in ``controls_dir``.

    Parameters
    ----------
    table : path
        The crops table (`moaflow.datasets.tables.write_crops_table`).
    output_dir : path
        The crop store's folder.
    sizes : list of int
        Square input sizes.
    channels : int
        The crops' channels (the config's ``crops.<name>.channels``).
    control_compound : str, optional
        The negative control's compound name (``crops.<name>.control_compound``): its crops are not trained on;
        they are what profiling normalises to.
    controls_dir : path, optional
        The control crops' store folder (needed with ``control_compound``).
    normalisation : {"none", "percentile"}
        ``none``: the files are 8-bit, stored as they are. ``percentile``: each plate's channels scaled so that
        the ``percentiles`` of its control crops (of all its crops without a control) are 0 and 255; 8- or
        16-bit files (Cell Painting's are 16-bit).
    percentiles : pair of float
        The low and high percentile of ``percentile`` normalisation.
    grid : pair of int
        Crops per file, (rows, columns) (``crops.<name>.crop_grid``): whole fields are cut like BBBC021's.

    Raises
    ------
    MetadataError
        A control compound that no crop has, or no folder for its store.
    """
    frame = pd.read_parquet(table).reset_index(drop=True)
    is_control = (frame["compound"] == control_compound).to_numpy()
    if control_compound is not None and (not is_control.any() or controls_dir is None):
        raise MetadataError(f"{table}: control_compound {control_compound!r} (crops.<name>.control_compound) "
                            f"{'names no crop' if not is_control.any() else 'needs controls_dir'}; compounds "
                            f"are e.g. {sorted(frame['compound'].unique())[:5]}")
    scaling = None
    if normalisation == "percentile":
        reference = is_control if control_compound is not None else np.ones(len(frame), bool)
        scaling = plate_percentiles(frame, reference, channels=channels, percentiles=tuple(percentiles))
        log(f"{table}: each plate's channels scaled to its {'control ' if control_compound else ''}crops' "
            f"{percentiles[0]:g}-{percentiles[1]:g} percentiles")
    elif normalisation != "none":
        raise ValueError(f"normalisation={normalisation!r}: expected 'none' or 'percentile'")
    parts = {Path(output_dir): frame}
    if control_compound is not None:
        parts = {Path(output_dir): frame[~is_control], Path(controls_dir): frame[is_control]}
        log(f"{table}: {is_control.sum()} crops of {control_compound} to {controls_dir}, {(~is_control).sum()} "
            "treatment crops to train on")
    for out, rows in parts.items():
        arrays, index = preprocess_crops(rows, sizes=sizes, channels=channels, scaling=scaling, grid=tuple(grid),
                                         log=log)
        for size, array in arrays.items():
            write_array(array, out / f"{size}.npy")
        write_table(index, out / "index.parquet")
