import pandas as pd
import pytest

from moaflow.datasets.tables import MetadataError, bbbc014_image_table, bbbc021_image_table
from moaflow.files import write_table

from tests.conftest import REFERENCE, lab_table, needs_real_cells

IMAGE_CSV = REFERENCE / "bbbc021" / "BBBC021_v1_image.csv"
MOA_CSV = REFERENCE / "bbbc021" / "BBBC021_v1_moa.csv"

# Per-MoA (compounds, treatments, wells, fields) on the real metadata, from the reference.
REAL_COUNTS = {
    "Actin disruptors": (3, 5, 15, 60), "Aurora kinase inhibitors": (3, 12, 36, 144),
    "Cholesterol-lowering": (2, 6, 18, 72), "DNA damage": (4, 9, 27, 108),
    "DNA replication": (4, 8, 24, 96), "Eg5 inhibitors": (2, 12, 36, 144),
    "Epithelial": (3, 8, 22, 88), "Kinase inhibitors": (3, 5, 10, 40),
    "Microtubule destabilizers": (4, 14, 42, 168), "Microtubule stabilizers": (3, 9, 27, 108),
    "Protein degradation": (4, 7, 21, 84), "Protein synthesis": (3, 8, 24, 96),
}


@pytest.fixture(scope="module")
def real_table():
    return bbbc021_image_table(IMAGE_CSV, MOA_CSV, "results/bbbc021/images", taxol_rule=True)


def test_real_metadata_gives_the_studys_selection(real_table):
    annotated = real_table[~real_table["is_dmso"]]
    assert len(annotated) == 1208
    assert annotated["compound"].nunique() == 38
    assert annotated["treatment"].nunique() == 103
    assert annotated["moa"].nunique() == 12
    assert int(real_table["is_dmso"].sum()) == 1320  # 24 DMSO fields on each of 55 plates


def test_real_metadata_per_moa_counts(real_table):
    annotated = real_table[~real_table["is_dmso"]]
    for moa, (compounds, treatments, wells, fields) in REAL_COUNTS.items():
        rows = annotated[annotated["moa"] == moa]
        assert (rows["compound"].nunique(), rows["treatment"].nunique(),
                len(rows[["plate", "well"]].drop_duplicates()), len(rows)) == (compounds, treatments, wells, fields), moa


def test_taxol_rule(real_table):
    taxol = real_table[real_table["compound"] == "taxol"]
    assert set(taxol["batch"]) == {"Week1"}
    assert taxol["well"].str.contains("D0").all()
    assert set(taxol["concentration"]) == {0.3, 1.0, 3.0}
    without_rule = bbbc021_image_table(IMAGE_CSV, MOA_CSV, "x", taxol_rule=False)
    assert (without_rule["compound"] == "taxol").sum() > len(taxol)


def test_columns_and_paths(real_table):
    row = real_table[real_table["compound"] == "ALLN"].iloc[0]
    assert {"plate", "batch", "well", "site", "replicate", "compound", "concentration", "moa", "is_dmso",
            "path_dapi", "path_tubulin", "path_actin"} <= set(real_table.columns)
    assert row["path_dapi"].startswith(f"results/bbbc021/images/{row['plate']}/")
    assert "_w1" in row["path_dapi"] and "_w2" in row["path_tubulin"] and "_w4" in row["path_actin"]
    assert row["batch"] == row["plate"].split("_")[0]
    assert set(real_table["site"]) == {1, 2, 3, 4}


def test_plate_subset_and_unknown_plate(tmp_path):
    table = bbbc021_image_table(IMAGE_CSV, MOA_CSV, "x", plates=["Week1_22123"], taxol_rule=True)
    assert set(table["plate"]) == {"Week1_22123"}
    with pytest.raises(MetadataError, match="Week99_1"):
        bbbc021_image_table(IMAGE_CSV, MOA_CSV, "x", plates=["Week99_1"], taxol_rule=True)


def test_missing_column_is_named(tmp_path):
    broken = tmp_path / "image.csv"
    pd.read_csv(IMAGE_CSV, nrows=5).drop(columns=["Replicate"]).to_csv(broken, index=False)
    with pytest.raises(MetadataError, match=r"image.csv.*Replicate"):
        bbbc021_image_table(broken, MOA_CSV, "x", taxol_rule=True)


