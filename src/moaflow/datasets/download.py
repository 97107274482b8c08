"""Fetch and unpack the published files: resumable, retried, mirrored, verified, and never destructive.

A download goes to ``<destination>.part``. An interrupted transfer is resumed
with an HTTP ``Range`` request; a server that ignores ``Range`` makes the file
start over. A complete transfer is verified (known size and SHA-256 when the
config has them, a zip's CRC-32s, a CSV's columns) before it is renamed to
``<destination>``; a file that fails leads to the next mirror, like a 404.
A destination that already exists and passes the same checks is reused
without a byte transferred, and a bad one is replaced only by a verified one.

Archives are unpacked into a staging folder, checked (names, declared sizes
against a limit, every file) and only then swapped in place of the old
folder, so a failed extraction leaves the previous good one untouched.

Each step returns a receipt (a dict: what, where from, size, SHA-256, which
checks passed) that the workflow writes as the step's declared output, so
Snakemake's deletion of outputs before a rerun never touches the data itself.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from moaflow import layout
from moaflow.errors import DownloadError, VerificationError
from moaflow.files import file_digest, replace_folder, restore_folder, write_json

__all__ = ["DownloadError", "VerificationError", "fetch", "extract_archive", "verify_zip", "verify_csv",
           "verify_text", "file_digest", "urls_for"]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
#: Bumped when extraction checks change: folders extracted under older checks are then redone.
EXTRACT_CHECKS_VERSION = 3
EXTRACT_MANIFEST = ".moaflow-extract.json"


class _Retryable(Exception):
    pass


def urls_for(base_urls: Iterable[str], filename: str) -> list[str]:
    """The same file at every mirror, in order.

    Examples
    --------
    >>> urls_for(["https://a.org/bbbc/", "https://b.org/x"], "f.zip")
    ['https://a.org/bbbc/f.zip', 'https://b.org/x/f.zip']
    """
    return [posixpath.join(base if base.endswith("/") else base + "/", filename) for base in base_urls]


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Print bytes done, rate and ETA at most every ``interval`` seconds."""

    def __init__(self, label: str, log: Callable[[str], None] = _log_to_stderr, interval: float = 2.0):
        self.label, self.log, self.interval = label, log, interval
        self._start = self._last = time.monotonic()
        self._start_bytes: int | None = None

    def __call__(self, done: int, total: int | None, final: bool = False) -> None:
        now = time.monotonic()
        if self._start_bytes is None:
            self._start_bytes = done
        if not final and now - self._last < self.interval:
            return
        self._last = now
        rate = (done - self._start_bytes) / max(now - self._start, 1e-9)
        if total:
            eta = (total - done) / rate if rate > 0 else float("inf")
            eta_text = "done" if final else (f"ETA {eta:,.0f} s" if eta != float("inf") else "ETA ?")
            text = f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB ({100 * done / total:.0f} %), {rate / 1e6:,.2f} MB/s, {eta_text}"
        else:
            text = f"{done / 1e6:,.1f} MB, {rate / 1e6:,.2f} MB/s"
        self.log(f"{self.label}: {text}")


# ------------------------------------------------------------------ content checks

