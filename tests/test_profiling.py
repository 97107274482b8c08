"""NSC / NSCB nearest-neighbour scores on hand-made profiles, and fold-correct embeddings."""

import numpy as np
import pandas as pd
import pytest

from moaflow import folds, profiling

from .conftest import build_crop_store


def _profiles(rows):
    """rows: (compound, concentration, moa, batches, features...)"""
    width = len(rows[0]) - 4
    return pd.DataFrame(rows, columns=["compound", "concentration", "moa", "batches",
                                       *[f"f_{i}" for i in range(width)]])


def test_a_batch_effect_fools_nsc_but_not_nscb():
    """Treatments look like their batch more than their MoA: NSC follows the batch, NSCB must look across."""
    profiles = _profiles([
        ("a1", 1.0, "A", "W1", 1.0, 0.0, 5.0), ("b1", 1.0, "B", "W1", 0.0, 1.0, 5.0),   # batch W1: big shared axis
        ("a2", 1.0, "A", "W2", 1.0, 0.0, -5.0), ("b2", 1.0, "B", "W2", 0.0, 1.0, -5.0),  # batch W2
    ])
    nsc, _ = profiling.nearest_neighbour_moa(profiles, not_same_batch=False)
    nscb, counts = profiling.nearest_neighbour_moa(profiles, not_same_batch=True)
    assert nsc["correct"].mean() == 0.0        # a1's nearest other compound is b1 (same batch, other MoA)
    assert nscb["correct"].mean() == 1.0 and counts["scored"] == 4


def test_nscb_can_be_worse_than_nsc():
    """The reverse: the only same-MoA neighbour shares the batch, so NSCB finds only other MoAs."""
    profiles = _profiles([
        ("a1", 1.0, "A", "W1", 1.0, 0.0), ("a2", 1.0, "A", "W1", 0.9, 0.1),
        ("a3", 1.0, "A", "W2", 0.0, 1.0), ("b1", 1.0, "B", "W2", 0.2, 0.8), ("b2", 1.0, "B", "W1", 0.1, 0.9),
    ])
    nsc, _ = profiling.nearest_neighbour_moa(profiles, not_same_batch=False)
    nscb, _ = profiling.nearest_neighbour_moa(profiles, not_same_batch=True)
    assert nsc.set_index("compound").loc["a1", "correct"] and not nscb.set_index("compound").loc["a1", "correct"]


def test_the_same_compound_is_never_a_neighbour():
    profiles = _profiles([("x", 1.0, "A", "W1", 1.0, 0.0), ("x", 3.0, "A", "W2", 1.0, 0.01),
                          ("y", 1.0, "B", "W3", 0.0, 1.0), ("z", 1.0, "A", "W4", 0.5, 0.5)])
    matches, _ = profiling.nearest_neighbour_moa(profiles, not_same_batch=False)
    assert not any(m.neighbour.startswith(m.compound + " ") for m in matches.itertuples())


def test_the_same_batch_is_never_a_neighbour_under_nscb_and_single_batch_moas_are_left_out():
    profiles = _profiles([("a1", 1.0, "A", "W1", 1.0, 0.0), ("a2", 1.0, "A", "W2", 1.0, 0.0),
                          ("b1", 1.0, "B", "W1", 0.0, 1.0), ("b2", 1.0, "B", "W1;W3", 0.0, 1.0),
                          ("c1", 1.0, "C", "W2", 0.5, 0.5), ("c2", 1.0, "C", "W2", 0.5, 0.4)])
    matches, counts = profiling.nearest_neighbour_moa(profiles, not_same_batch=True)
    assert counts["left_out_moas"] == ["C"]                     # C only in W2: no admissible same-MoA neighbour
    batches = profiles.set_index("compound")["batches"].map(lambda b: set(b.split(";")))
    for m in matches.itertuples():
        assert not batches[m.compound] & batches[m.neighbour.split()[0]]
        assert m.neighbour_moa != "C"


def test_profiles_average_wells_then_treatments():
    crops = pd.DataFrame({"compound": ["x"] * 4, "concentration": [1.0] * 4, "moa": ["A"] * 4,
                          "batch": ["W1"] * 4, "plate": ["p1", "p1", "p1", "p2"], "well": ["B02"] * 4,
                          "f_0": [0.0, 0.0, 3.0, 10.0]})
    profile = profiling.treatment_profiles(crops)
    assert profile["f_0"].item() == pytest.approx((1.0 + 10.0) / 2)   # wells (1, 10), not crops (3.25)


def test_every_query_is_embedded_by_the_fold_that_held_it_out(tmp_path):
    """Checked from the fold assignment: a crop's features come from the model of the fold whose test
    compound it is (recomputed from that fold's saved model), a model that never trained on it."""
    from moaflow import study, train
    from moaflow.models import embedding_model, load_model

    crops, index_path = build_crop_store(
        tmp_path, [64], n_plates=2, sites=1, dmso_wells=2, moas=["Eg5 inhibitors", "DNA damage"],
        compounds_per_moa=2, concentrations_per_compound=1, shape=(96, 120), magnification=2.0, seed=5)
    index = pd.read_parquet(index_path)
    table = folds.leave_one_compound_out(index)
    folds.write_folds(table, tmp_path / "folds.tsv")
    names = list(table["fold"][:2])
    train.train_job(crops / "64.npy", index_path, tmp_path / "folds.tsv", names, architecture="lab_cnn", weights=None,
                    hyper=study.hyperparameters("lab", "lab_cnn", {"epochs": 1, "batch_size": 8}), seed=0,
                    models_dir=tmp_path / "models", checkpoints_dir=tmp_path / "ck", log=lambda _: None)
    embedded = profiling.fold_embeddings(tmp_path / "models", table.head(2), log=lambda _: None)
    store = np.load(crops / "64.npy")
    for fold in names:
        row = table.set_index("fold").loc[fold]
        mine = embedded[embedded["fold"] == fold]
        assert set(mine["compound"]) == {row["test_group"]}                     # the fold that held it out
        trained_on = set(index.iloc[folds.split(index, {**row.to_dict(), "fold": fold})["train"]]["crop_id"])
        assert not set(mine["crop_id"]) & trained_on                          # never trained on it
        model = embedding_model(load_model(tmp_path / "models" / fold / "model.keras"))
        again = model.predict(store[mine["crop_id"].to_numpy()[:3]], verbose=0)
        assert np.allclose(mine[profiling.feature_columns(mine)].to_numpy()[:3], again, atol=1e-4)
