"""Per-plate preprocessing (BBBC021) and the BBBC014 wells, against literal transcriptions of the original."""

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from moaflow.cli import main as moaflow
from moaflow.datasets import download
from moaflow.datasets.tables import bbbc014_image_table
from moaflow.devtools import standin
from moaflow.errors import VerificationError
from moaflow.files import write_table
from moaflow.preprocess import crops, plates

from tests.conftest import BBBC014_PREPROCESSING, direct_study, flags, lab_table, needs_real_cells, study


def test_plate_crops_equal_the_original_pipeline(small_plate):
    """Every stored crop is the formula image's crop, resized by cv2 INTER_AREA as the original did."""
    _, table = small_plate
    expected = direct_study(table)
    arrays, index = plates.preprocess_plate(table, sizes=[24, 40], **study(empty_fraction=-1))
    assert arrays[24].shape == (len(index), 24, 24, 3) and len(index) == 4 * (~table["is_dmso"]).sum()
    boxes = crops.crop_boxes((64, 80), (2, 2))
    for k, row in index.iterrows():
        rs, cs = boxes[row["crop"]]
        crop = np.ascontiguousarray(expected[row["image_number"]][0][rs, cs])     # 32x40
        for size in (24, 40):
            assert np.array_equal(arrays[size][k], cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
    assert index["source"].str.endswith(".tif").all()


def test_empty_crops_are_dropped_and_index_agrees(small_plate):
    _, table = small_plate
    arrays, index = plates.preprocess_plate(table, sizes=[16, 24], **study(empty_fraction=0.002))
    # Stand-in fields are full of cells: raise the bar until some crops count as empty.
    sparse_arrays, sparse_index = plates.preprocess_plate(table, sizes=[16, 24],
                                                          **study(empty_threshold=200, empty_fraction=0.01))
    assert len(sparse_index) < len(index)
    for a, i in ((arrays, index), (sparse_arrays, sparse_index)):
        assert len(a[16]) == len(a[24]) == len(i)
        assert set(i.columns) >= set(plates.INDEX_COLUMNS) | {"crop", "source"}
        assert i["crop"].between(0, 3).all()


def test_dmso_crops_are_the_plates_controls_normalised_alike(small_plate):
    """``controls``: the DMSO fields, cropped with the same plate statistics as the treatments (profiling
    normalises to them); the treatment crops never include them."""
    _, table = small_plate
    expected = direct_study(table, controls=True)
    arrays, index = plates.preprocess_plate(table, sizes=[24], controls=True, **study(empty_fraction=-1))
    dmso = table[table["is_dmso"]]
    assert len(index) == 4 * len(dmso) and set(index["compound"]) == {"DMSO"}
    assert set(index["source"]) == set(dmso["path_dapi"])
    boxes = crops.crop_boxes((64, 80), (2, 2))
    for k, row in index.iterrows():
        rs, cs = boxes[row["crop"]]
        crop = np.ascontiguousarray(expected[row["image_number"]][0][rs, cs])
        assert np.array_equal(arrays[24][k], cv2.resize(crop, (24, 24), interpolation=cv2.INTER_AREA))
    _, treatments = plates.preprocess_plate(table, sizes=[24], **study(empty_fraction=-1))
    assert not set(treatments["source"]) & set(index["source"])


def _damaged_copy(table, tmp_path, column, row_filter, write):
    """The table with one file (chosen by row_filter) replaced by what ``write(path)`` writes."""
    victim = table[row_filter(table)].iloc[0][column]
    bad = tmp_path / ("bad_" + victim.rsplit("/", 1)[-1])
    write(bad, tifffile.imread(victim))
    damaged = table.copy()
    damaged.loc[damaged[column] == victim, column] = str(bad)
    write_table(damaged, tmp_path / "images.parquet")
    return bad


@pytest.mark.parametrize("name, write, rule", [
    ("truncated", lambda p, a: (tifffile.imwrite(p, a), p.write_bytes(p.read_bytes()[:300])), "cannot"),
    ("8-bit DMSO", lambda p, a: tifffile.imwrite(p, (a >> 8).astype(np.uint8)), "pixel type uint8"),
    ("negative int16", lambda p, a: tifffile.imwrite(p, a.astype(np.int16) - 100), "pixel type int16"),
    ("float32", lambda p, a: tifffile.imwrite(p, a.astype(np.float32)), "pixel type float32"),
    ("other size", lambda p, a: tifffile.imwrite(p, a[:60, :75]), "differ in size"),
])
def test_a_bad_field_stops_the_plate_naming_the_file(small_plate, tmp_path, capsys, name, write, rule):
    _, table = small_plate
    bad = _damaged_copy(table, tmp_path, "path_tubulin", lambda t: t["is_dmso"], write)
    status = moaflow(["preprocess-plate", *flags(table=tmp_path / "images.parquet", plate=table["plate"].iloc[0],
                                                 sizes=[16], output_prefix=tmp_path / "crops" / "p", **study())])
    error = capsys.readouterr().err
    assert status == 1, name
    assert bad.name in error and rule in error, error
    assert "Traceback" not in error
    assert not (tmp_path / "crops").exists() or not list((tmp_path / "crops").iterdir())


def test_a_grid_too_fine_is_an_error_before_any_work(small_plate, tmp_path, capsys):
    _, table = small_plate
    write_table(table, tmp_path / "images.parquet")
    status = moaflow(["preprocess-plate", *flags(table=tmp_path / "images.parquet", plate=table["plate"].iloc[0],
                                                 sizes=[16], output_prefix=tmp_path / "p", **study(grid=(200, 200)))])
    error = capsys.readouterr().err
    assert status == 1 and "crop_grid" in error and "64x80" in error and "Traceback" not in error


# ----------------------------------------------------------------- BBBC014

@pytest.fixture(scope="module")
def wells(tmp_path_factory):
    out = tmp_path_factory.mktemp("bbbc014")
    standin.write_bbbc014(out, shape=(96, 128), seed=2, log=lambda _: None)
    download.extract_archive(out / "www" / "BBBC014" / "BBBC014_v1_images.zip", out / "images",
                             member_root="BBBC014_v1_images", log=lambda _: None)
    return bbbc014_image_table(
        out / "images", filename_regex=r"Channel (?P<channel>[12])-(?P<index>\d+)-(?P<row>[A-H])-(?P<column>\d+)-00\.Bmp",
        dapi_channel=1, cell_lines={"MCF7": list("ABCD"), "A549": list("EFGH")},
        positive_columns=[1, 2, 3, 4], negative_columns=[9, 10, 11, 12])


def _original_bbbc014(dapi, fitc, grid_side):
    """generate_dataset_bbbc014.py transcribed: stack (0, Ch1, Ch2) as uint8, cv2 INTER_AREA to a square,
    cut into crops, then per crop Anscombe on channels 2-3 and one min-max over both to 8 bit."""
    side = dapi.shape[0]
    x = np.dstack((np.zeros_like(dapi), dapi, fitc)).astype("uint8")
    img = cv2.resize(x, (side, side), interpolation=cv2.INTER_AREA).astype("uint8")
    step = side // grid_side
    out = []
    for i in range(grid_side):
        for j in range(grid_side):
            crop = img[i * step:(i + 1) * step, j * step:(j + 1) * step].astype(np.float32)
            crop[..., 1:] = 2.0 * np.sqrt(crop[..., 1:] + 3.0 / 8.0)
            old_range = crop[..., 1:].max() - crop[..., 1:].min()
            crop[..., 1:] = (crop[..., 1:] - crop[..., 1:].min()) * 255 / old_range
            out.append(crop.astype("uint8"))
    return out


def test_bbbc014_crops_follow_the_original_per_crop_scaling(wells):
    arrays, index = plates.preprocess_bbbc014(wells, sizes=[24], **BBBC014_PREPROCESSING)
    labelled = wells[wells["label"] >= 0]
    assert arrays[24].shape == (len(labelled) * 16, 24, 24, 3) and len(index) == len(arrays[24])
    assert arrays[24][..., 0].max() == 0                   # RGB = (zeros, DAPI, FITC)
    assert set(index["label"]) == {0, 1}
    for n, (_, row) in enumerate(labelled.head(3).iterrows()):
        dapi, fitc = (np.asarray(Image.open(row[c]).convert("L")) for c in ("path_dapi", "path_fitc"))
        expected = _original_bbbc014(dapi, fitc, 4)
        for k in range(16):
            resized = cv2.resize(expected[k], (24, 24), interpolation=cv2.INTER_AREA)
            assert np.array_equal(arrays[24][n * 16 + k], resized), (n, k)


def test_bbbc014_per_well_scaling_is_a_switch(wells):
    per_crop, _ = plates.preprocess_bbbc014(wells.head(8), sizes=[24], **BBBC014_PREPROCESSING)
    per_well, _ = plates.preprocess_bbbc014(wells.head(8), sizes=[24], grid=(4, 4), minmax="well")
    labelled = int((wells.head(8)["label"] >= 0).sum())
    crops_max = per_crop[24].reshape(labelled * 16, -1, 3)[..., 1:].max(axis=(1, 2))
    assert (crops_max >= 250).all()                         # each crop spans 0..255
    assert not np.array_equal(per_crop[24], per_well[24])
    well_max = per_well[24].reshape(labelled, -1, 3)[..., 1:].max(axis=(1, 2))
    assert (well_max >= 250).all()                          # each well spans 0..255
    with pytest.raises(ValueError, match="minmax"):
        plates.preprocess_bbbc014(wells.head(8), sizes=[24], grid=(4, 4), minmax="plate")


def test_bbbc014_real_size_geometry(tmp_path):
    """A real-sized 1024x1360 well -> 1024x1024 by cv2 INTER_AREA -> 16 crops of 256, as the original."""
    rng = np.random.default_rng(5)
    paths = {}
    for name in ("dapi", "fitc"):
        paths[name] = tmp_path / f"{name}.bmp"
        Image.fromarray(rng.integers(0, 255, (1024, 1360), dtype=np.uint8)).save(paths[name])
    wells = pd.DataFrame([{"well": "A01", "row": "A", "column": 1, "cell_line": "MCF7", "label": 1,
                           "path_dapi": str(paths["dapi"]), "path_fitc": str(paths["fitc"])}])
    arrays, index = plates.preprocess_bbbc014(wells, sizes=[256], **BBBC014_PREPROCESSING)
    expected = _original_bbbc014(*(np.asarray(Image.open(paths[n]).convert("L")) for n in ("dapi", "fitc")), 4)
    assert arrays[256].shape == (16, 256, 256, 3)
    for k in range(16):
        assert np.array_equal(arrays[256][k], expected[k]), k


def test_bbbc014_mismatched_channels_are_named(wells, tmp_path):
    row = wells[wells["label"] >= 0].iloc[[0]].copy()
    small = tmp_path / "small.bmp"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(small)
    row["path_fitc"] = str(small)
    with pytest.raises(VerificationError, match="small.bmp"):
        plates.preprocess_bbbc014(row, sizes=[8], **BBBC014_PREPROCESSING)


@needs_real_cells
def test_the_lab_subset_store_is_its_pngs_resized_by_opencv():
    table = lab_table().head(12)
    arrays, index = plates.preprocess_crops(table, sizes=[64, 256])
    assert arrays[64].shape == (12, 64, 64, 3) and list(index["crop_id"]) == list(range(12))
    first = np.asarray(Image.open(table["source"].iloc[0]).convert("RGB"))
    assert np.array_equal(arrays[256][0], first)             # 256 -> 256: the file as it is
    assert np.array_equal(arrays[64][0], cv2.resize(first, (64, 64), interpolation=cv2.INTER_AREA))


def test_a_crop_of_another_size_is_named(tmp_path):
    for i, side in enumerate((16, 16, 12)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / f"c{i}.png")
    table = pd.DataFrame({"source": [str(tmp_path / f"c{i}.png") for i in range(3)]})
    with pytest.raises(VerificationError, match=r"c2.png: size \(12, 12\)"):
        plates.preprocess_crops(table, sizes=[8])


def test_a_crop_grid_cuts_each_file_into_its_crops_row_major(tmp_path):
    """Whole fields (crops.<name>.crop_grid): each file's crops follow one another, ``crop`` their position."""
    fields = [np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3) + i for i in range(2)]
    for i, field in enumerate(fields):
        Image.fromarray(field).save(tmp_path / f"f{i}.png")
    table = pd.DataFrame({"source": [str(tmp_path / f"f{i}.png") for i in range(2)], "plate": ["P1", "P2"]})
    arrays, index = plates.preprocess_crops(table, sizes=[8], grid=(2, 3))
    assert arrays[8].shape == (12, 8, 8, 3)
    assert list(index["crop"]) == list(range(6)) * 2 and list(index["crop_id"]) == list(range(12))
    assert list(index["plate"]) == ["P1"] * 6 + ["P2"] * 6
    assert np.array_equal(arrays[8][5], fields[0][8:16, 16:24])   # the first file's last crop: bottom right
    assert np.array_equal(arrays[8][7], fields[1][0:8, 8:16])     # the second file's second crop
    whole, whole_index = plates.preprocess_crops(table, sizes=[8])   # (1, 1): one crop a file, as before
    assert whole[8].shape == (2, 8, 8, 3) and list(whole_index["crop"]) == [0, 0]
