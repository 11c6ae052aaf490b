"""Block discovery: the model's prunable blocks in forward order, with their costs."""
from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from updp.pruner.cost import count_macs, count_params
from updp.pruner.models import InputSizeError, default_input_size
from updp.pruner.registry import family_for, qualified_name
from updp.pruner.spec import BlockSpec


@dataclass(frozen=True)
class Discovery:
    """What ``find_blocks`` saw: supported blocks, and the rest by class name."""

    blocks: list[BlockSpec]
    input_size: tuple[int, int, int]
    other_block_classes: dict[str, int]

    @property
    def prunable(self) -> list[BlockSpec]:
        return [b for b in self.blocks if b.supported]

    @property
    def worthwhile(self) -> list[BlockSpec]:
        return [b for b in self.blocks if b.worthwhile]


def stage_and_index(name: str) -> tuple[int, int]:
    """Stage from the module path: ``stages.2.blocks.3`` -> (2, 3), ``layer3.1`` -> (2, 1)."""
    layer = re.search(r"layer(\d+)\.(\d+)$", name)
    if layer:
        return int(layer.group(1)) - 1, int(layer.group(2))
    nums = [int(p) for p in name.split(".") if p.isdigit()]
    if len(nums) >= 2:
        return nums[0], nums[-1]
    return 0, nums[-1] if nums else 0


def _record_inputs(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Each registered block's input, in the order the forward pass reaches them."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if family_for(module) is not None:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, args[0].detach().clone())))
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.randn(1, *input_size, dtype=param.dtype, device=param.device))
    except Exception as e:  # noqa: BLE001 - a model rejects a size it cannot take in many ways
        raise _size_error(model, input_size, e) from e
    finally:
        for h in hooks:
            h.remove()
    return seen


def _size_error(model: nn.Module, input_size: tuple[int, int, int], e: Exception) -> InputSizeError:
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    own = "x".join(map(str, default_input_size(model)))
    return InputSizeError(f"the model cannot take a {'x'.join(map(str, input_size))} input, too small or not "
                          f"a size it accepts ({type(e).__name__}: {detail}); pass another --img-size, "
                          f"or omit it to use the model's own input size {own}")


def _merged_cost(block: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    family = family_for(block)
    pblock = family.progressive(copy.deepcopy(block)).eval()
    pblock.lam = 0.0
    merged = family.merge(pblock)
    return count_macs(merged, x), count_params(merged)


def _spec(name: str, block: nn.Module, x: torch.Tensor, costed: bool) -> BlockSpec:
    family = family_for(block)
    reason = family.check(block)
    in_chs, out_chs, stride = family.channels(block)
    stage, index = stage_and_index(name)
    spec = BlockSpec(name, stage, index, family.name, type(block).__name__, in_chs, out_chs, stride, reason=reason)
    if not costed:
        return spec
    merged_macs, merged_params = _merged_cost(block, x) if reason is None else (0, 0)
    return dataclasses.replace(spec, macs=count_macs(block, x), params=count_params(block),
                               merged_macs=merged_macs, merged_params=merged_params)


def _is_container(module: nn.Module) -> bool:
    """A Sequential/ModuleList/ModuleDict, or a module whose children share one class (RegNet's b1, b2, ...)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return True
    return len({type(c) for c in module.children()}) == 1


def _other_block_classes(model: nn.Module) -> dict[str, int]:
    """Classes of the blocks no family handles: non-container elements of containers.

    An element holding a registered block or another such element is a stage,
    not a block (a ConvNeXt stage wraps its blocks).
    """
    candidates = [child for module in model.modules() if _is_container(module) for child in module.children()
                  if family_for(child) is None and not _is_container(child) and len(list(child.children())) >= 2]
    ids = {id(c) for c in candidates}

    def holds_block(m: nn.Module) -> bool:
        return any(id(d) in ids or family_for(d) is not None for d in list(m.modules())[1:])

    return dict(Counter(qualified_name(type(c)) for c in candidates if not holds_block(c)))


def find_blocks(model: nn.Module, input_size: tuple[int, int, int], costed: bool = True) -> Discovery:
    """Every block of a registered family, in forward order, costed at ``input_size``.

    With ``costed=False`` MACs and params are left at 0 (fast: one forward pass).
    """
    was_training = model.training
    model.eval()
    try:
        inputs = _record_inputs(model, input_size)
        modules = dict(model.named_modules())
        specs = [_spec(name, modules[name], x, costed) for name, x in inputs.items()]
    finally:
        model.train(was_training)
    return Discovery(specs, tuple(input_size), _other_block_classes(model))
