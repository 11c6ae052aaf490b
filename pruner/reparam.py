"""Pure tensor functions of re-parameterization: fold, expand, compose, skip.

Convolutions are ``(weight, bias, stride)`` triples with dense weights
``(C_out, C_in, k, k)``, square kernels, dilation 1 and all zero padding at
the chain's input (the pruned forms guarantee that), so composition is exact.
BN folding uses torch's own ``fuse_conv_bn_weights``/``fuse_linear_bn_weights``
and refuses a BatchNorm subclass it does not know (``norms.require_foldable``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from updp.pruner.norms import require_foldable


class Conv(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int


def _bn_args(bn: nn.modules.batchnorm._BatchNorm):
    require_foldable(bn)
    return bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``y = scale * x + shift`` per channel."""
    require_foldable(bn)
    ones = torch.ones_like(bn.running_mean)
    weight = bn.weight if bn.weight is not None else ones
    bias = bn.bias if bn.bias is not None else torch.zeros_like(ones)
    scale = weight / torch.sqrt(bn.running_var + bn.eps)
    return scale.detach(), (bias - bn.running_mean * scale).detach()


def dense_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's weight as a dense ``(C_out, C_in, k, k)`` tensor (groups expanded)."""
    w = conv.weight.detach()
    if conv.groups == 1:
        return w
    out_chs, in_per_group, kh, kw = w.shape
    rows = torch.arange(out_chs)
    group = rows // (out_chs // conv.groups)
    cols = group[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
    dense = w.new_zeros(out_chs, in_per_group * conv.groups, kh, kw)
    dense[rows[:, None], cols] = w
    return dense


def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm | None,
                 expand_groups: bool = True) -> Conv:
    """A conv with the BN that follows it folded in (groups expanded by default)."""
    w = dense_weight(conv) if expand_groups else conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else w.new_zeros(w.shape[0])
    if bn is not None:
        w, b = fuse_conv_bn_weights(w, b, *_bn_args(bn))
    return Conv(w.detach(), b.detach(), conv.stride[0])


def fold_linear_bn(linear: nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(bn(x))`` as one affine map: the BN folded into the linear's input."""
    scale, shift = bn_scale_shift(bn)
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else w.new_zeros(w.shape[0])
    return w * scale[None, :], b + w @ shift


def fold_bn_after_linear(w: torch.Tensor, b: torch.Tensor, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(W x + b)`` as one affine map."""
    fw, fb = fuse_linear_bn_weights(w, b, *_bn_args(bn))
    return fw.detach(), fb.detach()


def compose_convs(first: Conv, second: Conv) -> Conv:
    """``second(first(x))`` as one conv, both unpadded (padding lives at the input).

    Kernel size ``k1 + (k2 - 1) * s1``, stride ``s1 * s2``.
    """
    w1, w2, s1 = first.weight, second.weight, first.stride
    k1, k2 = w1.shape[-1], w2.shape[-1]
    k = k1 + (k2 - 1) * s1
    w = w1.new_zeros(w2.shape[0], w1.shape[1], k, k)
    for u in range(k2):
        for v in range(k2):
            w[:, :, u * s1:u * s1 + k1, v * s1:v * s1 + k1] += torch.einsum(
                "om,mihw->oihw", w2[:, :, u, v], w1)
    b = second.bias + w2.sum(dim=(2, 3)) @ first.bias
    return Conv(w, b, s1 * second.stride)


def add_at_offset(conv: Conv, skip_weight: torch.Tensor, skip_bias: torch.Tensor | None, offset: int) -> Conv:
    """Add a 1x1 map (identity or a folded 1x1 downsample) at kernel position ``offset``."""
    w = conv.weight.clone()
    w[:, :, offset, offset] += skip_weight
    b = conv.bias if skip_bias is None else conv.bias + skip_bias
    return Conv(w, b, conv.stride)


def scale_conv(conv: Conv, scale: torch.Tensor, shift: torch.Tensor) -> Conv:
    """``scale * conv(x) + shift`` per output channel (a BN after the conv)."""
    return Conv(conv.weight * scale[:, None, None, None], conv.bias * scale + shift, conv.stride)


def to_conv2d(conv: Conv, padding: int, groups: int = 1) -> nn.Conv2d:
    out_chs, in_per_group, k, _ = conv.weight.shape
    layer = nn.Conv2d(in_per_group * groups, out_chs, k, stride=conv.stride, padding=padding,
                      groups=groups, bias=True,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        layer.bias.copy_(conv.bias)
    return layer
