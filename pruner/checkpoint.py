"""updp checkpoints: weights plus what is needed to rebuild the module tree.

A checkpoint is a dict saved with ``torch.save`` (loadable with
``weights_only=True``)::

    {"updp_checkpoint": 1, "model": "convnext_atto", "num_classes": 10,
     "pruned": ["stages.2.blocks.1", ...], "form": "original" | "pruned" | "merged",
     "state_dict": {...}, "meta": {...}}

``load_checkpoint`` rebuilds the timm model, applies the plan (pruned form)
and merges it (merged form) before loading the weights, so a merged checkpoint
loads back into a model built from its plan. A merged checkpoint whose blocks
took other merged forms than their family's default names them in
``meta["merge_forms"]`` (block -> form).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from updp.core.errors import CheckpointError
from updp.core.fileio import atomic_path
from updp.core.plan import PruningPlan
from updp.pruner.models import create_model
from updp.pruner.plan import progressive_blocks

FORMS = ("original", "pruned", "merged")


@dataclass
class Checkpoint:
    model: nn.Module
    plan: PruningPlan  # its model name is the timm architecture to rebuild
    num_classes: int
    form: str = "original"
    meta: dict = field(default_factory=dict)
    lambdas: dict[str, float] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.plan.model


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write atomically: an interrupted save leaves the previous file intact."""
    if ckpt.form not in FORMS:
        raise CheckpointError(f"unknown checkpoint form '{ckpt.form}'")
    state = {
        "updp_checkpoint": 1, "model": ckpt.model_name, "num_classes": ckpt.num_classes,
        "pruned": list(ckpt.plan.names), "form": ckpt.form, "meta": ckpt.meta,
        "lambdas": {n: b.lam for n, b in progressive_blocks(ckpt.model).items()},
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_file(path: str | os.PathLike) -> dict:
    """``torch.load`` a weights file safely, turning corruption into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"checkpoint '{path}' is corrupted or not a torch weights file ({detail})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(data).__name__}, not a dict of weights")
    return data


def is_updp_checkpoint(data: dict) -> bool:
    return data.get("updp_checkpoint") == 1


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Rebuild the model a ``save_checkpoint`` file describes and load its weights."""
    from updp.pruner.merge import merge_model
    from updp.pruner.plan import apply_plan, set_lambda

    data = read_file(path)
    if not is_updp_checkpoint(data):
        raise CheckpointError(f"'{path}' is not an updp checkpoint; pass it with --checkpoint next to a model name")
    if data.get("form") not in FORMS or not isinstance(data.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint '{path}' is damaged: unknown form or no state_dict")
    model = create_model(data["model"], data["num_classes"])
    pruned = data.get("pruned", [])
    if not isinstance(pruned, list) or not all(isinstance(n, str) for n in pruned):
        raise CheckpointError(f"checkpoint '{path}' is damaged: 'pruned' is not a list of block names")
    plan = PruningPlan(data["model"], pruned)
    lambdas = {n: float(v) for n, v in data.get("lambdas", {}).items()}
    if data["form"] != "original":
        apply_plan(model, plan, lam=0.0)
    if data["form"] == "merged":
        forms = data.get("meta", {}).get("merge_forms") or {}
        if not isinstance(forms, dict) or not all(isinstance(v, str) for v in forms.values()):
            raise CheckpointError(f"checkpoint '{path}' is damaged: 'merge_forms' is not a map of block to form")
        model = merge_model(model, forms=forms)
    else:
        set_lambda(model, {n: lambdas.get(n, 0.0) for n in plan})
    load_state(model, data["state_dict"], str(path))
    return Checkpoint(model.eval(), plan, data["num_classes"], data["form"],
                      data.get("meta", {}), lambdas)


def raw_state_dict(data: dict) -> dict:
    """The weights inside a plain, timm-style or updp weights file."""
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(data.get(key), dict):
            return data[key]
    return data


def load_state(model: nn.Module, state: dict, source: str) -> None:
    """Load weights strictly; a mismatch says which keys and shapes differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"checkpoint '{source}' does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state)
