"""Crops, the empty-crop rule and resizing: exactly what the original code's OpenCV calls give."""

import cv2
import numpy as np
import pytest

from moaflow.preprocess import crops


def _smooth_field(shape, seed=0):
    """A real-sized uint8 field: smooth structure plus noise, channels first."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    base = [127 + 100 * np.sin(y / (37 + 9 * c)) * np.cos(x / (53 - 7 * c)) for c in range(3)]
    return np.clip(np.stack(base) + rng.normal(0, 12, (3, *shape)), 0, 255).astype(np.uint8)


def test_crops_equal_the_original_opencv_resize_on_real_sized_fields():
    """1024x1280 field -> four 512x640 crops -> 224, 299 and 256, as the original: cv2.resize(INTER_AREA)
    of the 8-bit crop (read back by cv2 as BGR, which does not change a per-channel resize)."""
    field = _smooth_field((1024, 1280))
    above = np.ones_like(field, bool)
    kept, resized = crops.field_crops(field, above, (2, 2), [224, 299, 256])
    assert kept == [0, 1, 2, 3]
    channels_last = np.moveaxis(field, 0, -1)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        crop = channels_last[r * 512:(r + 1) * 512, c * 640:(c + 1) * 640]
        bgr = np.ascontiguousarray(crop[..., ::-1])
        for size in (224, 299, 256):
            original = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)[..., ::-1]
            assert np.array_equal(resized[size][k], original), (k, size)


def test_empty_crop_rule():
    above = np.zeros((3, 10, 100), bool)             # 3000 values
    assert crops.is_empty(above)
    above.flat[:6] = True                            # 6 / 3000 = 0.002 exactly: still empty (<=)
    assert crops.is_empty(above)
    above.flat[6] = True                             # 7 / 3000 > 0.002: kept
    assert not crops.is_empty(above)


def test_empty_crops_are_not_kept():
    field = np.zeros((3, 40, 60), np.uint8)
    above = np.zeros_like(field, bool)
    above[:, 20:, :30] = True                        # only the bottom-left crop has signal
    kept, resized = crops.field_crops(field, above, (2, 2), [8])
    assert kept == [2] and resized[8].shape == (1, 8, 8, 3)


def test_crops_are_row_major_and_channels_last():
    image = np.zeros((3, 40, 60), np.uint8)
    image[:, :20, 30:] = 200                          # top-right quadrant bright
    kept, resized = crops.field_crops(image, np.ones_like(image, bool), (2, 2), [8, 12])
    assert resized[8].shape == (4, 8, 8, 3) and resized[12].shape == (4, 12, 12, 3)
    assert [int(c.mean()) for c in resized[8]] == [0, 200, 0, 0]


@pytest.mark.parametrize("grid", [(200, 200), (0, 2)])
def test_a_grid_too_fine_for_the_field_is_named(grid):
    with pytest.raises(ValueError, match=r"crop_grid.*|crop grid"):
        crops.crop_boxes((64, 80), grid)
