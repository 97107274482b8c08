"""The crop store is read into RAM or memory-mapped as `training.load_into_memory` says."""

import numpy as np
import pytest

from moaflow.learn import feeder


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "32.npy"
    np.save(path, np.arange(4 * 32 * 32 * 3, dtype=np.uint8).reshape(4, 32, 32, 3))
    return path


@pytest.mark.parametrize(("setting", "mapped"), [(True, False), (False, True)])
def test_load_into_memory_true_reads_and_false_maps(store, setting, mapped):
    said = []
    crops = feeder.open_store(store, setting, log=said.append)
    assert isinstance(crops, np.memmap) == mapped
    assert np.array_equal(crops, np.load(store))
    assert ("memory-mapped" if mapped else "read into memory") in said[0]


def test_auto_reads_a_store_that_fits_in_half_the_available_memory_and_maps_a_larger_one(store, monkeypatch):
    size = np.load(store, mmap_mode="r").nbytes
    monkeypatch.setattr(feeder, "available_memory", lambda: 2 * size)
    assert not isinstance(feeder.open_store(store, "auto", log=lambda _: None), np.memmap)
    monkeypatch.setattr(feeder, "available_memory", lambda: 2 * size - 1)
    assert isinstance(feeder.open_store(store, "auto", log=lambda _: None), np.memmap)
