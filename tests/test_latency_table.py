"""Per-block latency table: prediction, calibration, random plans, failed blocks."""
from __future__ import annotations

import json
import math

import pytest

from updp.core.errors import UpdpError
from updp.core.plan import PruningPlan
from updp.latency.base import MeasureConfig
from updp.latency.result import failure, summarize
from updp.latency.table import LatencyTable, UnmeasuredBlock, build_table, calibrate, error_summary, random_plans
from updp.search.timing import PlanTimer

MODEL = "synthetic"
BLOCKS = ["a", "b", "c", "d"]
COST = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 3.0}


def _record(ms: float):
    return summarize([ms], backend="synthetic", precision="fp32", batch_size=1, input_shape=(3, 8, 8))


def _failed(reason: str):
    return failure(reason, backend="synthetic", precision="fp32", batch_size=1, input_shape=(3, 8, 8))


def additive(plans):
    assert all(isinstance(p, PruningPlan) and p.model == MODEL for p in plans)
    return [_record(20.0 - sum(COST[b] for b in plan)) for plan in plans]


def interacting(plans):  # merging a and b together saves an extra 1 ms
    return [_record(r.median_ms - (1.0 if {"a", "b"} <= plan.pruned else 0.0))
            for plan, r in zip(plans, additive(plans))]


def failing_on(block: str, reason: str = "engine build failed"):
    """``additive``, except that every plan holding ``block`` fails."""
    def measure_many(plans):
        return [_failed(reason) if block in plan else r for plan, r in zip(plans, additive(plans))]
    return measure_many


def test_additive_latency_is_predicted_exactly(tmp_path):
    table = build_table(additive, MODEL, BLOCKS)
    assert table.baseline_ms == 20.0 and table.saved_ms == pytest.approx(COST) and table.failed == {}
    assert table.context["model"] == MODEL
    df = calibrate(table, additive, random_plans(MODEL, BLOCKS, 10))
    assert df["ape_pct"].max() == pytest.approx(0.0) and df["error"].isna().all()
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json").predict(PruningPlan(MODEL, {"a", "d"})) == pytest.approx(16.0)


def test_calibration_sees_interactions():
    table = build_table(interacting, MODEL, BLOCKS)
    df = calibrate(table, interacting, [PruningPlan(MODEL, {"a", "b"}), PruningPlan(MODEL, {"c", "d"})])
    assert df.loc[0, "ape_pct"] == pytest.approx(100 * 1.0 / 16.0) and df.loc[1, "ape_pct"] == 0.0
    assert list(df["pruned"]) == ["a,b", "c,d"]  # PruningPlan.to_str
    s = error_summary(df)
    assert s["plans"] == 2 and s["failed"] == 0 and s["max_ape_pct"] == pytest.approx(6.25)


def test_random_plans_are_distinct_nonempty_and_bounded():
    plans = random_plans(MODEL, BLOCKS, 10, seed=3)
    assert len(plans) == 10 == len(set(plans)) and all(plans)
    assert all(isinstance(p, PruningPlan) and p.model == MODEL and p.pruned <= set(BLOCKS) for p in plans)
    assert len(random_plans(MODEL, ["x", "y"], 10)) == 3  # only 3 non-empty plans exist
    assert random_plans(MODEL, BLOCKS, 5, seed=1) == random_plans(MODEL, BLOCKS, 5, seed=1)


def test_failed_baseline_is_a_clear_error():
    def broken(plans):
        return [_failed("engine build failed") for _ in plans]
    with pytest.raises(UpdpError, match="baseline latency of synthetic could not be measured.*engine build failed"):
        build_table(broken, MODEL, BLOCKS)
    table = build_table(additive, MODEL, BLOCKS)
    with pytest.raises(UpdpError, match="baseline"):
        calibrate(table, broken, random_plans(MODEL, BLOCKS, 3))


