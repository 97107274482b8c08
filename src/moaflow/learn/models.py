"""The study's networks, in Keras 3 only (any of the tensorflow, jax or torch backends).

* ``resnet50``, ``inception_v3``, ``inception_resnet_v2``: ``keras.applications``
  without their top, global average pooling and a new softmax (or sigmoid) head;
  weights ``None`` (random, Glorot/"Xavier" initialisation) or a notop weights
  file (the ImageNet file the ``fetch_weights`` rule fetched).
* ``lab_cnn``: the course lab's LeNet-style baseline, exactly as in the reference.

Every model takes the crop store's uint8 rows as they are (stored channel order,
0..255): casting, augmentation, channel order and input scaling all run inside
the model, on the device. The layers, in order:

``to_float`` (Rescaling: uint8 -> float32) -> ``augmentation`` (training only,
float32) -> ``input_transform`` (a fixed 1x1 convolution: channel order and
scaling) -> the channel adapter's layers, if any, and the backbone for C channels
(`moaflow.learn.adapters`; with three channels the backbone as it is) -> head
(float32 under mixed precision).

`inference_model` drops the augmentation: what remains is built from Keras'
own layers only, so a saved ``model.keras`` loads with plain
``keras.models.load_model(path)``, no moaflow import needed.
"""

from __future__ import annotations

import math
import os

import keras
from keras import ops

from moaflow.learn import adapters, architectures
from moaflow.learn.inputs import input_transform, resolve_scaling

@keras.saving.register_keras_serializable(package="moaflow")
def box_blur(images):
    """3x3 mean filter of a (batch, rows, columns, channels) tensor with OpenCV's default border, reflect-101
    (as ``cv2.blur``, which the original's augmentation calls): a flat image stays flat at its edges."""
    channels = ops.shape(images)[-1]
    kernel = ops.ones((3, 3, channels, 1), dtype=images.dtype) / 9.0
    padded = ops.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="reflect")   # numpy's reflect = reflect-101
    return ops.depthwise_conv(padded, kernel, strides=1, padding="valid")