def verify_zip(path: str | os.PathLike) -> str:
    """Check that ``path`` is a zip archive whose every member passes its CRC-32.

    Raises
    ------
    VerificationError
        Naming the archive and the first bad member.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            n = len(zf.infolist())
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise VerificationError(f"{path}: not a readable zip archive ({exc})") from exc
    if bad is not None:
        raise VerificationError(f"{path}: member {bad!r} fails its CRC-32 check (corrupt archive)")
    return f"zip: {n} members, CRC-32 ok"


def verify_csv(path: str | os.PathLike, required_columns: list[str]) -> str:
    """Check that ``path`` is a CSV with ``required_columns`` and no row cut short.

    An error page served as the file, an empty file or one truncated inside a
    row fails; a file truncated exactly at a row boundary needs a known size
    or checksum to be caught (see `fetch`).
    """
    import pandas as pd

    try:
        frame = pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        raise VerificationError(f"{path}: empty file, expected a CSV with columns {required_columns}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in required_columns if c not in frame.columns]
    if missing:
        first = Path(path).read_bytes()[:80].decode("utf-8", "replace").splitlines()[:1]
        raise VerificationError(f"{path}: missing column(s) {missing}; it starts with {first} "
                                "(an error page or another file?)")
    if frame.empty:
        raise VerificationError(f"{path}: no rows below the header")
    short = frame[required_columns].isna().any(axis=1)
    if short.any():
        line = int(short.to_numpy().nonzero()[0][0]) + 2
        raise VerificationError(f"{path}: {int(short.sum())} row(s) lack values in {required_columns}, first at "
                                f"line {line} (truncated file?)")
    return f"csv: {len(frame)} rows, columns {len(frame.columns)}"


def verify_text(path: str | os.PathLike) -> str:
    """Check that ``path`` is a non-empty text file and not an HTML page."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise VerificationError(f"{path}: empty file")
    head = data[:200].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise VerificationError(f"{path}: an HTML page, not the expected text file")
    lines = data.count(b"\n") + 1
    return f"text: {lines} lines"


def _known(path: Path, size: int | None, sha256: str | None, md5: str | None) -> list[str]:
    checks = []
    if size is not None:
        found = path.stat().st_size
        if found != size:
            raise VerificationError(f"{path}: {found:,} bytes, the published file has {size:,}")
        checks.append(f"size {size:,} bytes as published")
    for name, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            found = file_digest(path, name)
            if found != expected.lower():
                raise VerificationError(f"{path}: {name.upper()} {found} differs from the published {expected}")
            checks.append(f"{name.upper()} as published")
    return checks


# ------------------------------------------------------------------ transfer

def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "moaflow"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URLs, schema-checked


