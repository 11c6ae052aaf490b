"""Shared test helpers."""
from __future__ import annotations

import torch
from torch import nn


def randomize_layer_scale(model: nn.Module, seed: int = 1) -> nn.Module:
    """ConvNeXt gamma / ViT LayerScale start near 1e-6, which would hide MLP-fold bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.5)
    return model
