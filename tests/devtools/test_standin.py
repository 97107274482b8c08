import csv
import re
import zipfile

import numpy as np
import pytest
import tifffile

from moaflow.devtools import standin
from moaflow.datasets.tables import bbbc021_image_table

from tests.conftest import REFERENCE, TINY_BBBC021

REAL_NAME = re.compile(r"^[B-G](0[2-9]|1[01])_s\d_w[124][0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\.tif$")


def test_image_csv_has_the_real_schema(standin_dir):
    with open(standin_dir / "www" / "BBBC021" / "BBBC021_v1_image.csv") as fh:
        header = next(csv.reader(fh))
    with open(REFERENCE / "bbbc021" / "BBBC021_v1_image.csv") as fh:
        real_header = next(csv.reader(fh))
    assert header == real_header == standin.BBBC021_IMAGE_COLUMNS


def test_names_and_moas_are_real(standin_dir):
    with open(REFERENCE / "bbbc021" / "BBBC021_v1_moa.csv") as fh:
        real = {(r["compound"], float(r["concentration"]), r["moa"]) for r in csv.DictReader(fh)}
    for treatment in standin.select_treatments(TINY_BBBC021["moas"], 2, 1):
        assert (treatment["compound"], treatment["concentration"], treatment["moa"]) in real


def test_every_plate_is_a_zip_of_plate_folder_with_real_file_names(standin_dir):
    www = standin_dir / "www" / "BBBC021"
    with open(www / "BBBC021_v1_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    plates = sorted({r["Image_Metadata_Plate_DAPI"] for r in rows})
    assert len(plates) == TINY_BBBC021["n_plates"]
    for plate in plates:
        with zipfile.ZipFile(www / f"BBBC021_v1_images_{plate}.zip") as zf:
            names = zf.namelist()
        assert all(n.startswith(f"{plate}/") for n in names)
        assert all(REAL_NAME.match(n.split("/", 1)[1]) for n in names)
        plate_rows = [r for r in rows if r["Image_Metadata_Plate_DAPI"] == plate]
        assert {f"{plate}/{r[f'Image_FileName_{c}']}" for r in plate_rows for c in ("DAPI", "Tubulin", "Actin")} == set(names)
        # DMSO wells on every plate
        assert sum(r["Image_Metadata_Compound"] == "DMSO" for r in plate_rows) == \
            TINY_BBBC021["dmso_wells"] * TINY_BBBC021["sites"]


def test_tiffs_are_16_bit_with_the_requested_size(standin_dir):
    zpath = next((standin_dir / "www" / "BBBC021").glob("*.zip"))
    with zipfile.ZipFile(zpath) as zf:
        image = tifffile.imread(zf.open(zf.namelist()[0]))
    assert image.dtype == np.uint16 and image.shape == TINY_BBBC021["shape"]


def test_generator_is_deterministic(tmp_path):
    settings = dict(TINY_BBBC021, n_plates=1, sites=1)
    standin.write_bbbc021(tmp_path / "a", log=lambda _: None, **settings)
    standin.write_bbbc021(tmp_path / "b", log=lambda _: None, **settings)
    standin.write_bbbc021(tmp_path / "c", log=lambda _: None, **dict(settings, seed=8))
    assert standin.tree_digest(tmp_path / "a") == standin.tree_digest(tmp_path / "b")
    assert standin.tree_digest(tmp_path / "a") != standin.tree_digest(tmp_path / "c")


def test_illumination_truth_is_smooth_and_applied(standin_dir, tmp_path):
    manifest_plate = sorted((standin_dir / "truth" / "bbbc021").glob("illumination_*_DAPI.npy"))[0]
    field = np.load(manifest_plate)
    assert field.shape == TINY_BBBC021["shape"]
    assert 0.4 < field.min() < field.max() <= 1.0
    # smooth: neighbouring pixels differ by far less than the field's range
    assert np.abs(np.diff(field, axis=1)).max() < 0.05 * (field.max() - field.min()) + 1e-3


def test_morphology_depends_on_moa():
    """Per-channel mean intensity separates MoAs far beyond field-to-field noise."""
    rng = np.random.default_rng(0)

    def features(moa):
        fields = [standin.render_cells((128, 160), standin.phenotype(moa, 1.0, np.zeros(10)), rng) for _ in range(6)]
        return np.array([[f[c].mean() for c in range(3)] + [(f[0] > 0.3).mean()] for f in fields])

    a, b = features("Eg5 inhibitors"), features("Protein synthesis")
    separation = np.abs(a.mean(0) - b.mean(0)) / (a.std(0) + b.std(0) + 1e-9)
    assert separation.max() > 3


def test_table_of_standin_matches_its_layout(standin_dir):
    www = standin_dir / "www" / "BBBC021"
    table = bbbc021_image_table(www / "BBBC021_v1_image.csv", www / "BBBC021_v1_moa.csv", "images", taxol_rule=True)
    n_treatments = len(standin.select_treatments(TINY_BBBC021["moas"], 2, 1))
    assert (~table["is_dmso"]).sum() == n_treatments * TINY_BBBC021["n_plates"] * TINY_BBBC021["sites"]
    assert set(table.loc[~table["is_dmso"], "moa"]) == set(TINY_BBBC021["moas"])


def test_bbbc014_layout(standin_dir):
    with zipfile.ZipFile(standin_dir / "www" / "BBBC014" / "BBBC014_v1_images.zip") as zf:
        names = zf.namelist()
    assert len(names) == 192
    assert "BBBC014_v1_images/Channel 1-01-A-01-00.Bmp" in names
    assert "BBBC014_v1_images/Channel 2-96-H-12-00.Bmp" in names


def test_bbbc014_translocation_rises_with_concentration():
    fractions = [standin.translocation_fraction(c) for c in range(1, 13)]
    assert all(a > b for a, b in zip(fractions, fractions[1:]))  # column 1 is the highest dose
    assert fractions[0] > 0.8 and fractions[-1] < 0.2


@pytest.mark.parametrize("shape", [(100, 100), (0, 0)])
def test_bad_shape_is_named(tmp_path, shape):
    with pytest.raises(ValueError, match="4:5"):
        standin.write_bbbc021(tmp_path, shape=shape, log=lambda _: None)


def test_a_port_already_served_is_named_with_the_setting_that_moves_it(tmp_path):
    """Two stand-ins on one port (a rehearsal while another serves): a clear error, not a socket traceback."""
    from moaflow.devtools.serve import StandinServer
    from moaflow.errors import MoaflowError

    with StandinServer(tmp_path, 0) as first:
        with pytest.raises(MoaflowError, match=rf"127\.0\.0\.1:{first.port} .*standin\.port"):
            StandinServer(tmp_path, first.port)
