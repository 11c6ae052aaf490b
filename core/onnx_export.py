"""ONNX export and its check (ONNX checker + ONNX Runtime vs torch), shared by the pruner, pipeline and latency."""
from __future__ import annotations

import copy
import ctypes
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from updp.core.errors import UpdpError
from updp.core.fileio import atomic_path

OPSET = 17
# Tried in turn: a graph with an operator opset 17 lacks gets the TorchScript exporter's newest.
OPSETS = (OPSET, 20)


class ExportError(UpdpError):
    """The model could not be exported to ONNX."""


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike,
                half: bool = False) -> Path:
    """Export ``model`` in eval mode for one input of ``input_shape``; written atomically.

    With ``half`` the graph itself is float16 (inputs, weights, outputs): the
    way to give strongly typed TensorRT (11.x) its precision. A failure is one
    ``ExportError`` line; nothing is printed and no file is left. The file is
    not checked here (:func:`check_onnx` does): the full checker adds about
    5.3 % to each export (15 of 280 ms for convnext_atto at 224 px, 2-core
    CPU), on every export the latency backends make before timing.
    """
    model = copy.deepcopy(model).half() if half else model
    model = model.eval()
    param = next(model.parameters())
    x = torch.zeros(*input_shape, dtype=param.dtype, device=param.device)
    _register_symbolics()
    path = Path(path)
    errors = []
    for opset in OPSETS:
        try:
            with atomic_path(path) as tmp, warnings.catch_warnings(), _quiet_native_output():
                warnings.simplefilter("ignore")
                # The TorchScript-based exporter is ~10x faster than the dynamo one here.
                torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"])
            return path
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported as data
            errors.append(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
            if "opset" not in str(e):
                break
    tried = ", ".join(map(str, OPSETS[:len(errors)]))
    raise ExportError(f"ONNX export failed: {errors[-1]} (tried opset{'s' * (len(errors) > 1)} {tried})")


@contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Send what native code writes to file descriptors 1 and 2 to a scratch file meanwhile.

    On a failure the TorchScript exporter prints its whole graph (hundreds of
    lines) from C++, where Python's own redirections cannot catch it.
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError):  # no real descriptors (closed, or an embedding host): leave them
        yield
        return
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            _flush_c_stdio()
            for fd, saved_fd in zip((1, 2), saved):
                os.dup2(saved_fd, fd)
                os.close(saved_fd)


def _flush_c_stdio() -> None:
    """C++ ``std::cout`` goes through C stdio buffers: flush them before the descriptors go back."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C runtime reachable this way (Windows)
        pass


_REGISTERED = False


def _register_symbolics() -> None:
    """Export rules for operators the TorchScript exporter has none for (once per process)."""
    global _REGISTERED
    if not _REGISTERED:
        torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, 9)
        _REGISTERED = True


def _rms_norm(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm`` (timm's ``RmsNorm``): ``x / sqrt(mean(x^2) + eps) * weight`` in basic ops."""
    from torch.onnx import JitScalarType
    from torch.onnx import symbolic_helper as sh

    axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
    dtype = JitScalarType.from_value(x, JitScalarType.FLOAT).dtype()
    eps = torch.finfo(dtype).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    square = g.op("Mul", x, x)
    if g.opset >= 18:  # axes became an input
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps, dtype=dtype))))
    y = g.op("Div", x, rms)
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def run_onnx(path: str | os.PathLike, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """One forward pass with ONNX Runtime on CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check_onnx(path: str | os.PathLike, model: nn.Module, x: torch.Tensor,
               rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Check an exported file: ONNX checker (full), then ONNX Runtime on ``x`` against ``model(x)``.

    Args:
        path: the ONNX file.
        model: the torch model it was exported from, in eval mode, on CPU.
        x: one input batch, as the file expects it.
        rtol: relative tolerance on the comparison.
        atol: absolute tolerance, scaled by the largest torch output magnitude when that is above 1.

    Returns:
        The max abs difference between the ONNX Runtime and the torch outputs.

    Raises:
        ExportError: the checker refuses the file, ONNX Runtime cannot run it,
            or its output is off (the message gives the max abs difference).
    """
    path = Path(path)
    _check_model(path)
    with torch.no_grad():
        want = model(x).detach().cpu().numpy()
    try:
        got = run_onnx(path, x.detach().cpu().numpy())
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors have no common base class
        raise ExportError(f"ONNX Runtime cannot run '{path.name}': {_one_line(e)}") from None
    if got.shape != want.shape:
        raise ExportError(f"ONNX Runtime output of '{path.name}' has shape {got.shape}, torch {want.shape}; "
                          "re-export the file from this model")
    diff = float(np.abs(got - want).max())
    if not np.allclose(got, want, rtol=rtol, atol=atol * max(1.0, float(np.abs(want).max()))):
        raise ExportError(f"ONNX Runtime output of '{path.name}' differs from torch (max abs diff {diff:.3g}, "
                          f"rtol {rtol:g}, atol {atol:g}); re-export it from this model, or report the model")
    return diff


def _check_model(path: Path) -> None:
    """``onnx.checker`` with shape inference (``full_check``); a refusal is one ``ExportError`` line."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"ONNX checker refuses '{path.name}': {_one_line(e)}; "
                          "re-export it, or report the model if a fresh export is refused too") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).replace("==>", "").split()) or type(e).__name__
