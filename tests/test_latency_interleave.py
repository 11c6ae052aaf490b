"""Interleaved timing: a variant that fails or runs out of time is a record, the others are still timed.

``Scripted`` is a real ``LatencyBackend`` whose targets say how ``run_once``
behaves (its figure, on which call it raises, from which call it sleeps); it
goes through the real ``measure_interleaved`` and ``build_table``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import pytest
import timm

from updp.core.errors import UpdpError
from updp.core.onnx_export import export_onnx
from updp.core.plan import PruningPlan
from updp.latency.backends import backend_class, resolve_backend
from updp.latency.base import LatencyBackend, MeasureConfig
from updp.latency.interleave import measure_interleaved, relative_to
from updp.latency.table import UnmeasuredBlock, build_table

CFG = MeasureConfig(input_shape=(3, 8, 8), warmup_runs=2, warmup_ms=0, min_runs=20, min_time_s=0, timeout_s=60)
ROUNDS = 5  # 4 runs per round; calls 1-2 are the warm-up, round r is calls 4r-1 .. 4r+2


class Scripted(LatencyBackend):
    """A backend whose target is a dict: ``ms`` per run, ``raise_at`` (call number), ``sleep_from`` / ``sleep_s``,
    ``load_error``. Calls are logged per target ``name`` across instances."""

    name = "scripted"
    needs_onnx = False
    calls: dict[str, int] = {}

    def load(self, target: dict[str, Any], cfg: MeasureConfig) -> None:
        if "load_error" in target:
            raise RuntimeError(target["load_error"])
        self.target = target
        Scripted.calls[target["name"]] = 0

    def run_once(self) -> float | None:
        t = self.target
        Scripted.calls[t["name"]] += 1
        n = Scripted.calls[t["name"]]
        if n == t.get("raise_at"):
            raise RuntimeError("device lost\nsecond line of the message")
        if n >= t.get("sleep_from", math.inf):
            time.sleep(t["sleep_s"])
        return t["ms"]


@pytest.fixture(autouse=True)
def _fresh_log():
    Scripted.calls = {}


def test_a_custom_backend_class_resolves_like_a_named_one():
    assert backend_class(Scripted) is Scripted and isinstance(resolve_backend(Scripted), Scripted)
    with pytest.raises(UpdpError, match="unknown latency backend 'nope'"):
        resolve_backend("nope")


def test_a_variant_that_raises_mid_pass_is_a_failure_record_and_the_others_go_on():
    # Old code: the RuntimeError from run_once propagated and the whole pass was lost.
    targets = [{"name": "broken", "ms": 5.0, "raise_at": 7}, {"name": "base", "ms": 2.0}, {"name": "fast", "ms": 1.0}]
    broken, base, fast = measure_interleaved(Scripted, targets, CFG, rounds=ROUNDS)
    assert not broken.ok and math.isnan(broken.median_ms) and broken.count == 0
    assert broken.error.startswith("RuntimeError: device lost (at test_latency_interleave.py:")
    assert broken.error.endswith(" in round 2 of 5") and "second line" not in broken.error
    assert Scripted.calls["broken"] == 7  # left out of rounds 3-5
    for r, ms in ((base, 2.0), (fast, 1.0)):
        assert r.ok and r.count == 20 and r.median_ms == ms and r.backend == "scripted"
        assert r.context["round_medians_ms"] == [ms] * ROUNDS and r.context["interleaved"] == 3
    assert Scripted.calls["base"] == Scripted.calls["fast"] == 2 + 20
    assert relative_to(fast, base) == 0.5


def test_a_variant_past_its_time_limit_is_a_failure_record_and_the_others_go_on():
    # Old code: MeasurementTimeout propagated out of measure_interleaved.
    cfg = dataclasses.replace(CFG, timeout_s=0.5)
    targets = [{"name": "base", "ms": 2.0}, {"name": "slow", "ms": 3.0, "sleep_from": 3, "sleep_s": 0.3},
               {"name": "fast", "ms": 1.0}]
    base, slow, fast = measure_interleaved(Scripted, targets, cfg, rounds=ROUNDS)
    # Each run of 'slow' takes at least 0.3 s: its round-1 burst of 4 passes 0.5 s whatever the machine's speed.
    assert not slow.ok and slow.error == "timed out after 0.5 s in round 1 of 5"
    assert Scripted.calls["slow"] in (3, 4)  # stopped inside its first burst, not run again after
    # The others each spent far less than 0.5 s of their own, though the pass as a whole took longer.
    assert base.ok and fast.ok and base.count == fast.count == 20
    assert len(base.context["round_medians_ms"]) == len(fast.context["round_medians_ms"]) == ROUNDS


def test_a_variant_that_cannot_load_says_so():
    targets = [{"name": "bad", "load_error": "engine build failed"}, {"name": "good", "ms": 4.0}]
    bad, good = measure_interleaved(Scripted, targets, CFG, rounds=ROUNDS)
    assert bad.error.startswith("RuntimeError: engine build failed (at test_latency_interleave.py:")
    assert bad.error.endswith(") while loading and warming up")
    assert good.ok and good.context["round_medians_ms"] == [4.0] * ROUNDS


def test_when_nothing_can_be_timed_every_result_is_a_record():
    targets = [{"name": "a", "ms": 1.0, "raise_at": 1}, {"name": "b", "ms": 1.0, "raise_at": 3}]
    a, b = measure_interleaved(Scripted, targets, CFG, rounds=ROUNDS)
    assert "device lost" in a.error and a.error.endswith("while loading and warming up")
    assert "device lost" in b.error and b.error.endswith("in round 1 of 5")
    fp16 = measure_interleaved(Scripted, targets, MeasureConfig(precision="fp16"), rounds=ROUNDS)
    assert [r.ok for r in fp16] == [False, False] and "does not support fp16" in fp16[0].error
    assert measure_interleaved(Scripted, [], CFG) == []


# ---------------------------------------------------------------- build_table on top of real interleaving


BLOCK_MS = {"s.0": 1.0, "s.1": 2.0, "s.2": 0.5}


def scripted_plans(fail: dict[str, dict[str, Any]], cfg: MeasureConfig = CFG):
    """``measure_many`` of an additive model (20 ms, minus each block's saving); ``fail`` scripts a plan's failure."""
    def measure_many(plans):
        targets = [{"name": plan.to_str() or "(none)", "ms": 20.0 - sum(BLOCK_MS[b] for b in plan),
                    **fail.get(plan.to_str(), {})} for plan in plans]
        return measure_interleaved(Scripted, targets, cfg, rounds=ROUNDS)
    return measure_many


def test_build_table_records_a_failing_block_and_refuses_plans_with_it():
    table = build_table(scripted_plans({"s.1": {"raise_at": 9}}), "m", list(BLOCK_MS))
    assert table.baseline_ms == 20.0 and set(table.saved_frac) == {"s.0", "s.2"}
    assert table.failed["s.1"].startswith("RuntimeError: device lost") and "in round 2 of 5" in table.failed["s.1"]
    assert table.predict(PruningPlan("m", {"s.0", "s.2"})) == pytest.approx(18.5)
    with pytest.raises(UnmeasuredBlock, match="s.1") as info:
        table.predict(PruningPlan("m", {"s.0", "s.1"}))
    assert info.value.failed == {"s.1": table.failed["s.1"]}


def test_build_table_with_a_block_past_its_time_limit():
    cfg = dataclasses.replace(CFG, timeout_s=0.5)
    table = build_table(scripted_plans({"s.2": {"sleep_from": 3, "sleep_s": 0.3}}, cfg), "m", list(BLOCK_MS))
    assert table.failed == {"s.2": "timed out after 0.5 s in round 1 of 5"}
    assert table.predict(PruningPlan("m", {"s.0", "s.1"})) == pytest.approx(17.0)


def test_build_table_with_a_failing_baseline_raises():
    with pytest.raises(UpdpError, match="baseline latency of m could not be measured.*device lost"):
        build_table(scripted_plans({"": {"raise_at": 5}}), "m", list(BLOCK_MS))


# ---------------------------------------------------------------- real ONNX Runtime


def test_onnxruntime_interleaves_a_good_file_with_missing_and_corrupt_ones(tmp_path):
    good = export_onnx(timm.create_model("test_convnext").eval(), (1, 3, 32, 32), tmp_path / "good.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    cfg = MeasureConfig(input_shape=(3, 32, 32), warmup_runs=2, warmup_ms=0, min_runs=10, min_time_s=0, threads=2)
    ok, missing, broken = measure_interleaved("onnxruntime", [good, tmp_path / "missing.onnx", corrupt], cfg,
                                              rounds=5)
    assert ok.ok and ok.count == 10 and len(ok.context["round_medians_ms"]) == 5
    assert ok.context["thread_spinning"] is False  # interleaved_options of ONNX Runtime
    assert missing.error == f"ONNX file '{tmp_path / 'missing.onnx'}' does not exist while loading and warming up"
    assert not broken.ok and broken.error.endswith("while loading and warming up") and broken.count == 0
