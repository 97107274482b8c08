"""Normalisation, crops, resizing and the training-ready store."""

import numpy as np
import pandas as pd
import pytest
import tifffile

from moaflow import download, preprocess, standin
from moaflow.cli import main as moaflow
from moaflow.download import VerificationError
from moaflow.image_table import bbbc021_image_table, write_table


@pytest.fixture(scope="module")
def small_plate(tmp_path_factory):
    """One extracted stand-in plate (64x80 fields) and its image table."""
    out = tmp_path_factory.mktemp("plate")
    manifest = standin.write_bbbc021(out, n_plates=1, sites=2, dmso_wells=3, moas=["Eg5 inhibitors", "Epithelial"],
                                     compounds_per_moa=1, concentrations_per_compound=2, shape=(64, 80),
                                     seed=11, log=lambda _: None)
    plate = manifest["plates"][0]
    www = out / "www" / "BBBC021"
    download.extract_archive(www / f"BBBC021_v1_images_{plate}.zip", out / "images" / plate,
                             member_root=plate, log=lambda _: None)
    table = bbbc021_image_table(www / "BBBC021_v1_image.csv", www / "BBBC021_v1_moa.csv", out / "images")
    return out, table


def _direct_study(table):
    """The reference formulas transcribed literally, pixel by pixel, in float64."""
    def read(row):
        return np.stack([tifffile.imread(row[f"path_{c}"]) for c in ("dapi", "tubulin", "actin")])

    dmso = np.stack([read(r) for _, r in table[table["is_dmso"]].iterrows()])   # (F, 3, M, N)
    a = 2 * np.sqrt(dmso.astype(np.float64) + 3 / 8)
    mean = a.transpose(1, 0, 2, 3).reshape(3, -1).mean(axis=1)
    std = a.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1)
    images = {}
    for _, row in table[~table["is_dmso"]].iterrows():
        z = (2 * np.sqrt(read(row).astype(np.float64) + 3 / 8) - mean[:, None, None]) / std[:, None, None]
        scaled = ((z - z.min()) / (z.max() - z.min()) * 255).astype(np.uint8)
        images[row["image_number"]] = np.moveaxis(scaled[[2, 1, 0]], 0, -1)   # (Actin, Tubulin, DAPI), channels last
    return images


def test_study_normalisation_equals_the_formulas_exactly(small_plate):
    _, table = small_plate
    expected = _direct_study(table)
    fields = [preprocess.read_field(r) for _, r in table[table["is_dmso"]].iterrows()]
    mean, std = preprocess.dmso_statistics(fields)
    for _, row in table[~table["is_dmso"]].iterrows():
        got = np.moveaxis(preprocess.study_normalise(preprocess.read_field(row), mean, std), 0, -1)
        assert np.array_equal(got, expected[row["image_number"]]), row["image_number"]


def test_plate_crops_equal_the_formulas_cropped(small_plate):
    """At the native crop size (no resize), every stored crop is the formula image's crop."""
    _, table = small_plate
    expected = _direct_study(table)
    arrays, index = preprocess.preprocess_plate(table, sizes=[32], grid=(2, 2), empty_fraction=-1)
    assert arrays[32].shape == (len(index), 32, 32, 3) and len(index) == 4 * (~table["is_dmso"]).sum()
    boxes = preprocess.crop_boxes((64, 80), (2, 2))
    for k, row in index.iterrows():
        rs, cs = boxes[row["crop"]]
        crop = expected[row["image_number"]][rs, cs]       # 32x40 -> resized to 32x32
        resized = preprocess.resize_area(np.moveaxis(crop, -1, 0), (32, 32))
        assert np.array_equal(arrays[32][k], np.moveaxis(resized, 0, -1))


def test_illumination_is_applied_by_division(small_plate):
    _, table = small_plate
    fields = [preprocess.read_field(r) for _, r in table[table["is_dmso"]].iterrows()]
    flat = np.ones((3, 64, 80))
    # the float path (with illumination) and the histogram path (without) agree to rounding
    assert np.allclose(preprocess.dmso_statistics(fields, flat), preprocess.dmso_statistics(fields), rtol=1e-12, atol=0)
    mean, std = preprocess.dmso_statistics(fields, 2 * flat)
    assert np.allclose(mean, preprocess.anscombe(np.stack(fields) / 2).mean(axis=(0, 2, 3)))
    field = preprocess.read_field(table[~table["is_dmso"]].iloc[0])
    slow = preprocess.study_normalise(field, mean, std, illumination=flat)
    fast = preprocess.study_normalise(field, mean, std)
    assert np.array_equal(slow, fast)  # the lookup-table path and the direct path agree


def test_percentile_normalisation(small_plate):
    _, table = small_plate
    fields = [preprocess.read_field(r) for _, r in table[table["is_dmso"]].iterrows()]
    low, high = preprocess.percentile_statistics(fields, (1, 99))
    image = preprocess.percentile_normalise(fields[0], low, high)
    assert image.dtype == np.uint8 and image.shape == (3, 64, 80)
    dapi = image[2]  # stored order is (Actin, Tubulin, DAPI)
    assert 0.005 < np.mean(dapi == 0) < 0.2 and np.mean(dapi == 255) < 0.05


def test_empty_crop_rule():
    crop = np.zeros((3, 10, 100), np.uint8)          # 3000 values
    assert preprocess.is_empty(crop)
    crop.flat[:6] = 51                               # 6 / 3000 = 0.002 exactly: still empty (<=)
    assert preprocess.is_empty(crop)
    crop.flat[6] = 51                                # 7 / 3000 > 0.002: kept
    assert not preprocess.is_empty(crop)
    crop[:] = 50                                     # the threshold itself is not "above"
    assert preprocess.is_empty(crop)