def _content_length(url: str, timeout: float) -> int | None:
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "moaflow"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _transfer_once(url: str, part: Path, timeout: float, chunk_size: int, progress: Progress) -> int:
    """One attempt: continue ``part`` from its current size, or restart it. Returns bytes received."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The part may already be complete; otherwise it is stale: restart.
            if _content_length(url, timeout) == offset:
                return 0
            part.unlink()
            raise _Retryable(f"{url}: stale partial file ({offset} bytes) discarded") from exc
        raise
    received = 0
    with response:
        length = response.headers.get("Content-Length")
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"{url}: server answered an unexpected range "
                                 f"{response.headers.get('Content-Range')!r} for offset {offset}")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
        else:
            # 200: the server sent the whole file, ignoring or never asked a Range.
            offset = 0
            total = int(length) if length is not None else None
            mode = "wb"
        done = offset
        with open(part, mode) as out:
            while True:
                block = response.read(chunk_size)
                if not block:
                    break
                out.write(block)
                done += len(block)
                received += len(block)
                progress(done, total)
            out.flush()
            os.fsync(out.fileno())
    if total is not None and done != total:
        raise _Retryable(f"{url}: connection closed after {done} of {total} bytes")
    progress(done, total, final=True)
    return received


def _try_mirror(url, part, destination, retries, backoff_seconds, timeout_seconds, chunk_size, failures, log
                ) -> int | None:
    """Up to ``retries + 1`` attempts at one mirror; bytes received once ``part`` is complete, else None."""
    received = 0
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_seconds * 2 ** (attempt - 1)
            log(f"{url}: retry {attempt}/{retries} in {wait:g} s")
            time.sleep(wait)
        resumed = part.stat().st_size if part.exists() else 0
        log(f"{url} -> {destination}" + (f" (resuming at byte {resumed})" if resumed else ""))
        try:
            received += _transfer_once(url, part, timeout_seconds, chunk_size, Progress(destination.name, log))
            return received
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
            log(failures[-1])
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                return None  # not on this mirror: no point retrying it
        except (_Retryable, urllib.error.URLError, OSError, TimeoutError) as exc:
            failures.append(f"{url}: {exc}")
            log(failures[-1])
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fetch(
    urls: list[str],
    destination: str | os.PathLike,
    *,
    retries: int,
    backoff_seconds: float,
    timeout_seconds: float,
    chunk_size: int = 1 << 20,
    verify: Callable[[Path], str] | None = None,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    log: Callable[[str], None] = _log_to_stderr,
) -> dict:
    """Make ``destination`` a verified copy of the published file; download only what is missing.

    Parameters
    ----------
    urls : list of str
        The same file at each mirror, tried in order.
    destination : path
        Final path. It changes only to a complete, verified file.
    retries : int
        Attempts per mirror after the first; a partial file is resumed.
    backoff_seconds : float
        Wait before retry ``k`` is ``backoff_seconds * 2**(k-1)``.
    timeout_seconds : float
        Socket timeout of each request.
    chunk_size : int
        Bytes read per block.
    verify : callable, optional
        Content check of a complete file: returns what it checked, raises `VerificationError` to reject it.
    size, sha256, md5 : optional
        The published file's size and digests, when known (the config).
    log : callable
        Receives one line per event.

    Returns
    -------
    receipt : dict
        ``file``, ``bytes``, ``sha256``, ``source`` (the URL, or ``"local copy"`` when an existing file passed
        the checks), ``transferred_bytes``, ``checks`` and ``time``.

    Raises
    ------
    DownloadError
        No mirror delivered a file that passed the checks; the message lists every mirror's last error.
        ``destination`` is left as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    published = {"size": size, "sha256": sha256, "md5": md5}
    if destination.exists():
        try:
            passed = _checks(destination, published, verify)
            log(f"{destination}: already present and verified ({'; '.join(passed)}); nothing fetched")
            return _receipt(destination, "local copy", 0, passed, published)
        except VerificationError as exc:
            log(f"{destination}: present but fails its checks ({exc}); fetching it again "
                "(the present file is kept until a verified one replaces it)")
    if not urls:
        raise DownloadError(f"{destination}: no URL configured")
    failures: list[str] = []
    for url in urls:
        received = _try_mirror(url, part, destination, retries, backoff_seconds, timeout_seconds, chunk_size,
                               failures, log)
        if received is None:
            continue
        try:
            passed = _checks(part, published, verify)
        except VerificationError as exc:
            failures.append(f"{url}: downloaded but rejected: {exc}")
            log(failures[-1])
            part.unlink(missing_ok=True)
            continue
        os.replace(part, destination)
        log(f"{destination}: complete and verified ({'; '.join(passed)}), {destination.stat().st_size:,} bytes")
        return _receipt(destination, url, received, passed, published)
    raise DownloadError(f"{destination.name}: no mirror delivered a verified file:\n  " + "\n  ".join(failures))


def _checks(path: Path, published: dict, verify) -> list[str]:
    """The published size and digests, then the content check: what passed, or `VerificationError`."""
    done = _known(path, published["size"], published["sha256"], published["md5"])
    if verify is not None:
        done.append(verify(path))
    return done


def _receipt(destination: Path, source: str, transferred: int, passed: list[str], published: dict) -> dict:
    if not any(c.startswith("SHA256") for c in passed) and published["size"] is None:
        passed.append("no published size or checksum configured: checked by content only")
    return {"file": destination.name, "path": str(destination), "bytes": destination.stat().st_size,
            "sha256": published["sha256"].lower() if published["sha256"] else file_digest(destination),
            "source": source, "transferred_bytes": transferred, "checks": passed, "time": _now()}


# ------------------------------------------------------------------ extraction

def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in member.parts:
        raise VerificationError(f"{archive}: refusing member {name!r}: it would escape the target folder")
    return member


