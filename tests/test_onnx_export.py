"""``check_onnx``: the ONNX checker and ONNX Runtime vs torch, on real exported files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from helpers import randomize_layer_scale

from updp.core.errors import UpdpError
from updp.core.onnx_export import ExportError, check_onnx, export_onnx

SHAPE = (1, 3, 32, 32)


def _model(seed: int, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_layer_scale(timm.create_model("test_convnext", num_classes=num_classes), seed).eval()


def _input() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = _model(0)
    return model, export_onnx(model, SHAPE, tmp_path_factory.mktemp("onnx") / "m.onnx")


def _one_line(info: pytest.ExceptionInfo) -> str:
    assert isinstance(info.value, UpdpError)
    text = str(info.value)
    assert text and "\n" not in text, text
    return text


def test_good_export_passes_and_returns_the_max_abs_diff(exported):
    model, path = exported
    x = _input()
    diff = check_onnx(path, model, x)
    with torch.no_grad():
        want = model(x).numpy()
    assert diff == pytest.approx(float(np.abs(_ort(path, x) - want).max()))
    assert 0 <= diff < 1e-4 * max(1.0, float(np.abs(want).max()))


def _break_unknown_op(graph: onnx.GraphProto) -> None:
    next(n for n in graph.node if n.op_type == "Conv").op_type = "NoSuchOp"


def _break_drop_inputs(graph: onnx.GraphProto) -> None:
    del next(n for n in graph.node if n.op_type == "Conv").input[:]


@pytest.mark.parametrize("breakage, fragment", [(_break_unknown_op, "NoSuchOp"),
                                                (_break_drop_inputs, "input size 0")])
def test_invalid_graph_is_refused_by_the_checker(exported, tmp_path: Path, breakage, fragment):
    model, path = exported
    proto = onnx.load(str(path))
    breakage(proto.graph)
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ExportError) as info:
        check_onnx(broken, model, _input())
    line = _one_line(info)
    assert "ONNX checker refuses 'broken.onnx'" in line and fragment in line, line


def test_output_that_differs_raises_with_the_diff(exported):
    _, path = exported
    other, x = _model(1), _input()
    with torch.no_grad():
        want = float(np.abs(_ort(path, x) - other(x).numpy()).max())
    assert want > 1e-2  # the two models really differ
    with pytest.raises(ExportError) as info:
        check_onnx(path, other, x)
    line = _one_line(info)
    assert f"max abs diff {want:.3g}" in line and "differs from torch" in line, line


def test_output_of_another_shape_is_refused(exported):
    _, path = exported
    with pytest.raises(ExportError) as info:
        check_onnx(path, _model(0, num_classes=7), _input())
    assert "shape (1, 10), torch (1, 7)" in _one_line(info)
