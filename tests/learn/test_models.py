"""Model construction: the lab CNN, in-model preprocessing and augmentation, weights from a file."""

import numpy as np
from keras import ops
import pytest

from moaflow.devtools import standin
from moaflow.learn import architectures, inputs, models, presets
from moaflow.learn.feeder import class_weights


def test_lab_cnn_has_the_labs_parameter_count():
    model = models.lab_cnn((256, 256, 3), 6)
    assert model.count_params() == 1_121_062
    assert model.layers[0].count_params() == 1_216
    assert [tuple(layer.output.shape[1:]) for layer in model.layers[:6]] == [
        (128, 128, 16), (64, 64, 16), (64, 64, 32), (16, 16, 32), (16, 16, 64), (4, 4, 64)]


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resnet50_notop\.h5.*resnet50"):
        models.build_model("resnet50", 32, 4, weights=str(tmp_path / "{architecture}_notop.h5"))


def test_training_never_fetches_weights():
    with pytest.raises(ValueError, match="fetch_weights"):
        architectures.resolve_weights("imagenet", "resnet50")


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match="at least 75"):
        models.build_model("inception_v3", 64, 4, weights=None)
    with pytest.raises(ValueError, match="at least 64"):
        models.build_model("lab_cnn", 32, 4)


def test_weights_file_values_are_loaded_exactly(tmp_path):
    """The stand-in writes a weights file of the real shapes in Keras' layout; a model built from it holds
    exactly those values (the path the fetched ImageNet file takes)."""
    digests = standin.write_weights(tmp_path, {"resnet50": "resnet/r.h5"}, seed=4, log=lambda _: None)
    path = tmp_path / "www" / "weights" / "resnet" / "r.h5"
    assert len(digests["resnet/r.h5"]) == 32
    model = models.build_model("resnet50", 64, 3, weights=str(path))
    loaded = [layer for layer in model.layers if layer.name.startswith("resnet50")][0].get_weights()
    rng = np.random.default_rng(4)
    reference = architectures.body("resnet50", 75).weights
    expected = [(1 + np.abs(values) if "moving_variance" in w.path else values).astype(w.dtype)
                for w in reference for values in [rng.normal(0, 0.05, w.shape)]]
    assert len(loaded) == len(expected) and all(np.array_equal(a, b) for a, b in zip(loaded, expected))
    variances = [v for v, w in zip(loaded, reference) if "moving_variance" in w.path]
    assert variances and all((v > 0).all() for v in variances)   # as real weights: features stay finite


@pytest.mark.parametrize("order, scaling", [("reversed", "raw"), ("stored", "unit"), ("stored", "symmetric"),
                                            ("reversed", "caffe")])
def test_uint8_inputs_are_reordered_and_scaled_on_the_device(order, scaling):
    """The model takes stored uint8 rows; its first layers do what the CPU did before, exactly."""
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    model = models.build_model("lab_cnn", 64, 2, augmentation=False, channel_order=order, input_scaling=scaling)
    import keras

    front = keras.Model(model.inputs, model.get_layer("input_transform").output)
    got = np.asarray(front.predict(np.pad(x, [(0, 0), (0, 56), (0, 56), (0, 0)]), verbose=0))[:, :8, :8]
    expected = x.astype(np.float32)[..., list(inputs.CHANNEL_ORDERS[order])]
    expected = {"raw": expected, "unit": expected / 255, "symmetric": expected / 127.5 - 1,
                "caffe": expected[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)}[scaling]
    assert np.allclose(got, expected, atol=1e-5)


def test_augmentation_is_training_only_bounded_and_seeded():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(16, 12, 12, 3)).astype("float32")
    layer = models.StudyAugmentation(seed=3)
    assert np.array_equal(np.asarray(layer(images, training=False)), images)
    out = np.asarray(layer(images, training=True))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255 and out.dtype == np.float32
    assert not np.allclose(out, images)
    again = np.asarray(models.StudyAugmentation(seed=3)(images, training=True))
    assert np.allclose(out, again)                          # same seed, same augmentation


def test_augmentation_runs_in_float32_under_mixed_precision():
    import keras

    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = models.build_model("lab_cnn", 64, 2)
        assert model.get_layer("augmentation").compute_dtype == "float32"
        assert model.get_layer("input_transform").compute_dtype == "float32"
        assert model.layers[-1].compute_dtype == "float32"
    finally:
        keras.config.set_dtype_policy("float32")


def test_blur_borders_reflect_like_opencv():
    """moaflow's blur equals cv2.blur (the original's call), whose default border is reflect-101."""
    import cv2

    image = np.random.default_rng(2).uniform(0, 255, (1, 6, 7, 3)).astype(np.float32)
    ours = np.asarray(models.box_blur(ops.convert_to_tensor(image)))
    assert np.allclose(ours[0], cv2.blur(image[0], (3, 3)), atol=1e-4)


