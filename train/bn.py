"""BN statistics re-estimated for a changed network (a plan's subnet, a merged model)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from updp.train.runtime import CPU, Runtime

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_bn(model: nn.Module, batches: Batches, rt: Runtime = CPU) -> None:
    """Re-estimate BN running statistics as a plain average over ``batches`` (torch's ``update_bn``).

    The forward passes run under ``rt``'s autocast; the statistics are accumulated in fp32
    (the BN buffers' dtype). The model's train/eval mode is kept.
    """
    with rt.autocast():
        update_bn(batches, model, device=rt.device)
