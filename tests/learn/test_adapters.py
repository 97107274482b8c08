"""Channel adapters: RGB networks on C-channel crops (moaflow.learn.adapters), and the inputs they get."""

import numpy as np
import pytest

from moaflow.devtools import standin
from moaflow.learn import adapters, architectures, inputs, models


def _features(model):
    """The layer outputs the head reads: the model without its head (`models.embedding_model`)."""
    return models.embedding_model(model)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    standin.write_weights(out, {"resnet50": "r.h5"}, seed=3, log=lambda _: None)
    return str(out / "www" / "weights" / "r.h5")


def test_replicate_with_three_channels_is_the_pretrained_network_exactly(resnet_weights):
    model = models.build_model("resnet50", 32, 4, weights=resnet_weights, channel_adapter="replicate")
    body = next(layer for layer in model.layers if layer.name.startswith("resnet50"))
    pretrained = architectures.body("resnet50", 32, resnet_weights)
    assert len(body.weights) == len(pretrained.weights)
    assert all(np.array_equal(a, b) for a, b in zip(body.get_weights(), pretrained.get_weights()))


def test_replicate_over_five_channels_averages_the_first_kernel_and_keeps_every_other_weight(resnet_weights):
    rgb = architectures.body("resnet50", 32, resnet_weights)
    _, wide = adapters.adapt("replicate", "resnet50", 32, 5, resnet_weights)
    changed = [(a, b) for a, b in zip(rgb.get_weights(), wide.get_weights()) if a.shape != b.shape]
    assert len(changed) == 1                                         # the first convolution's kernel only
    kernel, replicated = changed[0]
    assert kernel.shape[2] == 3 and replicated.shape[2] == 5
    assert np.allclose(replicated, np.repeat(kernel.mean(2, keepdims=True) * 3 / 5, 5, axis=2))
    same = [(a, b) for a, b in zip(rgb.get_weights(), wide.get_weights()) if a.shape == b.shape]
    assert all(np.array_equal(a, b) for a, b in same)
    # What the scaling is for: a grey image in all five channels gives the pretrained network's features of
    # that grey image in R, G and B.
    grey = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
    assert np.allclose(wide.predict(np.repeat(grey, 5, -1), verbose=0), rgb.predict(np.repeat(grey, 3, -1), verbose=0),
                       rtol=1e-4, atol=1e-4)


def test_replicate_refuses_weights_it_cannot_pair():
    source = architectures.body("lab_cnn", 64)
    target = architectures.body("lab_cnn", 64, channels=5)
    with pytest.raises(ValueError, match="not the same architecture"):
        adapters.copy_replicated(source, architectures.body("resnet50", 32, channels=5), 5)
    assert adapters.copy_replicated(source, target, 5) == 1


@pytest.mark.parametrize("architecture", list(architectures.REGISTRY))
def test_every_adapter_builds_for_every_registered_architecture(architecture):
    size = max(architectures.get(architecture).min_input_size, 32)
    depth = None
    for adapter in adapters.ADAPTERS:
        model = models.build_model(architecture, size, 4, channels=6, channel_adapter=adapter,
                                   channel_order="stored", augmentation=False)
        assert tuple(model.inputs[0].shape) == (None, size, size, 6) and tuple(model.outputs[0].shape) == (None, 4)
        features = _features(model).outputs[0].shape[-1]
        if adapter == "replicate":
            depth = features
        assert features == (6 * depth if adapter == "per_channel" else depth), (adapter, features)


def test_adapted_models_predict_and_load_in_plain_keras(tmp_path):
    import keras

    x = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 5), dtype=np.uint8)
    for adapter in adapters.ADAPTERS:
        model = models.build_model("lab_cnn", 64, 3, channels=5, channel_adapter=adapter, channel_order="stored",
                                   input_scaling="unit")
        inference = models.inference_model(model)
        inference.save(tmp_path / f"{adapter}.keras")
        again = keras.models.load_model(tmp_path / f"{adapter}.keras", compile=False)   # no moaflow needed
        assert np.allclose(again.predict(x, verbose=0), inference.predict(x, verbose=0), atol=1e-6), adapter


def test_per_channel_features_are_each_channel_through_the_same_backbone():
    model = models.build_model("lab_cnn", 64, 3, channels=4, channel_adapter="per_channel", channel_order="stored",
                               input_scaling="unit", augmentation=False)
    x = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 4), dtype=np.uint8)
    features = _features(model).predict(x, verbose=0)
    backbone = next(layer for layer in model.layers if layer.name.endswith("_per_channel")).get_layer(
        "lab_cnn_body_per_channel").layer
    for channel in range(4):
        grey = np.repeat(x[..., channel:channel + 1].astype(np.float32) / 255, 3, -1)
        depth = features.shape[1] // 4
        assert np.allclose(features[:, channel * depth:(channel + 1) * depth], backbone.predict(grey, verbose=0),
                           atol=1e-5)


