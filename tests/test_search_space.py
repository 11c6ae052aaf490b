"""Search space: candidates, caps, trial suggestions, seed plans (with a real Optuna study)."""
from __future__ import annotations

import random

import optuna
import pytest

from updp.core.errors import UpdpError
from updp.pruner import create_model, find_blocks
from updp.search.space import SearchSpace


@pytest.fixture(scope="module")
def blocks():
    return find_blocks(create_model("convnext_atto"), (3, 32, 32)).blocks


def test_candidates_exclude_kept_and_costlier(blocks):
    space = SearchSpace.build("convnext_atto", blocks, keep=["stages.2.blocks.0"])
    assert "stages.2.blocks.0" not in space.names and len(space.names) == 11
    assert space.stages[2] == [f"stages.2.blocks.{i}" for i in range(1, 6)]
    resnet = find_blocks(create_model("resnet18"), (3, 32, 32)).blocks
    with pytest.raises(UpdpError, match="no block is left"):
        SearchSpace.build("resnet18", resnet)
    with pytest.raises(UpdpError, match="unknown blocks"):
        SearchSpace.build("convnext_atto", blocks, keep=["stages.9.blocks.0"])


def test_cap_per_stage_is_enforced(blocks):
    space = SearchSpace.build("convnext_atto", blocks, max_per_stage=2)
    plan = space.repair(set(space.names))
    assert sum(n.startswith("stages.2.") for n in plan) == 2 and len(plan) == 8
    rng = random.Random(0)
    for _ in range(20):
        for p in (space.most_pruned(rng), space.random_plan(rng)):
            assert all(sum(n in p for n in names) <= 2 for names in space.stages.values())


@pytest.mark.parametrize("mode", ["blocks", "stages"])
def test_enqueued_params_reproduce_the_plan(blocks, mode):
    space = SearchSpace.build("convnext_atto", blocks, max_per_stage=3)
    study = optuna.create_study(directions=["maximize", "minimize"])
    seeds = space.seed_plans(mode)
    for plan in seeds:
        study.enqueue_trial(space.params(plan, mode))
    got = []
    study.optimize(lambda t: (got.append(space.suggest(t, mode)) or 0.0, 0.0), n_trials=len(seeds))
    assert got == seeds and space.plan() in seeds and len(set(seeds)) == len(seeds)


def test_stages_mode_prunes_counts_per_stage(blocks):
    space = SearchSpace.build("convnext_atto", blocks)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"stage0": 1, "stage1": 0, "stage2": 4, "stage3": 2})
    plans = []
    study.optimize(lambda t: (plans.append(space.suggest(t, "stages")) or 0.0, 0.0), n_trials=1)
    counts = {s: sum(n in plans[0] for n in names) for s, names in space.stages.items()}
    assert counts == {0: 1, 1: 0, 2: 4, 3: 2}


def test_unknown_mode(blocks):
    space = SearchSpace.build("convnext_atto", blocks)
    study = optuna.create_study()
    with pytest.raises(UpdpError, match="unknown search space"):
        space.suggest(study.ask(), "layers")
