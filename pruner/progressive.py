"""Building pieces of the progressive pruned forms (method.md section 2).

With lambda ``l`` going from 1 (original block, exactly) to 0 (pruned block):

- activation: ``act_l(x) = l * act(x) + (1 - l) * x``
- normalization: ``norm_l(x) = l * LN(x) + (1 - l) * BN(x)``
- block end: ``end_l(y) = l * y + (1 - l) * act(BN(y))``

A ``ProgressiveBlock`` wraps the original block (whose weights it shares) and
runs the original forward at lambda 1, so the network equals the baseline bit
for bit there.
"""
from __future__ import annotations

import abc
import copy

import torch
import torch.nn.functional as F
from torch import nn

from updp.pruner.norms import foldable_type


def non_inplace(act: nn.Module) -> nn.Module:
    """A copy of ``act`` that never writes into its input (the mix needs it)."""
    act = copy.deepcopy(act)
    if hasattr(act, "inplace"):
        act.inplace = False
    return act


def act_mix(act: nn.Module, x: torch.Tensor, lam: float) -> torch.Tensor:
    if lam <= 0.0:
        return x
    return lam * act(x) + (1.0 - lam) * x


def ring_act_mix(act: nn.Module, x: torch.Tensor, lam: float, ring: int) -> torch.Tensor:
    """``act_mix`` for a map computed on an input padded ``ring`` pixels wider.

    The pruned form pads the chain's input instead of each conv, so its
    intermediate maps carry a border of ``ring`` pixels where the original
    conv sees zero padding. Inside, the usual mix; on the border,
    ``(1 - l) * x``: zero (the original padding) at l = 1, the pruned map at 0.
    """
    if lam <= 0.0 or ring == 0:
        return act_mix(act, x, lam)
    inner = torch.zeros_like(x[:1, :1])
    inner[..., ring:-ring, ring:-ring] = 1.0
    return inner * (lam * act(x)) + (1.0 - lam) * x


def norm_mix(norm: nn.Module, bn: nn.Module, x: torch.Tensor, lam: float) -> torch.Tensor:
    if lam <= 0.0:
        return bn(x)
    return lam * norm(x) + (1.0 - lam) * bn(x)


def pad_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` without its own padding (the chain's input was padded already)."""
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@foldable_type
class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel (last) dim of ``(B, N, C)`` token tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class BlockEnd(nn.Module):
    """The BN + activation appended after the residual add of a pruned block."""

    def __init__(self, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.bn = bn
        self.act = non_inplace(act)

    def forward(self, y: torch.Tensor, lam: float) -> torch.Tensor:
        if lam >= 1.0:
            return y
        end = self.act(self.bn(y))
        return end if lam <= 0.0 else lam * y + (1.0 - lam) * end


class ProgressiveBlock(nn.Module, abc.ABC):
    """A block that morphs from its original form (lam=1) to its pruned form (lam=0).

    Subclasses implement ``forward_pruned(x, lam)`` for ``0 <= lam < 1``;
    ``family`` is the adapter that built it (and knows how to merge it).
    """

    def __init__(self, block: nn.Module, family):
        super().__init__()
        self.block = block
        self.family_name = family.name
        self.lam = 1.0

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # kwargs: what the model passes its blocks besides x (a ViT's attn_mask).
        if self.lam >= 1.0:
            return self.block(x, **kwargs)
        return self.forward_pruned(x, float(self.lam), **kwargs)

    @abc.abstractmethod
    def forward_pruned(self, x: torch.Tensor, lam: float) -> torch.Tensor:
        """The block at ``0 <= lam < 1``; at 0, the form that merges exactly."""

    def extra_repr(self) -> str:
        return f"family={self.family_name}, lam={self.lam:.4g}"
