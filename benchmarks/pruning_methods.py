"""The alternatives ``compare_depth_pruning.py`` holds updp against, built from the same baseline.

- Block dropping: residual blocks replaced by identity, those a simple importance score ranks lowest
  first. The score is block influence, 1 - cos(block input, block output) per position, averaged over
  calibration images (the score ShortGPT uses to drop layers).
- Channel pruning: Torch-Pruning's structural pruning with its own group magnitude (L2) importance, one
  ratio for every layer, the classifier kept; ViT attention keeps its head count and prunes head dims.
- A random plan with a given number of pruned blocks, under the search space's per-stage cap.
- Latency matching: candidates of one method timed in one interleaved ONNX Runtime pass with the model
  they must match; the nearest is taken.
"""
from __future__ import annotations

import copy
import random
import warnings

import torch
from torch import nn

from updp.latency.base import MeasureConfig
from updp.latency.interleave import measure_interleaved, relative_to
from updp.pruner import PruningPlan
from updp.search.space import SearchSpace


def _module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


@torch.no_grad()
def block_influence(model: nn.Module, names: list[str], batches) -> dict[str, float]:
    """1 - mean cosine similarity of each named block's input and output (over channels, per position).

    Only blocks whose output has the input's shape are scored (the ones identity can replace).
    """
    seen: dict[str, list[float]] = {n: [] for n in names}
    hooks = []
    for name in names:
        def hook(_m, args, out, name=name):
            x = args[0]
            if x.shape != out.shape:
                seen[name].append(float("nan"))
                return
            dim = 1 if x.dim() == 4 else -1  # NCHW conv features, or (B, tokens, C)
            seen[name].append(1.0 - torch.cosine_similarity(x.float(), out.float(), dim=dim).mean().item())
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        model.eval()
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: sum(v) / len(v) for n, v in seen.items() if v and v[0] == v[0]}


def droppable(model: nn.Module, names: list[str], batches) -> list[str]:
    """Blocks identity can replace (same input and output shape, a residual path), least influential first."""
    scores = block_influence(model, names, batches[:1])
    residual = [n for n in scores if getattr(model.get_submodule(n), "has_skip", True)]
    full = block_influence(model, residual, batches)
    return sorted(full, key=full.get)


def drop_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``model`` with the named blocks replaced by identity."""
    out = copy.deepcopy(model)
    for name in names:
        parent, leaf = _module(out, name)
        setattr(parent, leaf, nn.Identity())
    return out


def prune_channels(model: nn.Module, ratio: float, input_size: tuple[int, int, int]) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of every layer's channels removed by Torch-Pruning (L2 magnitude).

    ``ratio`` 0 returns an unchanged copy.
    """
    import torch_pruning as tp

    out = copy.deepcopy(model).eval()
    if ratio <= 0:
        return out
    heads = {m.qkv: m.num_heads for m in out.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
    with warnings.catch_warnings():  # layer scales, cls token, position embedding: the last dim is the channel
        warnings.filterwarnings("ignore", "Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(out, torch.zeros(1, *input_size),
                                      importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                      ignored_layers=[out.get_classifier()], num_heads=heads,
                                      round_to=8 if heads else None)
    pruner.step()
    for m in out.modules():  # timm's attention reshapes by its own head sizes: follow the pruned qkv
        if not (hasattr(m, "qkv") and hasattr(m, "num_heads")):
            continue
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim
    return out


def random_plan(space: SearchSpace, n: int, seed: int) -> PruningPlan:
    """A plan of ``n`` pruned blocks drawn uniformly among those within the per-stage cap."""
    rng = random.Random(seed)
    stage = {b.name: b.stage for b in space.candidates}
    for _ in range(10_000):
        chosen = rng.sample(space.names, n)
        if all(sum(stage[c] == s for c in chosen) <= space.cap(s) for s in {stage[c] for c in chosen}):
            return space.plan(chosen)
    raise ValueError(f"no plan of {n} blocks fits the per-stage cap")


def nearest_latency(reference: nn.Module, candidates: dict, mc: MeasureConfig, rounds: int = 10) -> tuple:
    """(key, candidate ms / reference ms, {key: ratio}) of the candidate timed nearest to ``reference``.

    Every candidate and the reference in one interleaved ONNX Runtime pass; ratios are per-round ratios
    of medians (drift cancels). Candidates that fail to time are left out.
    """
    keys = list(candidates)
    results = measure_interleaved("onnxruntime", [reference, *candidates.values()], mc, rounds=rounds)
    ref = results[0]
    if not ref.ok:
        raise RuntimeError(f"the reference model failed to time: {ref.error}")
    ratios = {key: relative_to(r, ref) for key, r in zip(keys, results[1:]) if r.ok}
    best = min(ratios, key=lambda k: abs(ratios[k] - 1.0))
    return best, ratios[best], ratios
