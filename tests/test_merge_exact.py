"""merged(x) == subnet(x) for every family and plan shape (eval, float64, random BN stats).

Odd input sizes put most pixels near a border; stride-2 blocks, the first and
last block of a stage and runs of adjacent pruned blocks are all covered.
"""
from __future__ import annotations

import pytest
import timm
import torch
from helpers import randomize_layer_scale
from timm.models.resnet import Bottleneck, ResNet
from torch.testing import assert_close

from updp.pruner import apply_plan, create_model, find_blocks, merge_model
from updp.pruner.merge import PlanError
from updp.pruner.verify import randomize_bn_stats

ALL = "all"

CASES = {
    # model: (input px, {plan shape: blocks})
    "test_convnext": (37, {  # ConvNeXt, NHWC Linear MLP
        "first": ["stages.1.blocks.0"], "last": ["stages.2.blocks.3"],
        "adjacent": ["stages.2.blocks.0", "stages.2.blocks.1", "stages.2.blocks.2"], "all": ALL}),
    "convnext_atto": (41, {  # ConvNeXt, NCHW conv MLP
        "first_last": ["stages.0.blocks.0", "stages.3.blocks.1"], "all": ALL}),
    "mobilenetv2_050": (37, {  # inverted residual + depthwise-separable
        "stride2_first": ["blocks.1.0", "blocks.3.0"], "last": ["blocks.2.2", "blocks.6.0"],
        "adjacent": ["blocks.3.0", "blocks.3.1", "blocks.3.2", "blocks.3.3"], "all": ALL}),
    "resnet18": (37, {  # BasicBlock, stride 2 with 1x1 downsample
        "stride2_first": ["layer2.0", "layer4.0"], "last": ["layer1.1"],
        "adjacent": ["layer3.0", "layer3.1"], "all": ALL}),
    "test_vit": (160, {"first_last": ["blocks.0", "blocks.5"], "all": ALL}),
    "test_vit2": (160, {"adjacent": ["blocks.2", "blocks.3", "blocks.4"], "all": ALL}),  # LayerScale
    "test_vit4": (160, {"all": ALL}),  # RmsNorm pre-norms
}

PARAMS = [pytest.param(m, size, shape, plan, id=f"{m}-{shape}")
          for m, (size, plans) in CASES.items() for shape, plan in plans.items()]


def _subnet(model, size, plan, dtype):
    model = model.to(dtype)
    if plan == ALL:
        plan = [b.name for b in find_blocks(model, (3, size, size), costed=False).prunable]
    apply_plan(model, plan, lam=0.0)
    randomize_bn_stats(model, seed=len(plan))
    randomize_layer_scale(model)
    return model.eval()


def _inputs(size, dtype):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size)).to(dtype)


@pytest.mark.parametrize("model_name,size,shape,plan", PARAMS)
def test_merge_exact_float64(model_name, size, shape, plan):
    torch.manual_seed(0)
    subnet = _subnet(create_model(model_name), size, plan, torch.float64)
    merged = merge_model(subnet)
    x = _inputs(size, torch.float64)
    with torch.no_grad():
        want, got = subnet(x), merged(x)
    assert_close(got, want, atol=1e-8, rtol=0)
    assert (want - subnet.float()(x.float()).double()).abs().max() > 0  # the check can see fp32 noise


FORM_CASES = [("test_convnext", "adjacent"), ("convnext_atto", "all"), ("mobilenetv2_050", "stride2_first"),
              ("mobilenetv2_050", "all"), ("resnet18", "stride2_first"), ("resnet18", "all")]


@pytest.mark.parametrize("model_name,shape", FORM_CASES, ids=[f"{m}-{s}" for m, s in FORM_CASES])
def test_every_merged_form_is_exact_float64(model_name, shape):
    """Each form of each family (dense kxk, DW + 1x1, the folded linear chain) computes the same function."""
    from updp.pruner.plan import progressive_blocks
    from updp.pruner.registry import family_for

    torch.manual_seed(0)
    size, plans = CASES[model_name]
    subnet = _subnet(create_model(model_name), size, plans[shape], torch.float64)
    x = _inputs(size, torch.float64)
    blocks = progressive_blocks(subnet)
    families = {name: family_for(p.block) for name, p in blocks.items()}
    with torch.no_grad():
        want = subnet(x)
        for form in sorted({f for fam in families.values() for f in fam.forms}):
            forms = {n: form for n, fam in families.items() if form in fam.forms}
            merged = merge_model(subnet, forms=forms)
            assert_close(merged(x), want, atol=1e-8, rtol=0, msg=f"form {form}")
            kinds = {type(m).__name__ for n, m in merged.named_modules() if n in forms}
            assert len(kinds) == 1, kinds  # every block of the family took the form asked for
    with pytest.raises(Exception, match="no merged form 'nope'"):
        merge_model(subnet, forms={next(iter(blocks)): "nope"})


@pytest.mark.parametrize("model_name", ["test_convnext", "mobilenetv2_050", "resnet18", "test_vit2"])
def test_merge_float32_user_tolerance(model_name):
    size = CASES[model_name][0]
    subnet = _subnet(create_model(model_name), size, ALL, torch.float32)
    merged = merge_model(subnet)
    x = _inputs(size, torch.float32)
    with torch.no_grad():
        want, got = subnet(x), merged(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_bottleneck_merges_exactly_though_costlier(float64):
    model = ResNet(block=Bottleneck, layers=[1, 1, 1, 1], num_classes=10)
    plan = ["layer1.0", "layer2.0"]  # a 1x1 downsample at stride 1 and at stride 2
    subnet = _subnet(model, 33, plan, torch.float64)
    x = _inputs(33, torch.float64)
    with torch.no_grad():
        assert_close(merge_model(subnet)(x), subnet(x), atol=1e-8, rtol=0)
        chain = {n: "chain" for n in plan}  # 1x1, 3x3, 1x1 kept, the downsample added apart
        assert_close(merge_model(subnet, forms=chain)(x), subnet(x), atol=1e-8, rtol=0)
    fresh = ResNet(block=Bottleneck, layers=[1, 1, 1, 1], num_classes=10)
    specs = {b.name: b for b in find_blocks(fresh, (3, 33, 33)).blocks}
    assert not specs["layer2.0"].worthwhile and specs["layer2.0"].merged_macs > specs["layer2.0"].macs


def test_merge_refuses_blocks_not_at_lambda_zero():
    model = apply_plan(create_model("test_convnext"), ["stages.1.blocks.0"], lam=0.5)
    with pytest.raises(PlanError, match="lambda 0.5"):
        merge_model(model)


def test_merge_model_does_not_touch_its_input():
    model = _subnet(create_model("test_vit"), 160, ["blocks.1"], torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.blocks[1]).__name__ == "ViTProgressive"


def test_merged_blocks_are_smaller_in_params():
    model = timm.create_model("test_convnext")
    merged = merge_model(model, ["stages.2.blocks.0"])
    old = sum(p.numel() for p in model.stages[2].blocks[0].parameters())
    new = sum(p.numel() for p in merged.stages[2].blocks[0].parameters())
    assert new < old
