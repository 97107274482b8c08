"""Real HTTP on 127.0.0.1, real files, real processes: no mocks of the network code."""

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from moaflow.cli import main as moaflow
from moaflow.datasets import download, images
from moaflow.devtools.serve import StandinServer

from tests.conftest import DEFAULTS, REFERENCE, flags

REAL_MOA = Path(__file__).resolve().parents[2] / "src" / "moaflow" / "data" / "BBBC021_v1_moa.csv"


def fetch(urls, destination, **options):
    """`moaflow.datasets.download.fetch` with the config's default download settings, unless given."""
    settings = {k: DEFAULTS["download"][k] for k in ("retries", "backoff_seconds", "timeout_seconds")}
    return download.fetch(urls, destination, **{**settings, **options})


def _fetch_flags(base_url: str, filename: str, destination) -> list[str]:
    """`moaflow fetch` of one file from one mirror, with the default download settings."""
    return flags(filename=filename, destination=destination, base_urls=[base_url], settings=DEFAULTS["download"],
                 kind="zip")


def _extract_flags(archive, image_csv, plate, target, **settings) -> list[str]:
    """`moaflow extract-bbbc021` of one plate with the study's taxol rule and the default download settings
    (over which ``settings`` go)."""
    return flags(archive=archive, target=target, image_csv=image_csv, moa_csv=REAL_MOA, plate=plate, taxol_rule=True,
                 settings={**DEFAULTS["download"], **settings})


