"""One-line errors, and TensorFlow's start-up noise filtered while real errors still show."""

import os
import subprocess
import sys

import pytest

from moaflow import logs
from moaflow.errors import VerificationError
from moaflow.learn.presets import hyperparameters

from tests.conftest import flags


def test_startup_noise_is_dropped_and_real_errors_pass(capfd):
    with logs.quiet_framework_startup():
        os.write(2, b"I0000 00:00:1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n")
        os.write(2, b"E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
        os.write(2, b"E0000 00:00:1 something.cc:9] a real failure\n")
    err = capfd.readouterr().err
    assert "cuInit" not in err and "cuda drivers" not in err
    assert "a real failure" in err


def test_user_errors_become_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        with logs.one_line_errors("step"):
            raise VerificationError("x.tif: pixel type uint8, expected uint16")
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == "step: error: x.tif: pixel type uint8, expected uint16"


def test_a_cpu_only_command_prints_no_framework_noise(tmp_path):
    """`moaflow train --gpus 0` on this CPU machine: its log starts with our device line, not CUDA probing."""
    options = flags(store=tmp_path / "none.npy", index=tmp_path / "none.parquet", folds=tmp_path / "none.tsv",
                    fold_names=["x"], architecture="lab_cnn", weights="none", hyper=hyperparameters("lab", "lab_cnn"),
                    seed=0, models_dir=tmp_path / "m", checkpoints_dir=tmp_path / "c", gpus=0, allow_cpu=False,
                    load_into_memory="auto", checkpoint_minutes=10)
    result = subprocess.run([sys.executable, "-m", "moaflow", "train", *options], capture_output=True, text=True)
    assert result.returncode == 1
    assert "cuInit" not in result.stderr and "oneDNN" not in result.stderr and "absl" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Keras ") and lines[-1].startswith("moaflow train: error:") and "none.parquet" in lines[-1]


def test_a_slow_rate_is_shown_with_two_significant_digits_not_as_zero():
    from moaflow.logs import rate

    assert [rate(0.43), rate(2.0), rate(9.96), rate(12_345.6), rate(None)] == ["0.43", "2", "10", "12,346", "-"]
