"""ConvNeXt V1 ``ConvNeXtBlock`` (both the NCHW conv-MLP and the NHWC Linear variants).

Pruned: DW 7x7, BN (for the LN), PW C->4C, identity act, PW 4C->C, gamma,
+x, then BN + GELU. Merged (form B of method.md): the DW with its BN folded,
one 1x1 conv C->C (gamma.W2.W1) and the skip; the block-end BN folds into the
1x1 conv and a per-channel scale on the skip. The dense 7x7 form (A, ``dense``)
costs 49 C^2 MACs per pixel against 49 C + C^2 for form B (``dw_pw``), so B is
the default; on a GPU one dense conv can still beat two kernels, which the
merge planner measures.
"""
from __future__ import annotations

import copy

import torch
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from updp.pruner import reparam
from updp.pruner.families.base import BlockFamily, is_identity, static_padding
from updp.pruner.families.conv_chain import MergedConvAct
from updp.pruner.progressive import BlockEnd, ProgressiveBlock, act_mix, non_inplace, norm_mix
from updp.pruner.registry import register_family


def _mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fc1/fc2 weights as matrices, biases as vectors (Linear or 1x1 conv)."""
    out = []
    for fc in (mlp.fc1, mlp.fc2):
        w = fc.weight.detach().flatten(1)
        b = fc.bias.detach() if fc.bias is not None else w.new_zeros(w.shape[0])
        out += [w, b]
    return tuple(out)


class ConvNeXtProgressive(ProgressiveBlock):
    def __init__(self, block: ConvNeXtBlock, family: BlockFamily):
        super().__init__(block, family)
        chs = block.conv_dw.out_channels
        ref = block.conv_dw.weight
        self.bn = nn.BatchNorm2d(chs, device=ref.device, dtype=ref.dtype)
        self.act = non_inplace(block.mlp.act)
        self.end = BlockEnd(nn.BatchNorm2d(chs, device=ref.device, dtype=ref.dtype), block.mlp.act)

    def _layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.block.use_conv_mlp:
            return self.block.norm(x)
        return self.block.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_pruned(self, x: torch.Tensor, lam: float) -> torch.Tensor:
        b = self.block
        h = b.conv_dw(x)
        h = norm_mix(self._layer_norm, self.bn, h, lam)
        mlp = b.mlp
        if not b.use_conv_mlp:
            h = h.permute(0, 2, 3, 1)
        h = mlp.drop1(act_mix(self.act, mlp.fc1(h), lam))
        h = mlp.drop2(mlp.fc2(mlp.norm(h)))
        if not b.use_conv_mlp:
            h = h.permute(0, 3, 1, 2)
        if b.gamma is not None:
            h = h * b.gamma.reshape(1, -1, 1, 1)
        return self.end(b.drop_path(h) + x, lam)


class MergedConvNeXt(nn.Module):
    """``act(pw(dw(x)) + skip_scale * x)``: the merged ConvNeXt block."""

    def __init__(self, dw: nn.Conv2d, pw: nn.Conv2d, skip_scale: torch.Tensor, act: nn.Module):
        super().__init__()
        self.dw = dw
        self.pw = pw
        self.skip_scale = nn.Parameter(skip_scale.reshape(1, -1, 1, 1).clone())
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pw(self.dw(x)) + x * self.skip_scale)


@register_family(ConvNeXtBlock)
class ConvNeXtFamily(BlockFamily):
    name = "convnext"
    forms = ("dw_pw", "dense")

    def check(self, block: nn.Module) -> str | None:
        if not is_identity(block.shortcut):
            return "block with a downsampling shortcut is not supported"
        if type(block.mlp).__name__ != "Mlp" or not is_identity(block.mlp.norm):
            return "MLP with GRN or an inner norm (ConvNeXt V2) is not supported"
        return static_padding(block.conv_dw)

    def channels(self, block: nn.Module) -> tuple[int, int, int]:
        return block.conv_dw.in_channels, block.conv_dw.out_channels, block.conv_dw.stride[0]

    def progressive(self, block: nn.Module) -> ConvNeXtProgressive:
        return ConvNeXtProgressive(block, self)

    def merge(self, pblock: ConvNeXtProgressive, form: str | None = None) -> MergedConvNeXt | MergedConvAct:
        form = self.form(form)
        b = pblock.block
        pad = b.conv_dw.padding[0]
        dw = reparam.fold_conv_bn(b.conv_dw, pblock.bn, expand_groups=form == "dense")
        w1, b1, w2, b2 = _mlp_weights(b.mlp)
        gamma = b.gamma.detach() if b.gamma is not None else torch.ones_like(b2)
        w, bias = gamma[:, None] * (w2 @ w1), gamma * (w2 @ b1 + b2)
        scale, shift = reparam.bn_scale_shift(pblock.end.bn)
        pw = reparam.Conv((scale[:, None] * w)[:, :, None, None], scale * bias + shift, 1)
        act = copy.deepcopy(pblock.end.act)
        if form == "dense":  # pw after dw is one dense kxk conv; the scaled skip sits at the kernel centre
            dense = reparam.add_at_offset(reparam.compose_convs(dw, pw), torch.diag(scale), None, pad)
            return MergedConvAct(reparam.to_conv2d(dense, pad), act)
        dw_layer = reparam.to_conv2d(dw, pad, groups=b.conv_dw.groups)
        return MergedConvNeXt(dw_layer, reparam.to_conv2d(pw, 0), scale, act)