def test_a_failed_block_is_recorded_and_refused_in_predictions(tmp_path):
    # Old code: build_table called ratio() on the failed result and raised for the whole table.
    table = build_table(failing_on("b", "TensorRT engine build failed: out of memory"), MODEL, BLOCKS)
    assert table.failed == {"b": "TensorRT engine build failed: out of memory"}
    assert table.saved_ms == pytest.approx({k: v for k, v in COST.items() if k != "b"})
    assert table.predict(PruningPlan(MODEL, {"a", "d"})) == pytest.approx(16.0)
    with pytest.raises(UnmeasuredBlock, match="'b': TensorRT engine build failed: out of memory") as info:
        table.predict(PruningPlan(MODEL, {"a", "b"}))
    assert info.value.failed == {"b": "TensorRT engine build failed: out of memory"}
    assert isinstance(info.value, UpdpError)
    table.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    assert again.failed == table.failed
    with pytest.raises(UnmeasuredBlock):
        again.predicted_ratio(PruningPlan(MODEL, {"b"}))


def test_a_table_file_without_failed_still_loads(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"baseline_ms": 10.0, "saved_frac": {"a": 0.1, "b": 0.2},
                                "context": {"backend": "onnxruntime"}}))
    table = LatencyTable.load(path)
    assert table.failed == {} and table.predict(PruningPlan(MODEL, {"a", "b"})) == pytest.approx(7.0)


def test_calibration_turns_failed_plans_into_rows():
    table = build_table(additive, MODEL, BLOCKS)
    plans = [PruningPlan(MODEL, {"a", "b"}), PruningPlan(MODEL, {"c", "d"}), PruningPlan(MODEL, {"c"})]
    df = calibrate(table, failing_on("d", "timed out after 300 s"), plans)
    assert len(df) == 3 and list(df["pruned"]) == ["a,b", "c,d", "c"]
    failed = df.iloc[1]
    assert failed["error"] == "timed out after 300 s" and math.isnan(failed["measured_ms"])
    assert math.isnan(failed["ape_pct"]) and failed["predicted_ms"] == pytest.approx(16.5)
    assert df.loc[[0, 2], "error"].isna().all() and df.loc[[0, 2], "ape_pct"].max() == pytest.approx(0.0)
    s = error_summary(df)
    assert s["plans"] == 2 and s["failed"] == 1 and s["max_ape_pct"] == pytest.approx(0.0)


def test_calibration_of_a_plan_with_an_unmeasured_block_is_a_row():
    table = build_table(failing_on("b"), MODEL, BLOCKS)
    df = calibrate(table, additive, [PruningPlan(MODEL, {"a", "b"}), PruningPlan(MODEL, {"a"})])
    assert "'b': engine build failed" in df.loc[0, "error"] and math.isnan(df.loc[0, "predicted_ms"])
    assert df["error"].isna().tolist() == [False, True]


def test_calibration_refuses_plans_of_another_model():
    table = build_table(additive, MODEL, BLOCKS)
    with pytest.raises(UpdpError, match="one model"):
        calibrate(table, additive, [PruningPlan("resnet18", {"a"})])


def test_unknown_block_and_unreadable_file(tmp_path):
    table = build_table(additive, MODEL, BLOCKS)
    with pytest.raises(UpdpError, match="no entry for z") as info:
        table.predict(PruningPlan(MODEL, {"z"}))
    assert not isinstance(info.value, UnmeasuredBlock)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UpdpError, match="cannot read latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_real_table_on_onnxruntime():
    cfg = MeasureConfig(warmup_runs=3, warmup_ms=0, min_runs=20, min_time_s=0.1, threads=2)
    timer = PlanTimer("test_convnext", "onnxruntime", cfg, None, img_size=64)
    blocks = ["stages.2.blocks.0", "stages.2.blocks.1", "stages.2.blocks.2"]
    table = build_table(timer.measure_many, "test_convnext", blocks)
    assert table.baseline_ms > 0 and set(table.saved_ms) == set(blocks) and table.failed == {}
    assert table.context["backend"] == "onnxruntime" and table.context["input_shape"] == [3, 64, 64]
    df = calibrate(table, timer.measure_many, random_plans("test_convnext", blocks, 3))
    assert len(df) == 3 and (df["measured_ms"] > 0).all() and (df["measured_ratio"] > 0).all()
    assert "round_medians_ms" not in table.context