def test_empty_crops_are_dropped_and_index_agrees(small_plate):
    _, table = small_plate
    fields = table.copy()
    arrays, index = preprocess.preprocess_plate(fields, sizes=[16, 24], empty_fraction=0.002)
    # Stand-in fields are full of cells: raise the bar until some crops count as empty.
    sparse_arrays, sparse_index = preprocess.preprocess_plate(fields, sizes=[16, 24], empty_threshold=200,
                                                              empty_fraction=0.01)
    assert len(sparse_index) < len(index)
    for a, i in ((arrays, index), (sparse_arrays, sparse_index)):
        assert len(a[16]) == len(a[24]) == len(i)
        assert set(i.columns) >= set(preprocess.INDEX_COLUMNS) | {"crop"}
        assert i["crop"].between(0, 3).all()


def test_area_weights():
    w = preprocess.area_weights(512, 224).toarray()
    assert w.shape == (224, 512)
    assert np.allclose(w.sum(axis=1), 1)
    assert np.allclose(w.sum(axis=0), 224 / 512)      # every input pixel counted once in total
    assert np.array_equal(preprocess.area_weights(7, 7).toarray(), np.eye(7, dtype=np.float32))
    half = preprocess.area_weights(4, 2).toarray()
    assert np.array_equal(half, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


def test_crops_at_sizes_shapes_and_order():
    image = np.zeros((3, 40, 60), np.uint8)
    image[:, :20, 30:] = 200                          # top-right quadrant bright
    crops = preprocess.crops_at_sizes(image, (2, 2), [8, 12])
    assert crops[8].shape == (4, 8, 8, 3) and crops[12].shape == (4, 12, 12, 3)
    assert [int(c.mean()) for c in crops[8]] == [0, 200, 0, 0]   # row-major


def test_truncated_tiff_stops_the_plate_naming_the_file(small_plate, tmp_path, capsys):
    _, table = small_plate
    victim = table[~table["is_dmso"]].iloc[0]["path_tubulin"]
    broken = tmp_path / "broken.tif"
    broken.write_bytes(open(victim, "rb").read()[:300])
    damaged = table.copy()
    damaged.loc[damaged["path_tubulin"] == victim, "path_tubulin"] = str(broken)
    write_table(damaged, tmp_path / "images.parquet")
    status = moaflow(["preprocess-plate", "--table", str(tmp_path / "images.parquet"),
                      "--plate", table["plate"].iloc[0], "--sizes", "16",
                      "--output-prefix", str(tmp_path / "crops" / "p")])
    assert status == 1
    assert "broken.tif" in capsys.readouterr().err
    assert not (tmp_path / "crops").exists() or not list((tmp_path / "crops").iterdir())


def test_gather_concatenates_in_order(tmp_path):
    parts = []
    for p, n in (("a", 3), ("b", 0), ("c", 2)):
        array = np.full((n, 4, 4, 3), ord(p), np.uint8)
        preprocess.write_array(array, tmp_path / f"{p}.4.npy")
        write_table(pd.DataFrame({"plate": [p] * n, "crop": range(n)}), tmp_path / f"{p}.index.parquet")
        parts.append((tmp_path / f"{p}.4.npy", tmp_path / f"{p}.index.parquet"))
    index = preprocess.gather(parts, tmp_path / "all.npy")
    store = np.load(tmp_path / "all.npy", mmap_mode="r")
    assert isinstance(store, np.memmap) and store.shape == (5, 4, 4, 3)
    assert list(index["crop_id"]) == [0, 1, 2, 3, 4]
    assert [chr(store[i, 0, 0, 0]) for i in index["crop_id"]] == list(index["plate"])
    assert not list(tmp_path.glob("*.tmp*"))


def test_gather_refuses_mismatched_parts(tmp_path):
    preprocess.write_array(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "a.4.npy")
    write_table(pd.DataFrame({"crop": [0]}), tmp_path / "a.index.parquet")
    with pytest.raises(ValueError, match="a.4.npy"):
        preprocess.gather([(tmp_path / "a.4.npy", tmp_path / "a.index.parquet")], tmp_path / "all.npy")
    assert not (tmp_path / "all.npy").exists()


def test_bbbc014_crops(tmp_path):
    from moaflow.image_table import bbbc014_image_table

    standin.write_bbbc014(tmp_path, shape=(48, 64), seed=2, log=lambda _: None)
    download.extract_archive(tmp_path / "www" / "BBBC014" / "BBBC014_v1_images.zip", tmp_path / "images",
                             member_root="BBBC014_v1_images", log=lambda _: None)
    wells = bbbc014_image_table(
        tmp_path / "images", filename_regex=r"Channel (?P<channel>[12])-(?P<index>\d+)-(?P<row>[A-H])-(?P<column>\d+)-00\.Bmp",
        dapi_channel=1, cell_lines={"MCF7": list("ABCD"), "A549": list("EFGH")},
        positive_columns=[1, 2, 3, 4], negative_columns=[9, 10, 11, 12])
    arrays, index = preprocess.preprocess_bbbc014(wells, sizes=[12], grid=(4, 4))
    assert arrays[12].shape == (64 * 16, 12, 12, 3) and len(index) == 64 * 16
    assert arrays[12][..., 0].max() == 0                   # RGB = (zeros, DAPI, FITC)
    assert set(index["label"]) == {0, 1}
    per_well = arrays[12].reshape(64, 16, 12, 12, 3)[..., 1:]
    assert (per_well.max(axis=(1, 2, 3, 4)) >= 250).all()  # each image min-max scaled to 0..255
