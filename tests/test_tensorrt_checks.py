"""TensorRT checks that run anywhere, and the few that need a GPU.

Anywhere: the engine precision check (``updp.latency.trt_inspect``) on engine
inspector JSON in the TensorRT 10.x and 11.x schemas (hand-written fixtures
in tests/fixtures/trt_inspector, each with a .source.txt saying what it
stands for), the backend's option checks and context keys, and the
bookkeeping of the shared CUDA context holder, driven by a plain Python
factory. That last test checks updp's reference counting, not pycuda: the
real pycuda path (``retain_primary_context``, ``push``, ``Context.pop``,
``detach``) runs only in the ``tensorrt`` tests at the end, on a machine with
an NVIDIA GPU, TensorRT and pycuda; elsewhere they skip.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from updp.core.errors import UpdpError
from updp.latency.backends import backend_class
from updp.latency.backends.tensorrt import CONTEXTS, ContextHolder, TensorRTBackend
from updp.latency.base import MeasureConfig
from updp.latency.trt_inspect import check_precision, layer_precisions, tensor_precision, verified_precision

FIXTURES = Path(__file__).parent / "fixtures" / "trt_inspector"
FAST = dict(input_shape=(3, 64, 64), warmup_runs=2, warmup_ms=0, min_runs=12, min_time_s=0.05)
NO_TENSORRT = backend_class("tensorrt").unavailable_reason()


def engine_info(name: str) -> str:
    return (FIXTURES / f"{name}.engine_info.json").read_text()


def counts(**nonzero: int) -> dict[str, int]:
    return {"fp32": 0, "fp16": 0, "bf16": 0, "int8": 0, "fp8": 0, **nonzero}


def one_line_error(call, match: str) -> str:
    with pytest.raises(UpdpError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- engine precision ---------------------------------------------------------------------------------


def test_fixtures_say_they_are_hand_written():
    for path in FIXTURES.glob("*.engine_info.json"):
        source = path.with_name(path.name.replace(".json", ".source.txt")).read_text()
        assert source.startswith("HAND-WRITTEN - NOT REAL TensorRT OUTPUT")


def test_trt10_fp16_engine_passes_an_fp16_request_and_fails_an_fp32_one():
    info = engine_info("trt10_fp16flag_resnetlike")
    # Reformat (input cast) and Shuffle (flatten) do not count; the Gemm TensorRT ran in FP32 does.
    assert layer_precisions(info) == counts(fp16=7, fp32=1)
    assert check_precision(info, "fp16") == {"verified_precision": "fp16", "layer_precisions": counts(fp16=7, fp32=1)}
    message = one_line_error(lambda: check_precision(info, "fp32"), "runs in fp16, not the fp32 asked for")
    assert "fp16 7" in message and "float32 graph" in message


def test_trt11_all_float_engine_fails_an_fp16_request_in_one_line():
    info = json.loads(engine_info("trt11_fp32graph_resnetlike"))
    assert "Bindings" not in info and info["I/O Tensors"][0]["DataType"] == "Float"
    assert layer_precisions(info) == counts(fp32=8)
    message = one_line_error(lambda: check_precision(info, "fp16"), "runs in fp32, not the fp16 asked for")
    assert "fp32 8" in message and "float16 graph" in message
    assert check_precision(info, "fp32")["verified_precision"] == "fp32"


def test_mixed_fp16_engine_with_some_fp32_layers_verifies_as_fp16():
    info = engine_info("trt11_mixed_fp16_vitlike")
    # Normalization and softmax stay Float; the Int64 shape, Bool mask, Shuffle and Reformat do not count.
    assert layer_precisions(info) == counts(fp16=8, fp32=4)
    assert check_precision(info, "fp16")["verified_precision"] == "fp16"
    one_line_error(lambda: check_precision(info, "fp32"), "runs in fp16")


def test_int8_engine_verifies_as_int8():
    info = engine_info("trt10_int8_qdq_resnetlike")
    assert layer_precisions(info) == counts(int8=4, fp16=1, fp32=1)
    assert check_precision(info, "int8")["verified_precision"] == "int8"
    one_line_error(lambda: check_precision(info, "fp16"), "runs in int8, not the fp16 asked for")


def test_names_only_engine_information_asks_for_detailed_verbosity():
    info = engine_info("trt10_names_only")
    for call in (lambda: layer_precisions(info), lambda: check_precision(info, "fp16")):
        one_line_error(call, r"layer names only: build the engine with .*ProfilingVerbosity\.DETAILED")
    one_line_error(lambda: layer_precisions({"Layers": [], "Bindings": []}), "DETAILED")


def test_unreadable_engine_information_is_a_one_line_error():
    one_line_error(lambda: layer_precisions("Layers: conv"), "not JSON")
    one_line_error(lambda: layer_precisions({"Bindings": ["x"]}), "no 'Layers' list")
    only_shapes = {"Layers": [{"Name": "shape", "LayerType": "Shape", "Outputs": [{"DataType": "Int64"}]}]}
    one_line_error(lambda: check_precision(only_shapes, "fp32"), "cannot be verified")


@pytest.mark.parametrize("tensor, precision", [
    ({"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}, "fp16"),
    ({"Format/Datatype": "Row major linear FP32"}, "fp32"),
    ({"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}, "int8"),
    ({"Format/Datatype": "Channel major BFloat16 format where channel % 8 == 0"}, "bf16"),
    ({"Format/Datatype": "Row major linear FP8 format"}, "fp8"),
    ({"Format/Datatype": "Half"}, "fp16"),  # a bare type name, as some layer kinds print
    ({"Format/Datatype": "Row major linear Int32"}, None),
    ({"Format/Datatype": "Row major linear UInt8 format"}, None),
    ({"Format/Datatype": "Row major linear BOOL"}, None),
    ({"Format/Datatype": "N/A due to dynamic shapes"}, None),
    ({"DataType": "BF16", "Format": "Row major linear BF16 format (kLINEAR)"}, "bf16"),
    ({"DataType": "Float", "Format": "Channel major FP32 format (kHWC)"}, "fp32"),
    ({"DataType": "Int32", "Format": "Row major linear FP32 format (kLINEAR)"}, None),  # DataType decides
    ({"Format": "Row major linear FP16 format (kLINEAR)"}, "fp16"),  # no DataType: the format's word
])
def test_tensor_precision_in_both_schemas(tensor, precision):
    assert tensor_precision(tensor) == precision


def test_verified_precision_is_the_narrowest_compute_precision():
    assert verified_precision(counts(fp32=30, fp16=1)) == "fp16"
    assert verified_precision(counts(fp32=3, fp16=5, int8=1)) == "int8"
    assert verified_precision(counts(fp32=3, bf16=5, fp16=1)) == "bf16"
    assert verified_precision(counts(fp32=1)) == "fp32"
    with pytest.raises(UpdpError, match="cannot be verified"):
        verified_precision(counts())


# --- backend options and context --------------------------------------------------------------------


@pytest.mark.parametrize("level", [-1, 6, 2.0, True, "3"])
def test_optimization_level_is_checked_when_the_backend_is_made(level):
    one_line_error(lambda: TensorRTBackend(optimization_level=level), "optimization level must be an integer from 0")


def test_build_context_before_and_after_a_build(tmp_path):
    backend = TensorRTBackend(timing_cache=tmp_path / "timing.cache")
    assert backend.build_context() == {"builder_optimization_level": "default (3)",
                                       "timing_cache": str(tmp_path / "timing.cache")}
    assert TensorRTBackend(optimization_level=0).build_context()["builder_optimization_level"] == 0
    backend.build_facts = check_precision(engine_info("trt10_fp16flag_resnetlike"), "fp16")  # as load() sets it
    assert backend.build_context()["verified_precision"] == "fp16"
    backend.release()  # nothing loaded: no CUDA call, and what the build verified is gone
    assert "verified_precision" not in backend.build_context() and not backend.holds_context


def test_identity_keeps_the_optimization_level_and_skips_the_timing_cache(tmp_path):
    class NoDevice(TensorRTBackend):  # the device part of context() needs pycuda; the build part does not
        def context(self):
            return {"device": "stub", **self.build_context()}

    a, b = NoDevice(timing_cache=tmp_path / "a"), NoDevice(timing_cache=tmp_path / "b")
    assert a.identity() == b.identity()
    assert NoDevice(optimization_level=5).identity() != a.identity()
    before = a.identity()
    a.build_facts = {"verified_precision": "fp16", "layer_precisions": counts(fp16=1)}
    a.release()
    assert a.identity() == before


def test_strongly_typed_tensorrt_10_wants_a_half_graph():
    assert TensorRTBackend(strongly_typed=True).wants_half_onnx()  # decided without importing tensorrt


# --- the shared CUDA context's bookkeeping (a plain factory; see the module docstring) -------------


class FakeContext:
    def __init__(self, device_id: int, log: list):
        self.device_id, self.log = device_id, log

    def push(self):
        self.log.append(("push", self.device_id))

    def pop(self):
        self.log.append(("pop", self.device_id))

    def detach(self):
        self.log.append(("detach", self.device_id))


@pytest.fixture
def holder_and_log():
    log: list = []

    def factory(device_id):
        log.append(("make", device_id))
        return FakeContext(device_id, log)

    return ContextHolder(factory), log


def test_context_is_made_once_per_device_and_detached_by_the_last_holder(holder_and_log):
    holder, log = holder_and_log
    first = holder.acquire(0)
    assert holder.acquire(0) is first and holder.holders(0) == 2
    assert holder.acquire(1) is not first and log == [("make", 0), ("make", 1)]
    holder.release(0)
    assert holder.holders(0) == 1 and ("detach", 0) not in log
    holder.release(0)
    assert holder.holders(0) == 0 and log[-1] == ("detach", 0)
    assert holder.acquire(0) is not first and log[-1] == ("make", 0)  # a later load makes a fresh one


def test_active_pushes_and_pops_around_the_block_even_when_it_raises(holder_and_log):
    holder, log = holder_and_log
    ctx = holder.acquire(0)
    with holder.active(0) as current:
        assert current is ctx and log[-1] == ("push", 0)
    assert log[-1] == ("pop", 0)
    with pytest.raises(RuntimeError), holder.active(0):
        raise RuntimeError("engine build failed")
    assert log[-2:] == [("push", 0), ("pop", 0)]


def test_a_failing_factory_holds_nothing_and_over_release_is_refused(holder_and_log):
    holder, _ = holder_and_log
    broken = ContextHolder(lambda device_id: (_ for _ in ()).throw(RuntimeError("no device")))
    with pytest.raises(RuntimeError, match="no device"):
        broken.acquire(0)
    assert broken.holders(0) == 0
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        holder.release(3)


def test_backends_share_the_module_holder_interleaved(monkeypatch, holder_and_log):
    """Two backends loaded at once, as ``measure_interleaved`` keeps them: one context, detached after both."""
    holder, log = holder_and_log
    monkeypatch.setattr("updp.latency.backends.tensorrt.CONTEXTS", holder)

    class NoEngine(TensorRTBackend):  # the real load/release bookkeeping around a stand-in for the build
        def _load(self, onnx_path, cfg):
            self.build_facts = {"verified_precision": cfg.precision}

    a, b = NoEngine(), NoEngine()
    a.load("a.onnx", MeasureConfig())
    b.load("b.onnx", MeasureConfig())
    assert holder.holders(0) == 2 and log.count(("make", 0)) == 1
    a.release()
    assert holder.holders(0) == 1 and ("detach", 0) not in log
    b.release()
    b.release()  # idempotent
    assert holder.holders(0) == 0 and log.count(("detach", 0)) == 1 and log[-2:] == [("pop", 0), ("detach", 0)]


# --- on a GPU with TensorRT and pycuda ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_convnext").eval()


@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TENSORRT is not None, reason=f"needs TensorRT, pycuda and a CUDA GPU ({NO_TENSORRT})")
def test_gpu_fp16_engine_is_verified_as_fp16_and_fp32_as_fp32(tiny, tmp_path):
    r16 = TensorRTBackend(timing_cache=tmp_path / "timing.cache").measure(
        tiny, MeasureConfig(**FAST, precision="fp16"))
    assert r16.ok, r16.error
    assert r16.context["verified_precision"] == "fp16" and r16.context["layer_precisions"]["fp16"] > 0
    r32 = TensorRTBackend(optimization_level=1).measure(tiny, MeasureConfig(**FAST))
    assert r32.ok, r32.error
    assert r32.context["verified_precision"] == "fp32" and r32.context["layer_precisions"]["fp16"] == 0
    assert r32.context["builder_optimization_level"] == 1
    assert CONTEXTS.holders(0) == 0


@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TENSORRT is not None, reason=f"needs TensorRT, pycuda and a CUDA GPU ({NO_TENSORRT})")
def test_gpu_interleaved_instances_share_one_context(tiny, monkeypatch):
    import timm

    from updp.latency.backends import tensorrt as trt_backend
    from updp.latency.interleave import measure_interleaved

    made, peak = [], []
    holder = ContextHolder(lambda device_id: made.append(device_id) or trt_backend._primary_context(device_id))
    acquire = holder.acquire

    def counting_acquire(device_id):
        ctx = acquire(device_id)
        peak.append(holder.holders(device_id))
        return ctx

    monkeypatch.setattr(holder, "acquire", counting_acquire)
    monkeypatch.setattr(trt_backend, "CONTEXTS", holder)
    torch.manual_seed(1)
    other = timm.create_model("test_convnext").eval()
    results = measure_interleaved("tensorrt", [tiny, other], MeasureConfig(**FAST), rounds=3)
    assert all(r.ok for r in results), [r.error for r in results]
    assert made == [0] and max(peak) == 2 and holder.holders(0) == 0
    assert results[0].context["verified_precision"] == "fp32"


@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TENSORRT is not None, reason=f"needs TensorRT, pycuda and a CUDA GPU ({NO_TENSORRT})")
def test_gpu_strongly_typed_tensorrt_10_builds_fp16_from_a_half_graph(tiny):
    import tensorrt as trt

    if int(trt.__version__.split(".")[0]) >= 11:
        pytest.skip("TensorRT 11 is always strongly typed (the fp16 test covers it)")
    r = TensorRTBackend(strongly_typed=True).measure(tiny, MeasureConfig(**FAST, precision="fp16"))
    assert r.ok, r.error
    assert r.context["verified_precision"] == "fp16" and r.context["strongly_typed"] is True
