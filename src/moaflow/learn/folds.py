"""Cross-validation folds: leave one compound (BBBC021) or one cell line (BBBC014) out.

A folds table has one row per fold:

``fold``
    A path-safe name (the held-out group, slugged), used as a Snakemake wildcard.
``group_column``
    The index column that defines groups (``compound`` or ``cell_line``).
``test_group``
    The held-out group: its crops are the test set (``;``-separated groups for a
    random split, which holds out many fields at once).
``validation_groups``
    ``;``-separated groups drawn from the training groups (empty reproduces the
    paper, which had no validation set).
``excluded_batches``
    ``;``-separated batches removed from training (the not-same-compound-or-batch
    variant: every batch in which the test compound was imaged).

Folds are a file the workflow reads at parse time, so ``snakemake -n`` lists
every training job; a rule checks at run time that the file still matches the
crop index.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd

from moaflow.files import atomic_path
from moaflow.logs import stderr

FOLD_COLUMNS = ["fold", "group_column", "test_group", "validation_groups", "excluded_batches"]


def slug(name: str) -> str:
    """Path- and wildcard-safe fold name: ``"mevinolin/lovastatin"`` -> ``"mevinolin-lovastatin"``."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not text:
        raise ValueError(f"cannot make a fold name from {name!r}")
    return text


def _validation_groups(train: list[str], moa_of: dict[str, str], n: int, rng: np.random.Generator) -> list[str]:
    """Draw ``n`` validation compounds, MoA-stratified: round-robin over MoAs (in a seeded
    order) that keep at least one training compound; only then from any MoA."""
    by_moa: dict[str, list[str]] = {}
    for compound in train:
        by_moa.setdefault(moa_of[compound], []).append(compound)
    chosen: list[str] = []
    moas = list(rng.permutation(sorted(by_moa)))
    while len(chosen) < n:
        eligible = [m for m in moas if len(by_moa[m]) >= 2]
        if not eligible:
            eligible = [m for m in moas if by_moa[m]]
            if not eligible:
                break
        for moa in eligible:
            if len(chosen) == n:
                break
            pick = by_moa[moa].pop(int(rng.integers(len(by_moa[moa]))))
            chosen.append(pick)
    return sorted(chosen)


def leave_one_compound_out(
    index: pd.DataFrame,
    *,
    n_validation: int = 0,
    seed: int = 0,
    variant: str = "nsc",
) -> pd.DataFrame:
    """One fold per compound: train on the others, test on it.

    Parameters
    ----------
    index : pandas.DataFrame
        Crop (or field) table with ``compound``, ``moa`` and ``batch``; DMSO rows are ignored.
    n_validation : int
        Validation compounds per fold, drawn from the training compounds,
        MoA-stratified where possible. 0 reproduces the paper.
    seed : int
        Folds are a pure function of (index, n_validation, seed, variant).
    variant : {"nsc", "nscb"}
        ``nscb`` also removes from training every batch that holds the test compound.

    Returns
    -------
    folds : pandas.DataFrame
        Columns `FOLD_COLUMNS`, one row per compound, sorted by compound.
    """
    if variant not in ("nsc", "nscb"):
        raise ValueError(f"variant={variant!r}: expected 'nsc' or 'nscb'")
    annotated = index[index["moa"] != "DMSO"] if "moa" in index else index
    moa_per_compound = annotated.groupby("compound")["moa"].unique()
    ambiguous = moa_per_compound[moa_per_compound.map(len) > 1]
    if len(ambiguous):
        raise ValueError(f"compound(s) with several MoAs: {dict(ambiguous.map(list))}")
    moa_of = {c: m[0] for c, m in moa_per_compound.items()}
    compounds = sorted(moa_of)
    if len(compounds) < 2:
        raise ValueError(f"leave-one-compound-out needs at least 2 compounds, got {compounds}")
    rows = []
    for i, test in enumerate(compounds):
        train = [c for c in compounds if c != test]
        validation = _validation_groups(train, moa_of, n_validation, np.random.default_rng([seed, i]))
        excluded = sorted(annotated.loc[annotated["compound"] == test, "batch"].unique()) if variant == "nscb" else []
        rows.append({"fold": slug(test), "group_column": "compound", "test_group": test,
                     "validation_groups": ";".join(validation), "excluded_batches": ";".join(excluded)})
    folds = pd.DataFrame(rows, columns=FOLD_COLUMNS)
    if folds["fold"].duplicated().any():
        raise ValueError(f"compound names collide as fold names: {folds.loc[folds['fold'].duplicated(), 'test_group'].tolist()}")
    return folds


