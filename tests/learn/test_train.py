"""Training on CPU with small inputs: outputs, jobs of several folds, resume, devices, backends, learning."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from moaflow.learn import folds, train
from moaflow.learn.architectures import REGISTRY
from moaflow.learn.devices import DeviceError
from moaflow.learn.presets import hyperparameters

from tests.conftest import JOB, build_crop_store, flags, lab_table, needs_real_cells, small_training_store

QUICK = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "run_eagerly": True}
STORE_SIZES = [32, 64, 75]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return small_training_store(tmp_path_factory.mktemp("train"), STORE_SIZES, n_validation=1)


def _job(store, tmp_path, architecture, size, fold_names, hyper, **kwargs):
    crops, index_path, folds_path, _ = store
    return train.train_job(crops / f"{size}.npy", index_path, folds_path, fold_names, architecture=architecture,
                           weights=None, hyper=hyper, seed=kwargs.pop("seed", 0), models_dir=tmp_path / "models",
                           checkpoints_dir=tmp_path / "ck", dataset="bbbc021", init="random", log=lambda _: None,
                           **{**JOB, **kwargs})


@pytest.mark.parametrize("architecture", list(REGISTRY))
def test_each_architecture_trains_a_short_epoch(store, tmp_path, architecture):
    """Every registered architecture, at the smallest of the store's sizes it accepts: a new registry entry
    is tested here without a line of its own."""
    _, _, folds_path, index = store
    size = min(s for s in STORE_SIZES if s >= REGISTRY[architecture].min_input_size)
    fold = folds.read_folds(folds_path).iloc[0]
    _job(store, tmp_path, architecture, size, [fold["fold"]], hyperparameters("final", architecture, QUICK))
    out = tmp_path / "models" / fold["fold"]
    history = pd.read_csv(out / "history.tsv", sep="\t")
    assert list(history["epoch"]) == [1]
    assert {"loss", "accuracy", "val_loss", "test_loss", "test_accuracy", "images_per_second"} <= set(history.columns)
    for name in ("model.keras", "history.tsv", "test_predictions.parquet", "validation_predictions.parquet", "run.json"):
        assert (out / name).is_file(), name
    test = pd.read_parquet(out / "test_predictions.parquet")
    assert len(test) == (index["compound"] == fold["test_group"]).sum()
    assert {"plate", "well", "site", "source", "fold"} <= set(test.columns)   # traceable to the image
    probabilities = test.filter(regex="^p_").to_numpy()
    assert probabilities.shape[1] == index["moa"].nunique() and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    validation = pd.read_parquet(out / "validation_predictions.parquet")
    assert set(validation["compound"]) == set(fold["validation_groups"].split(";"))
    assert not (tmp_path / "ck" / fold["fold"]).exists()   # the checkpoint is cleared once outputs exist


def test_run_json_records_backend_devices_and_precision(store, tmp_path):
    fold = folds.read_folds(store[2]).iloc[0]["fold"]
    _job(store, tmp_path, "lab_cnn", 64, [fold], hyperparameters("lab", "lab_cnn", QUICK))
    run = json.loads((tmp_path / "models" / fold / "run.json").read_text())
    assert run["backend"] == "tensorflow" and run["keras_version"]
    assert run["devices"] and all({"kind", "name"} <= set(d) for d in run["devices"])
    assert run["dtype_policy"] == "float32" and run["batch_size"] == 4 and run["images_per_second"] > 0
    assert run["started_at"] <= run["finished_at"] and run["fingerprint"]


def test_a_gpu_job_without_a_gpu_stops_with_the_install_hint(store, tmp_path):
    fold = folds.read_folds(store[2]).iloc[0]["fold"]
    hyper = hyperparameters("lab", "lab_cnn", QUICK)
    with pytest.raises(DeviceError, match=r"asked for 1 GPU.*sees none.*moaflow\[tensorflow-cuda\].*allow_cpu"):
        _job(store, tmp_path, "lab_cnn", 64, [fold], hyper, gpus=1, allow_cpu=False)
    assert not (tmp_path / "models").exists()
    _job(store, tmp_path, "lab_cnn", 64, [fold], hyper, gpus=1, allow_cpu=True)   # on purpose: allowed
    assert json.loads((tmp_path / "models" / fold / "run.json").read_text())["gpus_visible"] == 0


def test_folds_trained_in_one_job_equal_folds_trained_alone(store, tmp_path):
    """Start-up paid once must not change results: a fold's model restarts from the same state, its weights,
    optimizer, augmentation and BatchNorm's moving statistics (EfficientNet-Lite0 has BatchNorm; the lab
    CNN, which has none, would not show a statistic carried over)."""
    names = list(folds.read_folds(store[2])["fold"][:2])
    hyper = hyperparameters("lab", "efficientnet_lite0", {"epochs": 2, "batch_size": 4, "augmentation": True,
                                                          "steps_per_epoch": 2, "run_eagerly": True})
    _job(store, tmp_path / "together", "efficientnet_lite0", 32, names, hyper)
    _job(store, tmp_path / "alone", "efficientnet_lite0", 32, [names[1]], hyper)
    together = pd.read_parquet(tmp_path / "together" / "models" / names[1] / "test_predictions.parquet")
    alone = pd.read_parquet(tmp_path / "alone" / "models" / names[1] / "test_predictions.parquet")
    columns = [c for c in together if c.startswith("p_")]
    assert np.allclose(together[columns], alone[columns], atol=1e-5)


def test_a_rerun_keeps_finished_folds_and_redoes_changed_ones(store, tmp_path):
    fold = folds.read_folds(store[2]).iloc[0]["fold"]
    hyper = hyperparameters("lab", "lab_cnn", QUICK)
    _job(store, tmp_path, "lab_cnn", 64, [fold], hyper)
    mtime = (tmp_path / "models" / fold / "model.keras").stat().st_mtime_ns
    summary = _job(store, tmp_path, "lab_cnn", 64, [fold], hyper)
    assert summary["folds"][fold]["kept"] and (tmp_path / "models" / fold / "model.keras").stat().st_mtime_ns == mtime
    changed = _job(store, tmp_path, "lab_cnn", 64, [fold], {**hyper, "learning_rate": 0.01})
    assert not changed["folds"][fold]["kept"]


def test_a_rerun_retrains_when_the_data_or_the_training_code_changed(store, tmp_path, monkeypatch):
    """The fingerprint's data part (the crop store's content, not its file's age) and code part
    (TRAINING_CODE_VERSION)."""
    crops, index_path, folds_path, _ = store
    fold = folds.read_folds(folds_path).iloc[0]["fold"]
    copied = tmp_path / "64.npy"
    copied.write_bytes((crops / "64.npy").read_bytes())
    hyper = hyperparameters("lab", "lab_cnn", QUICK)

    def rerun():
        return train.train_job(copied, index_path, folds_path, [fold], architecture="lab_cnn", weights=None,
                               hyper=hyper, seed=0, models_dir=tmp_path / "models", checkpoints_dir=tmp_path / "ck",
                               dataset="bbbc021", init="random", log=lambda _: None, **JOB)["folds"][fold]["kept"]

    assert rerun() is False and rerun() is True
    # the same crops written again (a gather after one plate's crops were redone): a new file, the same folds
    np.save(copied, np.load(copied))
    assert rerun() is True
    data = np.load(copied)
    data[0] = 255 - data[0]                 # one crop changed, same size
    np.save(copied, data)
    assert rerun() is False and rerun() is True
    monkeypatch.setattr(train, "TRAINING_CODE_VERSION", train.TRAINING_CODE_VERSION + 1)
    assert rerun() is False


def test_the_saved_model_loads_in_plain_keras_without_optimizer_state(store, tmp_path):
    crops, _, folds_path, _ = store
    fold = folds.read_folds(folds_path).iloc[0]["fold"]
    _job(store, tmp_path, "lab_cnn", 64, [fold], hyperparameters("final", "lab_cnn", QUICK))
    path = tmp_path / "models" / fold / "model.keras"
    script = ("import sys, numpy as np, keras; m = keras.models.load_model(sys.argv[1]); "
              "x = np.load(sys.argv[2], mmap_mode='r')[:3]; print(getattr(m, 'optimizer', None) is None, m.input.dtype); "
              "np.save(sys.argv[3], m.predict(np.asarray(x), verbose=0))")
    result = subprocess.run([sys.executable, "-c", script, str(path), str(crops / "64.npy"), str(tmp_path / "p.npy")],
                            capture_output=True, text=True)   # a fresh interpreter: moaflow is never imported
    assert result.returncode == 0, result.stderr[-2000:]
    assert "moaflow" not in result.stderr and result.stdout.split()[:2] == ["True", "uint8"]
    from moaflow.learn.models import load_model

    model = load_model(path)
    assert np.allclose(np.load(tmp_path / "p.npy"), model.predict(np.load(crops / "64.npy")[:3], verbose=0), atol=1e-6)
    weights = sum(np.prod(v.shape) for v in model.weights)
    assert path.stat().st_size < 1.3 * 4 * weights      # weights only, no optimizer slots


def _train_command(store, tmp_path, architecture="lab_cnn", size=64, **hyper):
    """``moaflow train`` of the second fold, checkpointing after every epoch."""
    crops, index_path, folds_path, _ = store
    fold = folds.read_folds(folds_path).iloc[1]["fold"]
    options = flags(store=crops / f"{size}.npy", index=index_path, folds=folds_path, fold_names=[fold],
                    architecture=architecture, weights="none", hyper=hyperparameters("lab", architecture, hyper),
                    seed=0, models_dir=tmp_path / "models", checkpoints_dir=tmp_path / "ck",
                    **{**JOB, "checkpoint_minutes": 0})
    return [sys.executable, "-m", "moaflow", "train", *options], fold


def _predictions(folder):
    table = pd.read_parquet(folder / "test_predictions.parquet")
    return table[[c for c in table.columns if c.startswith("p_")]].to_numpy()


# efficientnet_lite0 has BatchNorm (moving statistics that must survive the checkpoint), the lab CNN none.
@pytest.mark.parametrize(("architecture", "size"), [("efficientnet_lite0", 32)])
def test_killed_after_epoch_one_resumes_with_the_full_history(store, tmp_path, architecture, size):
    """Killed between epochs and rerun, a fold ends as an uninterrupted run of the same seed ends: the same
    history rows and the same held-out predictions."""
    command, fold = _train_command(store, tmp_path, architecture, size, epochs=3, batch_size=2, steps_per_epoch=2, run_eagerly=True)
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    state = tmp_path / "ck" / fold / "state.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["epochs_done"] >= 1:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.loads(state.read_text())["epochs_done"]
    assert 1 <= done < 3, "the kill must land between epochs 1 and 3"
    assert not (tmp_path / "models" / fold / "run.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from the checkpoint after epoch {done}" in resumed.stderr
    history = pd.read_csv(tmp_path / "models" / fold / "history.tsv", sep="\t")
    assert list(history["epoch"]) == [1, 2, 3]

    whole, _ = _train_command(store, tmp_path / "whole", architecture, size, epochs=3, batch_size=2, steps_per_epoch=2, run_eagerly=True)
    assert subprocess.run(whole, capture_output=True).returncode == 0
    uninterrupted = pd.read_csv(tmp_path / "whole" / "models" / fold / "history.tsv", sep="\t")
    assert np.allclose(history["loss"], uninterrupted["loss"], rtol=1e-5)
    assert np.allclose(_predictions(tmp_path / "models" / fold), _predictions(tmp_path / "whole" / "models" / fold),
                       atol=1e-5)


def test_same_seed_same_first_epoch_loss(store, tmp_path):
    fold = folds.read_folds(store[2]).iloc[0]["fold"]
    hyper = hyperparameters("lab", "lab_cnn", {"epochs": 1, "batch_size": 8})

    def loss(seed, name):
        _job(store, tmp_path / name, "lab_cnn", 64, [fold], hyper, seed=seed)
        return pd.read_csv(tmp_path / name / "models" / fold / "history.tsv", sep="\t")["loss"].iloc[0]

    first, second, other = loss(0, "a"), loss(0, "b"), loss(1, "c")
    assert first == pytest.approx(second, rel=1e-6)
    assert first != pytest.approx(other, rel=1e-4)


def test_model_selection_best_validation_restores_the_best_epoch(store, tmp_path):
    fold = folds.read_folds(store[2]).iloc[0]["fold"]
    hyper = hyperparameters("lab", "lab_cnn", {"epochs": 4, "batch_size": 4, "model_selection": "best_validation"})
    _job(store, tmp_path, "lab_cnn", 64, [fold], hyper)
    out = tmp_path / "models" / fold
    history = pd.read_csv(out / "history.tsv", sep="\t")
    best = int(history.loc[history["val_accuracy"].idxmax(), "epoch"])
    run = json.loads((out / "run.json").read_text())
    assert run["model_selection"].startswith(f"best_validation (epoch {best},")
    # the reported predictions are the best epoch's: their accuracy is that epoch's test accuracy
    assert run["test_accuracy"] == pytest.approx(history.loc[history["epoch"] == best, "test_accuracy"].item())


def test_model_selection_needs_validation_compounds(store, tmp_path):
    crops, index_path, _, index = store
    folds.write_folds(folds.leave_one_compound_out(index), tmp_path / "plain.tsv")
    hyper = hyperparameters("lab", "lab_cnn", {**QUICK, "model_selection": "best_validation"})
    with pytest.raises(ValueError, match="best_validation needs validation compounds"):
        train.train_job(crops / "64.npy", index_path, tmp_path / "plain.tsv", [folds.slug(index["compound"][0])],
                        architecture="lab_cnn", weights=None, hyper=hyper, seed=0, models_dir=tmp_path / "m",
                        checkpoints_dir=tmp_path / "c", log=lambda _: None, **JOB)


def test_model_selection_mean_last_averages_predictions(store, tmp_path):
    """The saved predictions of mean_last over epochs 1-2 equal the mean of the epoch-1 and the epoch-2
    predictions, each from its own run of the same seed stopped there (training is deterministic per seed)."""
    fold = folds.read_folds(store[2]).iloc[0]["fold"]

    def predictions(name, epochs, **selection):
        hyper = hyperparameters("lab", "lab_cnn", {"epochs": epochs, "batch_size": 4, **selection})
        _job(store, tmp_path / name, "lab_cnn", 64, [fold], hyper)
        table = pd.read_parquet(tmp_path / name / "models" / fold / "test_predictions.parquet")
        run = json.loads((tmp_path / name / "models" / fold / "run.json").read_text())
        return table[[c for c in table.columns if c.startswith("p_")]].to_numpy(), run

    first, _ = predictions("one", 1)
    second, _ = predictions("two", 2)
    averaged, run = predictions("mean", 2, model_selection="mean_last", selection_epochs=2)
    assert run["model_selection"] == "mean of epochs 1-2"
    assert not np.allclose(first, second, atol=1e-4)          # the two epochs' predictions differ
    assert np.allclose(averaged, (first + second) / 2, atol=1e-5)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_keras_backends_train_a_fold(store, tmp_path, backend):
    """The multi-backend claim: the same training code runs without TensorFlow's backend."""
    command, fold = _train_command(store, tmp_path, epochs=1, batch_size=4)
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, KERAS_BACKEND=backend))
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "models" / fold / "run.json").read_text())
    assert run["backend"] == backend and run["test_accuracy"] is not None


