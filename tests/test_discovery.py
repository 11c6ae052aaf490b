"""Block discovery on real timm models (random weights): counts, families, order, costs."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from updp.pruner import Discovery, create_model, default_input_size, find_blocks
from updp.pruner.discovery import stage_and_index

CNN_SIZE = (3, 64, 64)


@dataclass(frozen=True)
class Case:
    """What discovery must report for one model.

    ``pattern`` spells block names from the stage ``s`` (``s1`` = s + 1) and the
    index ``i``; ``stages`` is the block count of each stage, in order.
    """

    model: str
    families: dict[str, int]
    stages: tuple[int, ...]
    pattern: str
    supported: int
    worthwhile: int
    native_size: bool = False

    def positions(self) -> list[tuple[int, int]]:
        return [(s, i) for s, n in enumerate(self.stages) for i in range(n)]

    def names(self) -> list[str]:
        return [self.pattern.format(s=s, s1=s + 1, i=i) for s, i in self.positions()]


CASES = [
    Case("convnext_atto", {"convnext": 12}, (2, 2, 6, 2), "stages.{s}.blocks.{i}", 12, 12),
    Case("convnext_tiny", {"convnext": 18}, (3, 3, 9, 3), "stages.{s}.blocks.{i}", 18, 18),
    Case("mobilenetv2_100", {"depthwise_separable": 1, "inverted_residual": 16}, (1, 2, 3, 4, 3, 3, 1),
         "blocks.{s}.{i}", 17, 16),
    Case("mobilenetv2_050", {"depthwise_separable": 1, "inverted_residual": 16}, (1, 2, 3, 4, 3, 3, 1),
         "blocks.{s}.{i}", 17, 16),
    Case("efficientnet_b0", {"depthwise_separable": 1, "inverted_residual": 15}, (1, 2, 2, 3, 3, 4, 1),
         "blocks.{s}.{i}", 0, 0),
    Case("resnet18", {"resnet_basic": 8}, (2, 2, 2, 2), "layer{s1}.{i}", 8, 0),
    Case("resnet50", {"resnet_bottleneck": 16}, (3, 4, 6, 3), "layer{s1}.{i}", 16, 0),
    Case("deit_tiny_patch16_224", {"vit": 12}, (12,), "blocks.{i}", 12, 12, native_size=True),
    Case("vit_small_patch16_224", {"vit": 12}, (12,), "blocks.{i}", 12, 12, native_size=True),
    Case("test_convnext", {"convnext": 9}, (1, 2, 4, 2), "stages.{s}.blocks.{i}", 9, 9),
    Case("test_vit", {"vit": 6}, (6,), "blocks.{i}", 6, 6, native_size=True),
    Case("test_vit2", {"vit": 8}, (8,), "blocks.{i}", 8, 8, native_size=True),
    # test_resnet: one plain BasicBlock, then avg-pool ('d') downsamples, a Bottleneck among them.
    Case("test_resnet", {"resnet_basic": 3, "resnet_bottleneck": 1}, (1, 1, 1, 1), "layer{s1}.{i}", 1, 0),
    # test_efficientnet: a ConvBnAct and two EdgeResiduals first (no family), then two SE blocks.
    Case("test_efficientnet", {"inverted_residual": 2}, (0, 0, 0, 1, 1), "blocks.{s}.{i}", 0, 0),
]
BY_MODEL = {c.model: c for c in CASES}


@pytest.fixture(scope="module")
def discover() -> Callable[[str], Discovery]:
    """Discovery of each model, computed once per module (some models are big)."""
    cache: dict[str, Discovery] = {}

    def get(name: str) -> Discovery:
        if name not in cache:
            torch.manual_seed(0)
            model = create_model(name)
            size = default_input_size(model) if BY_MODEL[name].native_size else CNN_SIZE
            cache[name] = find_blocks(model, size)
        return cache[name]

    return get


def stage_counts(found: Discovery) -> tuple[int, ...]:
    counts = Counter(b.stage for b in found.blocks)
    return tuple(counts[s] for s in range(max(counts) + 1))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_counts_families_and_flags(discover, case: Case):
    found = discover(case.model)
    assert Counter(b.family for b in found.blocks) == case.families
    assert stage_counts(found) == case.stages
    assert len(found.prunable) == case.supported
    assert len(found.worthwhile) == case.worthwhile


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_blocks_come_in_forward_order(discover, case: Case):
    found = discover(case.model)
    assert [b.name for b in found.blocks] == case.names()
    assert [(b.stage, b.index) for b in found.blocks] == case.positions()


def test_native_sizes_are_the_models_own(discover):
    assert discover("deit_tiny_patch16_224").input_size == (3, 224, 224)
    assert discover("test_vit").input_size == (3, 160, 160)
    assert discover("convnext_atto").input_size == CNN_SIZE


@pytest.mark.parametrize("model", ["mobilenetv2_100", "mobilenetv2_050"])
def test_mobilenetv2_first_block_is_not_worth_pruning(discover, model: str):
    first, *rest = discover(model).blocks
    assert (first.name, first.family, first.block_class) == ("blocks.0.0", "depthwise_separable",
                                                            "DepthwiseSeparableConv")
    assert first.supported and not first.worthwhile
    assert first.merged_macs > first.macs  # a dense 3x3 32->16 conv beats DW 3x3 + PW 32->16
    assert all(b.family == "inverted_residual" and b.worthwhile for b in rest)


@pytest.mark.parametrize("model", ["efficientnet_b0", "test_efficientnet"])
def test_squeeze_excitation_blocks_are_unsupported(discover, model: str):
    blocks = discover(model).blocks
    assert blocks and all(not b.supported and not b.worthwhile for b in blocks)
    assert all("squeeze-excitation" in b.reason for b in blocks)


def test_test_efficientnet_reports_blocks_of_no_family(discover):
    assert discover("test_efficientnet").other_block_classes == {"_efficientnet_blocks.ConvBnAct": 1,
                                                                 "_efficientnet_blocks.EdgeResidual": 2}


def test_test_resnet_avg_pool_downsamples_are_unsupported(discover):
    first, *rest = discover("test_resnet").blocks
    assert first.name == "layer1.0" and first.supported and not first.worthwhile
    assert [b.name for b in rest] == ["layer2.0", "layer3.0", "layer4.0"]
    assert all("downsample" in b.reason for b in rest)


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_resnet_blocks_merge_into_costlier_convs(discover, model: str):
    blocks = discover(model).blocks
    assert all(b.supported and not b.worthwhile and b.merged_macs > b.macs for b in blocks)


def test_convnext_costs_match_the_formula(discover):
    """Per pixel: 49 C + 8 C^2 MACs originally, 49 C + C^2 merged (DW kept, MLP folded to 1x1)."""
    for b in discover("convnext_atto").blocks:
        pixels = (64 // 4 // 2 ** b.stage) ** 2
        c = b.in_chs
        assert (b.macs, b.merged_macs) == ((49 * c + 8 * c * c) * pixels, (49 * c + c * c) * pixels), b.name


def test_resnet_basic_costs_match_the_formula(discover):
    """Stride 1: two 3x3 convs (18 C^2) merge into one 5x5 conv (25 C^2) per output pixel."""
    for b in discover("resnet18").blocks:
        if b.stride == 1:
            pixels = (64 // 4 // 2 ** b.stage) ** 2
            assert (b.macs, b.merged_macs) == (18 * b.in_chs ** 2 * pixels, 25 * b.in_chs ** 2 * pixels), b.name


@pytest.mark.parametrize("name, expected", [
    ("stages.2.blocks.3", (2, 3)),
    ("stages.0.blocks.0", (0, 0)),
    ("layer3.1", (2, 1)),
    ("layer1.0", (0, 0)),
    ("model.layer4.2", (3, 2)),
    ("blocks.5", (0, 5)),
    ("blocks.11", (0, 11)),
    ("blocks.2.1", (2, 1)),
    ("blocks.12.10", (12, 10)),
])
def test_stage_and_index(name: str, expected: tuple[int, int]):
    assert stage_and_index(name) == expected


@pytest.mark.parametrize("model, stride2, in_out", [
    ("mobilenetv2_100", {"blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.5.0"}, ("blocks.1.0", 16, 24)),
    ("resnet18", {"layer2.0", "layer3.0", "layer4.0"}, ("layer2.0", 64, 128)),
    ("resnet50", {"layer2.0", "layer3.0", "layer4.0"}, ("layer3.0", 512, 1024)),
    ("convnext_atto", set(), ("stages.1.blocks.0", 80, 80)),  # ConvNeXt downsamples between stages
    ("deit_tiny_patch16_224", set(), ("blocks.0", 192, 192)),
])
def test_strides_and_channels(discover, model: str, stride2: set[str], in_out: tuple[str, int, int]):
    blocks = {b.name: b for b in discover(model).blocks}
    assert {n for n, b in blocks.items() if b.stride == 2} == stride2
    assert all(b.stride in (1, 2) for b in blocks.values())
    name, in_chs, out_chs = in_out
    assert (blocks[name].in_chs, blocks[name].out_chs) == (in_chs, out_chs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_worthwhile_exactly_when_merged_is_cheaper(discover, case: Case):
    for b in discover(case.model).blocks:
        if b.supported:
            assert b.worthwhile == (b.merged_macs < b.macs), b.name
            assert b.merged_macs > 0 and b.merged_params > 0
        else:
            # Unsupported blocks are never costed: 0 means "no merged form", not "free".
            assert not b.worthwhile and b.merged_macs == 0 and b.reason
        assert b.macs > 0 and b.params > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_stage_and_index_fields_follow_the_name(discover, case: Case):
    for b in discover(case.model).blocks:
        assert (b.stage, b.index) == stage_and_index(b.name)


def test_as_dict_carries_the_flags(discover):
    first = discover("mobilenetv2_100").blocks[0].as_dict()
    assert first["name"] == "blocks.0.0" and first["supported"] is True and first["worthwhile"] is False


def test_find_blocks_leaves_the_model_as_it_was():
    model = create_model("mobilenetv2_050").train()  # BN running stats would move in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_blocks(model, (3, 32, 32))
    assert model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_input_size_is_recorded_and_changes_costs():
    model = create_model("test_convnext")
    small, large = find_blocks(model, (3, 32, 32)), find_blocks(model, (3, 64, 64))
    assert (small.input_size, large.input_size) == ((3, 32, 32), (3, 64, 64))
    assert [4 * b.macs for b in small.blocks] == [b.macs for b in large.blocks]


# --- blocks a family knows by class but cannot merge, and blocks of no family ----------------------

def test_blocks_with_group_norm_are_unsupported_not_a_crash():
    blocks = find_blocks(create_model("resnet50_gn"), (3, 32, 32)).blocks
    assert len(blocks) == 16 and all(b.family == "resnet_bottleneck" for b in blocks)
    assert all(not b.supported and "GroupNorm" in b.reason and "BatchNorm" in b.reason for b in blocks)
    assert all(b.macs > 0 and b.merged_macs == 0 for b in blocks)


def test_blocks_with_mixed_kernel_convs_are_unsupported_not_a_crash():
    blocks = {b.name: b for b in find_blocks(create_model("mixnet_s"), (3, 32, 32)).blocks}
    assert blocks["blocks.0.0"].supported  # a plain depthwise-separable conv
    assert "MixedConv2d" in blocks["blocks.1.0"].reason  # no SE: the mixed convs are the reason
    assert not any(b.supported for n, b in blocks.items() if n != "blocks.0.0")
    assert (blocks["blocks.1.0"].in_chs, blocks["blocks.1.0"].out_chs, blocks["blocks.1.0"].stride) == (16, 24, 2)


def test_blocks_of_no_family_outside_sequentials_are_named():
    """RegNet stages hold their blocks as attributes b1, b2, ... (no Sequential)."""
    found = find_blocks(create_model("regnetx_002"), (3, 32, 32))
    assert found.blocks == []
    assert found.other_block_classes == {"regnet.Bottleneck": 13}


@pytest.mark.parametrize("model, expected", [
    ("test_efficientnet", {"_efficientnet_blocks.ConvBnAct": 1, "_efficientnet_blocks.EdgeResidual": 2}),
    ("mobilenetv2_050", {}),  # stages are Sequentials: containers, not blocks
    ("test_convnext", {}),
    ("test_byobnet", {"byobnet.EdgeBlock": 1, "byobnet.DarkBlock": 1, "byobnet.BasicBlock": 1,
                      "byobnet.BottleneckBlock": 1}),
    ("regnetx_002", {"regnet.Bottleneck": 13}),  # one block in the first stage: found all the same
])
def test_other_block_classes_skip_containers_and_known_blocks(model: str, expected: dict[str, int]):
    assert find_blocks(create_model(model), (3, 32, 32), costed=False).other_block_classes == expected


@pytest.mark.parametrize("size", [(3, 1, 1), (3, 0, 0)])
def test_input_too_small_for_the_model_is_a_user_error(size):
    from updp.core.errors import UpdpError

    with pytest.raises(UpdpError, match="--img-size"):
        find_blocks(create_model("test_convnext"), size)