def test_the_augmentation_keeps_a_flat_image_flat_up_to_its_edges():
    """Flips, transposes, the per-channel jitter and a reflect-101 blur leave a flat image flat; a zero-padded
    blur (half the images are blurred) would darken its borders."""
    flat = np.full((32, 9, 9, 3), 100.0, "float32")
    out = np.asarray(models.StudyAugmentation(seed=3, noise_variance=0.0)(flat, training=True))
    assert np.allclose(out, out[:, :1, :1, :], atol=1e-3)          # each image and channel one value
    assert set(np.round(np.unique(out[:, 0, 0, :]), 3)) <= {75.0, 100.0, 125.0}


def test_augmentation_preserves_the_dihedral_content():
    """Without noise, the intensity centroid (a symmetric blur keeps it) is one of the 8 dihedral images."""
    image = np.zeros((1, 8, 8, 1), "float32")
    image[0, 1, 2, 0] = 200.0                               # one bright pixel on a dark field
    layer = models.StudyAugmentation(seed=1, noise_variance=0.0)
    for _ in range(10):
        out = np.asarray(layer(image, training=True))[0, ..., 0]
        rows, cols = np.mgrid[0:8, 0:8]
        bright = (int(round((rows * out).sum() / out.sum())), int(round((cols * out).sum() / out.sum())))
        assert bright in {(1, 2), (2, 1), (6, 2), (2, 6), (1, 5), (5, 1), (6, 5), (5, 6)}


def test_inference_model_drops_the_augmentation_and_shares_weights():
    model = models.build_model("lab_cnn", 64, 3)
    final = models.inference_model(model)
    assert "augmentation" not in [layer.name for layer in final.layers]
    x = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert np.allclose(model.predict(x, verbose=0), final.predict(x, verbose=0))
    assert models.embedding_model(final).output.shape[-1] == 1024


def test_class_weights_follow_the_study():
    labels = np.array([0, 0, 0, 1])
    assert np.allclose(class_weights(labels, 2), [4 / (2 * 3), 4 / (2 * 1)])
    assert class_weights(labels, 3)[2] == 0


def test_presets_and_overrides():
    assert presets.hyperparameters("final", "resnet50")["learning_rate"] == 1e-4
    published = presets.hyperparameters("published", "inception_resnet_v2")
    assert (published["epochs"], published["batch_size"], published["learning_rate"]) == (5, 32, 1e-3)
    assert presets.hyperparameters("final", "resnet50", {"batch_size": 64})["batch_size"] == 64
    with pytest.raises(ValueError, match="learning_rte"):
        presets.hyperparameters("final", "resnet50", {"learning_rte": 1})


def test_the_registry_weights_are_keras_published_files():
    """Every keras.applications entry's ImageNet file and hash are Keras' own (its sources), under the default
    base URL of the config."""
    import inspect

    import keras

    from moaflow.config import defaults

    base = defaults()["weights"]["base_urls"][0]
    checked = []
    for name, architecture in architectures.REGISTRY.items():
        constructor = getattr(architecture.build, "keras_constructor", None)
        if constructor is None:
            continue   # not a keras.applications network
        module = inspect.getmodule(getattr(keras.applications, constructor))
        url = base + architecture.weights.file
        published_urls = [v for v in vars(module).values() if isinstance(v, str) and v.startswith("https://")]
        assert any(url.startswith(u) for u in published_urls), (name, url, published_urls)
        stem = url.rsplit("/", 1)[1].split("_weights")[0].split("_notop")[0]
        source = inspect.getsource(module)
        assert stem in source and next(iter(architecture.weights.published.values())) in source, name
        checked.append(name)
    assert {"resnet50", "inception_v3", "inception_resnet_v2", "efficientnet_b0", "convnext_tiny"} <= set(checked)


def test_warmup_cosine_schedule_rises_then_decays():
    import keras

    from moaflow.learn import trainer

    hyper = presets.hyperparameters("final", "resnet50", {"schedule": "warmup_cosine", "warmup_epochs": 1,
                                                           "epochs": 4, "learning_rate": 0.1})
    optimizer = trainer.optimizer(hyper, steps_per_epoch=10)
    schedule = optimizer.learning_rate if callable(optimizer.learning_rate) else optimizer._learning_rate
    rates = [float(keras.ops.convert_to_numpy(schedule(step))) for step in (0, 5, 10, 25, 39)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(0.1)     # linear warm-up to the peak
    assert rates[2] > rates[3] > rates[4]                           # then cosine decay
    with pytest.raises(ValueError, match="schedule"):
        trainer.optimizer({**hyper, "schedule": "steps"}, 10)