@pytest.mark.slow
def test_held_out_compounds_are_classified_well_above_chance(tmp_path):
    """Bar: mean held-out crop accuracy >= 0.5 over one fold per MoA, with 4 MoAs (chance 0.25).
    The lab CNN on the demo's stand-in (64 px), 15 epochs; measured about 0.85."""
    crops, index_path = build_crop_store(
        tmp_path, [64], n_plates=3, sites=3, dmso_wells=4,
        moas=["Actin disruptors", "DNA damage", "Eg5 inhibitors", "Microtubule stabilizers"],
        compounds_per_moa=2, concentrations_per_compound=2, shape=(256, 320), magnification=2.5, seed=2019)
    index = pd.read_parquet(index_path)
    folds.write_folds(folds.leave_one_compound_out(index), tmp_path / "folds.tsv")
    names = [folds.slug(c) for c in index.groupby("moa")["compound"].max()]
    hyper = hyperparameters("lab", "lab_cnn", {"epochs": 15, "batch_size": 16})
    summary = train.train_job(crops / "64.npy", index_path, tmp_path / "folds.tsv", names, architecture="lab_cnn",
                              weights=None, hyper=hyper, seed=0, models_dir=tmp_path / "models",
                              checkpoints_dir=tmp_path / "ck", log=lambda _: None, **JOB)
    accuracies = [summary["folds"][n]["test_accuracy"] for n in names]
    assert np.mean(accuracies) >= 0.5, accuracies


