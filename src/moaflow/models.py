"""The study's networks, in Keras 3 only (any of the tensorflow, jax or torch backends).

* ``resnet50``, ``inception_v3``, ``inception_resnet_v2``: ``keras.applications``
  without their top, global average pooling and a new softmax (or sigmoid) head;
  weights ``"imagenet"`` (Keras fetches them on the user's machine), ``None``
  (random, Glorot/"Xavier" initialisation) or a local notop weights file.
* ``lab_cnn``: the course lab's LeNet-style baseline, exactly as in the reference.

The augmentation of the original code runs inside the model (`StudyAugmentation`),
on the accelerator, active only in training.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import keras
from keras import ops

#: architecture -> (keras.applications constructor, smallest input side it accepts)
APPLICATIONS = {
    "resnet50": ("ResNet50", 32),
    "inception_v3": ("InceptionV3", 75),
    "inception_resnet_v2": ("InceptionResNetV2", 75),
}
ARCHITECTURES = [*APPLICATIONS, "lab_cnn"]


@keras.saving.register_keras_serializable(package="moaflow")
class StudyAugmentation(keras.layers.Layer):
    """Kensert et al.'s per-image augmentation, on 0..255 images, training only.

    One of the 8 dihedral transforms (random vertical flip, horizontal flip and
    transpose: all 8 equally likely); each channel multiplied by ``1 - j`` with
    ``j`` drawn from {0, 0, +0.25, -0.25}; with p = 0.5 a 3x3 box blur; with
    p = 0.5 Gaussian noise of variance 50; clipped to 0..255. Square inputs only.
    """

    def __init__(self, seed: int | None = None, noise_variance: float = 50.0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.noise_variance = noise_variance
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        x = images
        batch, channels = ops.shape(x)[0], ops.shape(x)[-1]

        def coin():
            return ops.reshape(keras.random.uniform((batch,), seed=self.seed_generator) < 0.5, (-1, 1, 1, 1))

        x = ops.where(coin(), ops.flip(x, axis=1), x)
        x = ops.where(coin(), ops.flip(x, axis=2), x)
        x = ops.where(coin(), ops.transpose(x, (0, 2, 1, 3)), x)
        jitter = ops.convert_to_tensor([0.0, 0.0, 0.25, -0.25], dtype=x.dtype)
        pick = keras.random.randint((batch, 1, 1, channels), 0, 4, seed=self.seed_generator)
        x = x * (1.0 - ops.take(jitter, pick))
        kernel = ops.ones((3, 3, channels, 1), dtype=x.dtype) / 9.0
        x = ops.where(coin(), ops.depthwise_conv(x, kernel, strides=1, padding="same"), x)
        noise = keras.random.normal(ops.shape(x), stddev=math.sqrt(self.noise_variance), seed=self.seed_generator)
        x = ops.where(coin(), x + ops.cast(noise, x.dtype), x)
        return ops.clip(x, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed, "noise_variance": self.noise_variance}


@keras.saving.register_keras_serializable(package="moaflow")
class InputScaling(keras.layers.Layer):
    """How 0..255 inputs reach the network: ``raw`` (the study: unchanged), ``unit``
    (divided by 255, the lab), ``symmetric`` (to -1..1, Inception's ImageNet
    convention) or ``caffe`` (ResNet50's: BGR order, ImageNet mean subtracted)."""

    MODES = ("raw", "unit", "symmetric", "caffe")

    def __init__(self, mode: str = "raw", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"input_scaling={mode!r}: expected one of {self.MODES}")
        self.mode = mode

    def call(self, x):
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "symmetric":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            mean = ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
            return ops.flip(x, axis=-1) - mean
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def lab_cnn(input_shape=(256, 256, 3), n_classes: int = 6) -> keras.Model:
    """The course lab's LeNet-inspired CNN (1,121,062 parameters at 256x256x3, 6 classes)."""
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(16, 5, strides=2, padding="same", activation="relu"),   # 128x128x16
        keras.layers.MaxPooling2D(2),                                                # 64x64x16
        keras.layers.Conv2D(32, 5, padding="same", activation="relu"),              # 64x64x32
        keras.layers.MaxPooling2D(4),                                                # 16x16x32
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"),              # 16x16x64
        keras.layers.MaxPooling2D(4),                                                # 4x4x64
        keras.layers.Flatten(),                                                      # 1024
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(n_classes, activation="softmax"),
    ], name="lab_cnn")


def resolve_weights(weights: str | None, architecture: str) -> str | None:
    """Turn the config's weights value into what keras.applications accepts.

    ``"imagenet"`` stays (Keras downloads it); ``None``/``"none"`` is random
    initialisation; anything else is a path, in which ``{architecture}`` is
    replaced, and which must exist.
    """
    if weights is None or str(weights).lower() in ("none", "random", "null"):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(str(weights).format(architecture=architecture))
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} (training.initialisations, architecture {architecture}) does not exist; "
            "expected a Keras notop weights file such as resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    return os.fspath(path)


def build_model(
    architecture: str,
    input_size: int,
    n_classes: int,
    *,
    weights: str | None = None,
    head: str = "softmax",
    augmentation: bool = True,
    input_scaling: str = "raw",
    seed: int | None = None,
) -> keras.Model:
    """Build one of `ARCHITECTURES` for square ``input_size`` RGB inputs.

    Parameters
    ----------
    architecture : str
        One of `ARCHITECTURES`.
    input_size : int
        Side of the square input.
    n_classes : int
        Softmax outputs; with ``head="sigmoid"`` a single output (binary).
    weights : str, optional
        See `resolve_weights`. Ignored for ``lab_cnn`` (always random).
    augmentation : bool
        Put `StudyAugmentation` in front (active only in training).
    input_scaling : str
        See `InputScaling`.

    Returns
    -------
    model : keras.Model
        Uncompiled; input 0..255 float images.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}: expected one of {ARCHITECTURES}")
    if head not in ("softmax", "sigmoid"):
        raise ValueError(f"head={head!r}: expected 'softmax' or 'sigmoid'")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = StudyAugmentation(seed=seed, name="augmentation")(inputs) if augmentation else inputs
    x = InputScaling(input_scaling, name="input_scaling")(x)
    if architecture == "lab_cnn":
        if input_size < 64:
            raise ValueError(f"lab_cnn needs inputs of at least 64x64 (stride 2 and pools of 2, 4, 4), got {input_size}")
        core = lab_cnn((input_size, input_size, 3), n_classes if head == "softmax" else 1)
        # Reuse the lab network but swap its head for the requested one.
        features = core.layers[-2].output
        body = keras.Model(core.inputs, features, name="lab_cnn_body")
        x = body(x)
    else:
        name, smallest = APPLICATIONS[architecture]
        if input_size < smallest:
            raise ValueError(f"{architecture} needs inputs of at least {smallest}x{smallest}, got {input_size}")
        base = getattr(keras.applications, name)(
            include_top=False, weights=resolve_weights(weights, architecture),
            input_shape=(input_size, input_size, 3), pooling="avg")
        x = base(x)
    # The head stays float32 under mixed precision (stable softmax / sigmoid).
    if head == "softmax":
        outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="moa")(x)
    else:
        outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="translocation")(x)
    return keras.Model(inputs, outputs, name=f"{architecture}_{head}")
