"""The run's cost table: Snakemake's per-job benchmark records gathered per rule, and the disk by folder."""

import pandas as pd
import pytest

from moaflow.analysis.resources import disk_usage, resource_table

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _record(path, seconds, rss, written="1.0"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:01\t{rss}\t0\t0\t0\t0.5\t{written}\t1.0\t{seconds / 2}\n")


def test_jobs_are_summed_per_rule_and_the_largest_job_memory_is_kept(tmp_path):
    benchmarks = tmp_path / "benchmarks"
    _record(benchmarks / "train" / "bbbc021" / "resnet50" / "part-01.tsv", 100.0, 3000)
    _record(benchmarks / "train" / "bbbc021" / "resnet50" / "part-02.tsv", 50.0, 5000)
    _record(benchmarks / "extract_bbbc021_plate" / "Week1_22123.tsv", 4.0, 200, written="-")
    table = resource_table(benchmarks, tmp_path / "resources.csv", log=lambda _: None).set_index("rule")
    assert table.loc["train", "jobs"] == 2
    assert table.loc["train", "wall_seconds"] == 150.0
    assert table.loc["train", "longest_job_seconds"] == 100.0
    assert table.loc["train", "peak_rss_mb"] == 5000
    # "-" (nothing measured) is no number, not a zero
    assert pd.isna(table.loc["extract_bbbc021_plate", "written_mb"])
    assert list(pd.read_csv(tmp_path / "resources.csv")["rule"]) == ["train", "extract_bbbc021_plate"]


def test_no_benchmark_records_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmark records"):
        resource_table(tmp_path / "benchmarks", tmp_path / "resources.csv", log=lambda _: None)


def test_disk_usage_counts_the_bytes_and_files_of_each_folder(tmp_path):
    (tmp_path / "bbbc021" / "images" / "Week1_22123").mkdir(parents=True)
    (tmp_path / "bbbc021" / "images" / "Week1_22123" / "a.tif").write_bytes(b"x" * 1_000_000)
    (tmp_path / "bbbc021" / "crops").mkdir(parents=True)
    (tmp_path / "bbbc021" / "crops" / "75.npy").write_bytes(b"x" * 10)
    usage = disk_usage(tmp_path).set_index("folder")
    assert usage.loc["bbbc021/images", "files"] == 1
    assert usage.loc["bbbc021/images", "bytes"] >= 1_000_000       # allocated blocks: at least the bytes
    assert usage.loc["bbbc021/images", "gigabytes"] == usage.loc["bbbc021/images", "bytes"] / 1e9
    assert usage.index[0] == "bbbc021/images"                      # the largest first
    assert usage.loc["bbbc021/crops", "files"] == 1
