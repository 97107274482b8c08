"""Fetch the published files: resumable, retried, mirrored, verified, atomic.

A download goes to ``<destination>.part``. An interrupted transfer is resumed
with an HTTP ``Range`` request; a server that ignores ``Range`` makes the file
start over. Only a complete, verified file is renamed to ``<destination>``,
so a workflow manager never mistakes a partial or corrupt file for output.
Mirror base URLs are tried in order, each with retries and exponential
backoff. The Broad publishes no checksums: integrity comes from
``Content-Length``, the zip's own CRC-32s and (at extraction) decodable images.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """The file could not be fetched from any mirror."""


class VerificationError(RuntimeError):
    """A fetched or extracted file failed its integrity check."""


class _Retryable(Exception):
    pass


def mirror_urls(base_urls: Iterable[str], filename: str) -> list[str]:
    """Join ``filename`` onto each base URL, in order.

    Examples
    --------
    >>> mirror_urls(["https://a.org/bbbc/", "https://b.org/x"], "f.zip")
    ['https://a.org/bbbc/f.zip', 'https://b.org/x/f.zip']
    """
    return [base.rstrip("/") + "/" + filename for base in base_urls]


class Progress:
    """Print bytes done, rate and ETA at most every ``interval`` seconds."""

    def __init__(self, label: str, stream=None, interval: float = 2.0):
        self.label, self.stream, self.interval = label, stream or sys.stderr, interval
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
        print(f"{self.label}: {text}", file=self.stream, flush=True)


def verify_zip(path: str | os.PathLike) -> None:
    """Check that ``path`` is a zip archive whose every member passes its CRC-32.

    Raises
    ------
    VerificationError
        Naming the archive and the first bad member.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise VerificationError(f"{path}: not a readable zip archive ({exc})") from exc
    if bad is not None:
        raise VerificationError(f"{path}: member {bad!r} fails its CRC-32 check (corrupt archive)")


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "moaflow"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URLs from config


