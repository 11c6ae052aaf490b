"""ResNet ``BasicBlock`` and ``Bottleneck``.

The blocks already end in an activation after the residual add, so the
pruned form only makes the inner activations identity. BasicBlock merges into
one 5x5 conv (7x7 at stride 2) with the identity or 1x1 downsample folded at
the kernel centre. Bottleneck merges into a dense 3x3 Cin->Cout conv, which
costs more MACs than the original: the planner reports it as not worthwhile.
"""
from __future__ import annotations

from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from updp.pruner.families.base import is_identity
from updp.pruner.families.conv_chain import Chain, ConvChainFamily
from updp.pruner.registry import register_family


def _resnet_reason(block: nn.Module) -> str | None:
    if not is_identity(block.se):
        return "attention/SE layer in the block is input-dependent; no exact merged form"
    if not is_identity(block.aa):
        return "anti-aliased downsampling is not supported"
    if not is_identity(block.drop_block):
        return "DropBlock inside the chain is not supported"
    return None


def _skip(block: nn.Module) -> str:
    return "downsample" if block.downsample is not None else "identity"


@register_family(BasicBlock)
class BasicBlockFamily(ConvChainFamily):
    name = "resnet_basic"

    def chain(self, block: nn.Module) -> Chain:
        return Chain((("conv1", "bn1", "act1"), ("conv2", "bn2", None)), _skip(block), end_act="act2")

    def check(self, block: nn.Module) -> str | None:
        return _resnet_reason(block) or super().check(block)


@register_family(Bottleneck)
class BottleneckFamily(ConvChainFamily):
    name = "resnet_bottleneck"

    def chain(self, block: nn.Module) -> Chain:
        layers = (("conv1", "bn1", "act1"), ("conv2", "bn2", "act2"), ("conv3", "bn3", None))
        return Chain(layers, _skip(block), end_act="act3")

    def check(self, block: nn.Module) -> str | None:
        if block.conv2.groups != 1:
            return "grouped 3x3 (ResNeXt) bottleneck is not supported"
        return _resnet_reason(block) or super().check(block)
