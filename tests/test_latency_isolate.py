"""Measurements in a child process: results come back, hangs and crashes become records."""
from __future__ import annotations

import timm

from updp.latency.base import MeasureConfig
from updp.latency.isolate import measure_isolated
from updp.onnx_export import export_onnx
from updp.plan_latency import PlanTimer

FAST = MeasureConfig(input_shape=(3, 64, 64), warmup_runs=2, warmup_ms=0, min_runs=10, min_time_s=0.05, threads=2)


def _onnx(tmp_path):
    return export_onnx(timm.create_model("test_convnext").eval(), (1, 3, 64, 64), tmp_path / "m.onnx")


def test_result_comes_back(tmp_path):
    r = measure_isolated("onnxruntime", _onnx(tmp_path), FAST)
    assert r.ok and r.count >= 10 and r.context["execution_provider"] == "CPUExecutionProvider"


def test_hard_time_limit_kills_the_child(tmp_path):
    import dataclasses
    import time

    cfg = dataclasses.replace(FAST, min_runs=10**7, max_runs=10**8, timeout_s=600)
    t0 = time.perf_counter()
    r = measure_isolated("onnxruntime", _onnx(tmp_path), cfg, timeout_s=3)
    assert not r.ok and "killed after 3 s" in r.error and time.perf_counter() - t0 < 10


def test_child_failure_is_a_record(tmp_path):
    r = measure_isolated("onnxruntime", _onnx(tmp_path), FAST, no_such_option=1)
    assert not r.ok and "no_such_option" in r.error


def test_plan_timer_isolated(tmp_path):
    timer = PlanTimer("test_convnext", "onnxruntime", FAST, None, img_size=64, isolate=True)
    r = timer.measure(["stages.2.blocks.1"])
    assert r.ok and r.backend == "onnxruntime"
