"""The fitted latency model: it learns savings that do not add up, is judged on plans it never saw, round-trips."""
from __future__ import annotations

import numpy as np
import pytest

from updp.core.errors import UpdpError
from updp.core.plan import PruningPlan
from updp.latency.predictor import LatencyModel, evaluate, feature_names, fit, sized_plans
from updp.latency.table import LatencyTable

BLOCKS = [f"s{s}.b{i}" for s in range(3) for i in range(4)]
GROUPS = {b: b.split(".")[0] for b in BLOCKS}


def _truth(plan, noise=0.0, rng=None):
    """A machine whose savings do not add up: a stage gets cheaper per block as it empties, stages interact."""
    n = [sum(1 for b in plan if b.startswith(f"s{s}.")) for s in range(3)]
    r = 1 - 0.04 * n[0] - 0.06 * n[1] - 0.03 * n[2] - 0.004 * n[1] ** 2 + 0.003 * n[0] * n[1] + 0.002 * n[2] ** 2
    return r * (1 + noise * rng.standard_normal()) if noise else r


def _data(seed, noise=0.0):
    rng = np.random.default_rng(seed)
    singles = [PruningPlan("m", {b}) for b in BLOCKS]
    fit_plans = singles + sized_plans("m", BLOCKS, 20, seed=1)
    held = [p for p in sized_plans("m", BLOCKS, 40, seed=2) if p not in fit_plans][:20]
    return (fit_plans, [_truth(p, noise, rng) for p in fit_plans], held, [_truth(p, noise, rng) for p in held])


def test_the_fitted_model_learns_interactions_the_additive_table_misses():
    fit_plans, fit_ratios, held, held_ratios = _data(0)
    model = fit("m", GROUPS, fit_plans, fit_ratios, baseline_ms=10.0)
    table = LatencyTable(10.0, {b: 1 - r for b, r in zip(BLOCKS, fit_ratios[:len(BLOCKS)])})
    fitted, additive = evaluate(model.predicted_ratio, held, held_ratios), evaluate(table.predicted_ratio, held,
                                                                                      held_ratios)
    assert fitted["plans"] == additive["plans"] == 20
    assert fitted["median_ape_pct"] < 0.5 and fitted["p95_ape_pct"] < 1.0  # the truth is in its feature space
    assert additive["median_ape_pct"] > 5 * fitted["median_ape_pct"]
    assert model.predicted_ratio(()) == 1.0 and model.predict(held[0]) == pytest.approx(10 * held_ratios[0], rel=1e-2)


def test_with_timing_noise_the_held_out_error_stays_near_the_noise():
    fit_plans, fit_ratios, held, held_ratios = _data(1, noise=0.02)  # 2 % noise on every measurement
    model = fit("m", GROUPS, fit_plans, fit_ratios, baseline_ms=10.0)
    assert evaluate(model.predicted_ratio, held, held_ratios)["median_ape_pct"] < 4


def test_the_model_keeps_its_fit_data_and_round_trips(tmp_path):
    fit_plans, fit_ratios, held, _ = _data(0)
    model = fit("m", GROUPS, fit_plans, fit_ratios, baseline_ms=10.0, context={"backend": "onnxruntime"})
    assert model.features == feature_names(["s0", "s1", "s2"]) and len(model.coef) == 3 + 3 + 2
    assert len(model.fit_plans) == len(fit_plans) and model.fit_plans[0]["pruned"] == fit_plans[0].to_str()
    model.to_json(tmp_path / "latency_model.json")
    again = LatencyModel.load(tmp_path / "latency_model.json")
    assert [again.predict(p) for p in held] == [model.predict(p) for p in held]
    assert again.context == {"backend": "onnxruntime"}


def test_too_few_plans_and_unknown_blocks_are_clear_errors(tmp_path):
    plans = [PruningPlan("m", {b}) for b in BLOCKS[:5]]
    with pytest.raises(UpdpError, match="at least 9 measured plans"):
        fit("m", GROUPS, plans, [0.9] * 5, baseline_ms=1.0)
    fit_plans, fit_ratios, _, _ = _data(0)
    model = fit("m", GROUPS, fit_plans, fit_ratios, baseline_ms=10.0)
    with pytest.raises(UpdpError, match="no block s9.b0"):
        model.predict({"s9.b0"})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UpdpError, match="cannot read latency model"):
        LatencyModel.load(tmp_path / "bad.json")


def test_sized_plans_spread_over_every_size():
    plans = sized_plans("m", BLOCKS, 60, seed=3)
    assert len(set(plans)) == 60 and all(plans)
    sizes = [len(p) for p in plans]
    assert min(sizes) <= 2 and max(sizes) >= len(BLOCKS) - 1


def test_a_block_the_table_could_not_time_fails_the_plans_that_hold_it():
    from updp.latency.table import UnmeasuredBlock

    fit_plans, fit_ratios, held, _ = _data(0)
    model = fit("m", GROUPS, fit_plans, fit_ratios, baseline_ms=10.0, failed={"s1.b2": "timed out"})
    with pytest.raises(UnmeasuredBlock, match="timed out"):
        model.predict({"s0.b0", "s1.b2"})
    assert model.predict({"s0.b0"}) > 0
