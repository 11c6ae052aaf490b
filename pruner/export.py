"""``updp merge``: merge a plan, check it, write the checkpoint, ONNX and merge.json."""
from __future__ import annotations

import copy
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from updp.core.errors import PlanError, UpdpError
from updp.core.fileio import write_json
from updp.core.onnx_export import ExportError, check_onnx, export_onnx
from updp.core.plan import PruningPlan
from updp.pruner.checkpoint import (
    Checkpoint,
    is_updp_checkpoint,
    load_checkpoint,
    load_state,
    raw_state_dict,
    read_file,
    save_checkpoint,
)
from updp.pruner.cost import count_macs, count_params
from updp.pruner.discovery import Discovery, find_blocks
from updp.pruner.merge import merge_model
from updp.pruner.models import create_model, default_input_size
from updp.pruner.plan import apply_plan
from updp.pruner.verify import merge_error


@dataclass
class LoadedModel:
    model: nn.Module
    plan: PruningPlan  # the blocks a pruned checkpoint has pruned already (empty otherwise)
    num_classes: int

    @property
    def name(self) -> str:
        return self.plan.model


def load_model(spec: str, checkpoint: str | None = None, num_classes: int | None = None) -> LoadedModel:
    """A timm name or an updp checkpoint file, with optional weights from ``checkpoint``.

    With a ``checkpoint`` and no ``num_classes``, the class count is read from
    the checkpoint's classifier, so a fine-tuned state_dict loads as is.
    """
    if os.path.isfile(spec):
        ckpt = load_checkpoint(spec)
        if ckpt.form == "merged":
            raise UpdpError(f"'{spec}' is a merged model with no prunable blocks left; "
                            "use the original or pruned checkpoint it came from")
        return LoadedModel(ckpt.model, ckpt.plan, ckpt.num_classes)
    if not checkpoint:
        model = create_model(spec, num_classes)
        return LoadedModel(model, PruningPlan(spec), model.num_classes)
    data = read_file(checkpoint)
    if is_updp_checkpoint(data) and data["form"] != "original":
        raise UpdpError(f"'{checkpoint}' holds a {data['form']} model; pass it as MODEL instead of --checkpoint"
                        if data["form"] == "pruned" else
                        f"'{checkpoint}' is a merged model with no prunable blocks left")
    state = raw_state_dict(data)
    model = create_model(spec, num_classes or _classes_in(spec, state))
    load_state(model, state, checkpoint)
    return LoadedModel(model, PruningPlan(spec), model.num_classes)


def _classes_in(spec: str, state: dict) -> int | None:
    """Number of classes of the classifier weights in ``state``, if they are there."""
    head = (create_model(spec).pretrained_cfg or {}).get("classifier")
    weight = state.get(f"{head}.weight") if isinstance(head, str) else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def validate_plan(discovery: Discovery, pruned: Iterable[str], allow_costlier: bool = False) -> None:
    """Every named block exists, is supported and (unless allowed) gets cheaper."""
    if not pruned:
        raise PlanError("the plan is empty: name at least one block (see 'updp blocks MODEL')")
    by_name = {b.name: b for b in discovery.blocks}
    for name in pruned:
        spec = by_name.get(name)
        if spec is None:
            close = ", ".join(list(by_name)[:6])
            raise PlanError(f"block '{name}' is not a block of a supported family; blocks: {close}, ...")
        if not spec.supported:
            raise PlanError(f"block '{name}' cannot be pruned exactly: {spec.reason}")
        if not spec.worthwhile and not allow_costlier:
            raise PlanError(f"block '{name}' ({spec.family}) merges into a costlier form "
                            f"({spec.merged_macs:,} vs {spec.macs:,} MACs); drop it or pass --allow-costlier")


def _merge_errors(subnet: nn.Module, input_size: tuple[int, int, int]) -> dict:
    out = {}
    for tag, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        err = merge_error(subnet, input_size, dtype)
        out[f"max_abs_diff_{tag}"], out[f"output_scale_{tag}"] = err.max_abs_diff, err.output_scale
    return out


def _export(merged: nn.Module, input_size: tuple[int, int, int], own_size: tuple[int, int, int], path: Path) -> None:
    try:
        export_onnx(merged, (1, *input_size), path)
    except ExportError as e:
        if tuple(input_size) == tuple(own_size):
            raise
        # ViTs resample their position embeddings (bicubic, antialiased) off their own size.
        raise ExportError(f"{e}; at the model's own input size {'x'.join(map(str, own_size))} it may export: "
                          "omit --img-size") from e


def check_out_dir(out: Path) -> None:
    """Fail before any work where ``out`` cannot be a directory (it or a parent is a file)."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise UpdpError(f"--out '{out}': '{path}' is an existing file, not a directory; "
                                "pass a directory path (it is created if missing)")
            return


@contextmanager
def staged_outputs(out: Path) -> Iterator[Path]:
    """A scratch folder inside ``out`` whose files move into ``out`` only if the block succeeds.

    On failure the scratch folder goes, and so do ``out`` and any parents this
    call created: all outputs or none.
    """
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".merge-", dir=out))
    except OSError as e:
        raise UpdpError(f"cannot create --out '{out}' ({e.strerror}); pass a writable directory") from None
    try:
        yield stage
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for path in created:  # innermost first; empty unless the files moved in
            with suppress(OSError):
                path.rmdir()


def merge_and_export(spec: str, pruned: Iterable[str], out_dir: str | os.PathLike, checkpoint: str | None = None,
                     img_size: int | None = None, allow_costlier: bool = False,
                     num_classes: int | None = None) -> dict:
    """Merge ``pruned`` blocks of a model and write ``merged.pt``, ``merged.onnx`` and ``merge.json``.

    Everything is computed and checked before the three files appear in
    ``out_dir`` together; a failure leaves ``out_dir`` as it was.
    """
    out = Path(out_dir)
    check_out_dir(out)
    loaded = load_model(spec, checkpoint, num_classes)
    plan = loaded.plan.with_blocks(pruned)
    # A pruned checkpoint's own model has its blocks wrapped: cost the plain architecture.
    original = (create_model(loaded.name, loaded.num_classes) if loaded.plan else loaded.model).eval()
    input_size = default_input_size(original, img_size)
    validate_plan(find_blocks(original, input_size), plan, allow_costlier)
    subnet = apply_plan(copy.deepcopy(loaded.model), plan, lam=0.0).eval()
    merged = merge_model(subnet)
    x = torch.randn(1, *input_size)
    with staged_outputs(out) as stage:
        _export(merged, input_size, default_input_size(original), stage / "merged.onnx")  # fails fastest
        report = {
            "model": loaded.name, "pruned": plan.to_str(), "n_pruned": len(plan), "input_size": list(input_size),
            "params_before": count_params(original), "params_after": count_params(merged),
            "macs_before": count_macs(original, x), "macs_after": count_macs(merged, x),
            **_merge_errors(subnet, input_size),
            "onnx_max_abs_diff": check_onnx(stage / "merged.onnx", merged, x),
            "context": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                        "device": "cpu", "diff_inputs": "random normal, batch 2, BN statistics randomized"},
        }
        save_checkpoint(stage / "merged.pt", Checkpoint(merged, plan, loaded.num_classes, "merged",
                                                        {"input_size": list(input_size)}))
        write_json(stage / "merge.json", report)
    return report
