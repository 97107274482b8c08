import pandas as pd
import pytest

from moaflow.learn import folds
from moaflow.devtools import standin
from moaflow.datasets.tables import bbbc021_image_table

from tests.conftest import REFERENCE, REPO, lab_table, needs_real_cells


@pytest.fixture(scope="module")
def real_index():
    table = bbbc021_image_table(REFERENCE / "bbbc021" / "BBBC021_v1_image.csv",
                                REFERENCE / "bbbc021" / "BBBC021_v1_moa.csv", "x", taxol_rule=True)
    return table[~table["is_dmso"]].reset_index(drop=True)


def test_one_fold_per_compound_and_no_leak(real_index):
    table = folds.leave_one_compound_out(real_index)
    assert len(table) == 38 and sorted(table["test_group"]) == sorted(real_index["compound"].unique())
    for _, fold in table.iterrows():
        parts = folds.split(real_index, fold.to_dict())
        train = set(real_index.iloc[parts["train"]]["compound"])
        test = set(real_index.iloc[parts["test"]]["compound"])
        assert test == {fold["test_group"]} and not train & test
        assert len(parts["train"]) + len(parts["test"]) == len(real_index)   # no validation by default
    folds.check_folds(table, real_index)


def test_validation_compounds_are_training_compounds_and_stratified(real_index):
    table = folds.leave_one_compound_out(real_index, n_validation=3, seed=4)
    moa_of = real_index.groupby("compound")["moa"].first()
    for _, fold in table.iterrows():
        validation = fold["validation_groups"].split(";")
        assert len(validation) == 3 and fold["test_group"] not in validation
        assert len({moa_of[c] for c in validation}) == 3          # one per MoA (stratified)
        parts = folds.split(real_index, fold.to_dict())
        train_moas = set(real_index.iloc[parts["train"]]["moa"])
        assert len(train_moas) == 12                                # no MoA lost from training
        assert set(real_index.iloc[parts["validation"]]["compound"]) == set(validation)


def test_folds_are_stable_under_the_seed(real_index):
    a = folds.leave_one_compound_out(real_index, n_validation=2, seed=1)
    b = folds.leave_one_compound_out(real_index, n_validation=2, seed=1)
    c = folds.leave_one_compound_out(real_index, n_validation=2, seed=2)
    assert a.equals(b) and not a.equals(c)


def test_not_same_compound_or_batch(real_index):
    table = folds.leave_one_compound_out(real_index, variant="nscb")
    for _, fold in table.iterrows():
        parts = folds.split(real_index, fold.to_dict())
        test_batches = set(real_index.iloc[parts["test"]]["batch"])
        assert set(fold["excluded_batches"].split(";")) == test_batches
        assert not set(real_index.iloc[parts["train"]]["batch"]) & test_batches


def test_committed_real_folds_match_the_metadata(real_index):
    assert folds.read_folds(REPO / "config" / "folds" / "bbbc021.tsv").equals(
        folds.leave_one_compound_out(real_index))


def test_committed_demo_folds_match_the_demo_standin():
    import yaml

    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["standin"]["bbbc021"]
    treatments = standin.select_treatments(demo["moas"], demo["compounds_per_moa"], demo["concentrations_per_compound"])
    index = pd.DataFrame(treatments).assign(batch="Week1")
    committed = folds.read_folds(REPO / "config" / "folds" / "demo_bbbc021.tsv")
    assert committed.equals(folds.leave_one_compound_out(index, n_validation=1))


def test_check_folds_rejects_a_stale_file(real_index):
    table = folds.leave_one_compound_out(real_index).iloc[:-1]
    with pytest.raises(ValueError, match="exactly once"):
        folds.check_folds(table, real_index)


def test_cell_line_folds():
    index = pd.DataFrame({"cell_line": ["MCF7"] * 3 + ["A549"] * 2})
    table = folds.leave_one_cell_line_out(index)
    assert list(table["fold"]) == ["a549", "mcf7"]
    assert folds.split(index, table.iloc[0].to_dict())["train"].tolist() == [0, 1, 2]


def test_slug():
    assert folds.slug("mevinolin/lovastatin") == "mevinolin-lovastatin"
    assert folds.slug("proteasome inhibitor I") == "proteasome-inhibitor-i"


@needs_real_cells
def test_lab_subset_folds_leave_one_compound_out_and_a_split_grouped_by_field():
    table = lab_table()
    loco = folds.dataset_folds(table, variant="loco", validation_compounds=1, seed=0, fraction=0.25)
    assert len(loco) == 18
    folds.check_folds(loco, table)
    split = folds.dataset_folds(table, variant="random_field", fraction=0.25, seed=3, validation_compounds=0)
    folds.check_folds(split, table)
    parts = folds.split(table, split.iloc[0].to_dict())
    train_fields = set(table.iloc[parts["train"]]["field"])
    test_fields = set(table.iloc[parts["test"]]["field"])
    assert not train_fields & test_fields                    # no field on both sides
    assert abs(len(test_fields) - 0.25 * 165) <= 6 and len(parts["train"]) + len(parts["test"]) == 660
    assert set(table.iloc[parts["test"]]["moa"]) == set(table["moa"])   # stratified: every MoA held out
