"""ONNX Runtime: the CPU execution provider here, CUDA where onnxruntime-gpu is installed.

On CUDA, input and output live on the device through an IOBinding, so the
timed region holds no host-device copies.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from updp.latency.base import LatencyBackend, MeasureConfig


class OnnxRuntimeBackend(LatencyBackend):
    name = "onnxruntime"
    supported_precisions = ("fp32",)

    def __init__(self, device: str = "cpu", spin: bool = True):
        self.device = device
        self.spin = spin  # idle intra-op threads busy-wait; off when several sessions share the cores
        self.session = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime)"
        return None

    @classmethod
    def interleaved_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        # Spinning threads of the session that just ran would steal the cores from the next one.
        return {"spin": False, **options}

    def _providers(self) -> list[str]:
        import onnxruntime as ort

        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                from updp.core.errors import UpdpError
                raise UpdpError("ONNX Runtime has no CUDA execution provider (pip install onnxruntime-gpu)")
            return ["CUDAExecutionProvider"]
        return ["CPUExecutionProvider"]

    def load(self, target: Any, cfg: MeasureConfig) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if cfg.threads:
            opts.intra_op_num_threads = cfg.threads
        if not self.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(target), opts, providers=self._providers())
        inp = self.session.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal(cfg.full_shape).astype(
            np.float16 if "float16" in inp.type else np.float32)
        self.binding = self.session.io_binding()
        device = "cuda" if self.device == "cuda" else "cpu"
        self.binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        for out in self.session.get_outputs():
            self.binding.bind_output(out.name, device)

    def run_once(self) -> float | None:
        self.session.run_with_iobinding(self.binding)
        return None

    def release(self) -> None:
        self.session = None
        self.binding = None

    def context(self) -> dict[str, Any]:
        import onnxruntime as ort

        from updp.latency.context import cpu_name
        return {"device": cpu_name() if self.device == "cpu" else "cuda", "onnxruntime": ort.__version__,
                "execution_provider": self._providers()[0], "thread_spinning": self.spin}
