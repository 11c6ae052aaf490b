"""Progressive forms: lambda 1 is the original block, lambda 0 the pruned one, smooth between."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import randomize_layer_scale
from torch.testing import assert_close

from updp.core.errors import UpdpError
from updp.pruner import LambdaSchedule, apply_plan, create_model, find_blocks, progressive_blocks, set_lambda
from updp.pruner.verify import randomize_bn_stats

MODELS = {"test_convnext": 37, "convnext_atto": 41, "mobilenetv2_050": 37, "resnet18": 37,
          "test_vit": 160, "test_vit2": 160}


def _model(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = create_model(name).to(dtype)
    randomize_bn_stats(model)
    randomize_layer_scale(model)
    return model.eval()


def _x(name, dtype=torch.float32):
    size = MODELS[name]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)


def _all_blocks(model, name):
    size = MODELS[name]
    return [b.name for b in find_blocks(model, (3, size, size), costed=False).prunable]


@pytest.mark.parametrize("name", list(MODELS))
def test_lambda_one_is_the_original_bit_for_bit(name):
    model, x = _model(name), _x(name)
    with torch.no_grad():
        want = model(x)
        apply_plan(model, _all_blocks(model, name), lam=1.0)
        got = model(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_formula_at_lambda_one_equals_original_block(name, float64):
    """The mixing formulas themselves (not the shortcut) reach the original at lambda 1.

    This covers the border ring of chains whose padding moved to the input.
    """
    model, x = _model(name, torch.float64), _x(name, torch.float64)
    blocks = _all_blocks(model, name)
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.setdefault(n, a[0])) for n in blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    apply_plan(model, blocks, lam=1.0)
    for n, pblock in progressive_blocks(model).items():
        with torch.no_grad():
            assert_close(pblock.forward_pruned(inputs[n], 1.0), pblock.block(inputs[n]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["test_convnext", "mobilenetv2_050", "resnet18", "test_vit"])
def test_lambda_path_is_continuous_and_moves(name):
    model, x = _model(name), _x(name)
    apply_plan(model, _all_blocks(model, name), lam=1.0)
    outs = {}
    with torch.no_grad():
        for lam in (1.0, 0.5, 0.5 + 1e-4, 0.0):
            set_lambda(model, lam)
            outs[lam] = model(x)
    jump = (outs[0.5] - outs[0.5 + 1e-4]).abs().max()
    assert jump < 1e-2 * (outs[1.0] - outs[0.0]).abs().max()
    assert not torch.allclose(outs[0.5], outs[1.0]) and not torch.allclose(outs[0.5], outs[0.0])


def test_training_step_reaches_original_and_new_weights():
    model = create_model("test_convnext", num_classes=10).train()
    apply_plan(model, ["stages.1.blocks.0", "stages.2.blocks.1"], lam=0.5)
    pblock = progressive_blocks(model)["stages.1.blocks.0"]
    stats = pblock.bn.running_mean.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert pblock.block.mlp.fc1.weight.grad.abs().sum() > 0  # shared original weights
    assert pblock.bn.weight.grad.abs().sum() > 0 and pblock.end.bn.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(stats, pblock.bn.running_mean)


def test_inplace_activations_do_not_corrupt_the_mix():
    """MobileNetV2 uses in-place ReLU6; the mix must keep the pre-activation values."""
    model, x = _model("mobilenetv2_050"), _x("mobilenetv2_050")
    apply_plan(model, ["blocks.2.1"], lam=0.3)
    pblock = progressive_blocks(model)["blocks.2.1"]
    h = torch.randn(2, 16, 10, 10) * 10
    act = pblock.acts[1]
    assert_close(0.3 * torch.clamp(h, 0, 6) + 0.7 * h, 0.3 * act(h) + 0.7 * h)
    with torch.no_grad():
        model(x)  # runs without autograd/in-place errors


def test_set_lambda_per_block():
    model = apply_plan(create_model("test_vit"), ["blocks.0", "blocks.1"])
    set_lambda(model, {"blocks.0": 0.25, "blocks.1": 0.75})
    assert [b.lam for b in progressive_blocks(model).values()] == [0.25, 0.75]


def test_linear_and_cosine_schedules():
    lin = LambdaSchedule(start=10, end=20)
    assert [lin(s) for s in (0, 10, 15, 20, 30)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    cos = LambdaSchedule(start=0, end=100, kind="cosine")
    assert cos(50) == pytest.approx(0.5) and cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cos(10) > lin.__class__(0, 100)(10)  # cosine starts slower


def test_staggered_schedule_offsets_blocks():
    sched = LambdaSchedule.staggered(["a", "b", "c"], start=0, end=10, spacing=5)
    assert sched.lambdas(5, ["a", "b", "c"]) == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert sched(15, "b") == 0.0 and sched(15, "c") == 0.5


def test_schedule_rejects_bad_input():
    with pytest.raises(UpdpError, match="unknown lambda schedule"):
        LambdaSchedule(0, 10, kind="step")
    with pytest.raises(UpdpError, match="before it starts"):
        LambdaSchedule(10, 5)
