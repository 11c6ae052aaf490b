"""One contract every latency backend passes (TensorRT's class skips without it)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from updp.core.errors import UpdpError
from updp.core.onnx_export import export_onnx
from updp.latency.backends import backend_class, resolve_backend
from updp.latency.base import BackendUnavailable, MeasureConfig

FAST = dict(input_shape=(3, 64, 64), warmup_runs=2, warmup_ms=0, min_runs=12, min_time_s=0.05, threads=2)


class BatchSpy(nn.Module):
    """Notes the batch of every input it sees (class-level: backends may deep-copy the module)."""

    seen: list[int] = []

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        BatchSpy.seen.append(int(x.shape[0]))
        return self.conv(x)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        raise RuntimeError("this model cannot run")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("test_convnext").eval()


class BackendContract:
    name = ""
    options: dict = {}

    def backend(self):
        return resolve_backend(self.name, **self.options)

    def test_statistics_of_a_real_model(self, tiny):
        r = self.backend().measure(tiny, MeasureConfig(**FAST))
        assert r.ok, r.error
        assert r.backend == self.name and r.source == "measured" and not r.cached
        assert r.count >= FAST["min_runs"]
        assert 0 < r.min_ms <= r.median_ms <= r.p90_ms <= r.p99_ms <= r.max_ms
        assert r.min_ms <= r.mean_ms <= r.max_ms
        assert r.batch_size == 1 and r.input_shape == (3, 64, 64) and r.precision == "fp32"
        assert r.context["device"] and r.context["threads"] == 2

    def test_run_count_follows_min_runs_min_time_and_max_runs(self, tiny):
        r = self.backend().measure(tiny, MeasureConfig(**{**FAST, "min_runs": 40, "min_time_s": 0.0}))
        assert r.count == 40
        # A time that cannot be reached keeps it going past min_runs, up to max_runs.
        r = self.backend().measure(tiny, MeasureConfig(**{**FAST, "min_runs": 3, "min_time_s": 1e9, "max_runs": 25}))
        assert r.ok and r.count == 25

    def test_the_batch_size_reaches_the_model(self):
        BatchSpy.seen = []
        r = self.backend().measure(BatchSpy(), MeasureConfig(**{**FAST, "batch_size": 32}))
        assert r.ok and r.batch_size == 32 and r.input_shape == (3, 64, 64)
        assert BatchSpy.seen and set(BatchSpy.seen) == {32}  # traced for ONNX, or called for each run

    def test_time_limit_gives_a_failure_record(self, tiny):
        cfg = MeasureConfig(**{**FAST, "min_runs": 10**7, "max_runs": 10**8, "timeout_s": 0.5})
        r = self.backend().measure(tiny, cfg)
        assert not r.ok and "timed out" in r.error and math.isnan(r.median_ms)

    def test_a_model_that_fails_gives_a_failure_record(self):
        r = self.backend().measure(Broken(), MeasureConfig(**FAST))
        assert not r.ok and r.error and r.count == 0

    def test_unsupported_precision_is_a_failure_record(self, tiny):
        missing = [p for p in ("fp16", "int8") if p not in backend_class(self.name).supported_precisions]
        for precision in missing:
            r = self.backend().measure(tiny, MeasureConfig(**{**FAST, "precision": precision}))
            assert not r.ok and precision in r.error


class TestOnnxRuntime(BackendContract):
    name = "onnxruntime"

    def test_times_an_onnx_file(self, tiny, tmp_path):
        path = export_onnx(tiny, (1, 3, 64, 64), tmp_path / "m.onnx")
        r = self.backend().measure(path, MeasureConfig(**FAST))
        assert r.ok and r.count >= FAST["min_runs"]

    def test_missing_onnx_file_is_a_failure_record(self, tmp_path):
        r = self.backend().measure(tmp_path / "nope.onnx", MeasureConfig(**FAST))
        assert not r.ok and "does not exist" in r.error


class TestTorch(BackendContract):
    name = "torch"

    def test_an_onnx_path_is_refused(self, tiny, tmp_path):
        path = export_onnx(tiny, (1, 3, 64, 64), tmp_path / "m.onnx")
        r = self.backend().measure(path, MeasureConfig(**FAST))
        assert not r.ok and "nn.Module" in r.error

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error torch gives without a GPU")
    def test_fp16_needs_cuda(self, tiny):
        r = self.backend().measure(tiny, MeasureConfig(**{**FAST, "precision": "fp16"}))
        assert not r.ok and "CUDA" in r.error


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestTorchCuda(BackendContract):
    name = "torch"
    options = {"device": "cuda"}


@pytest.mark.tensorrt
@pytest.mark.skipif(backend_class("tensorrt").unavailable_reason() is not None,
                    reason="needs TensorRT, pycuda and a CUDA GPU")
class TestTensorRT(BackendContract):
    name = "tensorrt"

    def test_fp16_runs_on_a_half_graph_or_engine(self, tiny, tmp_path):
        import onnx
        import tensorrt as trt

        from updp.latency.backends.tensorrt import TensorRTBackend

        class Inspecting(TensorRTBackend):
            def load(self, target, cfg):
                self.onnx_input = onnx.load(str(target)).graph.input[0].type.tensor_type.elem_type
                super().load(target, cfg)
                self.engine_input = self.engine.get_tensor_dtype(self.engine.get_tensor_name(0))

        backend = Inspecting(timing_cache=tmp_path / "timing.cache")
        r16 = backend.measure(tiny, MeasureConfig(**{**FAST, "precision": "fp16"}))
        assert r16.ok and r16.precision == "fp16" and (tmp_path / "timing.cache").stat().st_size > 0
        if backend.wants_half_onnx():  # TensorRT 11: strongly typed, the precision is the graph's own
            assert backend.onnx_input == onnx.TensorProto.FLOAT16 and backend.engine_input == trt.float16
        else:  # TensorRT 10: an fp32 graph, built with the FP16 flag
            assert backend.onnx_input == onnx.TensorProto.FLOAT


def test_auto_picks_what_is_installed():
    expected = "tensorrt" if backend_class("tensorrt").unavailable_reason() is None else "onnxruntime"
    assert resolve_backend("auto").name == expected


@pytest.mark.skipif(backend_class("tensorrt").unavailable_reason() is None, reason="TensorRT is installed")
def test_tensorrt_unavailable_names_the_install_extra():
    with pytest.raises(BackendUnavailable, match=r'pip install "updp\[trt\]"'):
        resolve_backend("tensorrt")


def test_unknown_backend_and_bad_config():
    with pytest.raises(UpdpError, match="unknown latency backend"):
        resolve_backend("openvino")
    with pytest.raises(UpdpError, match="unknown precision"):
        MeasureConfig(precision="fp8")


def test_importing_latency_does_not_import_pruner_or_search():
    import subprocess
    import sys

    code = ("import sys, updp.latency.cache, updp.latency.table, updp.latency.backends.onnxruntime, "
            "updp.latency.isolate; bad = [m for m in sys.modules if m.startswith(('updp.pruner', 'updp.search'))];"
            " print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
