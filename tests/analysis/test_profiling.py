"""NSC / NSCB nearest-neighbour scores on hand-made profiles, and fold-correct embeddings."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moaflow import layout
from moaflow.analysis import profiling
from moaflow.files import write_json
from moaflow.learn import folds

from tests.conftest import DEFAULTS, JOB, build_crop_store, flags


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
    profile = profiling.treatment_profiles(crops, statistic="mean")
    assert profile["f_0"].item() == pytest.approx((1.0 + 10.0) / 2)   # wells (1, 10), not crops (3.25)


def test_every_query_is_embedded_by_the_fold_that_held_it_out(tmp_path):
    """Checked from the fold assignment: a crop's features come from the model of the fold whose test
    compound it is (recomputed from that fold's saved model), a model that never trained on it."""
    from moaflow.learn import train
    from moaflow.learn.models import embedding_model, load_model
    from moaflow.learn.presets import hyperparameters

    crops, index_path = build_crop_store(
        tmp_path, [64], controls=True, n_plates=2, sites=1, dmso_wells=2, moas=["Eg5 inhibitors", "DNA damage"],
        compounds_per_moa=2, concentrations_per_compound=1, shape=(96, 120), magnification=2.0, seed=5)
    index = pd.read_parquet(index_path)
    table = folds.leave_one_compound_out(index)
    folds.write_folds(table, tmp_path / "folds.tsv")
    names = list(table["fold"][:2])
    train.train_job(crops / "64.npy", index_path, tmp_path / "folds.tsv", names, architecture="lab_cnn", weights=None,
                    hyper=hyperparameters("lab", "lab_cnn", {"epochs": 1, "batch_size": 8}), seed=0,
                    models_dir=tmp_path / "models", checkpoints_dir=tmp_path / "ck", log=lambda _: None, **JOB)
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

    # The DMSO crops, embedded by the same fold's model: per-plate means and within-plate covariance.
    dmso_index = pd.read_parquet(tmp_path / "dmso" / "index.parquet")
    assert set(dmso_index["compound"]) == {"DMSO"} and set(dmso_index["plate"]) == set(index["plate"])
    dmso = np.load(tmp_path / "dmso" / "64.npy")
    output = tmp_path / "controls.json"
    profiling.control_embeddings(tmp_path / "models", table.head(2), dmso_index, dmso, output, log=lambda _: None)
    statistics = profiling.read_control_statistics(output)
    assert list(statistics) == names
    for fold in names:
        assert (tmp_path / "models" / fold / "dmso_statistics.npz").is_file()   # beside the model it came from
        features = embedding_model(load_model(tmp_path / "models" / fold / "model.keras")).predict(dmso, verbose=0)
        for k, plate in enumerate(statistics[fold]["plates"]):
            assert np.allclose(statistics[fold]["means"][k], features[(dmso_index["plate"] == plate).to_numpy()].mean(0),
                               atol=1e-4)
        factor = statistics[fold]["factor"]   # fewer DMSO crops than features: the covariance's factor
        assert np.allclose(factor.T @ factor, _pooled_within_plate_covariance(
            features, dmso_index["plate"].to_numpy()), rtol=1e-3, atol=1e-5)
    assert not np.allclose(statistics[names[0]]["means"], statistics[names[1]]["means"])   # two models, two spaces

    # Run again (Snakemake removes the output first: its inputs were rewritten with the same content, e.g. one
    # plate's crops redone and every training job keeping its folds): nothing is embedded again ...
    output.unlink()
    lines = []
    profiling.control_embeddings(tmp_path / "models", table.head(2), dmso_index, dmso, output, log=lines.append)
    assert all("kept (same model and crops)" in line for line in lines[:2]) and "0 embedded, 2 kept" in lines[2]
    resumed = profiling.read_control_statistics(output)
    for fold in names:
        for key in ("means", "factor"):
            assert np.array_equal(resumed[fold][key], statistics[fold][key])

    # ... but a fold trained again since is embedded again, and until then profiling refuses its old statistics.
    model = tmp_path / "models" / names[1] / "model.keras"
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=f"{names[1]}/dmso_statistics.npz: fold {names[1]}'s DMSO statistics now "
                                         f"come from another model"):
        profiling.read_control_statistics(output)
    lines.clear()
    profiling.control_embeddings(tmp_path / "models", table.head(2), dmso_index, dmso, output, log=lines.append)
    assert "kept" in lines[0] and "embedded" in lines[1] and "1 embedded, 1 kept" in lines[2], lines
    assert np.allclose(profiling.read_control_statistics(output)[names[1]]["means"], statistics[names[1]]["means"])

    # A job stopped after its first fold continues there; other crops are embedded anew, none kept.
    class Stopped(Exception):
        pass

    def stop_after_first_fold(line):
        if "fold 1/" in line:
            raise Stopped(line)

    output.unlink()
    with pytest.raises(Stopped):
        profiling.control_embeddings(tmp_path / "models", table.head(2), dmso_index, 255 - dmso, output,
                                     log=stop_after_first_fold)
    assert not output.exists()   # written last
    lines.clear()
    profiling.control_embeddings(tmp_path / "models", table.head(2), dmso_index, 255 - dmso, output, log=lines.append)
    assert "fold 1/2" in lines[0] and "kept" in lines[0], lines
    assert "fold 2/2" in lines[1] and "embedded" in lines[1] and "kept" not in lines[1], lines
    assert not np.allclose(profiling.read_control_statistics(output)[names[0]]["means"], statistics[names[0]]["means"])


