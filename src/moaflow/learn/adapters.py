"""The channel-adapter registry: how a network built for RGB reads a crop of C channels. Add an adapter here.

BBBC021 has three channels (Actin, Tubulin, DAPI) and ImageNet networks read
three; Cell Painting has five (DNA, ER, RNA, AGP, Mito) and RxRx six. The
``channel_adapter`` hyper-parameter names one entry of `ADAPTERS`; each turns
a registered architecture into the model's body for C-channel inputs (already
cast and scaled per channel by the model's ``input_transform``):

``replicate`` (the default)
    The architecture itself, built for C input channels. With ImageNet weights,
    every weight is the pretrained one except the first convolution's kernel:
    its RGB kernels are averaged and repeated over the C channels, scaled by
    3 / C, so a crop whose channels all show the same image starts with exactly
    the pretrained response to that grey image (per-channel input statistics,
    such as EfficientNet's, are averaged the same way). With C = 3 it is the
    pretrained network, unchanged: BBBC021's models are as before adapters existed.
``per_channel``
    Each channel as a grey image (copied into R, G and B) through one shared
    three-channel backbone, and the C feature vectors concatenated (C x D
    features): the pretrained filters see what they were trained on, at C
    times the compute.
``project``
    A learned 1x1 convolution from C channels to three in front of the
    three-channel backbone, starting as the channels' mean in each of R, G and B
    (a grey image the pretrained filters accept). It learns also when the body is
    frozen (``transfer: frozen``): the features are then not cached, as the
    projection changes them.

Every adapter is built from Keras' own layers, so a saved ``model.keras`` loads
with plain ``keras.models.load_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moaflow.learn import architectures


@dataclass(frozen=True)
class Adapter:
    """One way of feeding C channels to a registered architecture.

    Attributes
    ----------
    name : str
        The ``channel_adapter`` value.
    build : callable
        ``build(architecture, input_size, channels, weights) -> (front, body)``: layers applied before the body
        (they train even when the body is frozen), and the body (float32 ``(S, S, C)`` to pooled features).
    front_trains : bool
        Whether the layers in front of the body have weights that train.
    """

    name: str
    build: Callable
    front_trains: bool = False


def replicate_kernel(kernel: np.ndarray, channels: int) -> np.ndarray:
    """A first convolution's ``(h, w, 3, filters)`` kernel for ``channels`` inputs: the RGB kernels' mean,
    repeated over the channels and scaled by ``3 / channels`` (so a grey image in every channel gives the
    response the pretrained kernel gives that grey image in R, G and B).

    Examples
    --------
    >>> kernel = np.arange(6, dtype=np.float32).reshape(1, 1, 3, 2)
    >>> replicate_kernel(kernel, 6)[0, 0]
    array([[1. , 1.5],
           [1. , 1.5],
           [1. , 1.5],
           [1. , 1.5],
           [1. , 1.5],
           [1. , 1.5]], dtype=float32)
    """
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"a kernel of shape {kernel.shape}: expected (height, width, 3, filters)")
    mean = kernel.mean(axis=2, keepdims=True) * (3.0 / channels)
    return np.repeat(mean, channels, axis=2).astype(kernel.dtype)


def copy_replicated(source, target, channels: int) -> int:
    """Copy a three-channel network's weights into the same network built for ``channels`` inputs.

    Weights of equal shape are copied; a convolution kernel whose input axis is 3 in ``source`` becomes
    `replicate_kernel`; per-channel input statistics (length 3, as EfficientNet's input ``Normalization``)
    become their mean in every channel.

    Returns
    -------
    replicated : int
        How many weights were adapted rather than copied (the first convolution's kernel, and any input
        statistics).

    Raises
    ------
    ValueError
        When the two networks' weights do not pair up (different architectures).
    """
    pairs = list(zip(source.weights, target.weights))
    if len(source.weights) != len(target.weights):
        raise ValueError(f"{source.name} has {len(source.weights)} weights, {target.name} {len(target.weights)}: "
                         "not the same architecture")
    replicated = 0
    for old, new in pairs:
        value = np.asarray(old.numpy() if hasattr(old, "numpy") else old)
        if tuple(old.shape) == tuple(new.shape):
            new.assign(value)
        elif value.ndim == 4 and value.shape[2] == 3 and tuple(new.shape) == (*value.shape[:2], channels,
                                                                             value.shape[3]):
            new.assign(replicate_kernel(value, channels))
            replicated += 1
        elif value.shape == (3,) and tuple(new.shape) == (channels,):
            new.assign(np.full(channels, value.mean(), value.dtype))
            replicated += 1
        else:
            raise ValueError(f"{old.path} {tuple(old.shape)} has no {channels}-channel counterpart "
                             f"({new.path} {tuple(new.shape)})")
    for layer in target.layers:   # an input Normalization computes with a copy of its variables, made here
        if type(layer).__name__ == "Normalization" and getattr(layer, "input_mean", None) is None:
            layer.finalize_state()
    return replicated


def _replicate(architecture: str, input_size: int, channels: int, weights: str | None):
    if channels == 3:
        return [], architectures.body(architecture, input_size, weights)
    wide = architectures.body(architecture, input_size, None, channels=channels)
    if weights is not None:
        rgb = architectures.body(architecture, input_size, weights)
        if copy_replicated(rgb, wide, channels) == 0:
            raise ValueError(f"{architecture}: no three-channel kernel found to replicate over {channels} channels")
    return [], wide


def _per_channel(architecture: str, input_size: int, channels: int, weights: str | None):
    import keras
    from keras import layers

    backbone = architectures.body(architecture, input_size, weights)
    inputs = keras.Input((input_size, input_size, channels), name="channels")
    x = layers.Permute((3, 1, 2), name="channels_first")(inputs)
    x = layers.Reshape((channels, input_size, input_size, 1), name="one_image_per_channel")(x)
    grey = layers.Conv2D(3, 1, use_bias=False, kernel_initializer="ones", trainable=False, name="grey_to_rgb")
    x = layers.TimeDistributed(grey, name="grey_to_rgb_per_channel")(x)
    x = layers.TimeDistributed(backbone, name=f"{backbone.name}_per_channel")(x)
    features = layers.Flatten(name="features_of_every_channel")(x)
    return [], keras.Model(inputs, features, name=f"{architecture}_per_channel")


def _project(architecture: str, input_size: int, channels: int, weights: str | None):
    import keras

    projection = keras.layers.Conv2D(3, 1, kernel_initializer=keras.initializers.Constant(1.0 / channels),
                                     bias_initializer="zeros", dtype="float32", name="channel_projection")
    return [projection], architectures.body(architecture, input_size, weights)


#: name -> adapter (the ``channel_adapter`` hyper-parameter).
ADAPTERS: dict[str, Adapter] = {a.name: a for a in [
    Adapter("replicate", _replicate),
    Adapter("per_channel", _per_channel),
    Adapter("project", _project, front_trains=True),
]}


def adapt(adapter: str, architecture: str, input_size: int, channels: int, weights: str | None = None):
    """The layers in front of the body and the body of ``architecture`` for ``channels``-channel inputs.

    Raises
    ------
    ValueError
        An unknown adapter (naming the registered ones) or fewer than one channel.
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"channel_adapter={adapter!r}: expected one of {sorted(ADAPTERS)} (moaflow.learn.adapters)")
    if channels < 1:
        raise ValueError(f"{channels} channels: expected at least one")
    return ADAPTERS[adapter].build(architecture, input_size, channels, weights)


def trains_in_front(adapter: str) -> bool:
    """Whether the adapter puts trainable layers in front of the body (then a frozen body's features are not
    cached: the layers in front change them)."""
    return ADAPTERS[adapter].front_trains
