"""What precision a built TensorRT engine really runs in, read from its engine inspector.

A TensorRT build can quietly differ from what was asked: TensorRT 11 is
strongly typed and builds an fp32 engine from an fp32 ONNX graph whatever
the caller wanted, and TensorRT 10 with the FP16 flag only *permits* fp16
kernels. A latency figure labelled fp16 must come from an engine that runs
fp16, so the engine's own description is checked after each build.

The input is the JSON of ``IEngineInspector.get_engine_information(
LayerInformationFormat.JSON)`` for an engine built with
``ProfilingVerbosity.DETAILED``. Two schemas are read:

- TensorRT 8.x / 10.x: ``{"Layers": [...], "Bindings": ["input", ...]}``;
  each layer has ``Name``, ``LayerType``, and ``Inputs`` / ``Outputs`` lists
  of tensors with ``Name``, ``Location``, ``Dimensions`` and one text field
  ``"Format/Datatype"`` such as ``"Channel major FP16 format where channel %
  8 == 0"``, ``"Row major linear FP32"``, ``"Thirty-two wide channel
  vectorized row major Int8 format."``, or a bare type name (``"Half"``).
- TensorRT 11.x: ``"Bindings"`` is replaced by ``"I/O Tensors"`` (objects
  with ``Name``, ``IOMode``, ``DataType``, ``Dimensions``, ``Location``, ...)
  and a tensor's ``"Format/Datatype"`` is split into ``"Format"`` and
  ``"DataType"``, the latter a TensorRT data type name (``Float``, ``Half``,
  ``BF16``, ``Int8``, ``FP8``, ``Int32``, ``Bool``, ...).

With the default ``ProfilingVerbosity.LAYER_NAMES_ONLY`` the ``Layers`` are
plain strings and carry no types: that is an error saying how to build.

Counting rule: each *output* tensor of each compute layer counts once under
its precision (``fp32``, ``fp16``, ``bf16``, ``int8``, ``fp8``; TF32 kernels
write FP32 tensors and count as fp32). Not counted: layers that only move or
relabel data (``Reformat``, ``Shuffle``, ``NoOp``, ``Constant``: the input and
output casts TensorRT adds around an fp16 engine are Reformat layers), and
tensors of index, shape or mask types (Int32, Int64, UInt8, Bool) or of no
known type (``"N/A due to dynamic shapes"``).

The verified precision is the narrowest one any compute layer runs in: int8,
else fp8, else fp16 / bf16 (the more frequent of the two), else fp32. An fp16
engine keeps some layers in fp32 (TensorRT does so for softmax and
normalization), which the counts show; an fp32 engine has none in fp16.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from updp.core.errors import UpdpError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
DATA_MOVEMENT_LAYERS = frozenset({"Reformat", "Shuffle", "NoOp", "Constant"})

# Words of a format text or a data type name, lower case, and the precision they name.
_WORDS = {
    "fp32": "fp32", "float": "fp32", "float32": "fp32",
    "fp16": "fp16", "half": "fp16", "float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "int8": "int8",
    "fp8": "fp8", "float8": "fp8", "e4m3": "fp8",
}
_NOT_COUNTED = frozenset({"int32", "int64", "uint8", "bool", "int4", "fp4", "e8m0"})


def layer_precisions(info: str | Mapping[str, Any]) -> dict[str, int]:
    """Output tensors of the engine's compute layers, counted by precision (see the module docstring).

    Args:
        info: the engine information JSON, as the text the inspector returns or already parsed.

    Returns:
        A count for each of ``PRECISIONS``, zeros included.

    Raises:
        UpdpError: not engine information JSON, or built without ``ProfilingVerbosity.DETAILED``.
    """
    counts = dict.fromkeys(PRECISIONS, 0)
    for layer in _layers(info):
        if layer.get("LayerType") in DATA_MOVEMENT_LAYERS:
            continue
        for tensor in layer.get("Outputs") or ():
            precision = tensor_precision(tensor) if isinstance(tensor, Mapping) else None
            if precision is not None:
                counts[precision] += 1
    return counts


def tensor_precision(tensor: Mapping[str, Any]) -> str | None:
    """The precision of one inspector tensor entry (either schema), or None for index, shape and unknown types."""
    fields = {re.sub(r"[^a-z]", "", str(key).lower()): value for key, value in tensor.items()}
    for key in ("datatype", "formatdatatype", "format"):  # TensorRT 11's own type field first
        if key in fields and (precision := _precision_of_text(str(fields[key]))) is not None:
            return precision or None
    return None


def _precision_of_text(text: str) -> str | None:
    """The precision the first type word of ``text`` names; "" for a type that is not counted, None for none."""
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word in _NOT_COUNTED:
            return ""
        if word in _WORDS:
            return _WORDS[word]
    return None


def verified_precision(counts: Mapping[str, int]) -> str:
    """The precision an engine runs in, from ``layer_precisions`` counts: the narrowest its compute layers use.

    Raises:
        UpdpError: no compute layer has a floating-point or quantized output, so there is nothing to verify.
    """
    if counts.get("int8", 0):
        return "int8"
    if counts.get("fp8", 0):
        return "fp8"
    if counts.get("fp16", 0) or counts.get("bf16", 0):
        return "bf16" if counts.get("bf16", 0) > counts.get("fp16", 0) else "fp16"
    if counts.get("fp32", 0):
        return "fp32"
    raise UpdpError("the TensorRT engine information shows no compute layer with a floating-point or int8 "
                    "output, so its precision cannot be verified")


def check_precision(info: str | Mapping[str, Any], requested: str) -> dict[str, Any]:
    """Verify that an engine runs in ``requested`` precision.

    Returns:
        ``{"verified_precision": ..., "layer_precisions": {...}}`` for the record's context.

    Raises:
        UpdpError: one line, when the engine runs in another precision (an fp32 request whose engine has
            fp16 layers is a mismatch too; TF32 counts as fp32), or when ``info`` cannot be read.
    """
    counts = layer_precisions(info)
    verified = verified_precision(counts)
    if verified != requested:
        shown = ", ".join(f"{p} {n}" for p, n in counts.items() if n) or "none"
        raise UpdpError(f"the TensorRT engine runs in {verified}, not the {requested} asked for "
                        f"(compute layer outputs: {shown}); {_hint(requested, verified)}")
    return {"verified_precision": verified, "layer_precisions": counts}


def _hint(requested: str, verified: str) -> str:
    if requested == "fp16" and verified == "fp32":
        return ("a strongly typed build (TensorRT 11, or strongly_typed=True) takes its precision from the ONNX "
                "graph: give it a float16 graph (pass the nn.Module so updp exports one)")
    if requested == "fp32":
        return "the ONNX graph holds reduced-precision types or Q/DQ nodes: give it a float32 graph"
    if requested == "int8":
        return "int8 needs a calibrator (TensorRT 10) or explicit Q/DQ nodes in the ONNX graph"
    return f"check the ONNX graph's types and the builder settings for {requested}"


def _layers(info: str | Mapping[str, Any]) -> list[Any]:
    if isinstance(info, (str, bytes)):
        try:
            info = json.loads(info)
        except ValueError as e:
            raise UpdpError(f"the TensorRT engine information is not JSON ({e}); ask the inspector for "
                            "LayerInformationFormat.JSON") from None
    layers = info.get("Layers") if isinstance(info, Mapping) else None
    if not isinstance(layers, list):
        raise UpdpError("the TensorRT engine information has no 'Layers' list; pass the JSON of "
                        "IEngineInspector.get_engine_information(LayerInformationFormat.JSON)")
    if not layers or all(isinstance(layer, str) for layer in layers):
        raise UpdpError("the TensorRT engine information lists layer names only: build the engine with "
                        "config.profiling_verbosity = ProfilingVerbosity.DETAILED to verify its precision")
    return [layer for layer in layers if isinstance(layer, Mapping)]
