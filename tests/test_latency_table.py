"""Per-block latency table: prediction, calibration, random plans."""
from __future__ import annotations

import pytest

from updp.errors import UpdpError
from updp.latency.base import MeasureConfig
from updp.latency.result import failure, summarize
from updp.latency.table import LatencyTable, build_table, calibrate, error_summary, random_plans
from updp.plan_latency import PlanTimer

BLOCKS = ["a", "b", "c", "d"]
COST = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 3.0}


def _record(ms: float):
    return summarize([ms], backend="synthetic", precision="fp32", batch_size=1, input_shape=(3, 8, 8))


def additive(plans):
    return [_record(20.0 - sum(COST[b] for b in plan)) for plan in plans]


def interacting(plans):  # merging a and b together saves an extra 1 ms
    return [_record(r.median_ms - (1.0 if {"a", "b"} <= plan else 0.0)) for plan, r in zip(plans, additive(plans))]


def test_additive_latency_is_predicted_exactly(tmp_path):
    table = build_table(additive, BLOCKS)
    assert table.baseline_ms == 20.0 and table.saved_ms == pytest.approx(COST)
    df = calibrate(table, additive, random_plans(BLOCKS, 10))
    assert df["ape_pct"].max() == pytest.approx(0.0)
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json").predict(["a", "d"]) == pytest.approx(16.0)


def test_calibration_sees_interactions():
    table = build_table(interacting, BLOCKS)
    df = calibrate(table, interacting, [frozenset("ab"), frozenset("cd")])
    assert df.loc[0, "ape_pct"] == pytest.approx(100 * 1.0 / 16.0) and df.loc[1, "ape_pct"] == 0.0
    s = error_summary(df)
    assert s["plans"] == 2 and s["max_ape_pct"] == pytest.approx(6.25)


def test_random_plans_are_distinct_nonempty_and_bounded():
    plans = random_plans(BLOCKS, 10, seed=3)
    assert len(plans) == 10 == len(set(plans)) and all(plans)
    assert len(random_plans(["x", "y"], 10)) == 3  # only 3 non-empty plans exist
    assert random_plans(BLOCKS, 5, seed=1) == random_plans(BLOCKS, 5, seed=1)


def test_failed_measurement_is_a_clear_error():
    def broken(plans):
        return [failure("engine build failed", backend="x", precision="fp32", batch_size=1, input_shape=(3,))
                for _ in plans]
    with pytest.raises(UpdpError, match="engine build failed"):
        build_table(broken, BLOCKS)


def test_unknown_block_and_unreadable_file(tmp_path):
    table = build_table(additive, BLOCKS)
    with pytest.raises(UpdpError, match="no entry for z"):
        table.predict(["z"])
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UpdpError, match="cannot read latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_real_table_on_onnxruntime():
    cfg = MeasureConfig(warmup_runs=3, warmup_ms=0, min_runs=20, min_time_s=0.1, threads=2)
    timer = PlanTimer("test_convnext", "onnxruntime", cfg, None, img_size=64)
    blocks = ["stages.2.blocks.0", "stages.2.blocks.1", "stages.2.blocks.2"]
    table = build_table(timer.measure_many, blocks)
    assert table.baseline_ms > 0 and set(table.saved_ms) == set(blocks)
    assert table.context["backend"] == "onnxruntime" and table.context["input_shape"] == [3, 64, 64]
    df = calibrate(table, timer.measure_many, random_plans(blocks, 3))
    assert len(df) == 3 and (df["measured_ms"] > 0).all() and (df["measured_ratio"] > 0).all()
    assert "round_medians_ms" not in table.context
