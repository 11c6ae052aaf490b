"""The first trials of a study: simple seed plans, and the greedy chain built from each block pruned alone.

Real Optuna studies on SQLite, updp's own Objective and optimize loop; the score and latency are fixed
functions of the plan (each block has its own top-1 cost and latency saving) so the right chain is known.
"""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from updp.pruner.spec import BlockSpec
from updp.search import study as st
from updp.search.space import SearchSpace

# block -> (top-1 lost, ms saved) when pruned; lost / saved: b2 0.1, b0 0.5, b3 1.0, b1 4.0, b4 (saves nothing) last
COST = {"stages.0.blocks.0": (1.0, 2.0), "stages.0.blocks.1": (4.0, 1.0), "stages.0.blocks.2": (0.1, 1.0),
        "stages.1.blocks.0": (3.0, 3.0), "stages.1.blocks.1": (0.5, 0.0)}
ORDER = ["stages.0.blocks.2", "stages.0.blocks.0", "stages.1.blocks.0", "stages.0.blocks.1", "stages.1.blocks.1"]
# restoring a block of the most pruned plan (all five) regains its top-1 for its ms: b1 4.0, b3 1.0, b0 0.5, b2 0.1
RESTORE = ["stages.0.blocks.1", "stages.1.blocks.0", "stages.0.blocks.0", "stages.0.blocks.2"]


def _space(max_per_stage=None) -> SearchSpace:
    specs = [BlockSpec(n, int(n.split(".")[1]), int(n[-1]), "convnext", "ConvNeXtBlock", 8, 8, 1, macs=10,
                       merged_macs=5) for n in COST]
    return SearchSpace("m", tuple(specs), max_per_stage)


def _objective(space: SearchSpace, scored: list) -> st.Objective:
    def scorer(plan):
        scored.append(plan.to_str())
        return {"top1": 80.0 - sum(COST[n][0] for n in plan), "loss": 1.0}

    def latency(plan):
        return 10.0 - sum(COST[n][1] for n in plan), "predicted", {}

    return st.Objective(space, "blocks", scorer, latency, None)


def _run(tmp_path, space, greedy: bool, trials: int, sampler=None) -> tuple[optuna.Study, list]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = st.open_storage(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)
    study = st.open_study(storage, "s", sampler or optuna.samplers.RandomSampler(seed=0))
    seeding = st.Seeding(space, "blocks", greedy)
    seeding.enqueue(study)
    scored = []
    st.optimize(study, _objective(space, scored), trials, callbacks=[seeding])
    return study, scored


def _by_tag(study, tag):
    return [st.trial_plan(t, "m") for t in study.trials if t.user_attrs.get("seed_plan") == tag]


def test_greedy_chains_prune_from_one_end_and_restore_from_the_other(tmp_path):
    space = _space()
    study, scored = _run(tmp_path, space, greedy=True, trials=30)
    singles = {p.to_str() for p in _by_tag(study, "single")}
    simple = {p.to_str() for p in space.seed_plans()}
    every = set(COST)
    assert singles | simple >= {space.plan([n]).to_str() for n in COST} | {
        space.plan(every - {n}).to_str() for n in COST}
    forward = [space.plan(ORDER[:k]) for k in range(2, len(ORDER) + 1)]
    backward = [space.plan(every - set(RESTORE[:k])) for k in range(2, len(COST))]
    interleaved = [p for pair in zip(forward, backward) for p in pair] + forward[len(backward):]
    tried = simple | singles
    want = [p for p in dict.fromkeys(interleaved) if p.to_str() not in tried]
    assert _by_tag(study, "greedy") == want and len(want) >= 4  # the seed plans are not tried twice
    first_chain = min(t.number for t in study.trials if t.user_attrs.get("seed_plan") == "greedy")
    assert all(t.number < first_chain for t in study.trials if t.user_attrs.get("seed_plan") == "single")
    assert study.user_attrs["greedy_chain"] == "enqueued"
    assert len(scored) == len(set(scored))  # still no plan scored twice


