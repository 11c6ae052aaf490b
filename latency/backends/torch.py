"""PyTorch eager (optionally ``torch.compile``): CUDA events on a GPU, perf_counter on CPU."""
from __future__ import annotations

import copy
from typing import Any

from updp.latency.base import LatencyBackend, MeasureConfig


class TorchBackend(LatencyBackend):
    name = "torch"
    needs_onnx = False
    supported_precisions = ("fp32", "fp16")

    def __init__(self, device: str = "auto", compile: bool = False):
        self.device_arg = device
        self.compile = compile
        self.model = None

    def _device(self):
        import torch

        if self.device_arg == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device_arg.startswith("cuda") and not torch.cuda.is_available():
            from updp.core.errors import UpdpError
            raise UpdpError("torch backend: CUDA was asked for but torch sees no GPU")
        return torch.device(self.device_arg)

    def load(self, target: Any, cfg: MeasureConfig) -> None:
        import torch

        self.torch = torch
        self.device = self._device()
        dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
        if dtype == torch.float16 and self.device.type == "cpu":
            from updp.core.errors import UpdpError
            raise UpdpError("torch backend: fp16 needs a CUDA device")
        if cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        model = copy.deepcopy(target).eval().to(self.device, dtype)
        self.model = torch.compile(model) if self.compile else model
        self.x = torch.randn(cfg.full_shape, device=self.device, dtype=dtype)
        if self.device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def run_once(self) -> float | None:
        with self.torch.inference_mode():
            if self.device.type != "cuda":
                self.model(self.x)
                return None
            start, end = self.events
            start.record()
            self.model(self.x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

    def release(self) -> None:
        self.model = None
        self.x = None
        if getattr(self, "device", None) is not None and self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def context(self) -> dict[str, Any]:
        import torch

        from updp.latency.context import cpu_name
        device = self._device()
        ctx = {"torch": torch.__version__, "compile": self.compile, "torch_threads": torch.get_num_threads()}
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            ctx.update(device=props.name, cuda=torch.version.cuda, compute_capability=f"{props.major}.{props.minor}",
                       cudnn=torch.backends.cudnn.version())
        else:
            ctx["device"] = cpu_name()
        return ctx