def file_crc32(path: str | os.PathLike) -> int:
    """The CRC-32 of a file (what a zip records per member), read in 4 MB blocks."""
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _previous_extraction(target: Path, archive_sha256: str | None, wanted: Iterable[str] | None,
                         log: Callable[[str], None]) -> dict | None:
    """The manifest of an earlier extraction of the same archive under the same checks that holds every
    ``wanted`` file intact: each one's size and CRC-32 as the archive recorded them (a swapped or altered
    file of the same size is caught)."""
    import json

    manifest_path = target / EXTRACT_MANIFEST
    if archive_sha256 is None or not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return None
    if manifest.get("archive_sha256") != archive_sha256 or manifest.get("checks_version") != EXTRACT_CHECKS_VERSION:
        return None
    files, crcs = manifest.get("files", {}), manifest.get("crc32", {})
    missing = sorted(set(wanted or files) - set(files))
    if missing:
        log(f"{target}: {len(missing)} file(s) the study reads are not in the earlier extraction, e.g. {missing[:2]}")
        return None
    for name in wanted or files:
        path = target / name
        if not path.is_file() or path.stat().st_size != files[name] or file_crc32(path) != crcs.get(name):
            log(f"{target}: {name} differs from the archive's (size or CRC-32): extracting again")
            return None
    return manifest


def extract_archive(
    archive: str | os.PathLike,
    target: str | os.PathLike,
    *,
    member_root: str,
    expected: Iterable[str] | None = None,
    only_expected: bool = False,
    expected_count: int | None = None,
    check_file: Callable[[Path], object] | None = None,
    check_all: Callable[[list[Path]], object] | None = None,
    max_bytes: int = 8 << 30,
    archive_sha256: str | None = None,
    log: Callable[[str], None] = _log_to_stderr,
) -> dict:
    """Extract the folder ``member_root/`` of a zip to ``target``, all or nothing.

    Parameters
    ----------
    archive : path
        The zip file.
    target : path
        Final folder, replaced only after every check passed (until then a previous extraction stays).
    member_root : str
        Folder inside the archive whose contents become ``target`` (the real archives hold ``<Plate>/`` or
        ``BBBC014_v1_images/``). Other members are ignored but still checked for path escapes.
    expected : iterable of str, optional
        File names that must be present under ``member_root``.
    only_expected : bool
        Write only the ``expected`` files (the others are not written, only counted).
    expected_count : int, optional
        How many files ``member_root/`` must hold.
    check_file : callable, optional
        Called on each extracted file; raises `VerificationError` for a bad one.
    check_all : callable, optional
        Called once on the list of extracted files (e.g. one image size per plate).
    max_bytes : int
        Refuse archives whose members declare more uncompressed bytes, before
        anything is written.
    archive_sha256 : str, optional
        The archive's digest (from its download receipt). When ``target``
        already holds an intact extraction of the same archive under the same
        checks, it is reused as it is.

    Returns
    -------
    manifest : dict
        ``archive``, ``archive_sha256``, ``files`` (name -> bytes), ``bytes``,
        ``checks_version``, ``reused``.

    Raises
    ------
    VerificationError
        Unsafe member paths (``../``, absolute, symbolic links), a size over the limit, CRC errors, missing
        expected files or a failed check, each naming the file.
    """
    archive, target = Path(archive), Path(target)
    expected = None if expected is None else set(expected)
    staging = target.with_name(f".{target.name}.partial")
    restore_folder(target)   # a swap interrupted between its two renames: put the good folder back
    previous = _previous_extraction(target, archive_sha256, expected if only_expected else None, log)
    if previous is not None:
        log(f"{target}: already holds a verified extraction of this archive ({len(previous['files'])} files); "
            "nothing extracted")
        return {**previous, "reused": True}
    if not archive.exists():
        raise VerificationError(
            f"{archive}: needed to extract {target}, but it was removed after an earlier extraction "
            "(download.keep_archives: false), which lacks what the configured study now reads: fetch it again "
            "by forcing its download (snakemake --forcerun download_bbbc021_plate)")
    manifest = _extract_verified(archive, target, staging, member_root=member_root, expected=expected,
                                 only_expected=only_expected, expected_count=expected_count, check_file=check_file,
                                 check_all=check_all, max_bytes=max_bytes, archive_sha256=archive_sha256, log=log)
    log(f"{target}: {len(manifest['files'])} files, {manifest['bytes'] / 1e6:,.1f} MB extracted and verified")
    return {**manifest, "reused": False}


