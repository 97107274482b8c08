"""One row per field of view: the table every later stage reads.

BBBC021 follows Kensert et al. (2019): fields whose (compound, concentration)
has an MoA in ``BBBC021_v1_moa.csv`` are annotated; taxol is kept only on
Week1 plates, in wells whose name contains ``D0``, at 0.3, 1 and 3 uM; DMSO
fields are kept with ``is_dmso`` set (they normalise plates, never a class).
BBBC014 rows are wells: labels come from the well's column (TNF-alpha
concentration rank) and the cell line from its row, as in the study's code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from collections.abc import Callable

import numpy as np
import pandas as pd

from moaflow.errors import MetadataError
from moaflow.logs import stderr
from moaflow.study import BBBC021_CHANNELS

BBBC021_REQUIRED_COLUMNS = [
    "Image_FileName_DAPI", "Image_FileName_Tubulin", "Image_FileName_Actin",
    "Image_PathName_DAPI", "Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI",
    "Replicate", "Image_Metadata_Compound", "Image_Metadata_Concentration",
]
MOA_REQUIRED_COLUMNS = ["compound", "concentration", "moa"]
TAXOL_WEEK = "Week1"
TAXOL_WELL_TAG = "D0"
TAXOL_CONCENTRATIONS = (0.3, 1.0, 3.0)
_SITE = re.compile(r"_s(\d+)_w\d")


def _read_csv(path, required: list[str], sep: str = ",") -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, sep=sep, low_memory=False)
    except pd.errors.EmptyDataError:
        raise MetadataError(f"{path}: empty file; expected a table with columns {required}") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: cannot be read as a table ({exc})") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise MetadataError(f"{path}: missing column(s) {missing}; expected at least {required}")
    return frame


def _duplicates(frame: pd.DataFrame, keys: list[str], path, what: str) -> None:
    """Refuse a table in which ``keys`` do not identify rows uniquely, naming the first duplicates."""
    repeated = frame[frame.duplicated(keys, keep=False)]
    if len(repeated):
        shown = repeated[keys].drop_duplicates().head(3).to_dict("records")
        raise MetadataError(f"{path}: {len(repeated)} rows share their {'/'.join(keys)} ({what}), e.g. {shown}; "
                            "each must occur once")


def _concentration_key(values: pd.Series) -> pd.Series:
    # The two files write concentrations differently (0.003 vs 0.003000).
    return np.round(values.astype(float), 6)


def study_file_names(image_csv: str | os.PathLike, moa_csv: str | os.PathLike, plate: str, *,
                     taxol_rule: bool) -> set[str]:
    """The TIFF names of one plate that the study reads: its fields with an MoA (after the taxol rule) and its
    DMSO fields, three channels each (what extraction writes; the plate's other fields stay in its archive)."""
    table = bbbc021_image_table(image_csv, moa_csv, ".", plates=[plate], taxol_rule=taxol_rule, log=lambda _: None)
    return {Path(path).name for channel in BBBC021_CHANNELS for path in table[f"path_{channel.lower()}"]}


def bbbc021_image_table(
    image_csv: str | os.PathLike,
    moa_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    plates: list[str] | None = None,
    *,
    taxol_rule: bool,
    log: Callable[[str], None] = stderr,
) -> pd.DataFrame:
    """Build the BBBC021 field table used by the study.

    Parameters
    ----------
    image_csv, moa_csv : path
        The Broad's ``BBBC021_v1_image.csv`` and ``BBBC021_v1_moa.csv``.
    image_root : path
        Folder holding one extracted folder per plate; channel paths are
        ``image_root/<Plate>/<file name>``.
    plates : list of str, optional
        Keep only these plates (all when None). Each must occur in ``image_csv``.
    taxol_rule : bool
        Apply the study's taxol selection (Week1, ``D0`` wells, 0.3/1/3).
    log : callable
        Receives the counts of fields the study's selection drops.

    Returns
    -------
    table : pandas.DataFrame
        One row per kept field with columns ``plate, batch, well, site,
        replicate, compound, concentration, moa, treatment, is_dmso,
        path_dapi, path_tubulin, path_actin, image_number``.

    Examples
    --------
    On the real metadata the table has 1,208 annotated fields of 38
    compounds, 103 treatments and 12 MoAs, plus 1,320 DMSO fields.
    """
    images = _read_csv(image_csv, BBBC021_REQUIRED_COLUMNS)
    # The field's number is its row in the CSV: the Broad's ImageNumber restarts in each of its ten tables.
    images = images.assign(_row=np.arange(len(images)))
    moa = _read_csv(moa_csv, MOA_REQUIRED_COLUMNS)
    if plates is not None:
        unknown = sorted(set(plates) - set(images["Image_Metadata_Plate_DAPI"]))
        if unknown:
            raise MetadataError(f"{image_csv}: configured plate(s) {unknown} have no fields in this file")
        images = images[images["Image_Metadata_Plate_DAPI"].isin(plates)]
    images = images.assign(_conc=_concentration_key(images["Image_Metadata_Concentration"]))
    moa = moa.assign(_conc=_concentration_key(moa["concentration"]))[["compound", "_conc", "moa"]]
    _duplicates(moa, ["compound", "_conc"], moa_csv, "compound and concentration")
    sites = images["Image_FileName_DAPI"].str.extract(_SITE, expand=False)
    if sites.isna().any():
        bad = images.loc[sites.isna(), "Image_FileName_DAPI"].iloc[0]
        raise MetadataError(f"{image_csv}: file name {bad!r} has no site (expected '..._s<N>_w<N>...')")
    _duplicates(images.assign(site=sites), ["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "site"],
                image_csv, "plate, well and site")
    _check_complete(images.assign(site=sites), image_csv)
    merged = images.merge(moa, how="left", left_on=["Image_Metadata_Compound", "_conc"],
                          right_on=["compound", "_conc"], validate="many_to_one")
    merged = merged[_study_selection(merged, image_csv, moa_csv, taxol_rule, log)]
    return _field_table(merged, image_root, image_csv)


def _check_complete(images: pd.DataFrame, image_csv) -> None:
    """Stop a table that is visibly incomplete (a CSV cut short, by a server or a disk): a field without a file
    name for every channel, a plate without DMSO fields, a well with fewer sites than the table's wells have,
    or a plate with fewer DMSO fields than the table's plates have (the Broad's: 4 sites per well, 24 DMSO
    fields per plate)."""
    hint = ("; the file looks cut short (check its download: bbbc021.published_files holds the published size "
            "and SHA-256 that would have refused it)")
    for channel in BBBC021_CHANNELS:
        names = images[f"Image_FileName_{channel}"]
        blank = names.isna() | names.astype(str).str.strip().eq("")
        if blank.any():
            row = images.loc[blank].iloc[0]
            raise MetadataError(f"{image_csv}: {int(blank.sum())} field(s) have no {channel} file name, e.g. plate "
                                f"{row['Image_Metadata_Plate_DAPI']} well {row['Image_Metadata_Well_DAPI']}{hint}")
    plate, well = images["Image_Metadata_Plate_DAPI"], images["Image_Metadata_Well_DAPI"]
    dmso = images["Image_Metadata_Compound"].eq("DMSO").groupby(plate).sum()
    if (dmso == 0).any():
        raise MetadataError(f"{image_csv}: plate(s) {sorted(dmso.index[dmso == 0])} have no DMSO fields; every "
                            f"BBBC021 plate has its DMSO wells (profiles are normalised to them){hint}")
    sites = images.groupby([plate, well]).size()
    usual = int(sites.mode().max())
    short = sites[sites < usual]
    if len(short):
        (p, w), n = next(iter(short.items())), int(short.iloc[0])
        raise MetadataError(f"{image_csv}: {len(short)} well(s) have fewer fields than the {usual} sites the "
                            f"table's other wells have, e.g. plate {p} well {w} with {n}{hint}")
    usual = int(dmso.mode().max())
    short = dmso[dmso < usual]
    if len(short):
        raise MetadataError(f"{image_csv}: plate(s) { {k: int(v) for k, v in short.items()} } have fewer DMSO fields than the "
                            f"{usual} the table's other plates have{hint}")


def _study_selection(merged: pd.DataFrame, image_csv, moa_csv, taxol_rule: bool, log) -> pd.Series:
    """The fields the study uses: an MoA or DMSO, and taxol only where its rule allows; the dropped counted."""
    compound, plate = merged["Image_Metadata_Compound"], merged["Image_Metadata_Plate_DAPI"]
    annotated = merged["moa"].notna() | compound.eq("DMSO")
    unannotated = merged.loc[~annotated, ["Image_Metadata_Compound", "_conc"]]
    if len(unannotated):
        pairs = unannotated.drop_duplicates()
        log(f"{image_csv}: {len(unannotated)} fields of {len(pairs)} compound/concentration pairs without an MoA "
            f"in {Path(moa_csv).name} are not used (as in the study), e.g. "
            f"{list(pairs.head(3).itertuples(index=False, name=None))}")
    keep = annotated
    if taxol_rule:
        taxol = compound.eq("taxol")
        taxol_ok = (plate.str.split("_").str[0].eq(TAXOL_WEEK)
                    & merged["Image_Metadata_Well_DAPI"].str.contains(TAXOL_WELL_TAG)
                    & merged["_conc"].isin(TAXOL_CONCENTRATIONS))
        dropped = int((keep & taxol & ~taxol_ok).sum())
        if dropped:
            log(f"{image_csv}: {dropped} taxol fields outside Week1 D0 wells at 0.3/1/3 are not used (the study's "
                "taxol rule; bbbc021.taxol_rule)")
        keep &= ~taxol | taxol_ok
    return keep


def _inside_root(paths: list[str], root: Path, image_csv) -> None:
    """Every channel path must resolve inside the image root: a folder or file name of the metadata such as
    ``Week2/..`` would otherwise read (or be extracted to) files elsewhere."""
    base = os.path.normpath(os.path.abspath(root))
    for path in paths:
        resolved = os.path.normpath(os.path.abspath(path))
        if os.path.commonpath([base, resolved]) != base or resolved == base:
            raise MetadataError(f"{image_csv}: a field's path {path!r} (Image_PathName_* and Image_FileName_*) "
                                f"resolves to {resolved}, outside the image folder {base}; expected "
                                "'<Week>/<Plate>' folders and plain file names")


def _field_table(merged: pd.DataFrame, image_root, image_csv) -> pd.DataFrame:
    """The kept fields as the table's columns, channel paths under ``image_root/<Plate>/``."""
    is_dmso = merged["Image_Metadata_Compound"].eq("DMSO")
    plate = merged["Image_Metadata_Plate_DAPI"]
    sites = merged["Image_FileName_DAPI"].str.extract(_SITE, expand=False)
    root = Path(image_root)
    folder = merged["Image_PathName_DAPI"].str.split("/").str[-1]  # "<Week>/<Plate>" -> "<Plate>"
    table = pd.DataFrame({
        "plate": plate.to_numpy(),
        "batch": plate.str.split("_").str[0].to_numpy(),
        "well": merged["Image_Metadata_Well_DAPI"].to_numpy(),
        "site": sites.astype(int).to_numpy(),
        "replicate": merged["Replicate"].astype(int).to_numpy(),
        "compound": merged["Image_Metadata_Compound"].to_numpy(),
        "concentration": merged["_conc"].to_numpy(),
        "moa": merged["moa"].where(~is_dmso, "DMSO").to_numpy(),
        "is_dmso": is_dmso.to_numpy(),
        "image_number": merged["_row"].to_numpy(),
    })
    table["treatment"] = table["compound"] + "_" + table["concentration"].map("{:g}".format)
    for channel in BBBC021_CHANNELS:
        table[f"path_{channel.lower()}"] = [
            str(root / f / n) for f, n in zip(folder, merged[f"Image_FileName_{channel}"])]
        _inside_root(table[f"path_{channel.lower()}"], root, image_csv)
    return table.sort_values(["plate", "well", "site"], kind="stable").reset_index(drop=True)


def bbbc014_image_table(
    image_dir: str | os.PathLike,
    *,
    filename_regex: str,
    dapi_channel: int,
    cell_lines: dict[str, list[str]],
    positive_columns: list[int],
    negative_columns: list[int],
) -> pd.DataFrame:
    """Build the BBBC014 well table from the extracted images.

    Parameters
    ----------
    image_dir : path
        Folder of ``*.Bmp`` files.
    filename_regex : str
        Regular expression with named groups ``channel``, ``row`` and ``column``.
    dapi_channel : int
        Which channel number is DAPI; the other is FITC (NF-kB).
    cell_lines : dict
        Cell line -> plate rows, e.g. ``{"MCF7": ["A", "B", "C", "D"]}``.
    positive_columns, negative_columns : list of int
        Columns labelled 1 (translocation) and 0; other columns get label -1
        (unused by the study).

    Returns
    -------
    table : pandas.DataFrame
        One row per well: ``plate, well, row, column, cell_line, label,
        path_dapi, path_fitc``.
    """
    pattern = re.compile(filename_regex)
    files: dict[tuple[str, int], dict[int, str]] = {}
    image_dir = Path(image_dir)
    for path in sorted(image_dir.iterdir()):
        if path.name.startswith("."):
            continue  # bookkeeping such as Snakemake's .snakemake_timestamp
        match = pattern.fullmatch(path.name)
        if match is None:
            raise MetadataError(f"{path}: name does not match bbbc014.filename_regex {filename_regex!r}")
        key = (match["row"], int(match["column"]))
        files.setdefault(key, {})[int(match["channel"])] = str(path)
    row_to_line = {row: line for line, rows in cell_lines.items() for row in rows}
    records = []
    for (row, column), channels in sorted(files.items()):
        if set(channels) != {1, 2}:
            raise MetadataError(f"{image_dir}: well {row}{column:02d} has channels {sorted(channels)}, expected [1, 2]")
        if row not in row_to_line:
            raise MetadataError(f"{image_dir}: row {row!r} is in no bbbc014.cell_lines entry")
        label = 1 if column in positive_columns else 0 if column in negative_columns else -1
        records.append({
            "plate": "BBBC014", "well": f"{row}{column:02d}", "row": row, "column": column,
            "cell_line": row_to_line[row], "label": label,
            "path_dapi": channels[dapi_channel], "path_fitc": channels[3 - dapi_channel],
        })
    return pd.DataFrame.from_records(records)


def write_bbbc021_table(image_csv: str | os.PathLike, moa_csv: str | os.PathLike, image_root: str | os.PathLike,
                        output: str | os.PathLike, *, plates: list[str], taxol_rule: bool,
                        log: Callable[[str], None] = stderr) -> pd.DataFrame:
    """The BBBC021 field table (`bbbc021_image_table`), its counts logged, written to ``output``.

    Parameters
    ----------
    image_csv, moa_csv : path
        The Broad's ``BBBC021_v1_image.csv`` and ``BBBC021_v1_moa.csv``.
    image_root : path
        Folder of the extracted plates (one folder per plate).
    output : path
        The table (``.parquet``, or ``.csv``).
    plates : list of str
        The plates of this run (``bbbc021.plates``).
    taxol_rule : bool
        Keep taxol only on Week1 D0 wells at 0.3/1/3 (``bbbc021.taxol_rule``).
    """
    from moaflow.files import write_table

    table = bbbc021_image_table(image_csv, moa_csv, image_root, plates=plates, taxol_rule=taxol_rule, log=log)
    annotated = table[~table["is_dmso"]]
    log(f"{len(annotated)} annotated fields, {annotated['compound'].nunique()} compounds, "
        f"{annotated['treatment'].nunique()} treatments, {annotated['moa'].nunique()} MoAs, "
        f"{int(table['is_dmso'].sum())} DMSO fields")
    write_table(table, output)
    return table


def write_bbbc014_table(image_root: str | os.PathLike, output: str | os.PathLike, *, settings: dict,
                        log: Callable[[str], None] = stderr) -> pd.DataFrame:
    """The BBBC014 well table (`bbbc014_image_table`), written to ``output``.

    Parameters
    ----------
    image_root : path
        The extracted images.
    output : path
        The table (``.parquet``, or ``.csv``).
    settings : dict
        The config's ``bbbc014`` settings that decide the table: ``filename_regex``, ``dapi_channel``,
        ``cell_lines``, ``positive_columns``, ``negative_columns``.
    """
    from moaflow.files import write_table

    table = bbbc014_image_table(image_root, filename_regex=settings["filename_regex"],
                                dapi_channel=settings["dapi_channel"], cell_lines=settings["cell_lines"],
                                positive_columns=settings["positive_columns"],
                                negative_columns=settings["negative_columns"])
    log(f"{len(table)} wells, {int((table['label'] >= 0).sum())} labelled")
    write_table(table, output)
    return table


# ------------------------------------------------------------------ pre-cropped image sets

#: The metadata a crops dataset maps (``crops.<name>.columns``); site and batch are optional.
CROPS_REQUIRED = ("compound", "concentration", "moa", "plate", "well", "replicate")
CROPS_OPTIONAL = ("site", "batch")


def crops_table(images: str | os.PathLike, metadata: str | os.PathLike, *, columns: dict[str, str],
                filename: str | dict[str, str], separator: str = ",", batch_pattern: str | None = None,
                check_files: bool = True, log: Callable[[str], None] = stderr) -> pd.DataFrame:
    """One row per crop of a pre-cropped image set (PNG or TIFF files) with its metadata.

    Parameters
    ----------
    images : path
        Folder of the crop files.
    metadata : path
        Table with one row per crop.
    columns : dict
        Our name (`CROPS_REQUIRED`, and optionally ``site``/``batch``) -> the metadata's column.
    filename : str or dict
        The crop's file name as a format string over the metadata's columns (by their own names) and
        ``index`` (the row's position), e.g. ``"bbbc021v1_{index}.png"`` or ``"{file}"``; or, for one grey
        file per channel (Cell Painting's way), channel name -> such a pattern, in channel order.
    separator : str
        The metadata's field separator.
    batch_pattern : str, optional
        A regular expression whose first group, applied to the plate name, is the batch
        (``"^(Week[0-9]+)_"``) when no batch column is mapped.
    check_files : bool
        Whether every file must exist (not when planning from a downloaded set's metadata alone).

    Returns
    -------
    table : pandas.DataFrame
        ``plate, batch, well, site, replicate, compound, concentration, moa, treatment, image_number,
        field, source``; ``field`` (plate/well/site) groups the crops of one field of view. With one file per
        channel, ``source`` is the first channel's and ``channel_files`` lists every channel's.

    Raises
    ------
    MetadataError
        Missing columns or files, a file named twice, a batch pattern that does not match.
    """
    unknown = sorted(set(columns) - set(CROPS_REQUIRED) - set(CROPS_OPTIONAL))
    missing_keys = [k for k in CROPS_REQUIRED if k not in columns]
    if unknown or missing_keys:
        raise MetadataError(f"{metadata}: the columns mapping needs {list(CROPS_REQUIRED)} (optional "
                            f"{list(CROPS_OPTIONAL)}); unknown {unknown}, missing {missing_keys}")
    frame = _read_csv(metadata, list(columns.values()), sep=separator)
    patterns = filename if isinstance(filename, dict) else {"": filename}
    names = {channel: _file_names(frame, pattern, metadata) for channel, pattern in patterns.items()}
    table = pd.DataFrame({key: frame[column].to_numpy() for key, column in columns.items()})
    table["concentration"] = table["concentration"].astype(float)
    table["site"] = table["site"].astype(int) if "site" in table else 1
    if "batch" not in table:
        if batch_pattern:
            batch = table["plate"].astype(str).str.extract(batch_pattern, expand=False)
            if batch.isna().any():
                bad = table.loc[batch.isna(), "plate"].iloc[0]
                raise MetadataError(f"{metadata}: plate {bad!r} does not match batch_pattern {batch_pattern!r}")
            table["batch"] = batch
        else:
            table["batch"] = "all"
    files = {channel: [str(Path(images) / name) for name in channel_names] for channel, channel_names in names.items()}
    table["source"] = next(iter(files.values()))
    absent = [p for paths in files.values() for p in paths if check_files and not Path(p).is_file()]
    if absent:
        raise MetadataError(f"{metadata}: {len(absent)} of {len(table) * len(files)} crop files are missing, "
                            f"e.g. {absent[:3]}")
    for channel, paths in files.items():
        _duplicates(pd.DataFrame({"source": paths}), ["source"], metadata,
                    f"channel {channel}'s file" if channel else "the crop file")
    table["field"] = table["plate"].astype(str) + "/" + table["well"].astype(str) + "/" + table["site"].astype(str)
    table["image_number"] = pd.factorize(table["field"])[0]
    table["treatment"] = table["compound"] + "_" + table["concentration"].map("{:g}".format)
    log(f"{metadata}: {len(table)} crops, {table['field'].nunique()} fields, {table['compound'].nunique()} compounds, "
        f"{table['treatment'].nunique()} treatments, {table['moa'].nunique()} MoAs, "
        f"{table['batch'].nunique()} batches")
    order = ["plate", "batch", "well", "site", "replicate", "compound", "concentration", "moa", "treatment",
             "image_number", "field", "source"]
    if isinstance(filename, dict):
        table["channel_files"] = [list(paths) for paths in zip(*files.values())]
        order.append("channel_files")
    return table[order]


def _file_names(frame: pd.DataFrame, pattern: str, metadata) -> list[str]:
    """``pattern`` filled from each row of the metadata (its own column names, and ``index``)."""
    try:
        return [pattern.format(index=i, **row) for i, row in enumerate(frame.to_dict("records"))]
    except (KeyError, IndexError, ValueError) as exc:
        raise MetadataError(f"{metadata}: file name pattern {pattern!r} cannot be filled from its columns "
                            f"({type(exc).__name__}: {exc}); columns are {list(frame.columns)} and 'index'") from None


def write_crops_table(settings: dict, output: str | os.PathLike, log: Callable[[str], None] = stderr) -> pd.DataFrame:
    """A pre-cropped set's crop table (`crops_table`), written to ``output``.

    Parameters
    ----------
    settings : dict
        The config's ``crops.<name>`` section (``images``, ``metadata``, ``columns``, ``filename``, and
        optionally ``separator`` and ``batch_pattern``).
    output : path
        The table (``.parquet``, or ``.csv``).
    """
    from moaflow.files import write_table

    table = crops_table(settings["images"], settings["metadata"], columns=settings["columns"],
                        filename=settings["filename"], separator=settings.get("separator", ","),
                        batch_pattern=settings.get("batch_pattern"), log=log)
    write_table(table, output)
    return table
