"""Progressive training of a plan and the final merge: ``updp train`` and the last stages of ``updp run``.

The student starts as the baseline; each pruned block fades from its
original form (lambda 1) to its pruned form (lambda 0) on the schedule, the
baseline distilling it; then lambda stays 0 while the pruned form converges.
Afterwards: BN statistics re-estimated, merge, merged == subnet checked on
real validation images, export (torch + ONNX), baseline vs merged latency
timed in one interleaved pass, and a final report section.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from updp.data import Splits, fixed_batches
from updp.fileio import write_json
from updp.latency.base import MeasureConfig
from updp.latency.interleave import measure_interleaved
from updp.latency.table import ratio
from updp.onnx_export import export_onnx, run_onnx
from updp.pruner import Checkpoint, LambdaSchedule, apply_plan, merge_model, save_checkpoint, set_lambda
from updp.pruner.cost import count_macs, count_params
from updp.search.config import RunConfig, TrainPlanConfig
from updp.search.scoring import recalibrate_bn
from updp.training import TrainConfig, Trainer, evaluate, kd_loss


def schedule_for(tc: TrainPlanConfig, plan: list[str], total_steps: int) -> LambdaSchedule:
    end = int(tc.lambda_end_frac * total_steps)
    spacing = int(tc.stagger_frac * total_steps)
    if spacing:
        return LambdaSchedule.staggered(plan, 0, max(1, end - spacing * (len(plan) - 1)), spacing, tc.schedule)
    return LambdaSchedule(0, end, tc.schedule)


def train_plan(baseline: nn.Module, plan: list[str], splits: Splits, cfg: RunConfig, out_dir: Path,
               desc: str = "progressive") -> nn.Module:
    """Train the pruned subnet from the baseline with lambda fading and distillation; resumable."""
    tc = cfg.train
    teacher = copy.deepcopy(baseline).eval().requires_grad_(False)
    student = apply_plan(copy.deepcopy(baseline), plan, lam=1.0)
    trainer_cfg = TrainConfig(epochs=tc.epochs, batch_size=cfg.data.batch_size, lr=tc.lr, seed=cfg.search.seed)
    state = {"lam": 1.0}
    trainer = Trainer(student, trainer_cfg, splits.train, None, out_dir / "train.pt",
                      val_batches=fixed_batches(splits.val, 1000, cfg.search.seed), metrics_csv=out_dir / "train_metrics.csv",
                      desc=desc, extra_state=lambda: {"lambda": state["lam"]})
    schedule = schedule_for(tc, plan, trainer.total_steps)

    def step(x, y, i):
        lams = schedule.lambdas(i, plan)
        set_lambda(student, lams)
        state["lam"] = sum(lams.values()) / max(1, len(lams))
        with torch.no_grad():
            target = teacher(x)
        loss = kd_loss(student(x), target, y, tc.kd_alpha, tc.kd_temperature, 0.1)
        loss.backward()
        return {"loss": loss.item(), "lam": state["lam"]}

    trainer.step_fn = step
    trainer.fit()
    set_lambda(student, 0.0)
    return student


@torch.no_grad()
def _max_logit_diff(a: nn.Module, b: nn.Module, batches) -> float:
    return max((a(x) - b(x)).abs().max().item() for x, _ in batches)


def finalize(baseline: nn.Module, student: nn.Module, plan: list[str], splits: Splits, cfg: RunConfig,
             out_dir: Path, backend: str, num_classes: int) -> dict:
    """BN re-estimation, merge, verification on real images, export, latency, final.json."""
    recalibrate_bn(student, fixed_batches(splits.train_eval, 1024, cfg.search.seed))
    student.eval()
    merged = merge_model(student)
    val = fixed_batches(splits.val, len(splits.val))
    diff = _max_logit_diff(merged, student, val)
    shape = (3, cfg.data.img_size, cfg.data.img_size)
    save_checkpoint(out_dir / "pruned.pt", Checkpoint(student, cfg.model, num_classes, plan, "pruned"))
    save_checkpoint(out_dir / "merged.pt", Checkpoint(merged, cfg.model, num_classes, plan, "merged",
                                                      {"input_size": list(shape)}))
    onnx = export_onnx(merged, (1, *shape), out_dir / "merged.onnx")
    x = val[0][0][:1]
    onnx_diff = float(np.abs(run_onnx(onnx, x.numpy()) - merged(x).detach().numpy()).max())
    latency = _latency(baseline, merged, cfg, backend)
    x1 = torch.zeros(1, *shape)
    result = {
        "model": cfg.model, "pruned": plan, "n_pruned": len(plan),
        "baseline_top1": evaluate(baseline, val)["top1"], "subnet_top1": evaluate(student, val)["top1"],
        "merged_top1": evaluate(merged, val)["top1"], "val_images": len(splits.val),
        "max_abs_logit_diff_merged_vs_subnet": diff, "onnx_max_abs_diff": onnx_diff,
        "params_baseline": count_params(baseline), "params_merged": count_params(merged),
        "macs_baseline": count_macs(baseline.eval(), x1), "macs_merged": count_macs(merged, x1),
        "macs_input": "x".join(map(str, (1, *shape))), **latency}
    write_json(out_dir / "final.json", result)
    return result


def _latency(baseline: nn.Module, merged: nn.Module, cfg: RunConfig, backend: str) -> dict:
    lc = cfg.latency
    size = lc.img_size or cfg.data.img_size
    mc = MeasureConfig(batch_size=lc.batch_size, input_shape=(3, size, size), precision=lc.precision,
                       min_runs=max(lc.runs, 100), threads=lc.threads)
    base, mine = measure_interleaved(backend, [baseline.eval(), merged], mc, rounds=20)
    if not (base.ok and mine.ok):
        return {"latency_error": base.error or mine.error}
    return {"latency_backend": base.backend, "latency_device": base.context.get("device"),
            "latency_input": f"{lc.batch_size}x3x{size}x{size}", "latency_precision": lc.precision,
            "latency_baseline_ms": base.median_ms, "latency_merged_ms": mine.median_ms,
            "speedup": 1.0 / ratio(mine, base), "latency_runs": mine.count}


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
        f"Pruned blocks ({result['n_pruned']}): {', '.join(result['pruned'])}", "",
        "| | baseline | pruned + merged |", "|---|---|---|",
        f"| top-1 on val ({result['val_images']} images) | {result['baseline_top1']:.2f} % | "
        f"{result['merged_top1']:.2f} % |",
        f"| params | {result['params_baseline']:,} | {result['params_merged']:,} |",
        f"| MACs (input {result.get('macs_input', '')}) | {result['macs_baseline']:,} | {result['macs_merged']:,} |",
        lat, "",
        f"Merged vs trained subnet on real validation images: max abs logit difference "
        f"{result['max_abs_logit_diff_merged_vs_subnet']:.3g}; ONNX Runtime vs torch {result['onnx_max_abs_diff']:.3g}.",
        "Files: merged.pt, merged.onnx, pruned.pt, final.json, train_metrics.csv.", ""])


def append_final_section(run_dir: Path, result: dict) -> None:
    from updp.fileio import write_text

    report = run_dir / "report.md"
    text = report.read_text() if report.is_file() else f"# updp run: {result['model']}\n"
    marker = "\n## Final model"
    text = text.split(marker)[0].rstrip("\n") + "\n" + final_section(result)
    write_text(report, text)