def _random_zip(path: Path, megabytes: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("payload/data.bin", rng.bytes(int(megabytes * 1e6)))
    return path


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _random_zip(root / "big.zip", 3.0)
    return root


def test_fetch_downloads_identical_bytes(www, tmp_path):
    with StandinServer(www) as server:
        receipt = fetch([server.url + "big.zip"], tmp_path / "got.zip", verify=download.verify_zip,
                                 log=lambda _: None)
    out = tmp_path / "got.zip"
    assert out.read_bytes() == (www / "big.zip").read_bytes()
    assert not out.with_name("got.zip.part").exists()
    assert receipt["sha256"] == download.file_digest(www / "big.zip")
    assert receipt["source"] == server.url + "big.zip" and receipt["transferred_bytes"] == out.stat().st_size


def test_a_verified_file_is_reused_without_a_transfer(www, tmp_path):
    with StandinServer(www) as server:
        fetch([server.url + "big.zip"], tmp_path / "got.zip", verify=download.verify_zip, log=lambda _: None)
        inode = (tmp_path / "got.zip").stat().st_ino
        n_requests = len(server.requests)
        receipt = fetch([server.url + "big.zip"], tmp_path / "got.zip", verify=download.verify_zip,
                                 log=lambda _: None)
        assert len(server.requests) == n_requests          # not even a HEAD
    assert receipt["source"] == "local copy" and receipt["transferred_bytes"] == 0
    assert (tmp_path / "got.zip").stat().st_ino == inode


def test_a_bad_local_file_is_kept_until_a_verified_one_replaces_it(www, tmp_path):
    destination = tmp_path / "got.zip"
    destination.write_bytes(b"not a zip")
    with StandinServer(www) as server:
        with pytest.raises(download.DownloadError):
            fetch([server.url + "missing.zip"], destination, verify=download.verify_zip, retries=0,
                           log=lambda _: None)
        assert destination.read_bytes() == b"not a zip"   # nothing verified arrived: nothing replaced
        fetch([server.url + "big.zip"], destination, verify=download.verify_zip, log=lambda _: None)
    assert destination.read_bytes() == (www / "big.zip").read_bytes()


def test_download_killed_half_way_resumes_byte_identical(www, tmp_path):
    destination = tmp_path / "got.zip"
    part = tmp_path / "got.zip.part"
    size = (www / "big.zip").stat().st_size
    with StandinServer(www, rate=1_000_000) as slow:  # ~3 s for the whole file
        process = subprocess.Popen(
            [sys.executable, "-m", "moaflow", "fetch", *_fetch_flags(slow.url, "big.zip", destination)],
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while (not part.exists() or part.stat().st_size < size // 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = part.stat().st_size
    assert 0 < killed_at < size, "the kill must land half-way"
    assert not destination.exists(), "an interrupted download must not look finished"

    with StandinServer(www) as server:
        assert moaflow(["fetch", *_fetch_flags(server.url, "big.zip", destination)]) == 0
        ranges = [r for _, _, r in server.requests if r]
    assert destination.read_bytes() == (www / "big.zip").read_bytes()
    assert ranges and int(ranges[0].split("=")[1].rstrip("-")) >= killed_at  # it resumed, not restarted
    assert not part.exists()


def test_server_ignoring_range_still_gives_the_right_file(www, tmp_path):
    destination = tmp_path / "got.zip"
    # A stale partial file with wrong bytes: a server that ignores Range answers
    # with the whole file, which must replace the part rather than append to it.
    (tmp_path / "got.zip.part").write_bytes(b"x" * 1000)
    with StandinServer(www, ignore_range=True) as server:
        fetch([server.url + "big.zip"], destination, verify=download.verify_zip, log=lambda _: None)
        assert any(r for _, _, r in server.requests), "the client did ask for a range"
    assert destination.read_bytes() == (www / "big.zip").read_bytes()


def test_mirrors_are_tried_in_order(www, tmp_path):
    with StandinServer(www) as server:
        closed_port = StandinServer(www)  # bound, never serving, then closed: connection refused
        dead = closed_port.url
        closed_port.server_close()
        urls = [dead + "big.zip", server.url + "missing/big.zip", server.url + "big.zip"]
        fetch(urls, tmp_path / "got.zip", retries=1, backoff_seconds=0.01, log=lambda _: None)
        assert [p for _, p, _ in server.requests] == ["/missing/big.zip", "/big.zip"]  # 404 is not retried
    assert (tmp_path / "got.zip").read_bytes() == (www / "big.zip").read_bytes()


def test_all_mirrors_failing_names_the_file_and_each_mirror(www, tmp_path):
    with StandinServer(www) as server:
        with pytest.raises(download.DownloadError) as info:
            fetch([server.url + "a/none.zip", server.url + "b/none.zip"], tmp_path / "none.zip",
                           retries=0, log=lambda _: None)
    assert "none.zip" in str(info.value) and "/a/none.zip" in str(info.value) and "/b/none.zip" in str(info.value)
    assert not (tmp_path / "none.zip").exists()


def test_corrupt_zip_is_rejected_and_leaves_nothing(www, tmp_path, capsys):
    data = bytearray((www / "big.zip").read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte inside the member's data: its CRC no longer matches
    (www / "corrupt.zip").write_bytes(bytes(data))
    destination = tmp_path / "corrupt.zip"
    with StandinServer(www) as server:
        status = moaflow(["fetch", *_fetch_flags(server.url, "corrupt.zip", destination)])
    assert status == 1
    error = capsys.readouterr().err
    assert "corrupt.zip" in error and "CRC" in error
    assert not destination.exists() and not (tmp_path / "corrupt.zip.part").exists()


# ----------------------------------------------------------------- extraction

def _plate_zip(path: Path, plate: str, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name if name.startswith(("../", "/")) else f"{plate}/{name}", data)
    return path


def _tiff_bytes(shape=(16, 20)) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.arange(np.prod(shape), dtype=np.uint16).reshape(shape))
    return buffer.getvalue()


def _image_csv(path: Path, plate: str, wells: list[str]) -> Path:
    header = ("TableNumber,ImageNumber,Image_FileName_DAPI,Image_PathName_DAPI,Image_FileName_Tubulin,"
              "Image_PathName_Tubulin,Image_FileName_Actin,Image_PathName_Actin,Image_Metadata_Plate_DAPI,"
              "Image_Metadata_Well_DAPI,Replicate,Image_Metadata_Compound,Image_Metadata_Concentration")
    lines = [header] + [
        f"1,{i},{w}_s1_w1.tif,Week1/{plate},{w}_s1_w2.tif,Week1/{plate},{w}_s1_w4.tif,Week1/{plate},{plate},{w},1,DMSO,0"
        for i, w in enumerate(wells)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_extract_checks_every_tiff(tmp_path):
    plate = "Week1_22123"
    csv = _image_csv(tmp_path / "image.csv", plate, ["B02", "B03"])
    good = {f"{w}_s1_w{c}.tif": _tiff_bytes() for w in ("B02", "B03") for c in (1, 2, 4)}
    archive = _plate_zip(tmp_path / "plate.zip", plate, good)
    target = tmp_path / "images" / plate
    assert moaflow(["extract-bbbc021", *_extract_flags(archive, csv, plate, target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == sorted([*good, download.EXTRACT_MANIFEST])


def test_only_the_fields_the_study_reads_are_written(tmp_path, capsys):
    """A member the study does not read (here a 5 MB file no field names, and a field of a compound without an
    MoA) stays in the archive: not written, not counted as verified, its size said in the log."""
    plate = "Week1_22123"
    csv = _image_csv(tmp_path / "image.csv", plate, ["B02"])
    with open(csv, "a") as handle:   # a field of a compound the MoA table does not annotate
        handle.write(f"1,9,C05_s1_w1.tif,Week1/{plate},C05_s1_w2.tif,Week1/{plate},C05_s1_w4.tif,Week1/{plate},{plate},"
                     "C05,1,unannotated,1\n")
    files = {f"{w}_s1_w{c}.tif": _tiff_bytes() for w in ("B02", "C05") for c in (1, 2, 4)}
    files["large-unlisted.bin"] = bytes(5_000_000)
    archive = _plate_zip(tmp_path / "plate.zip", plate, files)
    target = tmp_path / "images" / plate
    assert moaflow(["extract-bbbc021", *_extract_flags(archive, csv, plate, target, keep_archives=True)]) == 0
    assert sorted(p.name for p in target.iterdir()) == sorted([f"B02_s1_w{c}.tif" for c in (1, 2, 4)]
                                                              + [download.EXTRACT_MANIFEST])
    assert "3 file(s) the study reads extracted; 4 others (5.0 MB) left in the archive" in capsys.readouterr().err


def test_a_reused_extraction_is_checked_against_the_archives_crcs(tmp_path, capsys):
    """Reusing an extraction re-reads its files' CRC-32s: two same-size TIFFs swapped after extraction are
    caught and extracted again (sizes alone would pass them)."""
    plate = "Week1_22123"
    csv = _image_csv(tmp_path / "image.csv", plate, ["B02"])
    files = {f"B02_s1_w{c}.tif": _tiff_bytes() for c in (1, 2, 4)}
    files["B02_s1_w2.tif"] = _tiff_bytes()[:-2] + b"\x07\x00"   # same size, other pixels
    archive = _plate_zip(tmp_path / "plate.zip", plate, files)
    target = tmp_path / "images" / plate
    download.write_receipt(download.fetch_published("plate.zip", archive, base_urls=["http://127.0.0.1:9/"],
                                                    settings=DEFAULTS["download"], published=None, kind="zip",
                                                    log=lambda _: None), str(archive) + ".verified.json", archive)
    options = _extract_flags(archive, csv, plate, target, keep_archives=True)
    assert moaflow(["extract-bbbc021", *options]) == 0
    assert moaflow(["extract-bbbc021", *options]) == 0 and "nothing extracted" in capsys.readouterr().err
    one, two = target / "B02_s1_w1.tif", target / "B02_s1_w2.tif"
    swapped = one.read_bytes()
    one.write_bytes(two.read_bytes())
    two.write_bytes(swapped)
    assert moaflow(["extract-bbbc021", *options]) == 0
    assert "differs from the archive's (size or CRC-32): extracting again" in capsys.readouterr().err
    assert two.read_bytes() == files["B02_s1_w2.tif"]


def test_archives_are_released_after_extraction_and_a_wider_study_says_what_to_refetch(tmp_path, capsys):
    """download.keep_archives false: the zip goes once its extraction is verified; a rerun reuses the extraction
    without it; a study that now reads a field not extracted names the archive to fetch again."""
    plate = "Week1_22123"
    csv = _image_csv(tmp_path / "image.csv", plate, ["B02"])
    files = {f"{w}_s1_w{c}.tif": _tiff_bytes() for w in ("B02", "C05") for c in (1, 2, 4)}
    archive = _plate_zip(tmp_path / "plate.zip", plate, files)
    download.write_receipt(download.fetch_published("plate.zip", archive, base_urls=["http://127.0.0.1:9/"],
                                                    settings=DEFAULTS["download"], published=None, kind="zip",
                                                    log=lambda _: None), str(archive) + ".verified.json", archive)
    target = tmp_path / "images" / plate
    options = _extract_flags(archive, csv, plate, target, keep_archives=False)
    assert moaflow(["extract-bbbc021", *options]) == 0 and not archive.exists()
    assert "removed after its verified extraction" in capsys.readouterr().err
    assert moaflow(["extract-bbbc021", *options]) == 0 and "nothing extracted" in capsys.readouterr().err
    with open(csv, "a") as handle:   # the study now reads another DMSO field of the plate
        handle.write(f"1,9,C05_s1_w1.tif,Week1/{plate},C05_s1_w2.tif,Week1/{plate},C05_s1_w4.tif,Week1/{plate},{plate},"
                     "C05,1,DMSO,0\n")
    assert moaflow(["extract-bbbc021", *options]) == 1
    error = capsys.readouterr().err
    assert "plate.zip" in error and "keep_archives" in error and "--forcerun download_bbbc021_plate" in error
    assert (target / "B02_s1_w1.tif").is_file()      # the good extraction is kept


def test_truncated_tiff_is_named_and_nothing_is_left(tmp_path, capsys):
    plate = "Week1_22123"
    csv = _image_csv(tmp_path / "image.csv", plate, ["B02"])
    files = {f"B02_s1_w{c}.tif": _tiff_bytes() for c in (1, 2, 4)}
    files["B02_s1_w2.tif"] = files["B02_s1_w2.tif"][:300]  # the zip is fine, the TIFF inside is not
    archive = _plate_zip(tmp_path / "plate.zip", plate, files)
    target = tmp_path / "images" / plate
    status = moaflow(["extract-bbbc021", *_extract_flags(archive, csv, plate, target)])
    assert status == 1
    assert "B02_s1_w2.tif" in capsys.readouterr().err
    assert not target.exists()
    assert list((tmp_path / "images").iterdir()) == []  # no staging folder left either


def test_missing_tiff_is_an_error(tmp_path, capsys):
    plate = "Week1_22123"
    csv = _image_csv(tmp_path / "image.csv", plate, ["B02", "B03"])
    files = {f"B02_s1_w{c}.tif": _tiff_bytes() for c in (1, 2, 4)}
    archive = _plate_zip(tmp_path / "plate.zip", plate, files)
    status = moaflow(["extract-bbbc021", *_extract_flags(archive, csv, plate, tmp_path / "out")])
    assert status == 1
    error = capsys.readouterr().err
    assert "missing" in error and "B03_s1_w" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("evil", ["../escaped.txt", "/etc/escaped.txt", "Week1_22123/../../escaped.txt"])
def test_entries_escaping_the_target_are_refused(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Week1_22123/ok.tif", _tiff_bytes())
        zf.writestr(evil, b"gotcha")
    work = tmp_path / "deep" / "images"
    work.mkdir(parents=True)
    with pytest.raises(download.VerificationError, match="escape"):
        download.extract_archive(archive, work / "Week1_22123", member_root="Week1_22123", log=lambda _: None)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (work / "Week1_22123").exists()


def test_symlink_entries_are_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("Week1_22123/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(download.VerificationError, match="symbolic link"):
        download.extract_archive(archive, tmp_path / "out", member_root="Week1_22123", log=lambda _: None)


# ----------------------------------------------------------------- metadata CSVs



@pytest.fixture
def csv_www(tmp_path):
    root = tmp_path / "www"
    for mirror in ("a", "b"):
        (root / mirror).mkdir(parents=True)
        shutil.copyfile(REAL_MOA, root / mirror / "BBBC021_v1_moa.csv")
    return root


@pytest.mark.parametrize("fault", ["html", "empty", "cut-no-length", "short-length"])
def test_a_bad_csv_from_one_mirror_leads_to_the_next(csv_www, tmp_path, fault):
    """Before: an error page, an empty or a truncated CSV was kept as a finished download.
    After: it is refused (content, or the known size and checksum) and the next mirror serves the file."""
    published = {"bytes": REAL_MOA.stat().st_size, "sha256": download.file_digest(REAL_MOA)}
    with StandinServer(csv_www, faults={"/a/BBBC021_v1_moa.csv": fault}) as server:
        receipt = download.fetch_published(
            "BBBC021_v1_moa.csv", tmp_path / "moa.csv", base_urls=[server.url + "a/", server.url + "b/"],
            settings={"retries": 0, "backoff_seconds": 0, "timeout_seconds": 10}, published=published,
            kind="moa_csv", log=lambda _: None)
    assert (tmp_path / "moa.csv").read_bytes() == REAL_MOA.read_bytes()
    assert receipt["source"] == server.url + "b/BBBC021_v1_moa.csv"


@pytest.mark.parametrize("fault, message", [("html", "missing column"), ("empty", "empty file"),
                                            ("cut-no-length", "lack values|missing column|not a readable")])
def test_a_bad_csv_is_refused_by_its_content_without_a_checksum(csv_www, tmp_path, fault, message):
    with StandinServer(csv_www, faults={"/a/BBBC021_v1_moa.csv": fault}) as server:
        with pytest.raises(download.DownloadError, match=message):
            download.fetch_published("BBBC021_v1_moa.csv", tmp_path / "moa.csv", base_urls=[server.url + "a/"],
                                     settings={"retries": 0, "backoff_seconds": 0, "timeout_seconds": 10},
                                     published=None, kind="moa_csv", log=lambda _: None)
    assert not (tmp_path / "moa.csv").exists() and not (tmp_path / "moa.csv.part").exists()


def test_a_truncated_image_csv_is_caught_by_its_published_size(tmp_path):
    """Cut at a row boundary, a CSV still parses: only the published size/checksum can tell."""
    real = REFERENCE / "bbbc021" / "BBBC021_v1_image.csv"
    lines = real.read_bytes().splitlines(keepends=True)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "BBBC021_v1_image.csv").write_bytes(b"".join(lines[: len(lines) // 2]))
    with StandinServer(tmp_path / "www") as server:
        with pytest.raises(download.DownloadError, match="bytes, the published file has 3,669,969"):
            download.fetch_published("BBBC021_v1_image.csv", tmp_path / "image.csv", base_urls=[server.url],
                                     settings={"retries": 0, "backoff_seconds": 0, "timeout_seconds": 10},
                                     published={"bytes": 3669969}, kind="image_csv", log=lambda _: None)


# ----------------------------------------------------------------- extraction limits and swaps

def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    """Before: a 6.7 MB zip holding a 5 GiB member wrote 5.4 GB before it was refused. After: the declared
    sizes are checked against the limit first (scaled down here: 64 MB declared, 16 MB allowed)."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Week1_22123/huge.tif", bytes(64 << 20))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(download.VerificationError, match=r"declare 0.06 GiB.*limit of 0.02 GiB.*max_extracted_gb"):
        download.extract_archive(archive, tmp_path / "out", member_root="Week1_22123", max_bytes=16 << 20,
                                 log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip"]


def test_a_failed_extraction_keeps_the_previous_good_folder(tmp_path):
    """Before: the plate folder was deleted before its rule reran, and a failing zip left nothing.
    After: the new extraction is staged and checked; the good folder stays until a verified one replaces it."""
    plate = "Week1_22123"
    good = _plate_zip(tmp_path / "good.zip", plate, {f"B02_s1_w{c}.tif": _tiff_bytes() for c in (1, 2, 4)})
    target = tmp_path / "images" / plate
    download.extract_archive(good, target, member_root=plate, check_file=images.read_tiff,
                             archive_sha256=download.file_digest(good), log=lambda _: None)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    files = {f"B02_s1_w{c}.tif": _tiff_bytes() for c in (1, 2, 4)}
    files["B02_s1_w2.tif"] = files["B02_s1_w2.tif"][:300]
    bad = _plate_zip(tmp_path / "bad.zip", plate, files)
    with pytest.raises(download.VerificationError, match="B02_s1_w2.tif"):
        download.extract_archive(bad, target, member_root=plate, check_file=images.read_tiff,
                                 archive_sha256=download.file_digest(bad), log=lambda _: None)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == [plate]   # no staging or old folder left


def test_the_same_archive_is_not_extracted_twice(tmp_path):
    plate = "Week1_22123"
    archive = _plate_zip(tmp_path / "good.zip", plate, {"B02_s1_w1.tif": _tiff_bytes()})
    digest = download.file_digest(archive)
    target = tmp_path / "images" / plate
    first = download.extract_archive(archive, target, member_root=plate, archive_sha256=digest, log=lambda _: None)
    mtime = (target / "B02_s1_w1.tif").stat().st_mtime_ns
    second = download.extract_archive(archive, target, member_root=plate, archive_sha256=digest, log=lambda _: None)
    assert not first["reused"] and second["reused"] and second["files"] == first["files"]
    assert (target / "B02_s1_w1.tif").stat().st_mtime_ns == mtime
    (target / "B02_s1_w1.tif").write_bytes(b"changed")      # a damaged folder is extracted anew
    assert not download.extract_archive(archive, target, member_root=plate, archive_sha256=digest,
                                        log=lambda _: None)["reused"]


def test_an_interrupted_swap_is_repaired(tmp_path):
    plate = "Week1_22123"
    archive = _plate_zip(tmp_path / "good.zip", plate, {"B02_s1_w1.tif": _tiff_bytes()})
    digest = download.file_digest(archive)
    target = tmp_path / "images" / plate
    download.extract_archive(archive, target, member_root=plate, archive_sha256=digest, log=lambda _: None)
    os.replace(target, target.with_name(f".{plate}.old"))   # killed between the swap's two renames
    assert download.extract_archive(archive, target, member_root=plate, archive_sha256=digest,
                                    log=lambda _: None)["reused"]
