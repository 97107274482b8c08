"""Image content checks: type, size and pixel count are checked from the header, naming the file."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from moaflow.datasets import images
from moaflow.errors import VerificationError


def _tiff(path, array, **kwargs):
    tifffile.imwrite(path, array, **kwargs)
    return path


@pytest.mark.parametrize("dtype, values", [(np.uint8, 7), (np.int16, -5), (np.float32, 0.5), (np.uint32, 9)])
def test_wrong_pixel_type_is_named(tmp_path, dtype, values):
    path = _tiff(tmp_path / "B02_s1_w1.tif", np.full((16, 20), values, dtype))
    with pytest.raises(VerificationError, match=rf"B02_s1_w1.tif: pixel type {np.dtype(dtype)}, expected uint16"):
        images.read_tiff(path)


def test_a_16_bit_field_reads(tmp_path):
    array = np.arange(320, dtype=np.uint16).reshape(16, 20)
    assert np.array_equal(images.read_tiff(_tiff(tmp_path / "ok.tif", array), shape=(16, 20)), array)


def test_multichannel_tiff_is_refused(tmp_path):
    path = _tiff(tmp_path / "rgb.tif", np.zeros((16, 20, 3), np.uint16), photometric="rgb")
    with pytest.raises(VerificationError, match="rgb.tif: expected a single-channel"):
        images.read_tiff(path)


def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    """A small compressed file that would decode to 128 MB (the real bomb: 1 MB -> 1 GB)."""
    path = _tiff(tmp_path / "bomb.tif", np.zeros((8000, 8000), np.uint16), compression="zlib")
    assert path.stat().st_size < 2_000_000

    def no_decoding(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(tifffile, "imread", no_decoding)          # header only: nothing may decode it
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_decoding)
    with pytest.raises(VerificationError, match=r"bomb.tif: 8000x8000 = 64,000,000 pixels exceeds the limit"):
        images.read_tiff(path, max_pixels=16_000_000)


def test_the_odd_size_is_named_even_when_it_comes_first(tmp_path):
    odd = _tiff(tmp_path / "A_first.tif", np.zeros((12, 17), np.uint16))
    good = [_tiff(tmp_path / f"B{i}.tif", np.zeros((16, 20), np.uint16)) for i in range(3)]
    with pytest.raises(VerificationError) as info:
        images.common_shape([odd, *good])
    assert "A_first.tif (12x17)" in str(info.value) and "16x20 of 3 of 4" in str(info.value)
    assert all(p.name not in str(info.value) for p in good)
    assert images.common_shape(good) == (16, 20)


def test_truncated_tiff_is_named(tmp_path):
    path = _tiff(tmp_path / "cut.tif", np.ones((64, 80), np.uint16))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VerificationError, match="cut.tif"):
        images.read_tiff(path)


def test_gray8_reads_and_refuses_colour_and_huge(tmp_path):
    Image.fromarray(np.full((10, 12), 9, np.uint8)).save(tmp_path / "ok.bmp")
    assert images.read_gray8(tmp_path / "ok.bmp").shape == (10, 12)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "rgb.bmp")
    with pytest.raises(VerificationError, match="rgb.bmp: image mode RGB"):
        images.read_gray8(tmp_path / "rgb.bmp")
    with pytest.raises(VerificationError, match="ok.bmp: 12x10 pixels exceed"):
        images.read_gray8(tmp_path / "ok.bmp", max_pixels=100)
    (tmp_path / "junk.bmp").write_bytes(b"not an image")
    with pytest.raises(VerificationError, match="junk.bmp: not a readable image"):
        images.read_gray8(tmp_path / "junk.bmp")
