"""What a job computes on: its environment before the framework loads, the devices it sees, and a loud
stop when it asked for a GPU and sees none (no silent CPU fallback).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from moaflow.errors import MoaflowError
from moaflow.logs import quiet_framework_startup, stderr


class DeviceError(MoaflowError):
    """A job that asked for a GPU sees none."""


def prepare_environment(gpus: int) -> None:
    """Before Keras loads: GPU memory is taken as needed (two local jobs can share a GPU), and a job
    declared CPU-only (``gpus == 0``) does not touch a GPU at all."""
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


INSTALL_HINT = ("install a GPU build: pip install 'moaflow[tensorflow-cuda]' (TensorFlow), or "
                "pip install 'moaflow[jax-cuda]' and set KERAS_BACKEND=jax, or pip install 'moaflow[torch]' "
                "(CUDA wheels on Linux) and set KERAS_BACKEND=torch; or set training.allow_cpu: true to train "
                "on the CPU on purpose")


def visible_devices() -> list[dict]:
    """The devices the Keras backend sees: kind (cpu/gpu), name and memory (GiB, where the backend says)."""
    import keras

    backend = keras.backend.backend()
    devices = []
    if backend == "jax":
        import jax

        for d in jax.devices():
            kind = "gpu" if d.platform in ("gpu", "cuda", "rocm") else d.platform
            memory = None
            if kind == "gpu":
                stats = d.memory_stats() or {}
                memory = stats.get("bytes_limit")
            devices.append({"kind": kind, "name": d.device_kind, "memory_gb": memory and round(memory / 2**30, 1)})
    elif backend == "torch":
        import torch

        devices.append({"kind": "cpu", "name": "cpu", "memory_gb": None})
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"kind": "gpu", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    elif backend == "tensorflow":
        import tensorflow as tf

        for d in tf.config.list_physical_devices():
            name = d.name
            if d.device_type == "GPU":
                name = tf.config.experimental.get_device_details(d).get("device_name", d.name)
            devices.append({"kind": d.device_type.lower(), "name": name, "memory_gb": None})
    else:
        devices.append({"kind": "unknown", "name": backend, "memory_gb": None})
    return devices


def check_devices(gpus: int, allow_cpu: bool, log: Callable[[str], None] = stderr) -> dict:
    """What this job computes on; stop at once when it asked for a GPU and sees none.

    Parameters
    ----------
    gpus : int
        GPUs the job's rule declares (``training.resources.gpu``).
    allow_cpu : bool
        ``training.allow_cpu``: train on the CPU on purpose although a GPU was asked for.

    Raises
    ------
    DeviceError
        With the install hint, when ``gpus >= 1``, no GPU is visible and CPU training is not allowed.
    """
    with quiet_framework_startup():
        import keras

        devices = visible_devices()
    found = [d for d in devices if d["kind"] == "gpu"]
    report = {"backend": keras.backend.backend(), "keras_version": keras.__version__, "devices": devices,
              "gpus_requested": gpus, "gpus_visible": len(found)}
    shown = ", ".join(f"{d['kind']}:{d['name']}" + (f" ({d['memory_gb']} GiB)" if d["memory_gb"] else "")
                      for d in devices)
    log(f"Keras {keras.__version__}, backend {report['backend']}; devices: {shown}")
    if gpus >= 1 and not found:
        if not allow_cpu:
            raise DeviceError(f"this job asked for {gpus} GPU(s) (training.resources.gpu) but the "
                              f"{report['backend']} backend sees none ({shown}): {INSTALL_HINT}")
        log(f"WARNING: {gpus} GPU(s) asked for, none visible: training on the CPU (training.allow_cpu: true)")
    return report