def _write_controls(folder: Path, fold_statistics: dict[str, dict]) -> Path:
    """`control_embeddings`'s output for folds whose statistics are given: each beside a model file."""
    entries = []
    for fold, statistics in fold_statistics.items():
        model = folder / "models" / fold / "model.keras"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(b"model")
        fingerprint = profiling._control_fingerprint(model, "crops")
        profiling._write_fold_statistics(model.parent / "dmso_statistics.npz", statistics, fingerprint)
        entries.append({"fold": fold, "statistics": f"models/{fold}/dmso_statistics.npz", "fingerprint": fingerprint})
    write_json({"crops": "crops", "folds": entries}, folder / "controls.json")
    return folder / "controls.json"


def _crops(rows, plate, batch, fold="f1"):
    """Crop rows (compound, moa, features...) of one plate, one well per compound."""
    return pd.DataFrame([{"compound": c, "concentration": 1.0, "moa": m, "plate": plate, "batch": batch,
                          "well": f"w_{c}", "fold": fold, **{f"f_{i}": v for i, v in enumerate(x)}}
                         for c, m, *x in rows])


def test_dmso_centering_removes_a_plate_effect_that_fools_nsc():
    """Every crop of a plate, DMSO included, carries the plate's offset: treatments then look like their plate
    more than their MoA. Centred on their plate's DMSO, the MoA decides."""
    offsets = {"p1": np.array([0, 0, 5.0, 0]), "p2": np.array([0, 0, 0, 5.0])}
    signal = {"A": np.array([1.0, 0, 0, 0]), "B": np.array([0, 1.0, 0, 0])}
    crops = pd.concat([_crops([(f"{m.lower()}{plate[-1]}", m, *(signal[m] + offsets[plate])) for m in "AB"],
                              plate, batch=plate) for plate in offsets], ignore_index=True)
    rng = np.random.default_rng(0)
    dmso = np.concatenate([offsets[p] + rng.normal(0, 0.05, (50, 4)) for p in offsets])
    statistics = profiling.control_statistics(dmso, ["p1"] * 50 + ["p2"] * 50)
    raw = profiling.treatment_profiles(crops, statistic="mean")
    assert profiling.nearest_neighbour_moa(raw, not_same_batch=False)[0]["correct"].mean() == 0.0
    features = profiling.feature_columns(crops)
    centred = crops.assign(**dict(zip(features, profiling.center_on_controls(
        crops[features].to_numpy(), crops["plate"], statistics).T)))
    matches, _ = profiling.nearest_neighbour_moa(profiling.treatment_profiles(centred, statistic="mean"), not_same_batch=False)
    assert matches["correct"].mean() == 1.0