def _extract_verified(archive: Path, target: Path, staging: Path, *, member_root, expected, only_expected,
                      expected_count, check_file, check_all, max_bytes, archive_sha256, log) -> dict:
    """`extract_archive`'s work: extract into ``staging``, check, write the manifest, swap into ``target``."""
    if staging.exists():
        shutil.rmtree(staging)
    try:
        with zipfile.ZipFile(archive) as zf:
            wanted = _members_to_extract(zf, archive, member_root, max_bytes, expected if only_expected else None,
                                         log)
            staging.mkdir(parents=True)
            files = _extract_members(zf, wanted, archive, staging, max_bytes, check_file, log)
            crcs = {_relative(i.filename, archive): i.CRC for i in wanted}
        _check_extraction(files, archive, member_root, staging, expected, expected_count, check_all)
        manifest = {"archive": str(archive), "archive_sha256": archive_sha256, "files": files, "crc32": crcs,
                    "bytes": sum(files.values()), "checks_version": EXTRACT_CHECKS_VERSION, "time": _now()}
        write_json(manifest, staging / EXTRACT_MANIFEST)
        replace_folder(staging, target)   # the old folder goes only once its verified replacement is in place
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise VerificationError(f"{archive}: cannot be extracted ({exc})") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _relative(name: str, archive: Path) -> str:
    """A member's path below its first folder (``<Plate>/<file>`` -> ``<file>``)."""
    return PurePosixPath(*_safe_member_path(name, archive).parts[1:]).as_posix()


def _members_to_extract(zf: zipfile.ZipFile, archive: Path, member_root: str, max_bytes: int,
                        only: set[str] | None, log) -> list:
    """The files under ``member_root/`` (those in ``only``, when given), once every member's name was checked and
    their declared total fits."""
    members = zf.infolist()
    for info in members:  # check every name before writing anything
        _safe_member_path(info.filename, archive)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise VerificationError(f"{archive}: refusing member {info.filename!r}: symbolic link")
    wanted = [i for i in members if not i.is_dir() and PurePosixPath(i.filename).parts[:1] == (member_root,)]
    if only is not None:
        skipped = [i for i in wanted if _relative(i.filename, archive) not in only]
        wanted = [i for i in wanted if _relative(i.filename, archive) in only]
        if skipped:
            log(f"{archive.name}: {len(wanted)} file(s) the study reads extracted; {len(skipped)} others "
                f"({sum(i.file_size for i in skipped) / 1e6:,.1f} MB) left in the archive")
    declared = sum(i.file_size for i in wanted)
    if declared > max_bytes:
        biggest = max(wanted, key=lambda i: i.file_size)
        raise VerificationError(
            f"{archive}: members declare {declared / 2**30:.2f} GiB uncompressed (largest {biggest.filename!r}, "
            f"{biggest.file_size / 2**30:.2f} GiB), over the limit of {max_bytes / 2**30:.2f} GiB "
            "(download.max_extracted_gb); nothing was extracted")
    return wanted


