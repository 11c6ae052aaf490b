"""Exactness checks: merged vs the lambda-0 subnet, with randomized BN statistics."""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from updp.pruner.merge import merge_model
from updp.pruner.norms import is_batchnorm


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine params (in place): default statistics hide folding bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m):  # Frozen BNs too: their defaults would hide a fold that ignores them
                shape, like = m.running_mean.shape, m.running_mean
                m.running_mean.copy_((torch.randn(shape, generator=gen) * 0.5).to(like))
                m.running_var.copy_((torch.rand(shape, generator=gen) * 1.5 + 0.5).to(like))
                if m.weight is not None:
                    m.weight.copy_((torch.randn(shape, generator=gen) * 0.5 + 1.0).to(like))
                    m.bias.copy_((torch.randn(shape, generator=gen) * 0.5).to(like))
    return model


class MergeError(NamedTuple):
    max_abs_diff: float
    output_scale: float  # max abs output of the subnet on the same inputs

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.output_scale, 1e-30)


@torch.no_grad()
def merge_error(subnet: nn.Module, input_size: tuple[int, int, int], dtype: torch.dtype,
                batch: int = 2, seed: int = 0) -> MergeError:
    """Merged vs subnet outputs in ``dtype``, with random BN statistics and random inputs."""
    sub = randomize_bn_stats(copy.deepcopy(subnet).to(dtype), seed).eval()
    merged = merge_model(sub)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_size, generator=gen).to(dtype)
    want = sub(x)
    return MergeError((merged(x) - want).abs().max().item(), want.abs().max().item())
