"""Training on CPU with small inputs: outputs, resume after a kill, determinism, learning."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from moaflow import folds, train

from .conftest import build_crop_store

QUICK = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "run_eagerly": True}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    crops, index_path = build_crop_store(
        out, [32, 64, 75], n_plates=2, sites=1, dmso_wells=2, moas=["Eg5 inhibitors", "DNA damage"],
        compounds_per_moa=2, concentrations_per_compound=1, shape=(96, 120), magnification=2.0, seed=21)
    index = pd.read_parquet(index_path)
    folds.write_folds(folds.leave_one_compound_out(index, n_validation=1), out / "folds.tsv")
    return crops, index_path, out / "folds.tsv", index


@pytest.mark.parametrize("architecture, size", [("resnet50", 32), ("inception_v3", 75),
                                                ("inception_resnet_v2", 75), ("lab_cnn", 75)])
def test_each_architecture_trains_a_short_epoch(store, tmp_path, architecture, size):
    crops, index_path, folds_path, index = store
    fold = folds.read_folds(folds_path).iloc[0]
    hyper = train.hyperparameters("final", architecture, QUICK)
    history = train.train_fold(crops / f"{size}.npy", index_path, folds_path, fold["fold"], architecture=architecture,
                               weights=None, hyper=hyper, seed=0, out_dir=tmp_path / "out",
                               checkpoint_dir=tmp_path / "ck", dataset="bbbc021", init="random", log=lambda _: None)
    assert list(history["epoch"]) == [1]
    assert {"loss", "accuracy", "val_loss", "test_loss", "test_accuracy"} <= set(history.columns)
    for name in ("model.keras", "history.tsv", "test_predictions.parquet", "validation_predictions.parquet", "run.json"):
        assert (tmp_path / "out" / name).is_file(), name
    test = pd.read_parquet(tmp_path / "out" / "test_predictions.parquet")
    assert len(test) == (index["compound"] == fold["test_group"]).sum()
    probabilities = test.filter(regex="^p_").to_numpy()
    assert probabilities.shape[1] == index["moa"].nunique() and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    validation = pd.read_parquet(tmp_path / "out" / "validation_predictions.parquet")
    assert set(validation["compound"]) == set(fold["validation_groups"].split(";"))
    assert not (tmp_path / "ck").exists()   # the checkpoint is cleared once outputs exist


def _train_command(store, tmp_path, epochs):
    crops, index_path, folds_path, _ = store
    hyper = json.dumps({"epochs": epochs, "batch_size": 2, "run_eagerly": True})
    return [sys.executable, "-m", "moaflow", "train", "--store", str(crops / "64.npy"), "--index", str(index_path),
            "--folds", str(folds_path), "--fold", folds.read_folds(folds_path).iloc[1]["fold"],
            "--architecture", "lab_cnn", "--preset", "lab", "--hyperparameters", hyper,
            "--out-dir", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ck")]


def test_killed_after_epoch_one_resumes_with_the_full_history(store, tmp_path):
    command = _train_command(store, tmp_path, epochs=4)
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    state = tmp_path / "ck" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["epochs_done"] >= 1:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.loads(state.read_text())["epochs_done"]
    assert 1 <= done < 4, "the kill must land between epochs 1 and 4"
    assert not (tmp_path / "out" / "run.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from the checkpoint after epoch {done}" in resumed.stderr
    history = pd.read_csv(tmp_path / "out" / "history.tsv", sep="\t")
    assert list(history["epoch"]) == [1, 2, 3, 4]


def test_same_seed_same_first_epoch_loss(store, tmp_path):
    crops, index_path, folds_path, _ = store
    fold = folds.read_folds(folds_path).iloc[0]["fold"]
    hyper = train.hyperparameters("lab", "lab_cnn", {"epochs": 1, "batch_size": 8})

    def loss(seed, name):
        history = train.train_fold(crops / "64.npy", index_path, folds_path, fold, architecture="lab_cnn",
                                   weights=None, hyper=hyper, seed=seed, out_dir=tmp_path / name,
                                   checkpoint_dir=tmp_path / f"{name}-ck", log=lambda _: None)
        return history["loss"].iloc[0]

    first, second, other = loss(0, "a"), loss(0, "b"), loss(1, "c")
    assert first == pytest.approx(second, rel=1e-6)
    assert first != pytest.approx(other, rel=1e-4)


@pytest.mark.slow
def test_held_out_compounds_are_classified_well_above_chance(tmp_path):
    """Bar: mean held-out crop accuracy >= 0.5 over one fold per MoA, with 4 MoAs (chance 0.25).
    The lab CNN on the demo's stand-in (64 px), 15 epochs; measured about 0.85."""
    crops, index_path = build_crop_store(
        tmp_path, [64], n_plates=3, sites=3, dmso_wells=4,
        moas=["Actin disruptors", "DNA damage", "Eg5 inhibitors", "Microtubule stabilizers"],
        compounds_per_moa=2, concentrations_per_compound=2, shape=(256, 320), magnification=2.5, seed=2019)
    index = pd.read_parquet(index_path)
    table = folds.leave_one_compound_out(index)
    folds.write_folds(table, tmp_path / "folds.tsv")
    one_per_moa = index.groupby("moa")["compound"].max()
    hyper = train.hyperparameters("lab", "lab_cnn", {"epochs": 15, "batch_size": 16})
    accuracies = []
    for compound in one_per_moa:
        fold = folds.slug(compound)
        train.train_fold(crops / "64.npy", index_path, tmp_path / "folds.tsv", fold, architecture="lab_cnn",
                         weights=None, hyper=hyper, seed=0, out_dir=tmp_path / fold,
                         checkpoint_dir=tmp_path / f"{fold}-ck", log=lambda _: None)
        accuracies.append(json.loads((tmp_path / fold / "run.json").read_text())["test_accuracy"])
    assert np.mean(accuracies) >= 0.5, accuracies


def test_class_per_folder_dataset_trains_the_lab_cnn(store, tmp_path):
    from PIL import Image

    from moaflow.datasets import folder_dataset

    crops, index_path, _, index = store
    images = np.load(crops / "75.npy")
    for row in index.itertuples():
        folder = tmp_path / "data" / row.moa
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[row.crop_id]).save(folder / f"{row.crop_id}.png")
    loaded, labels, classes, validation = folder_dataset(tmp_path / "data", 64, validation_fraction=0.25, seed=3)
    assert classes == sorted(index["moa"].unique()) and loaded.shape == (len(index), 64, 64, 3)
    for label in range(len(classes)):                       # stratified, about 25 % of each class
        members = np.flatnonzero(labels == label)
        assert abs(np.isin(members, validation).sum() - 0.25 * len(members)) <= 1
    assert np.array_equal(validation, folder_dataset(tmp_path / "data", 64, seed=3)[3])   # seeded
    assert not np.array_equal(validation, folder_dataset(tmp_path / "data", 64, seed=4)[3])

    hyper = train.hyperparameters("lab", "lab_cnn", {"epochs": 2})
    history = train.train_folder(tmp_path / "data", architecture="lab_cnn", input_size=64, hyper=hyper,
                                 out_dir=tmp_path / "out", seed=3, log=lambda _: None)
    assert list(history["epoch"]) == [1, 2] and "val_accuracy" in history
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["n_validation"] == len(validation) and run["validation_accuracy"] is not None


def test_folder_dataset_needs_class_folders(tmp_path):
    from moaflow.datasets import folder_dataset

    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="one sub-folder per class"):
        folder_dataset(tmp_path, 64)
