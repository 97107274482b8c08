"""Illumination correction on a stand-in whose illumination field is known."""

import numpy as np
import pandas as pd
import pytest
import tifffile

from moaflow.datasets import download
from moaflow.preprocess import illumination
from moaflow.devtools import standin
from moaflow.errors import VerificationError

CHANNELS = ("DAPI", "Tubulin", "Actin")


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    out = tmp_path_factory.mktemp("illum")
    manifest = standin.write_bbbc021(out, n_plates=1, sites=4, dmso_wells=12, moas=["DNA damage"],
                                     compounds_per_moa=1, concentrations_per_compound=1, shape=(128, 160),
                                     seed=3, log=lambda _: None)
    name = manifest["plates"][0]
    download.extract_archive(out / "www" / "BBBC021" / f"BBBC021_v1_images_{name}.zip", out / "images",
                             member_root=name, log=lambda _: None)
    csv = pd.read_csv(out / "www" / "BBBC021" / "BBBC021_v1_image.csv")
    return out, name, csv


@pytest.mark.parametrize("channel", CHANNELS)
def test_corrected_dmso_mean_is_flat(plate, channel):
    """Measure: CV of the DMSO mean image after 16x16 block averaging (cells average out,
    the illumination does not). Correction must cut it at least 4-fold, and the
    estimated function must follow the true field (Pearson r >= 0.9)."""
    out, name, csv = plate
    average = illumination.mean_image(out / "images" / n for n in csv[f"Image_FileName_{channel}"])
    function = illumination.illumination_function(average, filter_size=12, downscale=2, robust_percentile=2)
    dmso = [tifffile.imread(out / "images" / n).astype(np.float64)
            for n in csv.loc[csv["Image_Metadata_Compound"] == "DMSO", f"Image_FileName_{channel}"]]
    before = illumination.coefficient_of_variation(np.mean(dmso, axis=0), block=16)
    after = illumination.coefficient_of_variation(np.mean([f / function for f in dmso], axis=0), block=16)
    assert after * 4 <= before, (before, after)
    truth = np.load(out / "truth" / "bbbc021" / f"illumination_{name}_{channel}.npy")
    assert np.corrcoef(function.ravel(), truth.ravel())[0, 1] >= 0.9


def test_function_is_rescaled_by_the_2nd_percentile():
    rng = np.random.default_rng(0)
    average = 100 + rng.uniform(0, 50, size=(64, 80)).cumsum(axis=1) / 10
    function = illumination.illumination_function(average, filter_size=5, robust_percentile=2)
    assert function.min() == 1.0
    # everything at or below the robust minimum is clipped to exactly 1: about 2 % of pixels
    assert 0.015 <= np.mean(function == 1.0) <= 0.03


def test_function_keeps_the_shape_with_downscaling():
    y, x = np.mgrid[0:96, 0:120]
    average = 1000 - 0.05 * ((y - 40) ** 2 + (x - 70) ** 2)
    full = illumination.illumination_function(average, filter_size=5, robust_percentile=2)
    quarter = illumination.illumination_function(average, filter_size=5, downscale=4, robust_percentile=2)
    assert quarter.shape == average.shape
    assert np.abs(quarter - full).max() < 0.05 * full.max()


@pytest.mark.parametrize("kwargs", [dict(filter_size=0), dict(filter_size=5, downscale=0)])
def test_bad_parameters_are_named(kwargs):
    with pytest.raises(ValueError, match="filter_size|downscale"):
        illumination.illumination_function(np.ones((8, 8)), robust_percentile=2, **kwargs)


def test_truncated_tiff_is_named(tmp_path):
    path = tmp_path / "B02_s1_w1.tif"
    tifffile.imwrite(path, np.ones((64, 80), np.uint16))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VerificationError, match="B02_s1_w1.tif"):
        illumination.mean_image([path])


def test_plot_is_written_atomically(tmp_path):
    functions = {c: np.ones((8, 10), np.float32) + i for i, c in enumerate(CHANNELS)}
    illumination.plot_functions(functions, tmp_path / "p.png", "plate")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