@needs_real_cells
@pytest.mark.slow
def test_real_cells_held_out_compounds_are_classified_above_chance(tmp_path):
    """Real BBBC021 crops (the course lab's subset, 6 MoAs, chance 1/6): the lab CNN as config/lab_subset.yaml
    trains it (augmentation, class weights, mean of the last 5 epochs), but at 64 px and 12 epochs, on three
    compounds of three MoAs, with seeds 0, 1 and 2. One seed is too noisy a bar (its three folds' mean ranged
    from 0.35 to 0.82 over seeds, epochs and batch orders): the bar is the mean over the seeds, >= 0.45;
    measured 0.82, 0.36 and 0.67 (mean 0.61; at 20 epochs 0.35, 0.55 and 0.76), about 80 s on 2 cores."""
    from moaflow.files import write_array, write_table
    from moaflow.preprocess.plates import preprocess_crops

    arrays, index = preprocess_crops(lab_table(), sizes=[64])
    write_array(arrays[64], tmp_path / "64.npy")
    write_table(index, tmp_path / "index.parquet")
    folds.write_folds(folds.dataset_folds(index, variant="loco", validation_compounds=0, seed=0, fraction=0.25),
                      tmp_path / "folds.tsv")
    names = ["az-a", "az-c", "simvastatin"]
    hyper = hyperparameters("lab", "lab_cnn", {"epochs": 12, "augmentation": True, "class_weights": True,
                                                     "model_selection": "mean_last", "selection_epochs": 5})
    accuracies = {}
    for seed in (0, 1, 2):
        summary = train.train_job(tmp_path / "64.npy", tmp_path / "index.parquet", tmp_path / "folds.tsv", names,
                                  architecture="lab_cnn", weights=None, hyper=hyper, seed=seed,
                                  models_dir=tmp_path / f"models-{seed}", checkpoints_dir=tmp_path / "ck",
                                  log=lambda _: None, **JOB)
        accuracies[seed] = float(np.mean([summary["folds"][n]["test_accuracy"] for n in names]))
    assert np.mean(list(accuracies.values())) >= 0.45, accuracies


