"""The ehvi sampler: its closed-form hypervolume gain against a direct computation, its Gaussian process, and
real Optuna studies through updp's Objective (the score a fixed function of the plan, so a study takes a second).
"""
from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest

from updp.core.errors import UpdpError
from updp.latency.table import LatencyTable
from updp.pipeline.search import PlanLatency
from updp.pruner.spec import BlockSpec
from updp.search import study as st
from updp.search.ehvi import EHVISampler, GaussianProcess, expected_improvement_2d
from updp.search.space import SearchSpace


def _space(blocks_per_stage=(4, 4), max_per_stage=None) -> SearchSpace:
    specs = [BlockSpec(f"stages.{s}.blocks.{i}", s, i, "convnext", "ConvNeXtBlock", 8, 8, 1, macs=10, merged_macs=5)
             for s, n in enumerate(blocks_per_stage) for i in range(n)]
    return SearchSpace("m", tuple(specs), max_per_stage)


def _hypervolume(points, ref_score: float, ref_latency: float) -> float:
    """Area dominated by ``points`` (score up, latency down) inside the reference box: a direct sweep."""
    area, best = 0.0, ref_score
    pts = sorted(p for p in points if p[1] < ref_latency and p[0] > ref_score)
    edges = sorted({p[1] for p in pts} | {ref_latency})
    for lo, hi in zip(edges, edges[1:]):
        level = max([s for s, lat in pts if lat <= lo] + [best])
        area += (hi - lo) * (level - ref_score)
    return area


def test_the_closed_form_gain_is_the_mean_hypervolume_gain_of_sampled_scores():
    rng = np.random.default_rng(0)
    front = [(70.0, 5.0), (60.0, 3.0), (50.0, 2.0), (40.0, 1.5)]
    ref_s, ref_l = 30.0, 10.0
    base = _hypervolume(front, ref_s, ref_l)
    for mu, sd, lat in [(65.0, 4.0, 2.5), (55.0, 10.0, 1.0), (72.0, 0.5, 6.0), (45.0, 3.0, 4.0), (80.0, 5.0, 9.9)]:
        draws = rng.normal(mu, sd, 20000)
        sampled = np.mean([_hypervolume(front + [(d, lat)], ref_s, ref_l) - base for d in draws])
        exact = expected_improvement_2d(np.array([mu]), np.array([sd]), np.array([lat]),
                                        np.array([p[0] for p in front]), np.array([p[1] for p in front]),
                                        ref_s, ref_l)[0]
        assert exact == pytest.approx(sampled, rel=0.03, abs=1e-3)
    # a certain score: exactly the area it adds; dominated: nothing
    gain = expected_improvement_2d(np.array([65.0, 55.0]), np.array([0.0, 0.0]), np.array([2.5, 3.5]),
                                   np.array([p[0] for p in front]), np.array([p[1] for p in front]), ref_s, ref_l)
    assert gain[0] == pytest.approx(_hypervolume(front + [(65.0, 2.5)], ref_s, ref_l) - base)
    assert gain[1] == pytest.approx(0.0, abs=1e-9)


def test_the_gaussian_process_interpolates_and_is_unsure_away_from_its_data():
    rng = np.random.default_rng(1)
    bits = np.array(list(itertools.product([0.0, 1.0], repeat=8)))
    w = rng.uniform(1, 4, 8)
    y = 80 - bits @ w - 0.5 * bits[:, 0] * bits[:, 1] * 5
    train = rng.choice(len(bits), 60, replace=False)
    gp = GaussianProcess(bits[train], y[train])
    mu, sd = gp.predict(bits)
    assert np.abs(mu[train] - y[train]).max() < 0.5
    rest = np.setdiff1d(np.arange(len(bits)), train)
    assert np.abs(mu[rest] - y[rest]).mean() < 1.0 < np.abs(y[rest] - y[train].mean()).mean()
    assert sd[rest].mean() > sd[train].mean()


def _study(space, sampler, trials, table, score, mode="blocks"):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    st.seed_study(study, space, mode)
    st.optimize(study, st.Objective(space, mode, lambda p: {"top1": score(p), "loss": 1.0},
                                    PlanLatency("table", None, table), None), trials)
    return study


