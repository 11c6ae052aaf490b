"""Measurements in a child process: results come back, hangs and crashes become records."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import timm

from updp.core.onnx_export import export_onnx
from updp.core.plan import PruningPlan
from updp.latency.base import MeasureConfig
from updp.latency.isolate import measure_isolated
from updp.search.timing import PlanTimer

FAST = MeasureConfig(input_shape=(3, 64, 64), warmup_runs=2, warmup_ms=0, min_runs=10, min_time_s=0.05, threads=2)


def _onnx(tmp_path):
    return export_onnx(timm.create_model("test_convnext").eval(), (1, 3, 64, 64), tmp_path / "m.onnx")


def test_result_comes_back(tmp_path):
    r = measure_isolated("onnxruntime", _onnx(tmp_path), FAST)
    assert r.ok and r.count >= 10 and r.context["execution_provider"] == "CPUExecutionProvider"


def _isolate_children() -> set[int]:
    """Live (not zombie) child processes of this one running ``updp.latency.isolate``."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"updp.latency.isolate" in cmdline:
            pids.add(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads child processes from /proc")
def test_hard_time_limit_kills_the_child(tmp_path):
    # The child would time for hours (10**7 runs, its own limit 600 s): only the parent's 3 s limit can stop it.
    cfg = dataclasses.replace(FAST, min_runs=10**7, max_runs=10**8, timeout_s=600)
    onnx_path = _onnx(tmp_path)
    assert not _isolate_children()
    r = measure_isolated("onnxruntime", onnx_path, cfg, timeout_s=3)
    assert not r.ok and r.error == "timed out: measurement killed after 3 s" and r.count == 0
    assert math.isnan(r.median_ms) and r.backend == "onnxruntime"
    assert not _isolate_children()  # killed and reaped, not left running


def test_child_failure_is_a_record(tmp_path):
    r = measure_isolated("onnxruntime", _onnx(tmp_path), FAST, no_such_option=1)
    assert not r.ok and "no_such_option" in r.error


def test_plan_timer_isolated(tmp_path):
    timer = PlanTimer("test_convnext", "onnxruntime", FAST, None, img_size=64, isolate=True)
    r = timer.measure(PruningPlan("test_convnext", {"stages.2.blocks.1"}))
    assert r.ok and r.backend == "onnxruntime"
