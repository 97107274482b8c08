"""Folds packed in one compiled step (JAX) train as they train one by one, resume after a kill, reuse the
compiled programs of an earlier job, and other backends say they train one by one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moaflow.learn import train
from moaflow.learn.packed import packs
from moaflow.learn.presets import hyperparameters

from tests.conftest import JOB, flags, small_training_store
from tests.learn import small_networks

ROOT = Path(__file__).resolve().parents[2]
# Three folds whose training sets give 6, 6 and 5 batches of 3: the last fold sits out one step per epoch.
PACK = ["az-c", "az138", "chlorambucil"]
HYPER = {"epochs": 2, "batch_size": 3}
# float32 on a CPU: a packed (batched) convolution sums in another order than a single one.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
RUNNER = ("import sys; from tests.learn import small_networks; small_networks.register(); "
          "from moaflow.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    crops, index_path, folds_path, _ = small_training_store(out, [32], n_validation=1)
    return crops / "32.npy", index_path, folds_path, out


def _command(store, out: Path, pack_folds: int, **hyper) -> list[str]:
    """``moaflow train`` of the three folds with the small BatchNorm network on the JAX backend, the study's
    final preset (augmentation, class weights, SGD with momentum), a checkpoint after every epoch."""
    crops, index_path, folds_path, work = store
    small_networks.register()
    options = flags(store=crops, index=index_path, folds=folds_path, fold_names=PACK, architecture="bn_cnn",
                    weights="none", hyper=hyperparameters("final", "bn_cnn", {**HYPER, **hyper}), seed=0,
                    models_dir=out / "models", checkpoints_dir=out / "ck", receipt=out / "job.json",
                    pack_folds=pack_folds, compilation_cache=work / "compilation-cache",
                    **{**JOB, "checkpoint_minutes": 0})
    return [sys.executable, "-c", RUNNER, "train", *options]


def _run(command) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, KERAS_BACKEND="jax"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"log": result.stderr, "job": json.loads(Path(command[command.index("--receipt") + 1]).read_text())}


@pytest.fixture(scope="module")
def packed(store):
    """The three folds trained packed, uninterrupted (the first job: it fills the compilation cache)."""
    out = store[3] / "packed"
    return out, _run(_command(store, out, 3))


def _fold(out: Path, fold: str) -> dict:
    """A fold's outputs: history, held-out and validation probabilities, final weights, run record."""
    import keras

    folder = out / "models" / fold
    probabilities = {name: pd.read_parquet(folder / f"{name}_predictions.parquet").filter(regex="^p_").to_numpy()
                     for name in ("test", "validation")}
    model = keras.models.load_model(folder / "model.keras")
    return {"history": pd.read_csv(folder / "history.tsv", sep="\t"), **probabilities,
            "weights": model.get_weights(), "run": json.loads((folder / "run.json").read_text())}


def test_packs_are_as_even_as_possible():
    assert [len(p) for p in packs(list(range(10)), 4)] == [4, 3, 3]
    assert [len(p) for p in packs(list(range(8)), 4)] == [4, 4]
    assert packs([1], 16) == [[1]] and packs([], 4) == []
    with pytest.raises(ValueError, match="pack size 0"):
        packs([1, 2], 0)


def test_folds_trained_packed_equal_folds_trained_one_by_one(store, packed):
    """Per fold, the same per-epoch training losses and accuracies, final weights (BatchNorm statistics
    included) and held-out and validation predictions, within float32 tolerance."""
    packed_out, packed_job = packed
    alone_out = store[3] / "alone"
    _run(_command(store, alone_out, 1))
    assert "3 folds packed in one compiled step" in packed_job["log"]
    results = {}
    for fold in PACK:
        a, b = _fold(packed_out, fold), _fold(alone_out, fold)
        assert a["run"]["packed_folds"] == 3 and b["run"]["packed_folds"] == 1
        assert list(a["history"]["epoch"]) == list(b["history"]["epoch"]) == [1, 2]
        for column in ("loss", "accuracy", "val_loss", "test_loss"):
            assert np.allclose(a["history"][column], b["history"][column], **TOLERANCE), (fold, column)
        for name in ("test", "validation"):
            assert np.allclose(a[name], b[name], **TOLERANCE), (fold, name)
        assert len(a["weights"]) == len(b["weights"])
        for x, y in zip(a["weights"], b["weights"]):
            assert np.allclose(x, y, **TOLERANCE), fold
        results[fold] = a
    # Each fold trained on its own: their weights (and BatchNorm statistics) differ from each other's.
    first, second = results[PACK[0]]["weights"], results[PACK[1]]["weights"]
    assert any(not np.allclose(x, y, atol=1e-4) for x, y in zip(first, second))


def test_a_killed_packed_job_resumes_to_the_uninterrupted_result(store, packed):
    """Killed during its second epoch and rerun, a packed job resumes every fold from its checkpoint and ends
    as the uninterrupted packed job ended; the rerun compiles nothing (the earlier jobs' programs are loaded)."""
    packed_out, _ = packed
    out = store[3] / "killed"
    command = _command(store, out, 3)
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, cwd=ROOT, env=dict(os.environ, KERAS_BACKEND="jax"))
    states = [out / "ck" / fold / "state.json" for fold in PACK]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if all(s.exists() for s in states):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert all(s.exists() for s in states), "the kill must land after every fold's first checkpoint"
    assert not any((out / "models" / fold / "run.json").exists() for fold in PACK)

    resumed = _run(command)
    assert resumed["log"].count("resuming from the checkpoint after epoch 1") == 3
    for fold in PACK:
        a, b = _fold(out, fold), _fold(packed_out, fold)
        assert list(a["history"]["epoch"]) == [1, 2]
        assert np.allclose(a["history"]["loss"], b["history"]["loss"], **TOLERANCE)
        assert np.allclose(a["test"], b["test"], **TOLERANCE)
        for x, y in zip(a["weights"], b["weights"]):
            assert np.allclose(x, y, **TOLERANCE), fold
    cache = resumed["job"]["compilation_cache"]
    assert cache["compiled"] == 0 and cache["loaded"] > 0, cache


def test_other_backends_train_the_folds_one_by_one_and_say_so(store, tmp_path):
    crops, index_path, folds_path, _ = store
    lines = []
    small_networks.register()
    hyper = hyperparameters("final", "bn_cnn", {"epochs": 1, "batch_size": 3, "steps_per_epoch": 1})
    summary = train.train_job(crops, index_path, folds_path, PACK[:2], architecture="bn_cnn", weights=None, hyper=hyper,
                              seed=0, models_dir=tmp_path / "models", checkpoints_dir=tmp_path / "ck",
                              pack_folds=2, compilation_cache=str(tmp_path / "cache"), log=lines.append, **JOB)
    assert any("packed folds need the JAX backend" in line and "tensorflow backend trains the folds one by one"
               in line for line in lines)
    assert any("only the JAX backend keeps compiled programs" in line for line in lines)
    assert summary["compilation_cache"]["folder"] is None and not (tmp_path / "cache").exists()
    assert all(json.loads((tmp_path / "models" / f / "run.json").read_text())["packed_folds"] == 1 for f in PACK[:2])