def test_non_finite_predictions_stop_the_fold_by_name(store, tmp_path, monkeypatch):
    """A model giving NaN (diverged, or broken weights) must not pass as wrong answers (argmax of NaN is 0)."""
    from moaflow.learn import trainer

    real = trainer.predict

    def with_a_nan(*args, **kwargs):
        values = real(*args, **kwargs).copy()
        values[:1] = np.nan
        return values

    monkeypatch.setattr(trainer, "predict", with_a_nan)
    fold = folds.read_folds(store[2]).iloc[0]["fold"]
    with pytest.raises(train.TrainingError, match=f"fold {fold}: 1 of .* not finite"):
        _job(store, tmp_path, "lab_cnn", 64, [fold], hyperparameters("lab", "lab_cnn", QUICK))
    assert not (tmp_path / "models" / fold / "run.json").exists()


def test_a_frozen_body_trains_only_the_head_on_features_computed_once(store, tmp_path, monkeypatch):
    """``transfer: frozen`` without augmentation: the features of each crop are computed once per job and the
    head trains on them (FrozenFeatures); the same fold trained batch by batch through the whole frozen model
    gives the same predictions, and in both the body keeps its initial weights."""
    import keras

    from moaflow.learn import trainer
    from moaflow.learn.models import build_model, load_model

    fold = folds.read_folds(store[2]).iloc[0]["fold"]
    hyper = hyperparameters("lab", "lab_cnn", {"epochs": 3, "batch_size": 4, "transfer": "frozen"})
    assert trainer.trainer_for(hyper) is trainer.FrozenFeatures
    _job(store, tmp_path / "cached", "lab_cnn", 64, [fold], hyper)
    monkeypatch.setattr(trainer, "trainer_for", lambda _: trainer.Trainer)
    _job(store, tmp_path / "whole", "lab_cnn", 64, [fold], hyper)
    cached, whole = (pd.read_parquet(tmp_path / name / "models" / fold / "test_predictions.parquet")
                     for name in ("cached", "whole"))
    columns = [c for c in cached if c.startswith("p_")]
    assert np.allclose(cached[columns], whole[columns], atol=1e-5)
    keras.utils.set_random_seed(0)
    initial = build_model("lab_cnn", 64, len(columns), augmentation=False, transfer="frozen",
                          channel_order=hyper["channel_order"], input_scaling=hyper["input_scaling"])
    body = [w for layer in initial.layers[:-2] for w in layer.get_weights()]   # all but normalisation and head
    for name in ("cached", "whole"):
        saved = load_model(tmp_path / name / "models" / fold / "model.keras")
        trained_body = [w for layer in saved.layers[:-2] for w in layer.get_weights()]
        assert all(np.array_equal(a, b) for a, b in zip(body, trained_body)), name
        assert not np.array_equal(saved.layers[-1].get_weights()[0], initial.layers[-1].get_weights()[0])


