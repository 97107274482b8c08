"""The study's normalisation: exact equality with the formulas, and the pre-truncation empty flags."""

import numpy as np
import pytest

from moaflow.preprocess import intensity, plates

from tests.conftest import DEFAULTS, THRESHOLD, direct_study


def test_study_normalisation_equals_the_formulas_exactly(small_plate):
    _, table = small_plate
    expected = direct_study(table)
    fields = [plates.read_field(r) for _, r in table[table["is_dmso"]].iterrows()]
    mean, std = intensity.dmso_statistics(fields)
    for _, row in table[~table["is_dmso"]].iterrows():
        image, above = intensity.study_normalise(plates.read_field(row), mean, std, None, threshold=THRESHOLD)
        uint8, floats = expected[row["image_number"]]
        assert np.array_equal(np.moveaxis(image, 0, -1), uint8), row["image_number"]
        # the empty-crop flags come from the float image before truncation, as in the original
        assert np.array_equal(np.moveaxis(above, 0, -1), floats > 255 / 5.1), row["image_number"]


def test_flags_differ_from_the_truncated_image_where_the_original_differs():
    """Values in (50, 51) truncate to 50 but are above 255/5.1 = 50.0: the original counts them."""
    field = np.zeros((3, 4, 4), np.uint16)
    field[:, 0, 0] = 1000
    mean, std = np.zeros(3), np.ones(3)
    lo, hi = intensity.anscombe(0), intensity.anscombe(1000)
    for count in range(1000):   # find a count whose scaled value lies in (50, 51)
        scaled = (intensity.anscombe(count) - lo) / (hi - lo) * 255
        if 50 < scaled < 51:
            break
    field[0, 1, 1] = count
    image, above = intensity.study_normalise(field, mean, std, None, threshold=THRESHOLD)
    stored_dapi = 2   # DAPI (read channel 0) is stored last
    assert image[stored_dapi, 1, 1] == 50 and above[stored_dapi, 1, 1]


def test_constant_field_is_zero_and_empty():
    image, above = intensity.study_normalise(np.full((3, 4, 4), 7, np.uint16), np.zeros(3), np.ones(3), None,
                                             threshold=THRESHOLD)
    assert not image.any() and not above.any()


def test_illumination_is_applied_by_division(small_plate):
    _, table = small_plate
    fields = [plates.read_field(r) for _, r in table[table["is_dmso"]].iterrows()]
    flat = np.ones((3, 64, 80))
    # the float path (with illumination) and the histogram path (without) agree to rounding
    assert np.allclose(intensity.dmso_statistics(fields, flat), intensity.dmso_statistics(fields), rtol=1e-12, atol=0)
    mean, std = intensity.dmso_statistics(fields, 2 * flat)
    assert np.allclose(mean, intensity.anscombe(np.stack(fields) / 2).mean(axis=(0, 2, 3)))
    field = plates.read_field(table[~table["is_dmso"]].iloc[0])
    slow = intensity.study_normalise(field, mean, std, flat, threshold=THRESHOLD)
    fast = intensity.study_normalise(field, mean, std, None, threshold=THRESHOLD)
    assert np.array_equal(slow[0], fast[0]) and np.array_equal(slow[1], fast[1])   # both paths agree


def test_percentile_normalisation(small_plate):
    _, table = small_plate
    fields = [plates.read_field(r) for _, r in table[table["is_dmso"]].iterrows()]
    low, high = intensity.percentile_statistics(fields, percentiles=(1, 99))
    image, above = intensity.percentile_normalise(fields[0], low, high, None, threshold=THRESHOLD)
    assert image.dtype == np.uint8 and image.shape == (3, 64, 80) and above.shape == image.shape
    dapi = image[2]  # stored order is (Actin, Tubulin, DAPI)
    assert 0.005 < np.mean(dapi == 0) < 0.2 and np.mean(dapi == 255) < 0.05


def test_no_dmso_fields_is_named():
    with pytest.raises(ValueError, match="no DMSO fields"):
        intensity.dmso_statistics([])


def test_percentile_normalisation_maps_the_configured_dmso_percentiles_to_0_and_255():
    """The plate's DMSO pixels, pooled per channel: their 1st and 99.9th percentiles (the configured ones)
    computed here by numpy independently, and a field's values at them become 0 and 255."""
    percentiles = DEFAULTS["preprocess"]["bbbc021"]["percentiles"]
    assert percentiles == [1, 99.9]
    rng = np.random.default_rng(4)
    fields = [rng.gamma(2.0, 300.0 * (c + 1), size=(3, 40, 50)).astype(np.uint16) for c in range(4)]
    low, high = intensity.percentile_statistics(fields, percentiles=percentiles)
    for channel in range(3):
        pooled = np.concatenate([f[channel].ravel() for f in fields]).astype(np.float64)
        assert low[channel] == pytest.approx(np.percentile(pooled, 1))
        assert high[channel] == pytest.approx(np.percentile(pooled, 99.9))
    probe = np.stack([np.array([[low[c], (low[c] + high[c]) / 2, high[c], high[c] * 2]]) for c in range(3)])
    image, _ = intensity.percentile_normalise(probe, low, high, None, threshold=THRESHOLD)
    # stored order is reversed (channel 0 last); each row: low -> 0, midpoint -> 127, high -> 255, above clipped
    assert image[::-1, 0].tolist() == [[0, 127, 255, 255]] * 3
