"""The merge planner on this machine's targets: per family, the chosen merged form vs the fixed (default) one.

For each model and target (ONNX Runtime CPU and torch eager CPU, batch 1, 224 px, fp32):

1. the planner's pass (``search/forms.py``): one interleaved pass times the baseline and, per group of
   identical blocks and per form, the model with the whole group merged in that form. Per group: each
   form's latency ratio to the baseline, the form chosen, and the speedup of the chosen form over the
   family's default form (ratio of the two ratios, same pass). A group no form makes faster is "not worth
   pruning on this target".
2. a whole-model check, in a second interleaved pass: the baseline, every worthwhile block (fewer MACs in
   the default form) merged in its family's default form (the fixed form: what a search did before the
   planner), and every block the planner kept merged in its chosen form. The planner's candidates are all
   supported blocks (ResNet's BasicBlocks are supported but not worthwhile by MACs).

Writes results/merge_forms.{csv,md} (per group) and results/merge_forms_models.csv (whole models).
Run: python benchmarks/merge_forms.py [--models convnext_tiny mobilenetv2_100 resnet18] [--targets onnxruntime torch]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
from common import RESULTS, write_results

from updp.latency.base import MeasureConfig
from updp.latency.table import ratio
from updp.pruner import PruningPlan, find_blocks, merge_model
from updp.search.forms import plan_forms
from updp.search.timing import PlanTimer

ROUNDS = 20


def bench(model: str, target: str, threads: int, device: str | None = None,
          img_size: int = 224) -> tuple[list[dict], dict]:
    cfg = MeasureConfig(min_runs=60, threads=threads)
    timer = PlanTimer(model, target, cfg, img_size=img_size, **({"device": device} if device else {}))
    found = find_blocks(timer.base, tuple(timer.cfg.input_shape))
    specs = found.prunable  # the planner's candidates: every supported block, as in a search
    t0 = time.perf_counter()
    plan = plan_forms(timer, specs, ROUNDS)
    planner_s = time.perf_counter() - t0
    rows = []
    for name, g in plan.groups.items():
        default = g["ratios"].get(g["default"])
        best = min(g["ratios"], key=g["ratios"].get) if g["ratios"] else None
        worthwhile = sum(s.worthwhile for s in specs if s.name in g["blocks"])
        rows.append({"model": model, "target": target, "family": g["family"], "group": name,
                     "worthwhile_by_macs": f"{worthwhile}/{len(g['blocks'])}",
                     "blocks": len(g["blocks"]), "default_form": g["default"],
                     **{f"ratio_{f}": r for f, r in g["ratios"].items()},
                     "chosen": g["chosen"] or "not worth pruning", "best_form": best,
                     "speedup_chosen_vs_default": default / g["ratios"][best] if best and default else None})
    every = PruningPlan(model, frozenset(s.name for s in found.worthwhile))
    kept = PruningPlan(model, frozenset(plan.forms))
    base, fixed, chosen = timer.measure_models(
        [timer.base, merge_model(timer.base, every), merge_model(timer.base, kept, plan.forms)], ROUNDS)
    whole = {"model": model, "target": target, "baseline_ms": base.median_ms, "worthwhile_blocks": len(every),
             "fixed_form_speedup": 1 / ratio(fixed, base), "kept_blocks": len(kept),
             "planner_speedup": 1 / ratio(chosen, base), "dropped": ", ".join(plan.dropped) or "-",
             "planner_s": planner_s, "variants_timed": 1 + sum(len(g["ratios"]) for g in plan.groups.values())}
    return rows, whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["convnext_tiny", "mobilenetv2_100", "resnet18"])
    ap.add_argument("--targets", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", help="cuda: the onnxruntime/torch targets on the GPU")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--name", default="merge_forms", help="results/NAME.{csv,md}")
    args = ap.parse_args()
    groups, models = [], []
    for model in args.models:
        for target in args.targets:
            rows, whole = bench(model, target, args.threads, args.device, args.img_size)
            groups += rows
            models.append(whole)
            print(whole, flush=True)
    pd.DataFrame(models).to_csv(RESULTS / f"{args.name}_models.csv", index=False)
    whole_md = pd.DataFrame(models).to_markdown(index=False, floatfmt=".4g")
    notes = (f"Batch 1, 3x{args.img_size}x{args.img_size}, fp32, {args.threads} threads, {args.device or 'CPU'}; "
             f"each pass interleaved in {ROUNDS} rounds. "
             "Per group of identical blocks (stage, family, shape): each form's latency ratio to the baseline with "
             "the whole group merged in it, the form the planner chose (lowest ratio; 'not worth pruning' when no "
             "ratio is below 1) and its speedup over the family's default form (ratio_default / ratio_best, same "
             "pass). Whole models (second pass): every worthwhile block merged in the default form (fixed) vs the "
             f"blocks the planner kept, each in its chosen form:\n\n{whole_md}\n\nPer group:")
    notes += f"\n\nCommand: python benchmarks/merge_forms.py --models {' '.join(args.models)} --targets " \
             f"{' '.join(args.targets)} --img-size {args.img_size}{' --device ' + args.device if args.device else ''}"
    write_results(args.name, pd.DataFrame(groups), "Merge planner: chosen vs fixed merged form, per family and "
                  "target", notes)


if __name__ == "__main__":
    main()
