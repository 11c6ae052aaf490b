"""MACs and parameter counts, from torch's own FLOP counter (matmuls, convs, attention)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2; elementwise ops not counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops() // 2)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
