"""MobileNetV2 / EfficientNet inverted residuals and depthwise-separable convs.

Pruned: PW, BN, DW, BN, PW, BN (+x) with identity activations, then BN + act.
Merged: one dense kxk conv Cin->Cout with the DW's stride, identity at the
kernel centre, BNs folded, then the act. Blocks with squeeze-excitation are
reported unsupported: the SE gate scales channels by a function of the whole
image, which no static convolution can represent.
"""
from __future__ import annotations

from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn

from updp.pruner.families.base import act_of, is_identity
from updp.pruner.families.conv_chain import Chain, ConvChainFamily
from updp.pruner.registry import register_family


def _common_reason(block: nn.Module) -> str | None:
    if not is_identity(getattr(block, "se", None)):
        return ("squeeze-excitation gate is input-dependent (global pooling); "
                "no exact merged form exists")
    if not is_identity(getattr(block, "aa", None)):
        return "anti-aliased downsampling is not supported"
    if getattr(block, "conv_s2d", None) is not None:
        return "space-to-depth stem is not supported"
    return None


@register_family(InvertedResidual)
class InvertedResidualFamily(ConvChainFamily):
    name = "inverted_residual"

    def chain(self, block: nn.Module) -> Chain:
        layers = (("conv_pw", "bn1", "bn1.act"), ("conv_dw", "bn2", "bn2.act"), ("conv_pwl", "bn3", None))
        return Chain(layers, "identity" if block.has_skip else None)

    def end_activation(self, block: nn.Module) -> nn.Module:
        return act_of(block.bn1)

    def check(self, block: nn.Module) -> str | None:
        return _common_reason(block) or super().check(block)


@register_family(DepthwiseSeparableConv)
class DepthwiseSeparableFamily(ConvChainFamily):
    name = "depthwise_separable"

    def chain(self, block: nn.Module) -> Chain:
        pw_act = "bn2.act" if getattr(block, "has_pw_act", False) else None
        layers = (("conv_dw", "bn1", "bn1.act"), ("conv_pw", "bn2", pw_act))
        return Chain(layers, "identity" if block.has_skip else None)

    def end_activation(self, block: nn.Module) -> nn.Module:
        return act_of(block.bn1)

    def check(self, block: nn.Module) -> str | None:
        return _common_reason(block) or super().check(block)
