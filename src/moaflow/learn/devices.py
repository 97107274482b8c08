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


class CompilationCache:
    """JAX's persistent compilation cache in ``folder``, shared by every job of a run, and its tally.

    Every compiled program is written there (no minimum compile time), so the second job of an
    architecture loads its programs instead of compiling them. A size cap is set on purpose: with one,
    JAX takes a file lock around every read and write of the folder (without, a job could read another
    job's half-written entry), which makes the folder safe for concurrent jobs on one file system.
    Other backends have no such cache: the setting is then logged as not applied.

    Parameters
    ----------
    folder : path, optional
        ``training.compilation_cache`` (None: no persistent cache).
    max_gb : float
        The cap (least recently used programs are dropped beyond it).
    log : callable
    """

    EVENTS = {"/jax/compilation_cache/cache_hits": "loaded", "/jax/compilation_cache/cache_misses": "compiled"}

    def __init__(self, folder, max_gb: float = 20.0, log: Callable[[str], None] = stderr):
        import keras

        self.folder, self.counts = folder, {"loaded": 0, "compiled": 0}
        if folder is None:
            return
        if keras.backend.backend() != "jax":
            log(f"training.compilation_cache ({folder}): only the JAX backend keeps compiled programs; "
                f"the {keras.backend.backend()} backend compiles in every job")
            self.folder = None
            return
        import jax
        from jax import monitoring

        os.makedirs(folder, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.fspath(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_compilation_cache_max_size", int(max_gb * 2**30))
        monitoring.register_event_listener(self._event)

    def _event(self, event: str, **_) -> None:
        if event in self.EVENTS:
            self.counts[self.EVENTS[event]] += 1

    def summary(self, log: Callable[[str], None] = stderr) -> dict:
        """``folder`` and how many programs were loaded from it and compiled anew (and stored), also logged."""
        if self.folder is not None:
            log(f"compilation cache {self.folder}: {self.counts['loaded']} program(s) loaded, "
                f"{self.counts['compiled']} compiled and stored")
        return {"folder": None if self.folder is None else os.fspath(self.folder), **self.counts}