def test_bbbc014_table(tmp_path):
    from moaflow.devtools.standin import bbbc014_file_name

    for row in "ABCDEFGH":
        for column in range(1, 13):
            for channel in (1, 2):
                (tmp_path / bbbc014_file_name(channel, row, column)).touch()
    (tmp_path / ".snakemake_timestamp").touch()
    table = bbbc014_image_table(
        tmp_path, filename_regex=r"Channel (?P<channel>[12])-(?P<index>\d+)-(?P<row>[A-H])-(?P<column>\d+)-00\.Bmp",
        dapi_channel=2, cell_lines={"MCF7": list("ABCD"), "A549": list("EFGH")},
        positive_columns=[1, 2, 3, 4], negative_columns=[9, 10, 11, 12])
    assert len(table) == 96
    assert table.groupby(["cell_line", "label"]).size().to_dict() == {
        ("A549", -1): 16, ("A549", 0): 16, ("A549", 1): 16, ("MCF7", -1): 16, ("MCF7", 0): 16, ("MCF7", 1): 16}
    first = table.iloc[0]
    assert first["well"] == "A01" and first["path_dapi"].endswith("Channel 2-01-A-01-00.Bmp")


def test_write_table_is_atomic_and_roundtrips(tmp_path, real_table):
    write_table(real_table.head(10), tmp_path / "t.parquet")
    assert pd.read_parquet(tmp_path / "t.parquet").equals(real_table.head(10))
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_duplicate_fields_are_refused(tmp_path):
    """Before: duplicate rows in the image CSV became duplicate crops. After: an error naming plate/well/site."""
    frame = pd.read_csv(IMAGE_CSV, nrows=20)
    pd.concat([frame, frame.iloc[[3]]]).to_csv(tmp_path / "image.csv", index=False)
    with pytest.raises(MetadataError, match=r"image.csv: 2 rows share their .*plate, well and site"):
        bbbc021_image_table(tmp_path / "image.csv", MOA_CSV, "x", taxol_rule=True)


def test_duplicate_moa_keys_are_named(tmp_path):
    """Before: pandas' "Merge keys are not unique". After: the file and the duplicate treatment."""
    moa = pd.read_csv(MOA_CSV)
    pd.concat([moa, moa.iloc[[0]].assign(moa="Kinase inhibitors")]).to_csv(tmp_path / "moa.csv", index=False)
    with pytest.raises(MetadataError, match=r"moa.csv: 2 rows share their compound/_conc.*PP-2"):
        bbbc021_image_table(IMAGE_CSV, tmp_path / "moa.csv", "x", taxol_rule=True)


def test_empty_csv_is_named(tmp_path):
    """Before: "No columns to parse" with no file named."""
    (tmp_path / "image.csv").write_text("")
    with pytest.raises(MetadataError, match=r"image.csv: empty file"):
        bbbc021_image_table(tmp_path / "image.csv", MOA_CSV, "x", taxol_rule=True)


def test_unannotated_and_taxol_fields_are_counted_in_the_log():
    """The study drops fields without an MoA, and most taxol fields: said with a count, not in silence."""
    lines = []
    bbbc021_image_table(IMAGE_CSV, MOA_CSV, "x", log=lines.append, taxol_rule=True)
    unannotated = next(line for line in lines if "without an MoA" in line)
    assert "fields of" in unannotated and "not used" in unannotated
    images = pd.read_csv(IMAGE_CSV)
    moa = pd.read_csv(MOA_CSV)
    keys = set(zip(moa["compound"], moa["concentration"].round(6)))
    expected = sum((c, round(float(x), 6)) not in keys
                   for c, x in zip(images["Image_Metadata_Compound"], images["Image_Metadata_Concentration"]))
    assert unannotated.split(": ", 1)[1].startswith(f"{expected} fields")
    assert any("taxol fields" in line for line in lines)


# ----------------------------------------------------------------- crops datasets (real cells)

@needs_real_cells
def test_the_lab_subset_table_has_its_published_counts():
    table = lab_table()
    assert len(table) == 660 and table["compound"].nunique() == 18 and table["treatment"].nunique() == 55
    assert table["moa"].nunique() == 6 and table["field"].nunique() == 165
    assert table.groupby("field").size().eq(4).all()          # four crops per field
    assert set(table["batch"]) <= {f"Week{i}" for i in range(1, 11)}
    assert table["source"].str.endswith(".png").all()


