"""MACs and parameter counts, from torch's own FLOP counter (matmuls, convs, attention)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from updp.core.errors import UpdpError


class CostError(UpdpError):
    """A module whose forward pass cannot be costed."""


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad`` off for the duration, then as they were.

    The FLOP counter's module tracker hooks every input that requires grad; a
    view of a parameter made under ``no_grad`` (timm's attention-pool latent
    query) requires grad yet has no grad_fn, which makes that hook fail.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2; elementwise ops not counted)."""
    try:
        with torch.no_grad(), _frozen(module), FlopCounterMode(display=False) as counter:
            module(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure of a forward pass under the counter
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        shape = "x".join(map(str, inputs[0].shape)) if inputs else "no"
        raise CostError(f"cannot count the MACs of {type(module).__name__} on a {shape} input "
                        f"({type(e).__name__}: {detail}); updp cannot cost this model, "
                        "so it does not support it") from e
    return int(counter.get_total_flops() // 2)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
