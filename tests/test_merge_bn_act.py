"""Merging after a BatchNorm conversion: Sync (timm's, torch's) and Frozen variants, and unknown subclasses.

timm's ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d`` carry the activation of
the ``BatchNormAct2d`` they replace; a pruned block must leave it out exactly as
it does for ``BatchNormAct2d``, or the merge (which folds the BN alone) computes
another function. Conversions before and after ``apply_plan``, every block or a
random plan with a stride-2 block, eval, float64, random BN statistics.
"""
from __future__ import annotations

import copy
import random

import pytest
import timm
import torch
from helpers import randomize_layer_scale
from timm.layers import (
    BatchNormAct2d,
    FrozenBatchNormAct2d,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    freeze_batch_norm_2d,
)
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from updp.core.errors import PlanError
from updp.pruner import apply_plan, find_blocks, merge_model
from updp.pruner.norms import NormError, plain_batchnorm
from updp.pruner.verify import randomize_bn_stats

SIZE = 33
CONVERSIONS = {  # name: (conversion, the variant classes it leaves in the model)
    "sync": (convert_sync_batchnorm, (nn.SyncBatchNorm,)),
    "torch_sync": (nn.SyncBatchNorm.convert_sync_batchnorm, (nn.SyncBatchNorm,)),  # drops timm's acts
    "freeze": (freeze_batch_norm_2d, (FrozenBatchNorm2d, FrozenBatchNormAct2d)),
}
MODELS = {
    "mobilenetv2_050": lambda: timm.create_model("mobilenetv2_050", num_classes=10),
    "resnet": lambda: timm.create_model("resnet18", num_classes=10, stem_width=16, channels=(16, 24, 32, 48)),
    "test_convnext": lambda: timm.create_model("test_convnext", num_classes=10),  # BNs only in the pruned forms
}
SKIP = {("test_convnext", "before"), ("resnet", "torch_sync")}  # nothing to convert / the same as "sync"
CASES = [(m, c, order, plan) for m in MODELS for c in CONVERSIONS for order in ("before", "after")
         for plan in ("all", "random") if not SKIP & {(m, order), (m, c)}]


def _plan(model_name: str, kind: str) -> list[str]:
    """Every prunable block, or a random half of them with one stride-2 block (ConvNeXt blocks have none)."""
    blocks = find_blocks(MODELS[model_name](), (3, SIZE, SIZE), costed=False).prunable
    stride2 = [b.name for b in blocks if b.stride == 2]
    assert stride2 or model_name == "test_convnext"
    if kind == "all":
        return [b.name for b in blocks]
    rng = random.Random(len(blocks))
    rest = [b.name for b in blocks if b.stride == 1]
    return rng.sample(stride2, min(1, len(stride2))) + rng.sample(rest, len(rest) // 2)


def _pruned(model_name: str, plan: list[str], convert=None, order: str = "after") -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[model_name]().double()
    if convert and order == "before":
        model = convert(model)
    apply_plan(model, plan, lam=0.0)
    if convert and order == "after":
        model = convert(model)
    randomize_bn_stats(model, seed=3)
    randomize_layer_scale(model)
    return model.double().eval()


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(SIZE), dtype=torch.float64)


@pytest.mark.parametrize("model_name,conversion,order,plan_kind", CASES, ids=["-".join(c) for c in CASES])
def test_merge_exact_after_bn_conversion(model_name, conversion, order, plan_kind):
    convert, variants = CONVERSIONS[conversion]
    plan = _plan(model_name, plan_kind)
    subnet = _pruned(model_name, plan, convert, order)
    assert any(isinstance(m, variants) for m in subnet.modules())
    x = _inputs()
    with torch.no_grad():
        want, got = subnet(x), merge_model(subnet)(x)
        if conversion != "torch_sync":  # same function as the unconverted pruned model
            plain = _pruned(model_name, plan)(x)
            assert (want - plain).abs().max() <= 1e-10 * plain.abs().max()
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


@pytest.mark.parametrize("conversion", ["sync", "freeze"])
def test_discovery_and_merged_weights_ignore_the_conversion(conversion):
    convert = CONVERSIONS[conversion][0]
    specs = [(b.name, b.merged_macs) for b in find_blocks(MODELS["mobilenetv2_050"](), (3, SIZE, SIZE)).prunable]
    converted = convert(MODELS["mobilenetv2_050"]())
    assert [(b.name, b.merged_macs) for b in find_blocks(converted, (3, SIZE, SIZE)).prunable] == specs
    names = [name for name, _ in specs]
    merged = merge_model(converted, names)
    fresh = merge_model(MODELS["mobilenetv2_050"](), names)
    assert not any(isinstance(m, CONVERSIONS[conversion][1]) for m in merged.modules())
    fresh.load_state_dict(merged.state_dict())  # a merged checkpoint loads into a model built from the plan


@pytest.mark.parametrize("conversion", ["sync", "freeze"])
def test_plain_batchnorm_reverts_the_conversion(conversion):
    model = randomize_bn_stats(MODELS["mobilenetv2_050"]().double()).eval()
    model.blocks[1][0].bn1.weight.requires_grad_(False)
    plain = plain_batchnorm(CONVERSIONS[conversion][0](copy.deepcopy(model))).eval()
    assert {type(m) for m in plain.modules() if "BatchNorm" in type(m).__name__} == {BatchNormAct2d}
    assert isinstance(plain.blocks[1][0].bn1.act, nn.ReLU6)
    assert plain.blocks[1][0].bn1.weight.requires_grad == (conversion == "freeze")  # frozen ones become trainable
    with torch.no_grad():
        assert torch.equal(plain(_inputs()), model(_inputs()))
    bn = plain_batchnorm(SyncBatchNormAct(4))
    assert type(bn) is BatchNormAct2d and isinstance(bn.act, nn.Identity)


class ScaledBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass updp does not know: its forward is not BatchNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class ScaledSyncBatchNorm(nn.SyncBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def _swap_bn(owner: nn.Module, attr: str, cls: type) -> None:
    old = getattr(owner, attr)
    new = cls(old.num_features, dtype=old.weight.dtype)
    new.load_state_dict(old.state_dict())
    setattr(owner, attr, new.eval())


@pytest.mark.parametrize("cls", [ScaledBatchNorm, ScaledSyncBatchNorm])
def test_unknown_batchnorm_subclass_is_refused_by_name(cls):
    model = MODELS["mobilenetv2_050"]().eval()
    _swap_bn(model.blocks[1][0], "bn2", cls)
    with pytest.raises(PlanError, match=f"blocks.1.0.*{cls.__name__} is a BatchNorm subclass updp does not know"):
        apply_plan(model, ["blocks.1.0"], lam=0.0)

    model = apply_plan(MODELS["mobilenetv2_050"](), ["blocks.1.0"], lam=0.0).eval()
    _swap_bn(model.blocks[1][0].block, "bn2", cls)  # swapped in after the plan, as a conversion would
    with pytest.raises(NormError, match=f"block 'blocks.1.0': {cls.__name__} is a BatchNorm subclass") as err:
        merge_model(model)
    assert "\n" not in str(err.value)
    with pytest.raises(NormError):
        model(_inputs().float())


def test_vit_token_batchnorm_replaced_by_a_conversion_is_refused():
    model = convert_sync_batchnorm(apply_plan(timm.create_model("test_vit"), ["blocks.0"], lam=0.0))
    with pytest.raises(NormError, match="block 'blocks.0': bn1 is no longer updp's TokenBatchNorm"):
        merge_model(model)
