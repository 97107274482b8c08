"""What a network sees of a stored uint8 crop: the channel-order and input-scaling registries.

The crop store keeps channels as the study stored them (BBBC021: Actin, Tubulin,
DAPI) on 0..255. A fixed 1x1 convolution at the front of every model
(`input_transform`) reorders and scales them on the device, so the CPU feeds
uint8 rows as stored. ``channel_order`` and ``input_scaling`` (hyper-parameters)
name entries of `CHANNEL_ORDERS` and `INPUT_SCALINGS`; ``input_scaling:
pretrained`` is the scaling the architecture's ImageNet weights were trained on
(its registry entry). Add an order or a scaling here.
"""

from __future__ import annotations

import numpy as np

#: name -> which stored channel each input channel takes.
CHANNEL_ORDERS = {
    "stored": (0, 1, 2),     # (Actin, Tubulin, DAPI) for BBBC021; (zeros, DAPI, FITC) for BBBC014
    "reversed": (2, 1, 0),   # what the original network saw after OpenCV's BGR read: (DAPI, Tubulin, Actin)
}
#: name -> (scale, per-channel offset, reverse the channels): ``out = x * scale + offset``, x on 0..255; the
#: scale is one number or one per channel.
INPUT_SCALINGS = {
    "raw": (1.0, (0.0, 0.0, 0.0), False),                         # 0..255, the study
    "unit": (1 / 255, (0.0, 0.0, 0.0), False),                    # 0..1, the course lab
    "symmetric": (1 / 127.5, (-1.0, -1.0, -1.0), False),          # -1..1, Inception's ImageNet convention
    "caffe": (1.0, (-103.939, -116.779, -123.68), True),          # ResNet50's: BGR, ImageNet mean subtracted
    "lite": (1 / 128, (-127 / 128,) * 3, False),                  # EfficientNet-Lite's: (x - 127) / 128
    # torchvision's ImageNet normalisation, (x / 255 - mean) / std (ConvNeXt's own preprocessing layer)
    "torch": (tuple(1 / (255 * s) for s in (0.229, 0.224, 0.225)),
              tuple(-m / s for m, s in ((0.485, 0.229), (0.456, 0.224), (0.406, 0.225))), False),
}
#: The input_scaling that stands for "what this architecture's ImageNet weights were trained on".
PRETRAINED = "pretrained"


def resolve_scaling(input_scaling: str, architecture: str) -> str:
    """``pretrained`` -> the scaling of the architecture's ImageNet weights; any other name as it is."""
    if input_scaling != PRETRAINED:
        return input_scaling
    from moaflow.learn.architectures import get

    weights = get(architecture).weights
    if weights is None:
        raise ValueError(f"input_scaling: pretrained, but {architecture} has no ImageNet weights to match "
                         f"(moaflow.learn.architectures); name a scaling of {sorted(INPUT_SCALINGS)}")
    return weights.input_scaling


def input_transform(channel_order: str, input_scaling: str, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (1, 1, C, C) and bias (C,) of the fixed 1x1 convolution that maps stored 0..255 channels
    to what the network sees: ``out[c] = x[order[c]] * scale[c] + offset[c]``.

    Channel orders and the scalings' per-channel values are RGB's: a store of other than three channels
    takes the ``stored`` order, and every channel the scaling's mean scale and offset (its channels are not
    R, G or B; `moaflow.learn.adapters` feeds them to the RGB network).

    Raises
    ------
    ValueError
        An unknown order or scaling, naming the registered ones; an order other than ``stored`` for other
        than three channels.
    """
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order={channel_order!r}: expected one of {sorted(CHANNEL_ORDERS)}")
    if input_scaling not in INPUT_SCALINGS:
        raise ValueError(f"input_scaling={input_scaling!r}: expected one of {sorted(INPUT_SCALINGS)} "
                         f"(or {PRETRAINED})")
    scale, offset, reverse = INPUT_SCALINGS[input_scaling]
    scale = np.broadcast_to(np.asarray(scale, np.float32), (3,))
    offset = np.asarray(offset, np.float32)
    if channels != 3:
        if channel_order != "stored":
            raise ValueError(f"channel_order={channel_order!r} reorders three channels; a store of {channels} "
                             "channels takes channel_order: stored")
        return (np.eye(channels, dtype=np.float32).reshape(1, 1, channels, channels) * scale.mean(),
                np.full(channels, offset.mean(), np.float32))
    order = list(CHANNEL_ORDERS[channel_order])
    if reverse:
        order = order[::-1]
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for out, source in enumerate(order):
        kernel[0, 0, source, out] = scale[out]
    return kernel, offset