def _extract_members(zf: zipfile.ZipFile, wanted: list, archive: Path, staging: Path, max_bytes: int,
                     check_file, log) -> dict[str, int]:
    """Write ``wanted`` under ``staging`` (without their first folder), checking each; name -> bytes."""
    files: dict[str, int] = {}
    written = 0
    for n, info in enumerate(wanted, 1):
        relative = PurePosixPath(_relative(info.filename, archive))
        out_path = staging.joinpath(*relative.parts)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(info) as src, open(out_path, "wb") as dst:
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > max_bytes:   # declared sizes are checked before; this guards lying headers
                        raise VerificationError(f"{archive}: {info.filename!r} expands past the limit of "
                                                f"{max_bytes / 2**30:.2f} GiB (download.max_extracted_gb)")
                    dst.write(block)
        except zipfile.BadZipFile as exc:
            raise VerificationError(f"{archive}: member {info.filename!r} is corrupt ({exc})") from exc
        if check_file is not None:
            check_file(out_path)
        files[relative.as_posix()] = out_path.stat().st_size
        if n % 100 == 0 or n == len(wanted):
            log(f"{archive.name}: {n}/{len(wanted)} files extracted and checked")
    return files


def _check_extraction(files: dict, archive: Path, member_root: str, staging: Path, expected, expected_count,
                      check_all) -> None:
    """Every expected file present, the expected count, and the check over all files."""
    if expected is not None:
        missing = sorted(set(expected) - set(files))
        if missing:
            raise VerificationError(f"{archive}: {len(missing)} expected file(s) missing under {member_root}/, "
                                    f"e.g. {missing[:3]}")
    if expected_count is not None and len(files) != expected_count:
        raise VerificationError(f"{archive}: {len(files)} files under {member_root}/, expected {expected_count}")
    if check_all is not None:
        check_all([staging / name for name in files])


# ------------------------------------------------------------------ the workflow's steps

def content_check(kind: str) -> Callable[[Path], str] | None:
    """How each kind of published file is checked once complete (``"file"``: no content check)."""
    from moaflow.datasets import tables

    if kind == "file":
        return None
    checks = {
        "zip": verify_zip,
        "image_csv": lambda p: verify_csv(p, tables.BBBC021_REQUIRED_COLUMNS),
        "moa_csv": lambda p: verify_csv(p, tables.MOA_REQUIRED_COLUMNS),
        "text": verify_text,
        "weights": lambda p: "weights file",
    }
    if kind not in checks:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(checks)}")
    return checks[kind]


def fetch_published(filename: str, destination: str | os.PathLike, *, base_urls: list[str], settings: dict,
                    published: dict | None, kind: str, log: Callable[[str], None] = _log_to_stderr) -> dict:
    """Fetch one published file with the config's download ``settings`` (retries, backoff, timeout).

    ``published`` is the config's record of the file (``bytes``, ``sha256`` or
    ``md5``) when known; ``kind`` picks the content check (see `content_check`).
    Returns the receipt of `fetch`.
    """
    published = published or {}
    return fetch(urls_for(base_urls, filename), destination, retries=settings["retries"],
                 backoff_seconds=settings["backoff_seconds"], timeout_seconds=settings["timeout_seconds"],
                 verify=content_check(kind), size=published.get("bytes"), sha256=published.get("sha256"),
                 md5=published.get("md5"), log=log)


def write_receipt(receipt: dict, path: str | os.PathLike, data: str | os.PathLike) -> None:
    """Write a step's receipt (its declared output) with the modification time of the data it describes.

    A rerun that only re-verified existing data thereby leaves the receipt as
    old as the data, and Snakemake does not redo the steps downstream of it.
    """
    write_json(receipt, path)
    mtime = Path(data).stat().st_mtime
    os.utime(path, (mtime, mtime))


