"""A registry entry small enough to train many times in a test: two convolutions with BatchNorm.

Packing is the same code for every architecture; what it must keep per fold is state of the kinds the
study's networks have (weights, optimizer slots, BatchNorm moving statistics, the augmentation's random
stream). This network has each of them and compiles in seconds on a CPU, where the registry's smallest
network with BatchNorm (EfficientNet-Lite0) takes minutes per packed job. A test `register`s it in its own
process (and in the training subprocess it starts).
"""

from moaflow.learn import architectures


def bn_cnn_body(input_size: int, weights: str | None, channels: int = 3):
    """Conv-BatchNorm-ReLU twice, then global average pooling (16 features)."""
    import keras

    if weights is not None:
        raise ValueError("bn_cnn has no pretrained weights")
    inputs = x = keras.Input((input_size, input_size, channels))
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="bn_cnn")


BN_CNN = architectures.Architecture("bn_cnn", bn_cnn_body, input_size=32, min_input_size=16)


def register() -> None:
    architectures.REGISTRY.setdefault(BN_CNN.name, BN_CNN)
