import numpy as np
import pytest

from moaflow import models, train
from moaflow.datasets import class_weights


def test_lab_cnn_has_the_labs_parameter_count():
    model = models.lab_cnn((256, 256, 3), 6)
    assert model.count_params() == 1_121_062
    assert model.layers[0].count_params() == 1_216
    assert [tuple(layer.output.shape[1:]) for layer in model.layers[:6]] == [
        (128, 128, 16), (64, 64, 16), (64, 64, 32), (16, 16, 32), (16, 16, 64), (4, 4, 64)]


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resnet50_notop\.h5.*resnet50"):
        models.build_model("resnet50", 32, 4, weights=str(tmp_path / "{architecture}_notop.h5"))


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match="at least 75"):
        models.build_model("inception_v3", 64, 4, weights=None)
    with pytest.raises(ValueError, match="at least 64"):
        models.build_model("lab_cnn", 32, 4)


def test_augmentation_is_training_only_bounded_and_seeded():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(16, 12, 12, 3)).astype("float32")
    layer = models.StudyAugmentation(seed=3)
    assert np.array_equal(np.asarray(layer(images, training=False)), images)
    out = np.asarray(layer(images, training=True))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images)
    again = np.asarray(models.StudyAugmentation(seed=3)(images, training=True))
    assert np.allclose(out, again)                          # same seed, same augmentation


def test_augmentation_preserves_the_dihedral_content():
    """Without noise, blur or jitter effects a dihedral transform permutes pixels: sorted values agree."""
    image = np.zeros((1, 8, 8, 1), "float32")
    image[0, 1, 2, 0] = 200.0                               # one bright pixel on a dark field
    layer = models.StudyAugmentation(seed=1, noise_variance=0.0)
    for _ in range(10):
        out = np.asarray(layer(image, training=True))[0, ..., 0]
        rows, cols = np.mgrid[0:8, 0:8]
        # the intensity centroid (a symmetric 3x3 blur keeps it) is one of the 8 dihedral images of (1, 2)
        bright = (int(round((rows * out).sum() / out.sum())), int(round((cols * out).sum() / out.sum())))
        assert bright in {(1, 2), (2, 1), (6, 2), (2, 6), (1, 5), (5, 1), (6, 5), (5, 6)}


@pytest.mark.parametrize("mode, expected", [("raw", 255.0), ("unit", 1.0), ("symmetric", 1.0)])
def test_input_scaling(mode, expected):
    out = np.asarray(models.InputScaling(mode)(np.full((1, 2, 2, 3), 255.0, "float32")))
    assert np.allclose(out, expected)


def test_class_weights_follow_the_study():
    labels = np.array([0, 0, 0, 1])
    assert np.allclose(class_weights(labels, 2), [4 / (2 * 3), 4 / (2 * 1)])
    assert class_weights(labels, 3)[2] == 0


def test_presets_and_overrides():
    assert train.hyperparameters("final", "resnet50")["learning_rate"] == 1e-4
    published = train.hyperparameters("published", "inception_resnet_v2")
    assert (published["epochs"], published["batch_size"], published["learning_rate"]) == (5, 32, 1e-3)
    assert train.hyperparameters("final", "resnet50", {"batch_size": 64})["batch_size"] == 64
    with pytest.raises(ValueError, match="learning_rte"):
        train.hyperparameters("final", "resnet50", {"learning_rte": 1})


def test_warmup_cosine_schedule_rises_then_decays():
    import keras

    hyper = train.hyperparameters("final", "resnet50", {"schedule": "warmup_cosine", "warmup_epochs": 1,
                                                         "epochs": 4, "learning_rate": 0.1})
    optimizer = train._optimizer(hyper, steps_per_epoch=10)
    schedule = optimizer.learning_rate if callable(optimizer.learning_rate) else optimizer._learning_rate
    rates = [float(keras.ops.convert_to_numpy(schedule(step))) for step in (0, 5, 10, 25, 39)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(0.1)     # linear warm-up to the peak
    assert rates[2] > rates[3] > rates[4]                           # then cosine decay
    with pytest.raises(ValueError, match="schedule"):
        train._optimizer({**hyper, "schedule": "steps"}, 10)
