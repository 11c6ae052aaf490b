"""The contract every block family adapter fulfils."""
from __future__ import annotations

import abc

from torch import nn

from updp.core.errors import UpdpError
from updp.pruner.norms import unfoldable_reason
from updp.pruner.progressive import ProgressiveBlock


class BlockFamily(abc.ABC):
    """Adapter for one family of timm blocks (see ``register_family``).

    ``check`` says why an instance cannot be pruned exactly (or None);
    ``progressive`` wraps a block into its progressive form, sharing its
    weights; ``merge`` folds a progressive block at lambda 0 into the smaller
    module that computes the same function in eval mode. A family with more
    than one exact merged form lists them in ``forms`` (the first is the
    default); which one is fastest depends on the target, so the merge
    planner (``updp.search.forms``) times them there.
    """

    name: str = ""
    forms: tuple[str, ...] = ("merged",)

    def form(self, form: str | None) -> str:
        """``form``, or the default one when None.

        Raises:
            UpdpError: the family has no such form.
        """
        if form is None:
            return self.forms[0]
        if form not in self.forms:
            raise UpdpError(f"{self.name} blocks have no merged form '{form}'; they have {', '.join(self.forms)}")
        return form

    @abc.abstractmethod
    def check(self, block: nn.Module) -> str | None:
        """Why this block instance cannot be pruned exactly, or None."""

    @abc.abstractmethod
    def channels(self, block: nn.Module) -> tuple[int, int, int]:
        """``(in_chs, out_chs, stride)`` of the block."""

    @abc.abstractmethod
    def progressive(self, block: nn.Module) -> ProgressiveBlock:
        """The block's progressive form (lambda 1 = the block itself)."""

    @abc.abstractmethod
    def merge(self, pblock: ProgressiveBlock, form: str | None = None) -> nn.Module:
        """The merged module (of ``form``, default the first of ``forms``) equal to ``pblock`` at lambda 0 in eval
        mode."""


def is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def foldable_norm(norm: nn.Module | None) -> str | None:
    """Why a norm after a conv cannot be folded into it, or None.

    A BatchNorm2d with running statistics can, as can its timm ``*Act``, Sync and Frozen variants
    (see ``norms``); an unknown BatchNorm subclass cannot.
    """
    return unfoldable_reason(norm, conv_norm=True)


def act_of(module: nn.Module) -> nn.Module:
    """The activation inside a timm ``BatchNormAct2d`` or its Sync/Frozen variant (Identity when none)."""
    return getattr(module, "act", nn.Identity())


def static_padding(conv: nn.Module) -> str | None:
    """Why a conv's padding cannot be moved to the chain input, or None."""
    if not isinstance(conv, nn.Conv2d):
        return (f"{type(conv).__name__} is not a single Conv2d (e.g. MixNet's mixed kernel sizes); "
                "only plain Conv2d layers can be composed")
    if type(conv) is not nn.Conv2d:
        return (f"{type(conv).__name__} is a Conv2d variant (TF 'same' padding or weight standardization) "
                "whose output is not its plain convolution")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "conv padding is not static zero padding"
    if conv.dilation != (1, 1):
        return "dilated convolutions are not supported"
    k, p, s = conv.kernel_size, conv.padding, conv.stride
    if k[0] != k[1] or p[0] != p[1] or s[0] != s[1]:
        return "non-square kernel, padding or stride"
    return None
