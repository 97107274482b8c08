"""`moaflow bench-training --packs`: one run measures batch 8 single (a first and a second job), packed, and a
large batch, each job in its own process; the second job loads its programs from the compilation cache."""

import os
import subprocess
import sys

import pandas as pd

from tests.learn.test_packed import ROOT, RUNNER


def test_the_packed_benchmark_measures_every_case_and_a_second_job_compiles_nothing(tmp_path):
    command = [sys.executable, "-c", RUNNER, "bench-training", "--architectures", "bn_cnn", "--out", str(tmp_path),
               "--packs", "2", "--steps", "2", "--precision", "float32", "--batch-size", "16"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, KERAS_BACKEND="jax"))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path / "packing.csv").set_index("job")
    assert list(table.index) == ["batch-8 first job", "batch-8 second job", "batch-8 packed 2", "batch-16"]
    assert list(table["packed_folds"]) == [1, 1, 2, 1] and list(table["batch"]) == [8, 8, 8, 16]
    assert (table["images_per_s"] > 0).all() and (table["backend"] == "jax").all()
    assert table.loc["batch-8 first job", "compiled"] > 0
    assert table.loc["batch-8 second job", "compiled"] == 0 and table.loc["batch-8 second job", "loaded"] > 0
    assert "Training throughput" in result.stdout