class StudyAugmentation(keras.layers.Layer):
    """Kensert et al.'s per-image augmentation, on 0..255 images, training only.

    One of the 8 dihedral transforms (random vertical flip, horizontal flip and
    transpose: all 8 equally likely); each channel multiplied by ``1 - j`` with
    ``j`` drawn from {0, 0, +0.25, -0.25}; with p = 0.5 a 3x3 box blur with
    OpenCV's default border (reflect-101, as ``cv2.blur``); with p = 0.5
    Gaussian noise of variance 50; clipped to 0..255. Square inputs only. It
    always computes in float32, also under a mixed-precision policy.
    """

    def __init__(self, seed: int | None = None, noise_variance: float = 50.0, **kwargs):
        kwargs["dtype"] = "float32"
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
        x = ops.where(coin(), box_blur(x), x)
        noise = keras.random.normal(ops.shape(x), stddev=math.sqrt(self.noise_variance), seed=self.seed_generator)
        x = ops.where(coin(), x + ops.cast(noise, x.dtype), x)
        return ops.clip(x, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return {**config, "seed": self.seed, "noise_variance": self.noise_variance}


#: The frozen body's feature normalisation in front of the head (see `build_model`).
FEATURE_NORM = "feature_norm"


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


def build_model(
    architecture: str,
    input_size: int,
    n_classes: int,
    *,
    weights: str | None = None,
    head: str = "softmax",
    augmentation: bool = True,
    channel_order: str = "stored",
    input_scaling: str = "raw",
    transfer: str = "fine_tune",
    seed: int | None = None,
    channels: int = 3,
    channel_adapter: str = "replicate",
) -> keras.Model:
    """Build a registered architecture for square uint8 ``input_size`` crops in stored channel order.

    Parameters
    ----------
    architecture : str
        A name of the architecture registry (`moaflow.learn.architectures`).
    input_size : int
        Side of the square input.
    n_classes : int
        Softmax outputs; with ``head="sigmoid"`` a single output (binary).
    weights : str, optional
        A notop weights file, or None for random weights (see `moaflow.learn.architectures.resolve_weights`).
    augmentation : bool
        Put `StudyAugmentation` after the cast (active only in training).
    channel_order, input_scaling : str
        See `moaflow.learn.inputs` (``pretrained``: the scaling the architecture's ImageNet weights expect).
    transfer : {"fine_tune", "frozen"}
        ``frozen``: the body's weights are not trained and it always runs in inference mode (BatchNorm's
        moving statistics, no dropout), so only the head learns.
    seed : int, optional
        Seeds the augmentation.
    channels : int
        Channels of the stored crops.
    channel_adapter : str
        How the RGB architecture reads them (`moaflow.learn.adapters`; ``replicate`` with three channels is
        the architecture as it is).

    Returns
    -------
    model : keras.Model
        Uncompiled; input uint8 ``(None, input_size, input_size, channels)``.
    """
    if head not in ("softmax", "sigmoid"):
        raise ValueError(f"head={head!r}: expected 'softmax' or 'sigmoid'")
    kernel, bias = input_transform(channel_order, resolve_scaling(input_scaling, architecture), channels)
    inputs = keras.Input((input_size, input_size, channels), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)
    if augmentation:
        x = StudyAugmentation(seed=seed, name="augmentation")(x)
    transform = keras.layers.Conv2D(channels, 1, dtype="float32", trainable=False, name="input_transform")
    x = transform(x)
    transform.set_weights([kernel, bias])
    if transfer not in architectures.TRANSFERS:
        raise ValueError(f"transfer={transfer!r}: expected one of {architectures.TRANSFERS}")
    front, body = adapters.adapt(channel_adapter, architecture, input_size, channels, weights)
    for layer in front:   # an adapter's own layers: they train also when the body is frozen
        x = layer(x)
    if transfer == "frozen":
        body.trainable = False
        x = body(x, training=False)
        # A linear probe's usual normalisation (no scale or offset of its own): frozen features of any scale,
        # ImageNet's or random weights', reach the head standardised.
        x = keras.layers.BatchNormalization(center=False, scale=False, dtype="float32", name=FEATURE_NORM)(x)
    else:
        x = body(x)
    # The head stays float32 under mixed precision (stable softmax / sigmoid).
    if head == "softmax":
        outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="moa")(x)
    else:
        outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="translocation")(x)
    return keras.Model(inputs, outputs, name=f"{architecture}_{head}")


def head_layers(model: keras.Model) -> list:
    """The layers after the body: the classifier, and before it a frozen body's feature normalisation."""
    return [layer for layer in model.layers if layer.name in (FEATURE_NORM, "moa", "translocation")]


def _chain(model: keras.Model, *, head: bool, name: str) -> keras.Model:
    """A new model over ``model``'s layers (shared weights), without the augmentation, with or without the head."""
    inputs = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype, name="image")
    x = inputs
    excluded = () if head else head_layers(model)
    for layer in model.layers[1:]:
        if not isinstance(layer, StudyAugmentation) and layer not in excluded:
            x = layer(x)
    return keras.Model(inputs, x, name=name)


def inference_model(model: keras.Model) -> keras.Model:
    """The same network without its augmentation layer, sharing its weights.

    What is left uses Keras' own layers only, so its saved file loads with
    ``keras.models.load_model``; being uncompiled, it is saved without
    optimizer state.
    """
    return _chain(model, head=True, name=model.name)


def embedding_model(model: keras.Model) -> keras.Model:
    """Inputs -> the pooled features the classifier head reads (for profiling), sharing ``model``'s weights."""
    return _chain(model, head=False, name=f"{model.name}_features")


def load_model(path: str | os.PathLike) -> keras.Model:
    """Load a saved ``model.keras`` (a plain ``keras.models.load_model`` would do as well)."""
    return keras.models.load_model(path, compile=False)
