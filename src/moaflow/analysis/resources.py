"""What the run cost: every job's Snakemake benchmark record (``benchmark:``) gathered into one table per rule.

Snakemake writes one TSV per job (wall seconds, peak resident memory, I/O, CPU
time). `resource_table` reads them all and gives per rule: the jobs, their total
and longest wall time, the largest peak memory of one job, and the bytes read and
written, so that ``mem_mb`` and ``runtime`` in a profile can be sized from
evidence, and a change in cost shows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from moaflow.files import write_table
from moaflow.logs import stderr


def read_benchmarks(folder: str | os.PathLike) -> pd.DataFrame:
    """One row per job: its rule (the first folder under `folder`), its name and Snakemake's measurements."""
    paths = sorted(Path(folder).rglob("*.tsv"))
    if not paths:
        raise FileNotFoundError(f"no benchmark records (*.tsv) under {folder}: the rules' `benchmark:` "
                                "directives write them when their jobs run")
    frames = []
    for path in paths:
        relative = path.relative_to(folder)
        frame = pd.read_csv(path, sep="\t")
        frames.append(frame.assign(rule=relative.parts[0], job=str(relative.with_suffix(""))))
    return pd.concat(frames, ignore_index=True)


def disk_usage(root: str | os.PathLike, depth: int = 2) -> pd.DataFrame:
    """Bytes on disk (allocated blocks) and files under each folder ``depth`` levels below ``root``.

    Parameters
    ----------
    root : path
        The results folder.
    depth : int
        ``2`` gives e.g. ``bbbc021/images``, ``bbbc021/crops``, ``bbbc021/models``.
    """
    root = Path(root)
    usage: dict[str, list[int]] = {}
    for directory, _, files in os.walk(root):
        relative = Path(directory).relative_to(root)
        key = str(Path(*relative.parts[:depth])) if relative.parts else "."
        entry = usage.setdefault(key, [0, 0])
        for name in files:
            try:
                entry[0] += os.lstat(os.path.join(directory, name)).st_blocks * 512
                entry[1] += 1
            except FileNotFoundError:   # removed while walking (a job finishing)
                pass
    table = pd.DataFrame([(k, b, b / 1e9, n) for k, (b, n) in usage.items() if n],
                         columns=["folder", "bytes", "gigabytes", "files"])
    return table.sort_values("bytes", ascending=False, ignore_index=True)


def resource_table(folder: str | os.PathLike, output: str | os.PathLike, disk: str | os.PathLike | None = None,
                   *, log=stderr) -> pd.DataFrame:
    """Per rule: jobs, total and longest wall time, the largest peak memory of one job, the data read and written.

    A job that ran more than once keeps its last record (Snakemake overwrites it), so the table is the
    cost of the outputs now present, not of every attempt.

    Parameters
    ----------
    folder : path
        Where the rules' benchmarks are (``results/benchmarks``: one folder per rule, one TSV per job).
    output : path
        The table (CSV).
    disk : path, optional
        A second table (CSV), in the results folder: the disk used under each of that folder's folders now
        (`disk_usage`), at the end of the run (the resources rule runs last).
    """
    jobs = read_benchmarks(folder)
    for column in ("max_rss", "io_in", "io_out", "cpu_time"):
        jobs[column] = pd.to_numeric(jobs[column], errors="coerce")   # "-" where the OS gave nothing
    measured = lambda column: column.sum(min_count=1)   # noqa: E731 - nothing measured stays empty, not 0
    table = jobs.groupby("rule").agg(
        jobs=("job", "count"), wall_seconds=("s", "sum"), longest_job_seconds=("s", "max"),
        peak_rss_mb=("max_rss", "max"), read_mb=("io_in", measured), written_mb=("io_out", measured),
        cpu_seconds=("cpu_time", measured)).reset_index().sort_values("wall_seconds", ascending=False)
    write_table(table.round(1), output)
    if disk is not None:
        results = Path(disk).parent
        usage = disk_usage(results)
        write_table(usage.round({"gigabytes": 3}), disk)
        log(f"disk: {usage['gigabytes'].sum():,.2f} GB under {results} now")
    log(f"{len(jobs)} jobs of {len(table)} rules: {jobs['s'].sum() / 60:,.1f} job-minutes, the largest job "
        f"{jobs['max_rss'].max():,.0f} MB resident")
    return table
