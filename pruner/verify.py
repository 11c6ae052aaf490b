"""Exactness checks: merged vs the lambda-0 subnet, with randomized BN statistics."""
from __future__ import annotations

import copy

import torch
from torch import nn

from updp.pruner.merge import merge_model


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine params (in place): default statistics hide folding bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape, like = m.running_mean.shape, m.running_mean
                m.running_mean.copy_((torch.randn(shape, generator=gen) * 0.5).to(like))
                m.running_var.copy_((torch.rand(shape, generator=gen) * 1.5 + 0.5).to(like))
                if m.weight is not None:
                    m.weight.copy_((torch.randn(shape, generator=gen) * 0.5 + 1.0).to(like))
                    m.bias.copy_((torch.randn(shape, generator=gen) * 0.5).to(like))
    return model


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return (a(x) - b(x)).abs().max().item()


def merge_error(subnet: nn.Module, input_size: tuple[int, int, int], dtype: torch.dtype,
                batch: int = 2, seed: int = 0) -> float:
    """Max abs output difference, merged vs subnet, in ``dtype`` with random BN stats."""
    sub = randomize_bn_stats(copy.deepcopy(subnet).to(dtype), seed).eval()
    merged = merge_model(sub)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_size, generator=gen).to(dtype)
    return max_abs_diff(sub, merged, x)