def test_sphering_discounts_what_varies_among_dmso_crops():
    """A direction along which DMSO crops vary a lot (say, cell density) dominates the centred distances;
    whitened with the DMSO covariance it counts for little and the MoA decides."""
    rng = np.random.default_rng(1)
    dmso = rng.normal(0, [0.1, 0.1, 10.0], (4000, 3))
    statistics = profiling.control_statistics(dmso, ["p1"] * 4000)
    crops = _crops([("a1", "A", 1, 0, 8), ("b1", "B", 0, 1, 8), ("a2", "A", 1, 0, -8), ("b2", "B", 0, 1, -8)],
                   "p1", batch="W1")
    features = profiling.feature_columns(crops)
    scores = {}
    for name in ("dmso_center", "dmso_sphere"):
        method = profiling.FEATURE_NORMALISATIONS[name]
        normalised = crops.assign(**dict(zip(features, method.controls(
            crops[features].to_numpy(), crops["plate"], statistics, 1e-6).T)))
        matches, _ = profiling.nearest_neighbour_moa(profiling.treatment_profiles(normalised, statistic="mean"), not_same_batch=False)
        scores[name] = matches["correct"].mean()
    assert scores == {"dmso_center": 0.0, "dmso_sphere": 1.0}


def test_sphered_controls_have_the_identity_covariance():
    rng = np.random.default_rng(2)
    dmso = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + np.repeat([[0.0] * 6, [3.0] * 6], 250, axis=0)
    plates = ["p1"] * 250 + ["p2"] * 250
    statistics = profiling.control_statistics(dmso, plates)
    assert np.allclose(statistics["means"][1] - statistics["means"][0], 3.0, atol=0.5)
    sphered = profiling.sphere_to_controls(dmso, plates, statistics, 0)
    assert np.allclose(sphered.T @ sphered / (500 - 2), np.eye(6), atol=1e-8)   # the plates' offsets gone too
    with pytest.raises(ValueError, match="sphering_regularisation"):
        profiling.sphering_matrix(np.diag([1.0, 0.0]), 0)


def _pooled_within_plate_covariance(features, plates):
    """Independently: each plate's sample covariance (numpy), weighted by its degrees of freedom."""
    names = sorted(set(plates))
    scatter = sum((np.sum(plates == p) - 1) * np.cov(features[plates == p].T.astype(np.float64)) for p in names)
    return scatter / (len(features) - len(names))


def test_sphering_at_the_default_regularisation_equals_an_independent_whitening():
    """moaflow's dmso_sphere at the configured regularisation (0.01 of the mean eigenvalue) against
    scipy's inverse square root of the regularised pooled within-plate covariance."""
    from scipy.linalg import fractional_matrix_power

    regularisation = DEFAULTS["profiling"]["sphering_regularisation"]
    assert regularisation == 0.01
    rng = np.random.default_rng(7)
    dmso = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + np.repeat([[0.0] * 5, [2.0] * 5], 150, axis=0)
    plates = np.array(["p1"] * 150 + ["p2"] * 150)
    statistics = profiling.control_statistics(dmso, plates)
    covariance = _pooled_within_plate_covariance(dmso, plates)
    assert np.allclose(statistics["covariance"], covariance)
    whitening = fractional_matrix_power(covariance + regularisation * np.trace(covariance) / 5 * np.eye(5), -0.5)
    queries = rng.normal(size=(20, 5)) + 2.0
    query_plates = np.array(["p1", "p2"] * 10)
    means = {p: dmso[plates == p].mean(0) for p in ("p1", "p2")}
    expected = (queries - np.stack([means[p] for p in query_plates])) @ whitening
    assert np.allclose(profiling.sphere_to_controls(queries, query_plates, statistics, regularisation),
                       expected.real, atol=1e-8)


