"""Supernet: plans switch blocks, sandwich training runs, scoring leaves shared weights alone."""
from __future__ import annotations

import copy

import torch

from updp.pruner import create_model, find_blocks, progressive_blocks
from updp.search.scoring import calibrated, score_plan
from updp.search.space import SearchSpace
from updp.search.supernet import Supernet
from updp.train.bn import recalibrate_bn
from updp.train.loop import StepContext
from updp.train.runtime import CPU


def _supernet():
    torch.manual_seed(0)
    model = create_model("test_convnext", num_classes=10)
    return Supernet(model, SearchSpace.build("test_convnext", find_blocks(model, (3, 32, 32)).blocks))


def _batches(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def test_set_plan_switches_exactly_the_named_blocks():
    sn = _supernet()
    plan = {"stages.1.blocks.0", "stages.2.blocks.3"}
    sn.set_plan(plan)
    lams = {n: b.lam for n, b in progressive_blocks(sn.model).items()}
    assert {n for n, v in lams.items() if v == 0.0} == plan and all(v in (0.0, 1.0) for v in lams.values())


def test_unpruned_supernet_is_the_original_model():
    torch.manual_seed(0)
    original = create_model("test_convnext", num_classes=10).eval()
    space = SearchSpace.build("test_convnext", find_blocks(original, (3, 32, 32)).blocks)
    sn = Supernet(copy.deepcopy(original), space)
    sn.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(sn.model(x), original(x))


def test_sandwich_step_trains_shared_and_new_weights():
    sn = _supernet()
    sn.model.train()
    step = sn.sandwich_step(random_plans=1)
    x, y = _batches(1)[0]
    info = step(StepContext(sn.model, CPU, CPU.grad_scaler()), x, y, 0)
    pb = progressive_blocks(sn.model)["stages.2.blocks.0"]
    assert info["loss"] > 0 and info["sub_loss"] > 0
    assert pb.block.mlp.fc1.weight.grad.abs().sum() > 0 and pb.end.bn.weight.grad.abs().sum() > 0
    assert all(b.lam == 1.0 for b in progressive_blocks(sn.model).values())  # left unpruned


def test_scoring_does_not_change_what_the_next_candidate_sees():
    sn = _supernet()
    before = {k: v.clone() for k, v in sn.model.state_dict().items()}
    calib, held = _batches(2, seed=1), _batches(2, seed=2)
    plan = {"stages.2.blocks.1", "stages.3.blocks.0"}
    first = score_plan(sn, plan, calib, held)
    score_plan(sn, {"stages.1.blocks.1"}, calib, held, finetune_steps=3)
    after = sn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert score_plan(sn, plan, calib, held) == first  # deterministic and unaffected


def test_calibrated_sets_the_plan_and_its_bn_statistics_then_undoes_both_even_on_error():
    sn = _supernet()
    before = {k: v.clone() for k, v in sn.model.state_dict().items()}
    plan = {"stages.2.blocks.1"}
    calib = _batches(2, seed=3)
    try:
        with calibrated(sn, plan, calib) as model:
            lams = {n: b.lam for n, b in progressive_blocks(model).items()}
            assert {n for n, v in lams.items() if v == 0.0} == plan
            inside = {k: v.clone() for k, v in model.state_dict().items()}
            raise KeyboardInterrupt  # a scoring cut short
    except KeyboardInterrupt:
        pass
    changed = [k for k in before if "running_" in k and not torch.equal(before[k], inside[k])]
    assert changed  # the statistics were re-estimated for the plan inside
    after = sn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(b.lam == 1.0 for b in progressive_blocks(sn.model).values())


def test_bn_recalibration_is_a_plain_average():
    bn_model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    data = [(torch.randn(8, 3, 4, 4) * 3 + 1, None) for _ in range(3)]
    recalibrate_bn(bn_model, data)
    x = torch.cat([d for d, _ in data])
    torch.testing.assert_close(bn_model[0].running_mean, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert bn_model[0].momentum == 0.1


def test_uniform_sampling_draws_random_plans_only():
    sn = _supernet()
    rng_a, rng_b = __import__("random").Random(3), __import__("random").Random(3)
    sandwich = [sn.plans(rng_a, 2) for _ in range(20)]
    uniform = [sn.plans(rng_b, 2, "uniform") for _ in range(20)]
    most = len(sn.space.names)
    assert all(len(p) == 3 and len(p[0]) == most for p in sandwich)  # the sandwich's lower bound every step
    assert all(len(p) == 3 for p in uniform) and sum(len(p[0]) == most for p in uniform) < 3


def test_budget_sampling_draws_plans_near_the_budget():
    import random

    sn = _supernet()
    want = 3  # "latency" = number of blocks left unpruned, budget: 3 of them

    def near(plan):
        return abs(len(sn.space.names) - len(plan) - want)

    budget = [p for _ in range(50) for p in sn.plans(random.Random(_), 1, "budget", near)[1:]]
    uniform = [p for _ in range(50) for p in sn.plans(random.Random(_), 1, "uniform")]
    assert sum(map(near, budget)) < 0.5 * sum(map(near, uniform))
    assert all(len(sn.plans(random.Random(k), 1, "budget", near)[0]) == len(sn.space.names) for k in range(5))


def test_budget_sampling_trains_a_step():
    sn = _supernet()
    sn.model.train()
    step = sn.sandwich_step(random_plans=1, sampling="budget", near=lambda plan: abs(len(plan) - 4))
    x, y = _batches(1)[0]
    ctx = StepContext(sn.model, CPU, CPU.grad_scaler())
    info = step(ctx, x, y, 0)
    assert info["sub_loss"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sn.model.parameters())
    assert all(b.lam == 1.0 for b in progressive_blocks(sn.model).values())  # left unpruned
