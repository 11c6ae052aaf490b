"""Blocks that are a chain of conv+BN layers with a skip: the shared machinery.

Inverted residuals, depthwise-separable convs and ResNet blocks differ only in
which layers form the chain, how the skip is made and whether the pruned block
gets a BN + activation appended or already ends in one. The pruned form pads
the chain's input once (by ``P``) and runs every conv unpadded, so the chain
composes into one conv with padding ``P`` exactly, borders included.
"""
from __future__ import annotations

import abc
import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from updp.pruner import reparam
from updp.pruner.families.base import BlockFamily, foldable_norm, static_padding
from updp.pruner.norms import norm_only
from updp.pruner.progressive import BlockEnd, ProgressiveBlock, non_inplace, pad_conv, ring_act_mix


@dataclass(frozen=True)
class Chain:
    """Attribute names of a block's chain: ``(conv, bn, act or None)`` per layer.

    ``skip`` is None, ``"identity"`` or the attribute of a 1x1 conv+BN
    downsample; ``end_act`` names an activation the block already applies
    after its residual add (then no BN + act is appended).
    """

    layers: tuple[tuple[str, str, str | None], ...]
    skip: str | None
    end_act: str | None = None


def _get(block: nn.Module, path: str | None) -> nn.Module | None:
    return None if path is None else functools.reduce(getattr, path.split("."), block)


def _act(block: nn.Module, path: str | None) -> nn.Module:
    """The activation at ``path``; Identity where there is none (torch's SyncBatchNorm conversion drops timm's)."""
    if path is None:
        return nn.Identity()
    owner, _, attr = path.rpartition(".")
    return non_inplace(getattr(_get(block, owner) if owner else block, attr, nn.Identity()))


def chain_geometry(convs: list[nn.Conv2d]) -> tuple[int, list[int]]:
    """Input padding ``P`` of the whole chain and the border ring after each layer."""
    pads = [c.padding[0] for c in convs]
    strides = [c.stride[0] for c in convs]

    def ring_after(i: int) -> int:
        total, scale = 0, 1
        for j in range(i + 1, len(convs)):
            total += pads[j] * scale
            scale *= strides[j]
        return total

    return ring_after(-1), [ring_after(i) for i in range(len(convs))]


class ConvChainBlock(ProgressiveBlock):
    def __init__(self, block: nn.Module, family: "ConvChainFamily", chain: Chain, end_act: nn.Module):
        super().__init__(block, family)
        self.chain = chain
        convs = [_get(block, c) for c, _, _ in chain.layers]
        self.pad, self.rings = chain_geometry(convs)
        self.acts = nn.ModuleList(_act(block, a) for _, _, a in chain.layers)
        out_chs = convs[-1].out_channels
        ref = convs[-1].weight
        self.end = None if chain.end_act else BlockEnd(
            nn.BatchNorm2d(out_chs, device=ref.device, dtype=ref.dtype), end_act)

    def forward_pruned(self, x: torch.Tensor, lam: float) -> torch.Tensor:
        h = F.pad(x, [self.pad] * 4)
        for (conv, bn, act), mix, ring in zip(self.chain.layers, self.acts, self.rings):
            h = norm_only(_get(self.block, bn), pad_conv(_get(self.block, conv), h))
            if act is not None:
                h = ring_act_mix(mix, h, lam, ring)
        drop_path = getattr(self.block, "drop_path", None)
        if self.chain.skip is not None and drop_path is not None:
            h = drop_path(h)
        if self.chain.skip == "identity":
            h = h + x
        elif self.chain.skip is not None:
            h = h + _get(self.block, self.chain.skip)(x)
        if self.chain.end_act:
            return _get(self.block, self.chain.end_act)(h)
        return self.end(h, lam)