def _content_length(url: str, timeout: float) -> int | None:
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "moaflow"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _transfer_once(url: str, part: Path, timeout: float, chunk_size: int, progress: Progress) -> None:
    """One attempt: continue ``part`` from its current size, or restart it."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The part may already be complete; otherwise it is stale: restart.
            if _content_length(url, timeout) == offset:
                return
            part.unlink()
            raise _Retryable(f"{url}: stale partial file ({offset} bytes) discarded") from exc
        raise
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206:
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
                progress(done, total)
            out.flush()
            os.fsync(out.fileno())
    if total is not None and done != total:
        raise _Retryable(f"{url}: connection closed after {done} of {total} bytes")
    progress(done, total, final=True)


def _try_mirror(url, part, destination, retries, backoff_seconds, timeout_seconds, chunk_size, failures, log) -> bool:
    """Up to ``retries + 1`` attempts at one mirror; True once ``part`` is complete."""
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_seconds * 2 ** (attempt - 1)
            log(f"{url}: retry {attempt}/{retries} in {wait:g} s")
            time.sleep(wait)
        resumed = part.stat().st_size if part.exists() else 0
        log(f"{url} -> {destination}" + (f" (resuming at byte {resumed})" if resumed else ""))
        try:
            _transfer_once(url, part, timeout_seconds, chunk_size, Progress(destination.name))
            return True
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
            log(failures[-1])
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                return False  # not on this mirror: no point retrying it
        except (_Retryable, urllib.error.URLError, OSError, TimeoutError) as exc:
            failures.append(f"{url}: {exc}")
            log(failures[-1])
    return False


def fetch(
    urls: list[str],
    destination: str | os.PathLike,
    *,
    retries: int = 5,
    backoff_seconds: float = 2.0,
    timeout_seconds: float = 60.0,
    chunk_size: int = 1 << 20,
    verify: Callable[[Path], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Download the first mirror that works to ``destination``.

    Parameters
    ----------
    urls : list of str
        The same file at each mirror, tried in order.
    destination : path
        Final path. It appears only once the file is complete and verified.
    retries : int
        Attempts per mirror after the first; a partial file is resumed.
    backoff_seconds : float
        Wait before retry ``k`` is ``backoff_seconds * 2**k``.
    timeout_seconds : float
        Socket timeout of each request.
    chunk_size : int
        Bytes read per block.
    verify : callable, optional
        Called on the complete ``.part`` file; raises `VerificationError`
        to reject it (the part is then deleted, so a rerun fetches anew).
    log : callable, optional
        Receives one line per event (defaults to stderr).

    Returns
    -------
    destination : Path

    Raises
    ------
    DownloadError
        No mirror delivered the file; the message lists every mirror's last error.
    VerificationError
        The file arrived but failed ``verify``.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    if not urls:
        raise DownloadError(f"{destination}: no URL configured")
    failures: list[str] = []
    source = next((url for url in urls
                   if _try_mirror(url, part, destination, retries, backoff_seconds,
                                  timeout_seconds, chunk_size, failures, log)), None)
    if source is None:
        raise DownloadError(f"{destination.name}: every mirror failed:\n  " + "\n  ".join(failures))
    if verify is not None:
        try:
            verify(part)
        except VerificationError as exc:
            part.unlink(missing_ok=True)
            raise VerificationError(f"{destination}: downloaded from {source} but rejected: {exc}") from exc
    os.replace(part, destination)
    log(f"{destination}: complete, {destination.stat().st_size} bytes")
    return destination


def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in member.parts:
        raise VerificationError(f"{archive}: refusing member {name!r}: it would escape the target folder")
    return member


def extract_archive(
    archive: str | os.PathLike,
    target: str | os.PathLike,
    *,
    member_root: str,
    expected: Iterable[str] | None = None,
    check_file: Callable[[Path], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Extract the folder ``member_root/`` of a zip to ``target``, all or nothing.

    Parameters
    ----------
    archive : path
        The zip file.
    target : path
        Final folder; it appears only after every check passed.
    member_root : str
        Folder inside the archive whose contents become ``target`` (the real
        archives hold ``<Plate>/`` or ``BBBC014_v1_images/``). Other members
        are ignored but still checked for path escapes.
    expected : iterable of str, optional
        File names that must be present under ``member_root``.
    check_file : callable, optional
        Called on each extracted file; raises `VerificationError` for a bad one
        (e.g. a TIFF that does not decode).

    Raises
    ------
    VerificationError
        Unsafe member paths (``../``, absolute, symbolic links), CRC errors,
        missing expected files or a failed ``check_file``, each naming the file.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    archive, target = Path(archive), Path(target)
    staging = target.with_name(f".{target.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:  # check every name before writing anything
                _safe_member_path(info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise VerificationError(f"{archive}: refusing member {info.filename!r}: symbolic link")
            wanted = [i for i in members
                      if not i.is_dir() and PurePosixPath(i.filename).parts[:1] == (member_root,)]
            staging.mkdir(parents=True)
            for n, info in enumerate(wanted, 1):
                relative = PurePosixPath(*_safe_member_path(info.filename, archive).parts[1:])
                out_path = staging.joinpath(*relative.parts)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(out_path, "wb") as dst:
                        while block := src.read(1 << 20):
                            dst.write(block)
                except zipfile.BadZipFile as exc:
                    raise VerificationError(f"{archive}: member {info.filename!r} is corrupt ({exc})") from exc
                if check_file is not None:
                    check_file(out_path)
                if n % 100 == 0 or n == len(wanted):
                    log(f"{archive.name}: {n}/{len(wanted)} files extracted and checked")
        present = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()}
        if expected is not None:
            missing = sorted(set(expected) - present)
            if missing:
                raise VerificationError(
                    f"{archive}: {len(missing)} expected file(s) missing under {member_root}/, "
                    f"e.g. {missing[:3]}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise VerificationError(f"{archive}: cannot be extracted ({exc})") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