def random_field_split(index: pd.DataFrame, *, fraction: float = 0.25, seed: int = 0) -> pd.DataFrame:
    """The course lab's random hold-out, grouped by field: about ``fraction`` of each MoA's fields are
    held out whole, so crops of one field never straddle training and test (one fold, "random-split").

    Unlike leave-one-compound-out, the held-out compounds were also seen in training: the accuracy says
    how well fields of known compounds are recognised, not new compounds.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction {fraction!r}: expected between 0 and 1")
    rng = np.random.default_rng(seed)
    held_out = []
    for _, fields in index.drop_duplicates("field").groupby("moa")["field"]:
        chosen = rng.permutation(sorted(fields))
        held_out.extend(chosen[: max(1, int(round(fraction * len(chosen))))])
    return pd.DataFrame([{"fold": "random-split", "group_column": "field", "test_group": ";".join(sorted(held_out)),
                          "validation_groups": "", "excluded_batches": ""}], columns=FOLD_COLUMNS)


def dataset_folds(index: pd.DataFrame, *, variant: str, validation_compounds: int, seed: int,
                  fraction: float) -> pd.DataFrame:
    """The folds of a crops dataset: ``loco`` (leave one compound out), ``nscb`` (and its batches) or
    ``random_field`` (`random_field_split`)."""
    if variant in ("loco", "nscb"):
        return leave_one_compound_out(index, n_validation=validation_compounds, seed=seed,
                                      variant="nsc" if variant == "loco" else "nscb")
    if variant == "random_field":
        return random_field_split(index, fraction=fraction, seed=seed)
    raise ValueError(f"folds variant {variant!r}: expected loco, nscb or random_field")


def leave_one_cell_line_out(index: pd.DataFrame) -> pd.DataFrame:
    """BBBC014: two folds, each training on one cell line and testing on the other."""
    lines = sorted(index["cell_line"].unique())
    return pd.DataFrame([{"fold": slug(line), "group_column": "cell_line", "test_group": line,
                          "validation_groups": "", "excluded_batches": ""} for line in lines], columns=FOLD_COLUMNS)


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    """Read a folds file, with a clear error when columns are missing."""
    folds = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in FOLD_COLUMNS if c not in folds.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {FOLD_COLUMNS}")
    return folds


def write_folds(folds: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a folds file (TSV), atomically."""
    with atomic_path(path) as tmp:
        folds[FOLD_COLUMNS].to_csv(tmp, sep="\t", index=False)


def split(index: pd.DataFrame, fold: dict) -> dict[str, np.ndarray]:
    """Row positions of ``index`` for training, validation and test in one fold.

    Returns
    -------
    parts : dict
        ``train``, ``validation`` and ``test`` integer arrays (positions in ``index``).
    """
    column = fold["group_column"]
    groups = index[column].astype(str).to_numpy()
    validation = [g for g in fold["validation_groups"].split(";") if g]
    excluded = [b for b in fold["excluded_batches"].split(";") if b]
    test = np.isin(groups, [g for g in str(fold["test_group"]).split(";") if g])
    if not test.any():
        raise ValueError(f"fold {fold['fold']}: no crops of {column} {fold['test_group']!r} in the index")
    is_validation = np.isin(groups, validation)
    train = ~test & ~is_validation
    if excluded:
        train &= ~np.isin(index["batch"].to_numpy(), excluded)
    return {"train": np.flatnonzero(train), "validation": np.flatnonzero(is_validation), "test": np.flatnonzero(test)}


