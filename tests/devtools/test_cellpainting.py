"""The Cell Painting stand-in: JUMP's file layout, and MoAs that change an organelle, not only the nucleus."""

import csv
import zipfile

import numpy as np
import pytest
import tifffile

from moaflow.devtools import cellpainting


@pytest.mark.parametrize("organelle", ["Mito", "ER", "AGP"])
def test_each_moa_changes_its_organelle_and_leaves_the_nucleus_and_rna_alone(organelle):
    """The mean of each channel over 60 cells: the changed organelle's moves by a third or more, DNA and RNA's
    by less than a tenth."""
    def means(changed, seed):
        rng = np.random.default_rng(seed)
        return np.mean([cellpainting.render_cell(48, changed, rng).mean(axis=(1, 2)) for _ in range(60)], axis=0)

    control, treated = means(None, 1), means(organelle, 2)
    ratio = dict(zip(cellpainting.CHANNELS, treated / control))
    assert ratio[organelle] > 1.33, ratio
    assert all(abs(ratio[c] - 1) < 0.1 for c in ("DNA", "RNA")), ratio
    for other in {"Mito", "ER", "AGP"} - {organelle}:
        assert abs(ratio[other] - 1) < 0.15, ratio


def test_the_served_files_have_jumps_layout_16_bit_one_tiff_per_channel_per_site(tmp_path):
    files = cellpainting.write_cellpainting(tmp_path, plates=2, moas=2, compounds_per_moa=1, concentrations=(1.0,),
                                            dmso_wells=1, sites=2, shape=(64, 64), cells=2, cell_size=24,
                                            log=lambda _: None)
    www = tmp_path / "www" / "CellPainting"
    assert files["archives"] == ["CPSTANDIN001.zip", "CPSTANDIN002.zip"]
    with open(www / "load_data.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3 * 2                     # plates x (a treatment in 2 wells + 1 DMSO well) x sites
    assert {r["Metadata_Batch"] for r in rows} == {"Batch1", "Batch2"}
    plates_of = {}
    for r in rows:
        plates_of.setdefault(r["Metadata_Compound"], set()).add(r["Metadata_Plate"])
    assert plates_of["DMSO"] == {"CPSTANDIN001", "CPSTANDIN002"}               # controls on every plate
    assert all(len(plates) == 1 for compound, plates in plates_of.items() if compound != "DMSO")   # as BBBC021
    assert sum(r["Metadata_Compound"] == "DMSO" for r in rows) == 4
    first = rows[0]
    assert first["FileName_OrigMito"] == "r02c02f01p01-ch5sk1fk1fl1.tiff"
    with zipfile.ZipFile(www / "CPSTANDIN001.zip") as archive:
        names = set(archive.namelist())
        assert len(names) == 3 * 2 * 5 and f"CPSTANDIN001/{first['FileName_OrigDNA']}" in names
        archive.extract(f"CPSTANDIN001/{first['FileName_OrigDNA']}", tmp_path / "x")
    pixels = tifffile.imread(tmp_path / "x" / "CPSTANDIN001" / first["FileName_OrigDNA"])
    assert pixels.dtype == np.uint16 and pixels.shape == (64, 64)
    assert files["published_files"]["load_data.csv"]["bytes"] == (www / "load_data.csv").stat().st_size
    again = cellpainting.write_cellpainting(tmp_path / "again", plates=2, moas=2, compounds_per_moa=1,
                                            concentrations=(1.0,), dmso_wells=1, sites=2, shape=(64, 64), cells=2,
                                            cell_size=24, log=lambda _: None)
    assert again["published_files"] == files["published_files"]    # deterministic: the digests a config holds


def test_the_compounds_of_a_moa_are_on_different_plates_so_that_nscb_can_be_scored():
    for plates in (2, 3):
        for moa in range(3):
            assert len({cellpainting.plate_of(moa, compound, plates) for compound in range(2)}) == 2


def test_the_demo_runs_the_workflow_twice_only_while_a_sets_metadata_is_still_to_be_fetched(tmp_path, monkeypatch):
    """`moaflow demo` from any folder: the Cell Painting demo's layers name a set to fetch first; a BBBC demo's none."""
    import yaml

    from moaflow.devtools.demo import fetch_first

    monkeypatch.chdir(tmp_path)   # no config/config.yaml here: the layers alone decide
    layer = tmp_path / "paint.yaml"
    spec = cellpainting.crops_settings({"metadata": "load_data.csv", "archives": ["P1.zip"]}, "http://127.0.0.1:1/")
    layer.write_text(yaml.safe_dump({"datasets": ["paint"], "crops": {"paint": spec}}))
    assert fetch_first([str(layer)]) == ["paint"]
    (tmp_path / "results" / "paint" / "raw").mkdir(parents=True)
    (tmp_path / "results" / "paint" / "raw" / "load_data.csv.verified.json").write_text("{}")
    assert fetch_first([str(layer)]) == []
    bbbc = tmp_path / "bbbc.yaml"
    bbbc.write_text(yaml.safe_dump({"bbbc021": {"base_urls": ["http://127.0.0.1:1/"]}}))
    assert fetch_first([str(bbbc)]) == []
