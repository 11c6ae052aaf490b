"""No trial scores a plan twice: the sampler is steered away from repeats, and a repeat that still happens is
answered from the study. Real Optuna samplers and studies, updp's own Objective; the score is a fixed function
of the plan so a study takes milliseconds."""
from __future__ import annotations

import itertools
import math

import optuna
import pytest
from optuna.trial import TrialState

from updp.latency.table import LatencyTable
from updp.pipeline.search import PlanLatency
from updp.pruner.spec import BlockSpec
from updp.search import study as st
from updp.search.space import SearchSpace


def _space(blocks_per_stage=(3, 3), max_per_stage=None) -> SearchSpace:
    specs = [BlockSpec(f"stages.{s}.blocks.{i}", s, i, "convnext", "ConvNeXtBlock", 8, 8, 1, macs=10, merged_macs=5)
             for s, n in enumerate(blocks_per_stage) for i in range(n)]
    return SearchSpace("m", tuple(specs), max_per_stage)


def _study(space: SearchSpace, sampler, trials: int, mode: str = "blocks") -> optuna.Study:
    table = LatencyTable(10.0, {n: 0.05 + 0.01 * i for i, n in enumerate(space.names)})
    calls = []

    def scorer(plan):
        calls.append(plan)
        return {"top1": 80.0 - 3 * len(plan) + (hash(plan.to_str()) % 7) / 10, "loss": 1.0}

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    st.optimize(study, st.Objective(space, mode, scorer, PlanLatency("table", None, table), None), trials)
    study.scored = calls
    return study


def _plans(study) -> list[str]:
    return [t.user_attrs["plan"] for t in study.trials]


@pytest.mark.parametrize("name", ["nsga2", "tpe", "random"])
def test_a_steered_sampler_tries_only_new_plans(name):
    space = _space()  # 64 plans
    study = _study(space, st.DistinctSampler(st.make_sampler(name, 0, 40), space, seed=0), 40)
    plans = _plans(study)
    assert len(plans) == 40 and len(set(plans)) == 40  # every trial started was a new plan
    assert len(study.scored) == 40 and len({p.to_str() for p in study.scored}) == 40


def test_without_steering_the_same_sampler_repeats_plans():
    space = _space()
    study = _study(space, st.make_sampler("nsga2", 0, 40), 40)
    plans = _plans(study)
    repeats = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert len(set(plans)) < len(plans) and repeats  # what the wrapper removes
    assert all(t.state == TrialState.PRUNED for t in repeats)
    assert len(study.scored) == len(set(plans))  # a repeat is never scored again


def test_stage_counts_are_steered_too():
    space = _space((3, 4))  # 4 x 5 = 20 count combinations
    sampler = st.DistinctSampler(st.make_sampler("tpe", 1, 20), space, "stages", seed=1)
    plans = _plans(_study(space, sampler, 20, "stages"))
    assert len(set(plans)) == 20 == space.size("stages")


@pytest.mark.parametrize("per_stage, cap", [((3, 3), None), ((4, 2, 5), 2), ((1,), None)])
def test_space_size_counts_the_distinct_plans(per_stage, cap):
    space = _space(per_stage, cap)
    every = {space.repair(n for n, b in zip(space.names, bits) if b).to_str()
             for bits in itertools.product([False, True], repeat=len(space.names))}
    assert space.size("blocks") == len(every)
    assert space.size("stages") == math.prod(space.cap(s) + 1 for s in space.stages)


def test_params_round_trip_through_the_distributions():
    space = _space((3, 4), 2)
    for mode in ("blocks", "stages"):
        dists = space.distributions(mode)
        plan = space.repair(space.names[::2])
        params = space.params(plan, mode)
        assert set(params) == set(dists) and all(dists[k]._contains(dists[k].to_internal_repr(v))
                                                 for k, v in params.items())
        if mode == "blocks":
            assert space.from_params(params, mode) == plan
