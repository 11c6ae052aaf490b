"""Creating timm models by name, offline (weights come from local files only)."""
from __future__ import annotations

import difflib

import timm
from torch import nn

from updp.core.errors import UnknownModelError, UpdpError


class InputSizeError(UpdpError):
    """An input size that is not positive, or that the model cannot take."""


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A timm model with random weights; unknown names get close suggestions."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UnknownModelError(f"unknown model '{name}' (not a timm model name nor a checkpoint file){hint}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=False, **kwargs)


def default_input_size(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` from the model's pretrained config, or a square ``img_size``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, w = cfg.get("input_size", (3, 224, 224))
    if img_size is None:
        return chans, h, w
    if img_size < 1:
        raise InputSizeError(f"--img-size must be a positive number of pixels, got {img_size}; "
                             f"omit it to use the model's own input size {chans}x{h}x{w}")
    return chans, img_size, img_size
