"""Latency backends, looked up by name; heavy imports happen only when one is used."""
from __future__ import annotations

from updp.core.errors import UpdpError
from updp.latency.base import BackendUnavailable, LatencyBackend

_BACKENDS = {
    "tensorrt": "updp.latency.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "updp.latency.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "updp.latency.backends.torch:TorchBackend",
}
NAMES = ("auto", *_BACKENDS)


def backend_class(backend: str | type[LatencyBackend]) -> type[LatencyBackend]:
    """The class of a named backend (``auto`` resolved), or ``backend`` itself when it is a ``LatencyBackend`` subclass.

    Passing a class is how a backend of one's own (a test double, a new
    runtime) goes through the same resolution as the built-in ones.
    """
    import importlib

    if isinstance(backend, type) and issubclass(backend, LatencyBackend):
        return backend
    if backend == "auto":
        backend = "tensorrt" if backend_class("tensorrt").unavailable_reason() is None else "onnxruntime"
    if backend not in _BACKENDS:
        raise UpdpError(f"unknown latency backend '{backend}'; choose from {', '.join(NAMES)} "
                        "(or pass a LatencyBackend subclass)")
    module, cls = _BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_backend(backend: str | type[LatencyBackend] = "auto", **options) -> LatencyBackend:
    """An instance of ``backend`` (a name or a class); ``auto`` is TensorRT on a GPU where installed, else ONNX Runtime.

    Raises:
        BackendUnavailable: the backend's packages or device are missing.
    """
    cls = backend_class(backend)
    reason = cls.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend '{cls.name or backend}' is not available: {reason}")
    return cls(**options)