def test_fewer_dmso_crops_than_features_keep_a_factor_that_spheres_exactly_as_the_covariance_would():
    """Five channels through ``per_channel`` give 5 x 1280 features from a few dozen DMSO crops: the covariance's
    factor (N x D) is kept instead of the D x D covariance, and spheres to the same result without an
    eigendecomposition of D x D."""
    from scipy.linalg import fractional_matrix_power

    rng = np.random.default_rng(3)
    dmso, plates = rng.normal(size=(12, 40)), np.array(["p1"] * 6 + ["p2"] * 6)
    statistics = profiling.control_statistics(dmso, plates)
    assert "covariance" not in statistics and statistics["factor"].shape == (12, 40)
    covariance = _pooled_within_plate_covariance(dmso, plates)
    assert np.allclose(statistics["factor"].T @ statistics["factor"], covariance)
    whitening = fractional_matrix_power(covariance + 0.01 * np.trace(covariance) / 40 * np.eye(40), -0.5).real
    queries, query_plates = rng.normal(size=(7, 40)), np.array(["p1", "p2", "p1", "p2", "p1", "p2", "p1"])
    means = {p: dmso[plates == p].mean(0) for p in ("p1", "p2")}
    expected = (queries - np.stack([means[p] for p in query_plates])) @ whitening
    assert np.allclose(profiling.sphere_to_controls(queries, query_plates, statistics, 0.01), expected, atol=1e-8)
    with pytest.raises(ValueError, match="sphering_regularisation > 0"):
        profiling.sphere_to_controls(queries, query_plates, statistics, 0)


def test_a_plate_without_dmso_crops_is_named():
    statistics = profiling.control_statistics(np.ones((3, 2)), ["p1"] * 3)
    with pytest.raises(ValueError, match="plate.*p2"):
        profiling.center_on_controls(np.ones((2, 2)), ["p1", "p2"], statistics)


def test_each_fold_is_normalised_to_its_own_models_dmso_crops(tmp_path):
    """Two folds' models map the same crops to spaces offset from each other; normalised to the DMSO crops
    as each fold's own model embedded them, the held-out crops' profiles agree across folds."""
    from moaflow.files import write_array, write_table

    shift = {"f1": np.array([0.0, 0.0, 0.0]), "f2": np.array([4.0, -3.0, 2.0])}
    folds_table = pd.DataFrame({"fold": ["f1", "f2"]})
    controls = {}
    rng = np.random.default_rng(3)
    base = {"a1": [1, 0, 0.2], "b1": [0, 1, 0.2], "a2": [1, 0.1, -0.2], "b2": [0.1, 1, -0.2]}
    for fold, held_out in (("f1", ["a1", "b1"]), ("f2", ["a2", "b2"])):
        crops = _crops([(c, c[0].upper(), *base[c]) for c in held_out], "p1", batch=f"W{fold[-1]}", fold=fold)
        (tmp_path / fold).mkdir()
        write_table(crops.drop(columns=profiling.feature_columns(crops) + ["fold"]),
                    tmp_path / fold / "test_predictions.parquet")
        write_array((crops[profiling.feature_columns(crops)].to_numpy() + shift[fold]).astype(np.float32),
                    tmp_path / fold / "test_embeddings.npy")
        controls[fold] = profiling.control_statistics(rng.normal(0, 0.3, (300, 3)) + shift[fold], ["p1"] * 300)
    embedded = profiling.fold_embeddings(tmp_path, folds_table, log=lambda _: None)
    raw = profiling.treatment_profiles(embedded, statistic="mean")
    assert profiling.nearest_neighbour_moa(raw, not_same_batch=True)[0]["correct"].mean() < 1.0
    statistics = profiling.read_control_statistics(_write_controls(tmp_path, controls))
    for name in ("dmso_center", "dmso_sphere"):
        normalised = profiling._normalised_to_controls(embedded, statistics, profiling.FEATURE_NORMALISATIONS[name],
                                                       0.01, name, log=lambda _: None)
        matches, _ = profiling.nearest_neighbour_moa(profiling.treatment_profiles(normalised, statistic="mean"),
                                                     not_same_batch=True)
        assert matches["correct"].mean() == 1.0, name