def extract_bbbc021_plate(archive, target, *, image_csv, moa_csv, plate: str, taxol_rule: bool, max_bytes: int,
                          max_pixels: int, archive_sha256: str | None = None,
                          log: Callable[[str], None] = _log_to_stderr) -> dict:
    """Extract the TIFFs of one BBBC021 plate that the study reads (`moaflow.datasets.tables.study_file_names`):
    each must be present and decode as a 16-bit field, all of one size; the plate's other files stay in the
    archive."""
    from moaflow.datasets import images, tables

    fields = tables.study_file_names(image_csv, moa_csv, plate, taxol_rule=taxol_rule)
    return extract_archive(
        archive, target, member_root=plate, expected=fields, only_expected=True,
        check_file=lambda path: images.read_tiff(path, max_pixels=max_pixels),
        check_all=lambda paths: images.common_shape(paths, max_pixels=max_pixels),
        max_bytes=max_bytes, archive_sha256=archive_sha256, log=log)


def extract_bbbc014_images(archive, target, *, member_root: str, expected_count: int, max_bytes: int,
                           max_pixels: int, archive_sha256: str | None = None,
                           log: Callable[[str], None] = _log_to_stderr) -> dict:
    """Extract the BBBC014 images: the configured number of readable 8-bit images."""
    from moaflow.datasets import images

    return extract_archive(archive, target, member_root=member_root, expected_count=expected_count,
                           check_file=lambda p: images.read_gray8(p, max_pixels=max_pixels), max_bytes=max_bytes,
                           archive_sha256=archive_sha256, log=log)


# ------------------------------------------------------------------ the download and extraction rules' steps

def _limits(settings: dict) -> dict:
    return {"max_bytes": int(settings["max_extracted_gb"] * 2**30),
            "max_pixels": int(settings["max_image_megapixels"] * 1e6)}


def _archive_digest(archive) -> str | None:
    """The archive's SHA-256 from its download receipt, when it has one."""
    import json

    receipt = Path(layout.receipt(archive))
    return json.loads(receipt.read_text())["sha256"] if receipt.is_file() else None


def download_file(filename: str, destination: str | os.PathLike, *, base_urls: list[str], settings: dict, kind: str,
                  published: dict | None = None, log: Callable[[str], None] = _log_to_stderr) -> dict:
    """Make ``destination`` a verified copy of a published file and write its receipt beside it.

    Parameters
    ----------
    filename : str
        The file's name under each of ``base_urls``.
    destination : path
        Where the verified file goes (its receipt beside it, ``<destination>.verified.json``).
    base_urls : list of str
        Mirrors, tried in order.
    settings : dict
        The config's ``download`` section (retries, backoff_seconds, timeout_seconds).
    kind : str
        The content check (`content_check`): zip, image_csv, moa_csv, text, weights or file.
    published : dict, optional
        The publisher's size and digests (``bytes``, ``sha256``, ``md5``), when known.
    """
    receipt = fetch_published(filename, destination, base_urls=base_urls, settings=settings, published=published,
                              kind=kind, log=log)
    write_receipt(receipt, layout.receipt(destination), destination)
    return receipt


def extract_plate(archive: str | os.PathLike, target: str | os.PathLike, *, image_csv: str | os.PathLike,
                  moa_csv: str | os.PathLike, plate: str, taxol_rule: bool, settings: dict,
                  log: Callable[[str], None] = _log_to_stderr) -> dict:
    """Extract and verify one BBBC021 plate's archive into ``target`` and write its receipt beside it.

    Parameters
    ----------
    archive : path
        The plate's downloaded zip (its receipt, when present, gives the digest that lets a rerun reuse the
        extraction).
    target : path
        The plate's image folder, replaced only by a verified extraction.
    image_csv, moa_csv : path
        The Broad's image and MoA CSVs: which TIFFs of the plate the study reads.
    plate : str
        The plate's name (its folder inside the archive).
    taxol_rule : bool
        The study's taxol rule (``bbbc021.taxol_rule``), which decides which taxol fields it reads.
    settings : dict
        The config's ``download`` section (``max_extracted_gb``, ``max_image_megapixels``, ``keep_archives``).
    """
    manifest = extract_bbbc021_plate(archive, target, image_csv=image_csv, moa_csv=moa_csv, plate=plate,
                                     taxol_rule=taxol_rule, archive_sha256=_archive_digest(archive), log=log,
                                     **_limits(settings))
    write_receipt(manifest, layout.receipt(target), Path(target) / EXTRACT_MANIFEST)
    _release_archive(archive, settings, log)
    return manifest