def _problem(space, seed=0):
    rng = np.random.default_rng(seed)
    cost = dict(zip(space.names, rng.gamma(1.0, 2.0, len(space.names))))
    table = LatencyTable(10.0, dict(zip(space.names, rng.uniform(0.02, 0.1, len(space.names)).tolist())))

    def score(plan):
        lost = sum(cost[n] for n in plan)
        return 80.0 - lost - 0.02 * lost ** 2
    return table, score


def test_a_study_finds_the_exhaustive_front_in_a_fraction_of_the_space():
    space = _space((4, 4, 4))  # 4,096 plans
    table, score = _problem(space)
    every = [space.plan(n for n, b in zip(space.names, bits) if b) for bits in itertools.product([0, 1], repeat=12)]
    points = [(score(p), table.predict(p)) for p in every]
    ref_s, ref_l = min(p[0] for p in points), 1.01 * max(p[1] for p in points)
    sampler = st.DistinctSampler(st.make_sampler("ehvi", 0, 60, 0, space, "blocks", table.predict), space, seed=0)
    study = _study(space, sampler, 60, table, score)
    plans = [t.user_attrs["plan"] for t in study.trials]
    assert len(plans) == len(set(plans)) == 60  # no plan twice
    found = [tuple(t.values) for t in study.trials]
    random = _study(space, optuna.samplers.RandomSampler(seed=0), 60, table, score)
    ratio = _hypervolume(found, ref_s, ref_l) / _hypervolume(points, ref_s, ref_l)
    random_ratio = _hypervolume([tuple(t.values) for t in random.trials], ref_s, ref_l) / _hypervolume(
        points, ref_s, ref_l)
    assert ratio > 0.995 and ratio > random_ratio + 0.02


def test_every_plan_once_then_the_space_is_spent():
    space = _space((3, 3))  # 64 plans
    table, score = _problem(space, 1)
    sampler = st.DistinctSampler(st.make_sampler("ehvi", 0, 64, 0, space, "blocks", table.predict), space, seed=0)
    study = _study(space, sampler, 64, table, score)
    assert len({t.user_attrs["plan"] for t in study.trials}) == 64 == space.size()


def test_a_plan_running_elsewhere_or_unpriced_is_not_proposed():
    space = _space((3, 3))
    table, score = _problem(space, 2)
    unpriced = space.names[0]
    del table.saved_frac[unpriced]  # the predictor cannot price plans holding it: they would fail
    sampler = EHVISampler(space, "blocks", table.predict, seed=0, startup=0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    objective = st.Objective(space, "blocks", lambda p: {"top1": score(p), "loss": 1.0},
                             PlanLatency("table", None, table), None)
    for plan in (space.plan(), space.plan(space.names[1:2]), space.plan(space.names[3:5])):
        study.enqueue_trial(space.params(plan))
    st.optimize(study, objective, 3)
    study.enqueue_trial(space.params(space.plan(space.names[2:4])))
    running = space.suggest(study.ask())  # another worker's trial, not finished
    mine = space.suggest(study.ask())
    assert mine != running and unpriced not in mine
    assert mine.to_str() not in {t.user_attrs.get("plan") for t in study.trials}


def test_stage_counts_and_a_sampled_pool_for_large_spaces():
    space = _space((3, 4))
    table, score = _problem(space, 3)
    sampler = st.DistinctSampler(st.make_sampler("ehvi", 1, 20, 0, space, "stages", table.predict), space, "stages",
                                 seed=1)
    study = _study(space, sampler, 20, table, score, "stages")
    assert len({t.user_attrs["plan"] for t in study.trials}) == 20 == space.size("stages")
    big = EHVISampler(space, "blocks", table.predict, seed=0, max_candidates=16, pool=40)  # as if 2^7 were too many
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=st.DistinctSampler(big, space, seed=0))
    st.seed_study(study, space, "blocks")
    st.optimize(study, st.Objective(space, "blocks", lambda p: {"top1": score(p), "loss": 1.0},
                                    PlanLatency("table", None, table), None), 30)
    assert len({t.user_attrs["plan"] for t in study.trials}) == 30
    assert 16 < len(big._plans) < space.size()  # the pool and the front's neighbours, not every plan


def test_the_sampler_needs_the_space_and_a_predictor():
    with pytest.raises(UpdpError, match="ehvi sampler needs"):
        st.make_sampler("ehvi", 0, 10)
