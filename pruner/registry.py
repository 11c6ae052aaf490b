"""Registry of block families: a decorator maps timm block classes to an adapter.

Adding a family is one new file in ``pruner/families`` and one
``@register_family`` line; see ``BlockFamily`` for the contract.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from updp.pruner.families.base import BlockFamily

_FAMILIES: dict[type, "BlockFamily"] = {}


def register_family(*block_classes: type):
    """Class decorator: register one adapter instance for each timm block class."""

    def wrap(cls):
        adapter = cls()
        for block_cls in block_classes:
            _FAMILIES[block_cls] = adapter
        return cls

    return wrap


def family_for(module: "nn.Module") -> "BlockFamily | None":
    """The adapter registered for this module's exact class, or None."""
    _load_builtin_families()
    return _FAMILIES.get(type(module))


def supported_classes() -> list[str]:
    _load_builtin_families()
    return sorted({f"{qualified_name(c)} ({a.name})" for c, a in _FAMILIES.items()})


def qualified_name(cls: type) -> str:
    """``resnet.BasicBlock``: timm reuses class names across model files."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _load_builtin_families() -> None:
    # Importing the package runs each family's decorator once.
    import updp.pruner.families  # noqa: F401
