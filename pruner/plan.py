"""Applying a pruning plan: wrap blocks in their progressive forms, set lambda."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from updp.core.errors import PlanError
from updp.pruner.progressive import ProgressiveBlock
from updp.pruner.registry import family_for, supported_classes


def parse_plan(text: str) -> list[str]:
    """A plan from the CLI: a JSON file holding a list of names, or ``a,b,c``."""
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise PlanError(f"plan file '{text}' does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file '{text}' is not valid JSON: {e}") from None
        data = data.get("pruned", data) if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise PlanError(f"plan file '{text}' must hold a JSON list of block names")
        return data
    return [n.strip() for n in text.split(",") if n.strip()]


def apply_plan(model: nn.Module, pruned: Iterable[str], lam: float = 1.0) -> nn.Module:
    """Replace each named block of ``model`` (in place) by its progressive form at ``lam``.

    Blocks that are progressive already keep their lambda.
    """
    modules = dict(model.named_modules())
    for name in pruned:
        block = modules.get(name)
        if block is None:
            raise PlanError(f"block '{name}' is not in the model; list them with 'updp blocks MODEL'")
        if isinstance(block, ProgressiveBlock):
            continue  # already pruned: keep its (trained) lambda
        family = family_for(block)
        if family is None:
            raise PlanError(f"block '{name}' is a {type(block).__name__}, which no family supports; "
                            f"supported: {', '.join(supported_classes())}")
        reason = family.check(block)
        if reason:
            raise PlanError(f"block '{name}' cannot be pruned exactly: {reason}")
        pblock = family.progressive(block)
        pblock.lam = lam
        pblock.train(block.training)
        model.set_submodule(name, pblock)
    return model


def progressive_blocks(model: nn.Module) -> dict[str, ProgressiveBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ProgressiveBlock)}


def set_lambda(model: nn.Module, lam: float | Mapping[str, float]) -> None:
    """Set every progressive block's lambda: one value, or one per block name."""
    for name, block in progressive_blocks(model).items():
        block.lam = float(lam[name] if isinstance(lam, Mapping) else lam)
