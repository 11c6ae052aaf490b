"""Model-level merging: fold every pruned block (at lambda 0) into its merged form."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from updp.core.errors import PlanError
from updp.pruner.norms import NormError, plain_batchnorm
from updp.pruner.plan import apply_plan, progressive_blocks
from updp.pruner.registry import family_for


def merge_model(model: nn.Module, plan: Iterable[str] | None = None,
                forms: Mapping[str, str] | None = None) -> nn.Module:
    """A new model, in eval mode, with every pruned block merged.

    The copy's Sync and Frozen BatchNorms are made plain first (``plain_batchnorm``), so the pruned
    forms and the folds see the same layers and the result loads into a model built from the plan.

    Args:
        model: a model whose pruned blocks are progressive blocks at lambda 0
            (as trained), or an original model.
        plan: block names to prune first where ``model`` still has them in
            their original form (fresh BNs; mostly for timing and tests).
        forms: the merged form of each block (see ``BlockFamily.forms``); a block not named takes its
            family's default. Every form computes the same function; they differ in speed on a target.
    """
    forms = dict(forms or {})
    merged = plain_batchnorm(copy.deepcopy(model))
    if plan is not None:
        missing = [n for n in plan if n not in progressive_blocks(merged)]
        apply_plan(merged, missing, lam=0.0)
    merged.eval()
    with torch.no_grad():
        for name, pblock in progressive_blocks(merged).items():
            if pblock.lam != 0.0:
                raise PlanError(f"block '{name}' is at lambda {pblock.lam:.3g}; merging is exact only at lambda 0")
            try:
                block = family_for(pblock.block).merge(pblock, forms.get(name))
            except NormError as e:
                raise NormError(f"block '{name}': {e}") from None
            merged.set_submodule(name, block.eval())
    return merged
