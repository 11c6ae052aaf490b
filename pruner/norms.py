"""BatchNorm variants the merge meets: which fold, their normalization alone, their plain forms.

``convert_sync_batchnorm`` (timm's or torch's) and timm's ``freeze_batch_norm_2d``
swap a model's BatchNorms for variants with the same eval-mode normalization:
``SyncBatchNorm``, timm's ``SyncBatchNormAct``, ``FrozenBatchNorm2d`` and
``FrozenBatchNormAct2d``. timm's ``*Act`` layers (``BatchNormAct2d`` too) apply
an activation and a drop layer after the normalization; a pruned block runs
their normalization alone (``norm_only``), which is what the merge folds.
``plain_batchnorm`` turns the variants back into ``BatchNorm2d`` /
``BatchNormAct2d``. Any other BatchNorm subclass may compute something else in
its forward, so it is refused by name instead of being folded as a plain BN.
"""
from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from updp.core.errors import UpdpError


class NormError(UpdpError):
    """A normalization layer that the merge cannot fold exactly."""


_SYNC = {nn.SyncBatchNorm: nn.BatchNorm2d, SyncBatchNormAct: BatchNormAct2d}
_FROZEN = {FrozenBatchNorm2d: nn.BatchNorm2d, FrozenBatchNormAct2d: BatchNormAct2d}
# Exact classes, each with the forward of its normalization alone (the *Act ones skip their act and drop).
_NORM_FORWARD = {
    nn.BatchNorm2d: nn.BatchNorm2d.forward, BatchNormAct2d: nn.BatchNorm2d.forward,
    nn.SyncBatchNorm: nn.SyncBatchNorm.forward, SyncBatchNormAct: nn.SyncBatchNorm.forward,
    FrozenBatchNorm2d: FrozenBatchNorm2d.forward, FrozenBatchNormAct2d: FrozenBatchNorm2d.forward,
}
_FOLDABLE: set[type] = {*_NORM_FORWARD, nn.BatchNorm1d}


def foldable_type(cls: type) -> type:
    """Class decorator: an updp BatchNorm subclass whose statistics fold as its base's (``TokenBatchNorm``)."""
    _FOLDABLE.add(cls)
    return cls


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm of any kind: torch's (and subclasses) or a frozen one with its statistics as buffers."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, FrozenBatchNormAct2d))


def unfoldable_reason(norm: nn.Module | None, conv_norm: bool = False) -> str | None:
    """Why ``norm`` cannot be folded into the layer next to it, or None.

    Args:
        norm: the normalization layer.
        conv_norm: it follows a conv, so only the 2d BatchNorm variants qualify.
    """
    name = type(norm).__name__
    if type(norm) not in (_NORM_FORWARD if conv_norm else _FOLDABLE):
        if is_batchnorm(norm) and type(norm) not in _FOLDABLE:
            return (f"{name} is a BatchNorm subclass updp does not know (its forward may differ from BatchNorm's); "
                    "convert it to torch's BatchNorm2d or timm's BatchNormAct2d before pruning and merging")
        return f"{name} is not a BatchNorm{'2d' if conv_norm else ''} with running statistics, so it cannot be folded"
    if getattr(norm, "running_var", None) is None:
        return f"{name} has no running statistics (track_running_stats=False), so it cannot be folded"
    return None


def require_foldable(norm: nn.Module) -> nn.Module:
    """``norm`` itself, or a ``NormError`` saying why the merge cannot fold it."""
    reason = unfoldable_reason(norm)
    if reason:
        raise NormError(reason)
    return norm


def norm_only(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The normalization of a 2d BatchNorm variant alone: without the act and drop of timm's ``*Act`` layers."""
    forward = _NORM_FORWARD.get(type(bn))
    if forward is None:
        raise NormError(unfoldable_reason(bn, conv_norm=True))
    return forward(bn, x)


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every Sync and Frozen BatchNorm variant in ``module`` by its plain form, in place.

    The reverse of ``convert_sync_batchnorm`` and ``freeze_batch_norm_2d``: ``SyncBatchNorm`` and the
    frozen ``FrozenBatchNorm2d`` become ``BatchNorm2d``, ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d``
    become ``BatchNormAct2d`` with the same act and drop layers. Statistics and eps are kept; a sync
    layer hands over its own parameters (``requires_grad`` included), a frozen one's become trainable.

    Returns:
        ``module``, or its replacement where ``module`` is a variant itself.
    """
    cls = type(module)
    if cls in _SYNC:
        return _from_sync(module, _SYNC[cls])
    if cls in _FROZEN:
        return _from_frozen(module, _FROZEN[cls])
    for name, child in module.named_children():
        plain = plain_batchnorm(child)
        if plain is not child:
            module.add_module(name, plain)
    return module


def _with_act(plain: nn.Module, variant: nn.Module) -> nn.Module:
    if isinstance(plain, BatchNormAct2d):
        plain.act = getattr(variant, "act", nn.Identity())
        plain.drop = getattr(variant, "drop", nn.Identity())
    return plain.train(variant.training)


def _from_sync(bn: nn.SyncBatchNorm, cls: type) -> nn.Module:
    plain = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(plain, attr, getattr(bn, attr))
    return _with_act(plain, bn)


def _from_frozen(bn: nn.Module, cls: type) -> nn.Module:
    ref = bn.weight
    plain = cls(ref.shape[0], eps=bn.eps, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(plain, attr).copy_(getattr(bn, attr))
    return _with_act(plain, bn)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``BatchNorm2d`` -> ``SyncBatchNorm`` and ``BatchNormAct2d`` -> ``SyncBatchNormAct``, in place, for
    training over several processes (``plain_batchnorm`` reverts it).

    Only those exact classes: timm's ``convert_sync_batchnorm`` would also turn updp's
    ``TokenBatchNorm`` (a ``BatchNorm1d`` over the token tensor's last dim) into a SyncBatchNorm
    that normalizes the wrong dim. Parameters are handed over, so an optimizer built on them holds.
    """
    from timm.layers import convert_sync_batchnorm

    if type(module) in (nn.BatchNorm2d, BatchNormAct2d):
        return convert_sync_batchnorm(module)
    for name, child in module.named_children():
        synced = sync_batchnorm(child)
        if synced is not child:
            module.add_module(name, synced)
    return module