def check_folds(folds: pd.DataFrame, index: pd.DataFrame) -> None:
    """Raise if the folds do not cover the index's groups exactly once each."""
    if folds.empty:
        raise ValueError("the folds file has no folds")
    column = folds["group_column"].iloc[0]
    groups = set(index[column].astype(str).unique())
    tested = [g for value in folds["test_group"] for g in str(value).split(";") if g]
    if column == "field":   # a random split holds out some fields once
        if len(tested) != len(set(tested)) or not set(tested) <= groups:
            raise ValueError("the random split's test fields are repeated or not in the index "
                             "(regenerate with `moaflow folds`)")
    elif sorted(tested) != sorted(groups):
        raise ValueError(f"folds test {sorted(set(tested) ^ groups)} differently from the index's {column}s: "
                         f"each must be tested exactly once (regenerate with `moaflow folds`)")
    for _, fold in folds.iterrows():
        unknown = [g for g in fold["validation_groups"].split(";") if g and g not in groups]
        if unknown or fold["test_group"] in fold["validation_groups"].split(";"):
            raise ValueError(f"fold {fold['fold']}: validation groups {fold['validation_groups']!r} are not "
                             "training groups of this index")


def write_dataset_folds(dataset: str, output: str | os.PathLike, *, variant: str, validation_compounds: int,
                        seed: int, fraction: float, index: str | os.PathLike | None = None,
                        image_csv: str | os.PathLike | None = None, moa_csv: str | os.PathLike | None = None,
                        log=stderr) -> pd.DataFrame:
    """Write the folds of a dataset: leave one compound out (BBBC021, from the crop index or straight
    from the Broad's metadata), one cell line (BBBC014), or `dataset_folds` of a crops dataset.

    Parameters
    ----------
    dataset : {"bbbc021", "bbbc014", "crops"}
        Which kind of folds.
    output : path
        The folds file (TSV).
    variant : {"loco", "nscb", "random_field"}
        Leave one compound out, also its batches, or the lab's random hold-out of fields.
    validation_compounds : int
        Validation compounds per fold, MoA-stratified.
    seed : int
        Draws the validation compounds (or the random fields).
    fraction : float
        ``random_field``: the fraction of each MoA's fields held out.
    index : path, optional
        The crop (or field) index the folds are made from.
    image_csv, moa_csv : path, optional
        BBBC021: make them from the Broad's metadata instead of an index.
    """
    if dataset == "bbbc014":
        table = leave_one_cell_line_out(pd.read_parquet(index))
    elif dataset == "crops":
        table = dataset_folds(pd.read_parquet(index), variant=variant, validation_compounds=validation_compounds,
                              seed=seed, fraction=fraction)
    else:
        if image_csv:   # before anything is downloaded: the Broad's metadata is enough
            from moaflow.datasets.tables import bbbc021_image_table

            frame = bbbc021_image_table(image_csv, moa_csv, "images", log=lambda _: None, taxol_rule=True)
        elif index:
            frame = pd.read_parquet(index)
        else:
            raise ValueError("folds: give --index, or --image-csv with --moa-csv")
        table = leave_one_compound_out(frame[frame["moa"] != "DMSO"], n_validation=validation_compounds,
                                       seed=seed, variant="nscb" if variant == "nscb" else "nsc")
    write_folds(table, output)
    log(f"{len(table)} folds written to {output}")
    return table


def check_folds_file(folds: str | os.PathLike, index: str | os.PathLike, output: str | os.PathLike) -> None:
    """Check a folds file against a crop index (`check_folds`), then copy it to ``output``.

    Parameters
    ----------
    folds : path
        The folds file (TSV, `FOLD_COLUMNS`).
    index : path
        The crop index it must cover.
    output : path
        The checked copy (what training reads).
    """
    table = read_folds(folds)
    check_folds(table, pd.read_parquet(index))
    write_folds(table, output)
