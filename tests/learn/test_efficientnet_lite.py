"""EfficientNet-Lite0: the Keras network with its converted ImageNet weights gives the reference model's logits."""

import numpy as np
import pytest

from moaflow.datasets.packaged import convert_weights, packaged_file
from moaflow.errors import VerificationError
from moaflow.learn import architectures, efficientnet_lite

WEIGHTS = architectures.get("efficientnet_lite0").weights


def _photos(size: int = 224) -> np.ndarray:
    """scikit-image's photos, centre-cropped and area-resized, RGB 0..255 float32."""
    import cv2
    from skimage import data

    photos = []
    for name in ("chelsea", "coffee", "astronaut"):
        image = getattr(data, name)()
        h, w = image.shape[:2]
        side = min(h, w)
        image = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        photos.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(photos).astype(np.float32)


@pytest.fixture(scope="module")
def state():
    return efficientnet_lite.read_state_dict(packaged_file(WEIGHTS.package.distribution, WEIGHTS.file))


def test_keras_logits_equal_the_reference_models(state):
    """The reference PyTorch model (efficientnet-lite-pytorch) and the Keras port, same weights, same photos:
    the same logits within float tolerance, the same top-1 (a cat for chelsea, espresso for coffee)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    x = (_photos() - 127.0) / 128.0   # the official Lite preprocessing (input scaling "lite")
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    model = efficientnet_lite.efficientnet_lite0(224, top=True)
    efficientnet_lite.load_state_dict(model, state)
    logits = np.asarray(model.predict(x, verbose=0))
    assert np.abs(logits - expected).max() < 1e-3
    assert list(logits.argmax(1)) == list(expected.argmax(1))
    assert logits[0].argmax() in (281, 282, 285) and logits[1].argmax() == 967    # tabby/tiger/Egyptian cat, espresso


def test_the_converted_file_is_the_registry_body_with_imagenet_features(tmp_path, state):
    """convert_weights: the packaged file checked against its published hash, written as a Keras file with a
    receipt; the registry's body loads it and gives the reference's pooled features."""
    import json

    destination = tmp_path / "efficientnet_lite0_notop.h5"
    receipt = convert_weights("efficientnet_lite0", destination, log=lambda _: None)
    assert "MD5 as published" in receipt["checks"] and receipt["source"].startswith(WEIGHTS.package.distribution)
    assert json.loads((tmp_path / "efficientnet_lite0_notop.h5.verified.json").read_text())["sha256"] == \
        receipt["sha256"]
    body = architectures.body("efficientnet_lite0", 224, str(destination))
    full = efficientnet_lite.efficientnet_lite0(224, top=True)
    efficientnet_lite.load_state_dict(full, state)
    x = (_photos() - 127.0) / 128.0
    pooled = np.asarray(body.predict(x, verbose=0))
    logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    assert np.allclose(logits, np.asarray(full.predict(x, verbose=0)), atol=1e-3)


def test_a_package_file_that_is_not_the_published_one_is_refused(tmp_path):
    with pytest.raises(VerificationError, match="MD5.*differs.*not the published one"):
        convert_weights("efficientnet_lite0", tmp_path / "w.h5", published={"md5": "0" * 32}, log=lambda _: None)
    assert not (tmp_path / "w.h5").exists()
