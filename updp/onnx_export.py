"""ONNX export and an ONNX Runtime check, shared by the pruner and the latency backends."""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from updp.errors import UpdpError
from updp.fileio import atomic_path

OPSET = 17


class ExportError(UpdpError):
    """The model could not be exported to ONNX."""


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike,
                dynamic_batch: bool = False, half: bool = False) -> Path:
    """Export ``model`` in eval mode for one input of ``input_shape``; written atomically.

    With ``half`` the graph itself is float16 (inputs, weights, outputs): the
    way to give strongly typed TensorRT (11.x) its precision.
    """
    model = copy.deepcopy(model).half() if half else model
    model = model.eval()
    param = next(model.parameters())
    x = torch.zeros(*input_shape, dtype=param.dtype, device=param.device)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter is ~10x faster than the dynamo one here.
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["logits"], dynamic_axes=axes)
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported as data
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return path


def run_onnx(path: str | os.PathLike, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """One forward pass with ONNX Runtime on CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