def test_crops_table_errors_name_the_problem(tmp_path):
    from moaflow.datasets.tables import crops_table

    (tmp_path / "images").mkdir()
    pd.DataFrame({"compound": ["a"], "concentration": [1], "moa": ["m"], "plate": ["Week1_1"], "well": ["B02"],
                  "replicate": [1]}).to_csv(tmp_path / "meta.csv", index=False)
    columns = {k: k for k in ("compound", "concentration", "moa", "plate", "well", "replicate")}
    with pytest.raises(MetadataError, match=r"1 of 1 crop files are missing.*x_0.png"):
        crops_table(tmp_path / "images", tmp_path / "meta.csv", columns=columns, filename="x_{index}.png")
    with pytest.raises(MetadataError, match=r"cannot be filled.*'nope'"):
        crops_table(tmp_path / "images", tmp_path / "meta.csv", columns=columns, filename="{nope}.png")
    with pytest.raises(MetadataError, match=r"missing \['moa'\]"):
        crops_table(tmp_path / "images", tmp_path / "meta.csv", columns={k: v for k, v in columns.items()
                                                                         if k != "moa"}, filename="x.png")


def _real_plates(*plates):
    frame = pd.read_csv(IMAGE_CSV)
    return frame[frame["Image_Metadata_Plate_DAPI"].isin(plates)]


TWO_PLATES = ("Week1_22123", "Week1_22141")


def test_a_csv_cut_at_a_row_boundary_inside_a_well_is_refused(tmp_path):
    """Before: a CSV cut short by a server without Content-Length built a table, a plate then normalised on
    part of its DMSO fields. After: the short well is named."""
    frame = _real_plates(*TWO_PLATES)
    frame.iloc[:-2].to_csv(tmp_path / "image.csv", index=False)
    with pytest.raises(MetadataError, match=r"fewer fields than the 4 sites.*cut short"):
        bbbc021_image_table(tmp_path / "image.csv", MOA_CSV, "x", taxol_rule=True)


def test_a_plate_missing_dmso_wells_is_refused(tmp_path):
    frame = _real_plates(*TWO_PLATES)
    dmso = frame.index[(frame["Image_Metadata_Plate_DAPI"] == TWO_PLATES[1])
                       & (frame["Image_Metadata_Compound"] == "DMSO")]
    frame.drop(dmso[:8]).to_csv(tmp_path / "image.csv", index=False)    # two whole DMSO wells gone
    with pytest.raises(MetadataError, match=rf"{TWO_PLATES[1]}': 16.*fewer DMSO fields than the 24"):
        bbbc021_image_table(tmp_path / "image.csv", MOA_CSV, "x", taxol_rule=True)


def test_a_field_without_a_channel_file_name_is_refused(tmp_path):
    frame = _real_plates(*TWO_PLATES)
    frame.loc[frame.index[5], "Image_FileName_Actin"] = None
    frame.to_csv(tmp_path / "image.csv", index=False)
    with pytest.raises(MetadataError, match=r"1 field\(s\) have no Actin file name"):
        bbbc021_image_table(tmp_path / "image.csv", MOA_CSV, "x", taxol_rule=True)


@pytest.mark.parametrize(("column", "value"), [("Image_PathName_DAPI", "Week2/.."),
                                                ("Image_FileName_Tubulin", "../../etc/passwd")])
def test_a_metadata_path_outside_the_image_folder_is_refused_when_the_table_is_built(tmp_path, column, value):
    """Before: `Week2/..` was accepted and failed only at preprocessing. After: refused, naming the path."""
    frame = _real_plates(*TWO_PLATES)
    frame.loc[frame.index[frame["Image_Metadata_Compound"] == "DMSO"][0], column] = value
    frame.to_csv(tmp_path / "image.csv", index=False)
    with pytest.raises(MetadataError, match=r"outside the image folder"):
        bbbc021_image_table(tmp_path / "image.csv", MOA_CSV, tmp_path / "images", taxol_rule=True)


def test_two_real_plates_pass_the_completeness_checks(tmp_path):
    _real_plates(*TWO_PLATES).to_csv(tmp_path / "image.csv", index=False)
    table = bbbc021_image_table(tmp_path / "image.csv", MOA_CSV, "x", taxol_rule=True)
    assert table.groupby("plate")["is_dmso"].sum().to_dict() == {p: 24 for p in TWO_PLATES}