def _release_archive(archive, settings: dict, log) -> None:
    """Remove a verified extraction's archive unless ``download.keep_archives``: its receipt keeps its size and
    SHA-256, and a rerun reuses the extraction without it."""
    if not settings["keep_archives"] and Path(archive).exists():
        size = Path(archive).stat().st_size
        Path(archive).unlink()
        log(f"{archive}: removed after its verified extraction ({size / 1e9:.2f} GB freed; download.keep_archives)")


def extract_images(archive: str | os.PathLike, target: str | os.PathLike, *, member_root: str, expected_count: int,
                   settings: dict, log: Callable[[str], None] = _log_to_stderr) -> dict:
    """Extract and verify the BBBC014 image archive into ``target`` and write its receipt beside it.

    Parameters
    ----------
    archive : path
        The downloaded zip.
    target : path
        The image folder, replaced only by a verified extraction.
    member_root : str
        The folder inside the archive that holds the images (``bbbc014.archive_folder``).
    expected_count : int
        How many images it must hold (``bbbc014.expected_images``).
    settings : dict
        The config's ``download`` section (``max_extracted_gb``, ``max_image_megapixels``).
    """
    manifest = extract_bbbc014_images(archive, target, member_root=member_root, expected_count=expected_count,
                                      archive_sha256=_archive_digest(archive), log=log, **_limits(settings))
    write_receipt(manifest, layout.receipt(target), Path(target) / EXTRACT_MANIFEST)
    _release_archive(archive, settings, log)
    return manifest


def extract_crops_archive(archive: str | os.PathLike, target: str | os.PathLike, *, member_root: str, settings: dict,
                          log: Callable[[str], None] = _log_to_stderr) -> dict:
    """Extract and verify one image archive of a downloaded crops dataset (``crops.<name>.download``) into
    ``target`` and write its receipt beside it.

    Parameters
    ----------
    archive : path
        The downloaded zip; it holds the folder ``member_root/``.
    target : path
        That folder's place, replaced only by a verified extraction.
    member_root : str
        The folder inside the archive (the archive's name without ``.zip``).
    settings : dict
        The config's ``download`` section (``max_extracted_gb``, ``max_image_megapixels``, ``keep_archives``).
    """
    limits = _limits(settings)
    manifest = extract_archive(archive, target, member_root=member_root,
                               check_file=lambda p: _check_image_header(p, limits["max_pixels"]),
                               max_bytes=limits["max_bytes"], archive_sha256=_archive_digest(archive), log=log)
    if not manifest["files"]:
        raise VerificationError(f"{archive}: no file under {member_root}/, expected the set's images there")
    write_receipt(manifest, layout.receipt(target), Path(target) / EXTRACT_MANIFEST)
    _release_archive(archive, settings, log)
    return manifest


def _check_image_header(path: Path, max_pixels: int) -> None:
    """A TIFF's header, or a PNG's, read without decoding: readable and at most ``max_pixels``."""
    from moaflow.datasets import images

    if path.suffix.lower() in (".tif", ".tiff"):
        images.check_tiff_header(path, dtype=None, max_pixels=max_pixels)
        return
    from PIL import Image

    try:
        with Image.open(path) as opened:
            pixels = opened.size[0] * opened.size[1]
    except Exception as exc:  # PIL raises several types for damaged files
        raise VerificationError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if pixels > max_pixels:
        raise VerificationError(f"{path}: {pixels:,} pixels, over download.max_image_megapixels ({max_pixels:,})")
