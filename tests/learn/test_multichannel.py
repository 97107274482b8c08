"""Screens of more than three channels through the chain: crops table, store, training, occlusion by channel."""

import pandas as pd
import numpy as np
import pytest

from moaflow.analysis.interpretation import channel_occlusion
from moaflow.datasets.tables import crops_table
from moaflow.devtools import standin
from moaflow.files import write_array, write_table
from moaflow.learn import folds, train
from moaflow.learn.models import load_model
from moaflow.learn.presets import hyperparameters
from moaflow.preprocess.crops import resize_area
from moaflow.preprocess.plates import preprocess_crops
from tests.conftest import JOB

CELL_PAINTING = ["DNA", "ER", "RNA", "AGP", "Mito"]
RXRX = ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]


@pytest.mark.parametrize("channels, deciding, per_channel_files", [
    (CELL_PAINTING, "Mito", True),     # Cell Painting's five channels, one grey file per channel
    (RXRX, "ConA", False),             # RxRx's six, one multi-page TIFF per crop
])
def test_a_fold_of_many_channels_trains_above_chance_and_is_read_from_its_deciding_channel(
        tmp_path, channels, deciding, per_channel_files):
    """Two MoAs that differ in one channel only (fragmented dots against filaments); the lab CNN, its first
    convolution over every channel, on a held-out compound of each MoA. Blanking the deciding channel must
    cost the true class more probability than blanking any other."""
    settings = standin.write_multichannel_crops(tmp_path / "set", channels, deciding=deciding,
                                                per_channel_files=per_channel_files, seed=1)
    table = crops_table(settings["images"], settings["metadata"], columns=settings["columns"],
                        filename=settings["filename"], log=lambda _: None)
    assert ("channel_files" in table) == per_channel_files
    arrays, index = preprocess_crops(table, sizes=[64], channels=len(channels))
    assert arrays[64].shape == (len(table), 64, 64, len(channels))
    write_array(arrays[64], tmp_path / "64.npy")
    write_table(index, tmp_path / "index.parquet")
    folds.write_folds(folds.leave_one_compound_out(index), tmp_path / "folds.tsv")
    names = ["fragmenting-0", "tubular-1"]
    hyper = hyperparameters("lab", "lab_cnn", {"epochs": 12, "batch_size": 8, "class_weights": True})
    summary = train.train_job(tmp_path / "64.npy", tmp_path / "index.parquet", tmp_path / "folds.tsv", names,
                              architecture="lab_cnn", weights=None, hyper=hyper, seed=0,
                              models_dir=tmp_path / "models", checkpoints_dir=tmp_path / "ck", log=lambda _: None,
                              **JOB)
    accuracies = [summary["folds"][n]["test_accuracy"] for n in names]
    assert min(accuracies) >= 0.75, accuracies     # chance: 0.5
    model = load_model(tmp_path / "models" / names[0] / "model.keras")
    held_out = (index["compound"] == "fragmenting-0").to_numpy()
    drops = channel_occlusion(model, arrays[64][held_out], np.zeros(held_out.sum(), int)).mean(0)
    assert channels[int(np.argmax(drops))] == deciding, dict(zip(channels, drops.round(3)))


def test_channel_files_must_exist_and_agree(tmp_path):
    settings = standin.write_multichannel_crops(tmp_path / "set", CELL_PAINTING, deciding="Mito",
                                                compounds_per_moa=1, wells_per_compound=1, crops_per_well=1)
    missing = next((tmp_path / "set" / "images").glob("*_ER.png"))
    missing.unlink()
    from moaflow.errors import MetadataError, VerificationError

    with pytest.raises(MetadataError, match=r"crop files are missing.*_ER\.png"):
        crops_table(settings["images"], settings["metadata"], columns=settings["columns"],
                    filename=settings["filename"], log=lambda _: None)
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(missing)   # back, but smaller than the crop's others
    table = crops_table(settings["images"], settings["metadata"], columns=settings["columns"],
                        filename=settings["filename"], log=lambda _: None)
    with pytest.raises(VerificationError, match=r"_ER\.png: shape \(32, 32\).*first channel file"):
        preprocess_crops(table, sizes=[32], channels=5)
    with pytest.raises(VerificationError, match="2 channel files, expected 5"):
        preprocess_crops(table.assign(channel_files=[list(f[:2]) for f in table["channel_files"]]), sizes=[32],
                         channels=5)


def test_the_config_names_the_same_channels_as_the_files():
    from moaflow.config import check, defaults

    config = defaults()
    config["crops"] = {"paint": {"images": "i", "metadata": "m.csv", "filename": {"DNA": "{f}_1.png", "ER": "{f}_2.png"},
                                 "columns": {}, "channels": ["ER", "RNA"]}}
    config["datasets"] = ["paint"]
    config["training"]["paint"] = config["preprocess"]["paint"] = {}
    with pytest.raises(ValueError, match=r"crops.paint.filename names the channels \['DNA', 'ER'\].*for each channel"):
        check(config)


def test_more_than_four_channels_are_each_resized_as_the_grey_image_they_are():
    image = np.random.default_rng(0).integers(0, 256, (50, 50, 6), dtype=np.uint8)
    resized = resize_area(image, 20)
    assert resized.shape == (20, 20, 6)
    for c in range(6):
        assert np.array_equal(resized[..., c], resize_area(image[..., c], 20))


def test_sixteen_bit_channels_are_scaled_per_plate_to_their_control_crops(tmp_path):
    """Cell Painting's files are 16-bit, and plates differ in brightness: with ``normalisation: percentile``
    each plate's channels map its DMSO crops' 0.1-99.9 percentiles to 0-255, so a plate twice as bright stores
    the same 8-bit crops; without it a 16-bit file is refused, naming it."""
    import tifffile

    from moaflow.errors import VerificationError
    from moaflow.preprocess.plates import preprocess_crops_files

    rng = np.random.default_rng(0)
    base = rng.integers(100, 4000, (6, 16, 16, 2))   # three crops per plate: DMSO, DMSO, treated
    rows = []
    for k in range(6):
        plate, compound = f"P{k // 3}", ("DMSO" if k % 3 < 2 else "x")
        gain = 2 if plate == "P1" else 1                # plate P1 imaged twice as bright
        tifffile.imwrite(tmp_path / f"c{k}.tif", (base[k % 3] * gain).astype(np.uint16), photometric="minisblack")
        rows.append({"compound": compound, "concentration": 1.0, "moa": "m", "plate": plate, "well": "B02",
                     "replicate": 1, "source": str(tmp_path / f"c{k}.tif")})
    pd.DataFrame(rows).to_parquet(tmp_path / "table.parquet")
    preprocess_crops_files(tmp_path / "table.parquet", tmp_path / "crops", sizes=[16], channels=2,
                           control_compound="DMSO", controls_dir=tmp_path / "dmso", normalisation="percentile",
                           percentiles=(0.1, 99.9), log=lambda _: None)
    dmso, treated = np.load(tmp_path / "dmso" / "16.npy"), np.load(tmp_path / "crops" / "16.npy")
    assert dmso.dtype == np.uint8 and dmso.shape == (4, 16, 16, 2)
    assert np.array_equal(dmso[:2], dmso[2:]) and np.array_equal(treated[0], treated[1])   # the plates agree
    assert dmso.max() == 255 and dmso.min() == 0
    with pytest.raises(VerificationError, match=r"c0\.tif.*uint16.*expected.*uint8"):
        preprocess_crops_files(tmp_path / "table.parquet", tmp_path / "raw", sizes=[16], channels=2,
                               log=lambda _: None)
