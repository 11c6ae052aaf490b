"""Latency backends, looked up by name; heavy imports happen only when one is used."""
from __future__ import annotations

from updp.errors import UpdpError
from updp.latency.base import BackendUnavailable, LatencyBackend

_BACKENDS = {
    "tensorrt": "updp.latency.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "updp.latency.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "updp.latency.backends.torch:TorchBackend",
}
NAMES = ("auto", *_BACKENDS)


def backend_class(name: str) -> type[LatencyBackend]:
    import importlib

    if name not in _BACKENDS:
        raise UpdpError(f"unknown latency backend '{name}'; choose from {', '.join(NAMES)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_backend(name: str = "auto", **options) -> LatencyBackend:
    """The backend called ``name``; ``auto`` is TensorRT on a GPU where installed, else ONNX Runtime."""
    if name == "auto":
        name = "tensorrt" if backend_class("tensorrt").unavailable_reason() is None else "onnxruntime"
    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend '{name}' is not available: {reason}")
    return cls(**options)
