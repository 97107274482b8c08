"""The rehearsal's stand-in: the Broad's own plate map, every study field rendered with its real name."""

import hashlib
import zipfile

import pytest
import yaml

from moaflow.devtools.rehearsal import study_fields, write_study_standin

from ..conftest import REFERENCE, REPO

IMAGE_CSV = REFERENCE / "bbbc021" / "BBBC021_v1_image.csv"
MOA_CSV = REFERENCE / "bbbc021" / "BBBC021_v1_moa.csv"
PLATE = "Week1_22123"


def test_the_study_reads_2528_fields_of_the_13200_on_55_plates():
    fields = study_fields(IMAGE_CSV, MOA_CSV)
    assert len(fields) == 2528
    assert (~fields["is_dmso"]).sum() == 1208 and fields["is_dmso"].sum() == 1320
    assert fields["plate"].nunique() == 55


@pytest.fixture(scope="module")
def one_plate(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    manifest = write_study_standin(out, REFERENCE / "bbbc021", shape=(32, 40), plates=[PLATE], processes=1,
                                   log=lambda _: None)
    return out, manifest


def test_a_plate_zip_holds_exactly_its_study_fields_with_the_csv_names(one_plate):
    out, manifest = one_plate
    fields = study_fields(IMAGE_CSV, MOA_CSV)
    fields = fields[fields["plate"] == PLATE]
    expected = {f"{PLATE}/{name}" for column in ("DAPI", "Tubulin", "Actin") for name in fields[column]}
    with zipfile.ZipFile(out / "www" / "BBBC021" / f"BBBC021_v1_images_{PLATE}.zip") as archive:
        members = {m for m in archive.namelist() if not m.endswith("/")}
    assert members == expected
    assert manifest["plates"] == [PLATE] and manifest["fields"] == len(fields)
    assert manifest["csv_fields"] == 13200


def test_the_served_metadata_are_the_broads_bytes_as_the_config_expects(one_plate):
    out, _ = one_plate
    published = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["bbbc021"]["published_files"]
    for name, facts in published.items():
        data = (out / "www" / "BBBC021" / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (facts["bytes"], facts["sha256"])


def test_a_fraction_of_plates_renders_the_same_fields_as_the_whole(one_plate, tmp_path):
    out, _ = one_plate
    write_study_standin(tmp_path, REFERENCE / "bbbc021", shape=(32, 40), plates=["Week10_40111", PLATE],
                        processes=1, log=lambda _: None)
    name = f"www/BBBC021/BBBC021_v1_images_{PLATE}.zip"
    with zipfile.ZipFile(out / name) as alone, zipfile.ZipFile(tmp_path / name) as among:
        assert {m: alone.read(m) for m in alone.namelist()} == {m: among.read(m) for m in among.namelist()}


def test_an_unknown_plate_is_named(tmp_path):
    with pytest.raises(ValueError, match="Week99_1"):
        write_study_standin(tmp_path, REFERENCE / "bbbc021", shape=(32, 40), plates=["Week99_1"],
                            log=lambda _: None)