def test_the_command_line_names_what_dmso_normalisation_lacks(tmp_path, capsys):
    from moaflow.cli import main as moaflow

    options = dict(dataset="bbbc021", folds="f", index="i", stores={"lab_cnn": "s"}, networks=[["lab_cnn", "random"]],
                   out_dir=tmp_path, seed=0, statistic="mean", feature_normalisation="dmso_sphere",
                   sphering_regularisation=0.01, inputs={})
    assert moaflow(["profile", *flags(**options)]) == 1
    assert "needs the DMSO statistics of lab_cnn/random (controls) and the DMSO crops' index" in capsys.readouterr().err
    # the DMSO embedding job is a GPU job like training: asked for a GPU and seeing none, it stops at once
    status = moaflow(["embed-controls", *flags(models_dir="m", folds="f", index="i", store="s", gpus=1,
                                               allow_cpu=False, output=tmp_path / "c.npz")])
    assert status == 1 and "asked for 1 GPU(s)" in capsys.readouterr().err and not (tmp_path / "c.npz").exists()


def test_non_finite_features_are_refused_not_scored(tmp_path):
    from moaflow.files import write_array, write_table

    crops = _crops([("a1", "A", 1.0, 0.0), ("b1", "B", 0.0, np.nan)], "p1", batch="W1")
    fold_dir = Path(layout.fold_dir("bbbc021", "m", "random", 0, "f1", root=tmp_path))
    fold_dir.mkdir(parents=True)
    write_table(crops.drop(columns=["f_0", "f_1", "fold"]), fold_dir / "test_predictions.parquet")
    write_array(crops[["f_0", "f_1"]].to_numpy(np.float32), fold_dir / "test_embeddings.npy")
    pd.DataFrame({"fold": ["f1"], "test_group": ["a1"], "validation_groups": [""], "group_column": ["compound"],
                  "excluded_batches": [""]}).to_csv(tmp_path / "folds.tsv", sep="\t", index=False)
    write_table(crops.drop(columns=["f_0", "f_1", "fold"]), tmp_path / "index.parquet")
    with pytest.raises(ValueError, match="m/random: 1 of 2 crops have non-finite"):
        profiling.profile_dataset("bbbc021", tmp_path / "folds.tsv", tmp_path / "index.parquet", {}, [["m", "random"]],
                                  tmp_path / "out", seed=0, statistic="mean", feature_normalisation="none",
                                  sphering_regularisation=0.01, inputs={}, root=tmp_path, log=lambda _: None)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_reading_the_dmso_statistics_holds_one_copy_of_every_folds_covariance(tmp_path):
    import tracemalloc

    folds, plates, features = 20, 3, 300
    rng = np.random.default_rng(0)
    covariance = rng.random((folds, features, features), dtype=np.float32)
    path = _write_controls(tmp_path, {f"f{k}": {"plates": np.array(["p1", "p2", "p3"]),
                                                "means": rng.random((plates, features)), "covariance": covariance[k]}
                                      for k in range(folds)})
    tracemalloc.start()
    statistics = profiling.read_control_statistics(path)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert np.array_equal(statistics["f7"]["covariance"], covariance[7])
    # one copy of each fold's covariance, not one of all folds per fold (the full-count rehearsal's profiling
    # job was killed at 24 GB so: 38 x 0.64 GB)
    assert held < 2 * covariance.nbytes
