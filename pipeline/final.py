"""The final stage after progressive training: ``updp train`` and the end of ``updp run``.

BN statistics re-estimated, merge, merged == subnet checked on real
validation images, export (torch + ONNX), baseline vs merged latency timed in
one interleaved pass, and a final report section.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from updp.core.fileio import write_json
from updp.core.onnx_export import check_onnx, export_onnx
from updp.latency.base import MeasureConfig
from updp.latency.interleave import measure_interleaved
from updp.latency.table import ratio
from updp.pipeline.config import RunConfig
from updp.pruner import Checkpoint, PruningPlan, merge_model, save_checkpoint
from updp.pruner.cost import count_macs, count_params
from updp.train.bn import recalibrate_bn
from updp.train.data import Splits, fixed_batches
from updp.train.loop import evaluate
from updp.train.runtime import CPU, Runtime


@torch.no_grad()
def _max_logit_diff(a: nn.Module, b: nn.Module, batches) -> float:
    return max((a(x) - b(x)).abs().max().item() for x, _ in batches)


def _top1(model: nn.Module, batches, rt: Runtime) -> float:
    """Top-1 of a copy of ``model`` on the training device (the model itself stays on the CPU)."""
    return evaluate(rt.prepare(copy.deepcopy(model)), batches, rt)["top1"]


def finalize(baseline: nn.Module, student: nn.Module, plan: PruningPlan, splits: Splits, cfg: RunConfig,
             out_dir: Path, backend: str, num_classes: int, latency_img_size: int, rt: Runtime = CPU,
             forms: dict[str, str] | None = None) -> dict:
    """BN re-estimation, merge, verification on real images, export, latency, final.json.

    ``forms`` is the merge planner's choice (block -> merged form); blocks it does not name take their
    family's default form. The forms of the plan's blocks are recorded in final.json and merged.pt.

    BN statistics are re-estimated on the training device; the merge, its check and the export
    run in fp32 on the CPU, whatever the training ran on.
    """
    recalibrate_bn(rt.prepare(student), fixed_batches(splits.train_eval, 1024, cfg.search.seed), rt)
    student = student.cpu().float().eval()
    baseline = baseline.cpu().float().eval()
    forms = {b: f for b, f in (forms or {}).items() if b in plan}
    merged = merge_model(student, forms=forms)
    val = fixed_batches(splits.val, len(splits.val))
    diff = _max_logit_diff(merged, student, val)
    shape = (3, cfg.data.img_size, cfg.data.img_size)
    save_checkpoint(out_dir / "pruned.pt", Checkpoint(student, plan, num_classes, "pruned"))
    save_checkpoint(out_dir / "merged.pt", Checkpoint(merged, plan, num_classes, "merged",
                                                      {"input_size": list(shape), "merge_forms": forms}))
    onnx = export_onnx(merged, (1, *shape), out_dir / "merged.onnx")
    onnx_diff = check_onnx(onnx, merged, val[0][0][:1])  # a real validation image
    latency = (_imported_latency(plan, cfg, latency_img_size) if backend == "trtexec"
               else _latency(baseline, merged, cfg, backend, latency_img_size))
    x1 = torch.zeros(1, *shape)
    result = {
        "model": cfg.model, "pruned": plan.to_str(), "n_pruned": len(plan), "merge_forms": forms,
        "baseline_top1": _top1(baseline, val, rt), "subnet_top1": _top1(student, val, rt),
        "merged_top1": _top1(merged, val, rt), "val_images": len(splits.val),
        "max_abs_logit_diff_merged_vs_subnet": diff, "onnx_max_abs_diff": onnx_diff,
        "params_baseline": count_params(baseline), "params_merged": count_params(merged),
        "macs_baseline": count_macs(baseline.eval(), x1), "macs_merged": count_macs(merged, x1),
        "macs_input": "x".join(map(str, (1, *shape))), "training_device": str(rt.device), "amp": rt.amp,
        "world_size": rt.world_size, **latency}
    write_json(out_dir / "final.json", result)
    return result


def _latency(baseline: nn.Module, merged: nn.Module, cfg: RunConfig, backend: str, size: int) -> dict:
    lc = cfg.latency
    mc = MeasureConfig(batch_size=lc.batch_size, input_shape=(3, size, size), precision=lc.precision,
                       min_runs=max(lc.runs, 100), threads=lc.threads)
    base, mine = measure_interleaved(backend, [baseline.eval(), merged], mc, rounds=20)
    if not (base.ok and mine.ok):
        return {"latency_error": base.error or mine.error}
    return {"latency_backend": base.backend, "latency_device": base.context.get("device"),
            "latency_input": f"{lc.batch_size}x3x{size}x{size}", "latency_precision": lc.precision,
            "latency_baseline_ms": base.median_ms, "latency_merged_ms": mine.median_ms,
            "speedup": 1.0 / ratio(mine, base), "latency_runs": mine.count}


def _imported_latency(plan: PruningPlan, cfg: RunConfig, size: int) -> dict:
    """Baseline and final plan as trtexec timed them on the target (``--backend trtexec``): nothing is timed here."""
    from updp.latency.cache import LatencyCache
    from updp.search.remote import ImportedTimer

    lc = cfg.latency
    mc = MeasureConfig(batch_size=lc.batch_size, input_shape=(3, size, size), precision=lc.precision)
    timer = ImportedTimer(cfg.model, mc, LatencyCache(lc.cache), lc.device)
    base, mine = timer.lookup(PruningPlan(cfg.model)), timer.lookup(plan)
    if base is None or mine is None:
        return {"latency_error": f"no trtexec figure of the final plan on '{lc.device}' yet: time merged.onnx there "
                                 f"(exported at batch 1; 'updp latency export {cfg.model} --plans FILE' writes one at "
                                 f"{lc.batch_size}x3x{size}x{size}) and import it with 'updp latency import'"}
    return {"latency_backend": "trtexec (imported)", "latency_device": lc.device,
            "latency_input": f"{lc.batch_size}x3x{size}x{size}", "latency_precision": lc.precision,
            "latency_baseline_ms": base.median_ms, "latency_merged_ms": mine.median_ms,
            "speedup": base.median_ms / mine.median_ms, "latency_runs": mine.count}


def _plan_text(result: dict) -> str:
    pruned = result["pruned"]  # a list in final.json files of release 0.1.0
    if isinstance(pruned, list):
        return ", ".join(PruningPlan(result["model"], pruned))
    plan = PruningPlan.from_str(result["model"], pruned)
    return ", ".join(plan)


def final_section(result: dict) -> str:
    """The Markdown section added to the run's report."""
    if "latency_error" in result:
        lat = f"| latency | could not be measured: {result['latency_error']} | |"
    else:
        lat = (f"| latency ({result['latency_backend']}, {result['latency_input']}, {result['latency_precision']}, "
               f"median) | {result['latency_baseline_ms']:.4g} ms | {result['latency_merged_ms']:.4g} ms "
               f"(speedup {result['speedup']:.3f}x) |")
    return "\n".join([
        "", "## Final model (progressive training, merged)", "",
        f"Pruned blocks ({result['n_pruned']}): {_plan_text(result)}", "",
        *([f"Merged forms (timed on the target): {', '.join(f'{b} {f}' for b, f in result['merge_forms'].items())}",
           ""] if result.get("merge_forms") else []),
        "| | baseline | pruned + merged |", "|---|---|---|",
        f"| top-1 on val ({result['val_images']} images) | {result['baseline_top1']:.2f} % | "
        f"{result['merged_top1']:.2f} % |",
        f"| params | {result['params_baseline']:,} | {result['params_merged']:,} |",
        f"| MACs (input {result.get('macs_input', '')}) | {result['macs_baseline']:,} | {result['macs_merged']:,} |",
        lat, "",
        f"Merged vs trained subnet on real validation images: max abs logit difference "
        f"{result['max_abs_logit_diff_merged_vs_subnet']:.3g}; "
        f"ONNX Runtime vs torch {result['onnx_max_abs_diff']:.3g}.",
        "Files: merged.pt, merged.onnx, pruned.pt, final.json, train_metrics.csv.", ""])


def append_final_section(run_dir: Path, result: dict) -> None:
    from updp.core.fileio import write_text

    report = run_dir / "report.md"
    text = report.read_text() if report.is_file() else f"# updp run: {result['model']}\n"
    marker = "\n## Final model"
    text = text.split(marker)[0].rstrip("\n") + "\n" + final_section(result)
    write_text(report, text)