class MergedConvAct(nn.Module):
    """A merged chain: one dense conv (skip and BNs folded in), then the block-end act."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class MergedChain(nn.Module):
    """The chain kept as convs with their BNs folded and no activation between them (the "chain" form).

    The first conv pads by the whole chain's ``P`` and the others not at all, exactly as the pruned
    form computes; the skip (``x * skip_scale``, or a folded 1x1 downsample of ``x``) is added before
    the block-end activation.
    """

    def __init__(self, convs: list[nn.Conv2d], act: nn.Module, skip_scale: torch.Tensor | None = None,
                 skip_conv: nn.Conv2d | None = None):
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.skip_conv = skip_conv
        if skip_scale is not None:
            self.skip_scale = nn.Parameter(skip_scale.reshape(1, -1, 1, 1).clone())
        else:
            self.skip_scale = None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x)
        if self.skip_conv is not None:
            h = h + self.skip_conv(x)
        elif self.skip_scale is not None:
            h = h + x * self.skip_scale
        return self.act(h)


class ConvChainFamily(BlockFamily):
    """Base adapter: subclasses say which layers form the chain.

    Two merged forms: ``dense`` composes the chain, skip and BNs into one conv (fewest MACs where the
    chain is thin, e.g. an inverted residual's); ``chain`` keeps the folded convs one after another
    without activations (fewer MACs where the dense kernel grows, and no dense kxk on targets that run
    depthwise convs fast).
    """

    forms = ("dense", "chain")

    @abc.abstractmethod
    def chain(self, block: nn.Module) -> Chain:
        """Which attributes of ``block`` form its chain, skip and end."""

    def end_activation(self, block: nn.Module) -> nn.Module:
        """The activation appended at the end of the pruned block."""
        return nn.ReLU()

    def check(self, block: nn.Module) -> str | None:
        chain = self.chain(block)
        for conv, bn, _ in chain.layers:
            for attr, reason in ((conv, static_padding(_get(block, conv))), (bn, foldable_norm(_get(block, bn)))):
                if reason:
                    return f"{attr}: {reason}"
        if chain.skip not in (None, "identity"):
            return _downsample_reason(_get(block, chain.skip))
        return None

    def channels(self, block: nn.Module) -> tuple[int, int, int]:
        convs = [_get(block, c) for c, _, _ in self.chain(block).layers]
        stride = 1
        for c in convs:
            stride *= _stride(c)
        return convs[0].in_channels, convs[-1].out_channels, stride

    def progressive(self, block: nn.Module) -> ConvChainBlock:
        return ConvChainBlock(block, self, self.chain(block), self.end_activation(block))

    def merge(self, pblock: ConvChainBlock, form: str | None = None) -> MergedConvAct | MergedChain:
        if self.form(form) == "chain":
            return self._merge_chain(pblock)
        block, chain = pblock.block, pblock.chain
        convs = [reparam.fold_conv_bn(_get(block, c), _get(block, b)) for c, b, _ in chain.layers]
        merged = functools.reduce(reparam.compose_convs, convs)
        if chain.skip == "identity":
            eye = torch.eye(merged.weight.shape[0], dtype=merged.weight.dtype, device=merged.weight.device)
            merged = reparam.add_at_offset(merged, eye, None, pblock.pad)
        elif chain.skip is not None:
            ds_conv, ds_bn = _get(block, chain.skip)
            ds = reparam.fold_conv_bn(ds_conv, ds_bn)
            merged = reparam.add_at_offset(merged, ds.weight[:, :, 0, 0], ds.bias, pblock.pad)
        if chain.end_act:
            act = copy.deepcopy(_get(block, chain.end_act))
        else:
            merged = reparam.scale_conv(merged, *reparam.bn_scale_shift(pblock.end.bn))
            act = copy.deepcopy(pblock.end.act)
        return MergedConvAct(reparam.to_conv2d(merged, pblock.pad), act)

    def _merge_chain(self, pblock: ConvChainBlock) -> MergedChain:
        block, chain = pblock.block, pblock.chain
        layers = [(_get(block, c), _get(block, b)) for c, b, _ in chain.layers]
        convs = [reparam.fold_conv_bn(conv, bn, expand_groups=False) for conv, bn in layers]
        skip = None
        if chain.skip not in (None, "identity"):
            ds_conv, ds_bn = _get(block, chain.skip)
            skip = reparam.fold_conv_bn(ds_conv, ds_bn)
        scale = None
        if chain.end_act:
            act = copy.deepcopy(_get(block, chain.end_act))
        else:
            scale, shift = reparam.bn_scale_shift(pblock.end.bn)
            convs[-1] = reparam.scale_conv(convs[-1], scale, shift)
            if skip is not None:
                skip = reparam.scale_conv(skip, scale, torch.zeros_like(shift))
            act = copy.deepcopy(pblock.end.act)
        layers_out = [reparam.to_conv2d(c, pblock.pad if i == 0 else 0, groups=conv.groups)
                      for i, (c, (conv, _)) in enumerate(zip(convs, layers))]
        if chain.skip == "identity":
            skip_scale = scale if scale is not None else torch.ones(layers_out[-1].out_channels,
                                                                     dtype=convs[-1].weight.dtype)
            return MergedChain(layers_out, act, skip_scale=skip_scale)
        return MergedChain(layers_out, act, skip_conv=None if skip is None else reparam.to_conv2d(skip, 0))


def _stride(conv: nn.Module) -> int:
    """A conv's stride; conv-like modules without one (MixedConv2d) carry it in their parts."""
    stride = getattr(conv, "stride", None)
    if stride is None:
        return max((_stride(c) for c in conv.children()), default=1)
    return stride if isinstance(stride, int) else stride[0]


def _downsample_reason(ds: nn.Module) -> str | None:
    ok = (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
          and ds[0].kernel_size == (1, 1) and ds[0].padding == (0, 0) and ds[0].groups == 1)
    if not ok:
        return "downsample is not a 1x1 conv + BN (e.g. avg-pool 'd' variant)"
    reason = foldable_norm(ds[1])
    return f"downsample.1: {reason}" if reason else None