@needs_real_cells
@pytest.mark.slow
def test_real_cells_imagenet_features_beat_random_ones(tmp_path):
    """The study's claim on real cells, and the check that pretrained weights get the input they were trained on:
    EfficientNet-Lite0's ImageNet features (the packaged weights converted; RGB = the stored channels, scaled
    as (x - 127) / 128) classify held-out compounds far better than the same network's random ones, each a
    frozen body with a trained head (preset imagenet_features), on four compounds of four MoAs at 128 px.
    Bar: ImageNet >= 0.6 of held-out crops and >= 0.25 above random."""
    from moaflow.datasets.packaged import convert_weights
    from moaflow.files import write_array, write_table
    from moaflow.preprocess.plates import preprocess_crops

    arrays, index = preprocess_crops(lab_table(), sizes=[128])
    write_array(arrays[128], tmp_path / "128.npy")
    write_table(index, tmp_path / "index.parquet")
    folds.write_folds(folds.dataset_folds(index, variant="loco", validation_compounds=0, seed=0, fraction=0.25),
                      tmp_path / "folds.tsv")
    convert_weights("efficientnet_lite0", tmp_path / "lite0.h5", log=lambda _: None)
    names = ["az-a", "emetine", "mevinolin-lovastatin", "mitoxantrone"]
    hyper = hyperparameters("imagenet_features", "efficientnet_lite0")
    accuracy = {}
    for init, weights in (("imagenet", str(tmp_path / "lite0.h5")), ("random", None)):
        summary = train.train_job(tmp_path / "128.npy", tmp_path / "index.parquet", tmp_path / "folds.tsv", names,
                                  architecture="efficientnet_lite0", weights=weights, hyper=hyper, seed=0,
                                  models_dir=tmp_path / init, checkpoints_dir=tmp_path / "ck", log=lambda _: None,
                                  **JOB)
        accuracy[init] = np.mean([summary["folds"][n]["test_accuracy"] for n in names])
    assert accuracy["imagenet"] >= 0.6 and accuracy["imagenet"] >= accuracy["random"] + 0.25, accuracy
