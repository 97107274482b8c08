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

from moaflow import download
from moaflow.cli import main as moaflow
from moaflow.serve import StandinServer


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
        out = download.fetch([server.url + "big.zip"], tmp_path / "got.zip", verify=download.verify_zip,
                             log=lambda _: None)
    assert out.read_bytes() == (www / "big.zip").read_bytes()
    assert not out.with_name("got.zip.part").exists()


def test_download_killed_half_way_resumes_byte_identical(www, tmp_path):
    destination = tmp_path / "got.zip"
    part = tmp_path / "got.zip.part"
    size = (www / "big.zip").stat().st_size
    with StandinServer(www, rate=1_000_000) as slow:  # ~3 s for the whole file
        process = subprocess.Popen(
            [sys.executable, "-m", "moaflow", "fetch", "--url", slow.url + "big.zip", "--kind", "zip",
             "--output", str(destination)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while (not part.exists() or part.stat().st_size < size // 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = part.stat().st_size
    assert 0 < killed_at < size, "the kill must land half-way"
    assert not destination.exists(), "an interrupted download must not look finished"

    with StandinServer(www) as server:
        assert moaflow(["fetch", "--url", server.url + "big.zip", "--kind", "zip", "--output", str(destination)]) == 0
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
        download.fetch([server.url + "big.zip"], destination, verify=download.verify_zip, log=lambda _: None)
        assert any(r for _, _, r in server.requests), "the client did ask for a range"
    assert destination.read_bytes() == (www / "big.zip").read_bytes()


def test_mirrors_are_tried_in_order(www, tmp_path):
    with StandinServer(www) as server:
        closed_port = StandinServer(www)  # bound, never serving, then closed: connection refused
        dead = closed_port.url
        closed_port.server_close()
        urls = [dead + "big.zip", server.url + "missing/big.zip", server.url + "big.zip"]
        download.fetch(urls, tmp_path / "got.zip", retries=1, backoff_seconds=0.01, log=lambda _: None)
        assert [p for _, p, _ in server.requests] == ["/missing/big.zip", "/big.zip"]  # 404 is not retried
    assert (tmp_path / "got.zip").read_bytes() == (www / "big.zip").read_bytes()


def test_all_mirrors_failing_names_the_file_and_each_mirror(www, tmp_path):
    with StandinServer(www) as server:
        with pytest.raises(download.DownloadError) as info:
            download.fetch([server.url + "a/none.zip", server.url + "b/none.zip"], tmp_path / "none.zip",
                           retries=0, log=lambda _: None)
    assert "none.zip" in str(info.value) and "/a/none.zip" in str(info.value) and "/b/none.zip" in str(info.value)
    assert not (tmp_path / "none.zip").exists()


def test_corrupt_zip_is_rejected_and_leaves_nothing(www, tmp_path, capsys):
    data = bytearray((www / "big.zip").read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte inside the member's data: its CRC no longer matches
    (www / "corrupt.zip").write_bytes(bytes(data))
    destination = tmp_path / "corrupt.zip"
    with StandinServer(www) as server:
        status = moaflow(["fetch", "--url", server.url + "corrupt.zip", "--kind", "zip", "--output", str(destination)])
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
    assert moaflow(["extract-bbbc021", "--archive", str(archive), "--image-csv", str(csv), "--plate", plate,
                    "--output", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == sorted(good)


def test_truncated_tiff_is_named_and_nothing_is_left(tmp_path, capsys):
    plate = "Week1_22123"
    csv = _image_csv(tmp_path / "image.csv", plate, ["B02"])
    files = {f"B02_s1_w{c}.tif": _tiff_bytes() for c in (1, 2, 4)}
    files["B02_s1_w2.tif"] = files["B02_s1_w2.tif"][:300]  # the zip is fine, the TIFF inside is not
    archive = _plate_zip(tmp_path / "plate.zip", plate, files)
    target = tmp_path / "images" / plate
    status = moaflow(["extract-bbbc021", "--archive", str(archive), "--image-csv", str(csv), "--plate", plate,
                      "--output", str(target)])
    assert status == 1
    assert "B02_s1_w2.tif" in capsys.readouterr().err
    assert not target.exists()
    assert list((tmp_path / "images").iterdir()) == []  # no staging folder left either


def test_missing_tiff_is_an_error(tmp_path, capsys):
    plate = "Week1_22123"
    csv = _image_csv(tmp_path / "image.csv", plate, ["B02", "B03"])
    files = {f"B02_s1_w{c}.tif": _tiff_bytes() for c in (1, 2, 4)}
    archive = _plate_zip(tmp_path / "plate.zip", plate, files)
    status = moaflow(["extract-bbbc021", "--archive", str(archive), "--image-csv", str(csv), "--plate", plate,
                      "--output", str(tmp_path / "out")])
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