def test_project_learns_its_projection_also_when_the_body_is_frozen():
    import keras

    from moaflow.learn.trainer import FrozenFeatures, Trainer, trainer_for

    model = models.build_model("lab_cnn", 64, 2, channels=5, channel_adapter="project", channel_order="stored",
                               input_scaling="unit", transfer="frozen", augmentation=False)
    projection = model.get_layer("channel_projection")
    assert np.allclose(projection.get_weights()[0], 1 / 5)          # starts as the channels' mean in R, G and B
    body = next(layer for layer in model.layers if layer.name == "lab_cnn_body")
    before = [w.copy() for w in projection.get_weights()], [w.copy() for w in body.get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    x = np.random.default_rng(3).integers(0, 256, (8, 64, 64, 5), dtype=np.uint8)
    model.fit(x, np.eye(2)[np.arange(8) % 2], epochs=1, batch_size=8, verbose=0)
    assert not np.allclose(projection.get_weights()[0], before[0][0])
    assert all(np.array_equal(a, b) for a, b in zip(body.get_weights(), before[1]))
    hyper = {"transfer": "frozen", "augmentation": False}
    assert trainer_for({**hyper, "channel_adapter": "project"}) is Trainer          # its features change
    assert trainer_for({**hyper, "channel_adapter": "replicate"}) is FrozenFeatures


def test_unknown_adapters_and_orders_for_other_channel_counts_are_refused():
    with pytest.raises(ValueError, match="channel_adapter='mean'.*per_channel"):
        adapters.adapt("mean", "lab_cnn", 64, 5)
    with pytest.raises(ValueError, match="channel_order='reversed'.*5 channels"):
        inputs.input_transform("reversed", "raw", 5)


def test_other_channel_counts_get_the_scalings_mean_per_channel():
    kernel, bias = inputs.input_transform("stored", "caffe", 5)
    assert kernel.shape == (1, 1, 5, 5) and np.allclose(kernel[0, 0], np.eye(5))
    assert np.allclose(bias, -np.mean([103.939, 116.779, 123.68]))
    kernel, bias = inputs.input_transform("stored", "torch", 3)
    x = np.array([10.0, 128.0, 250.0], np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    assert np.allclose(x @ kernel[0, 0] + bias, (x / 255 - mean) / std, atol=1e-5)


def test_efficientnet_from_a_file_is_the_network_keras_builds_for_imagenet(tmp_path, monkeypatch):
    """Keras adds a rescaling after EfficientNet's input normalisation only for weights="imagenet" (TensorFlow
    issue 49930); the registry's build from a file must be that same network. Keras' own "imagenet" path is
    run here on the same file (its download replaced by the file)."""
    import h5py
    import keras
    from keras.src.applications import efficientnet
    from keras.src.legacy.saving import legacy_h5_format

    # Keras' own initialisation (features that depend on the input), ImageNet's statistics in the input
    # normalisation as in the published file, saved in that file's layout.
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3),
                                               pooling="avg")
    normalization = next(layer for layer in source.layers if type(layer).__name__ == "Normalization")
    normalization.set_weights([np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]),
                               normalization.get_weights()[2]])
    path = str(tmp_path / "b0_notop.h5")
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *args, **kwargs: path)
    theirs = keras.applications.EfficientNetB0(include_top=False, weights="imagenet", input_shape=(32, 32, 3),
                                               pooling="avg")
    ours = architectures.body("efficientnet_b0", 32, path)
    x = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = theirs.predict(x, verbose=0)

    def difference(a, b):   # relative to the features' scale (random initial weights give small features)
        return np.abs(a - b).max() / np.abs(b).max()

    assert difference(expected[0], expected[1]) > 0.1                  # features that see the input
    assert difference(ours.predict(x, verbose=0), expected) < 1e-4
    plain = keras.applications.EfficientNetB0(include_top=False, weights=path, input_shape=(32, 32, 3), pooling="avg")
    assert difference(plain.predict(x, verbose=0), expected) > 0.01   # what the fix is for
    # Over five channels the input statistics are the RGB ones' mean, in the values the layer computes with.
    _, wide = adapters.adapt("replicate", "efficientnet_b0", 32, 5, path)
    rgb, five = (next(la for la in m.layers if type(la).__name__ == "Normalization") for m in (ours, wide))
    for name in ("mean", "variance"):
        used = keras.ops.convert_to_numpy(getattr(five, name)).ravel()
        assert np.allclose(used, keras.ops.convert_to_numpy(getattr(rgb, name)).mean()) and used.size == 5, name
