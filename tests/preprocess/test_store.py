import numpy as np
import pandas as pd
import pytest

from moaflow.preprocess import store
from moaflow.files import write_array, write_table


def test_gather_concatenates_in_order(tmp_path):
    parts = []
    for p, n in (("a", 3), ("b", 0), ("c", 2)):
        write_array(np.full((n, 4, 4, 3), ord(p), np.uint8), tmp_path / f"{p}.4.npy")
        write_table(pd.DataFrame({"plate": [p] * n, "crop": range(n)}), tmp_path / f"{p}.index.parquet")
        parts.append((tmp_path / f"{p}.4.npy", tmp_path / f"{p}.index.parquet"))
    index = store.gather(parts, tmp_path / "all.npy")
    array = np.load(tmp_path / "all.npy", mmap_mode="r")
    assert isinstance(array, np.memmap) and array.shape == (5, 4, 4, 3)
    assert list(index["crop_id"]) == [0, 1, 2, 3, 4]
    assert [chr(array[i, 0, 0, 0]) for i in index["crop_id"]] == list(index["plate"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_gather_refuses_mismatched_parts(tmp_path):
    write_array(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "a.4.npy")
    write_table(pd.DataFrame({"crop": [0]}), tmp_path / "a.index.parquet")
    with pytest.raises(ValueError, match="a.4.npy"):
        store.gather([(tmp_path / "a.4.npy", tmp_path / "a.index.parquet")], tmp_path / "all.npy")
    assert not (tmp_path / "all.npy").exists()
    assert not list(tmp_path.glob(".*tmp*"))