def test_greedy_chain_respects_the_per_stage_cap(tmp_path):
    space = _space(max_per_stage=1)
    study, _ = _run(tmp_path, space, greedy=True, trials=11)
    for plan in _by_tag(study, "greedy"):
        assert all(sum(n in plan for n in names) <= 1 for names in space.stages.values())
    assert _by_tag(study, "greedy")[0] == space.plan(["stages.0.blocks.2", "stages.1.blocks.0"])


def test_the_chain_waits_for_every_single_block_trial_and_is_enqueued_once(tmp_path):
    space = _space()
    storage = st.open_storage(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)
    study = st.open_study(storage, "s", optuna.samplers.RandomSampler(seed=0))
    seeding = st.Seeding(space, "blocks", greedy=True)
    seeding.enqueue(study)
    seeding.enqueue(study)  # a second worker: the study is not seeded twice
    assert len(study.trials) == len(space.seed_plans()) + len(_by_tag(study, "single"))
    st.optimize(study, _objective(space, []), 3, callbacks=[seeding])  # singles still WAITING
    assert study.user_attrs["greedy_chain"] == "pending" and not _by_tag(study, "greedy")
    st.optimize(study, _objective(space, []), 12, callbacks=[seeding, seeding])
    chain = _by_tag(study, "greedy")
    assert chain and len({p.to_str() for p in chain}) == len(chain)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(chain) == sum(t.state == TrialState.COMPLETE for t in study.trials
                             if t.user_attrs.get("seed_plan") == "greedy") + len(waiting)


def test_simple_seeding_enqueues_no_single_blocks_and_no_chain(tmp_path):
    study, _ = _run(tmp_path, _space(), greedy=False, trials=12)
    assert not _by_tag(study, "single") and not _by_tag(study, "greedy")
    assert "greedy_chain" not in study.user_attrs


@pytest.mark.parametrize("blocks,mode,trials,want", [(12, "blocks", 60, True), (12, "blocks", 59, False),
                                                     (16, "blocks", 100, True), (12, "stages", 100, False)])
def test_auto_takes_the_greedy_chain_when_the_trials_allow_it(blocks, mode, trials, want):
    specs = [BlockSpec(f"stages.0.blocks.{i}", 0, i, "convnext", "ConvNeXtBlock", 8, 8, 1, macs=10, merged_macs=5)
             for i in range(blocks)]
    assert st.greedy_fits(SearchSpace("m", tuple(specs)), mode, trials) is want


@pytest.mark.parametrize("sampler,seeding,want", [("gp", "auto", True), ("tpe", "auto", True), ("ehvi", "auto", False),
                                                  ("ehvi", "greedy", True), ("gp", "simple", False)])
def test_auto_seeding_leaves_the_chains_out_for_the_ehvi_sampler(sampler, seeding, want):
    from updp.pipeline.search import study_seeding

    assert study_seeding(_space(), "blocks", seeding, 100, sampler).greedy is want


def test_a_block_whose_single_trial_failed_goes_last_in_the_chain(tmp_path):
    space = _space()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = st.open_study(st.open_storage(f"sqlite:///{tmp_path / 'study.db'}", tmp_path), "s",
                          optuna.samplers.RandomSampler(seed=0))
    seeding = st.Seeding(space, "blocks", greedy=True)
    seeding.enqueue(study)
    objective = _objective(space, [])
    timed = objective.latency

    def latency(plan):
        if plan == space.plan(["stages.0.blocks.2"]):
            raise st.CandidateFailed("cannot time it")
        return timed(plan)

    objective.latency = latency
    st.optimize(study, objective, 16, callbacks=[seeding])
    assert any(t.state == TrialState.FAIL for t in study.trials)
    first = _by_tag(study, "greedy")[0]
    assert first == space.plan(ORDER[1:3])  # b2 (the best ratio, but unmeasured) is no longer first
