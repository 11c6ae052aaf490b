"""Latency predictors against held-out measurements: the additive per-block table vs the fitted model.

Per model, two interleaved ONNX Runtime passes on the CPU (batch 1, 224 px,
fp32, 2 threads, 20 rounds):

1. fit pass: the baseline, every worthwhile block merged alone and
   ``--fit`` random plans of evenly spread sizes. The table uses the single
   blocks (``1 - sum of savings``); the fitted model (``latency/predictor.py``:
   per-group counts, their squares and adjacent-group products, ridge) uses
   the single blocks and the random plans.
2. held-out pass, separate in time: the baseline and ``--held-out`` other
   random plans. Both predictors are judged there only: APE =
   |predicted ratio - measured ratio| / measured ratio, each ratio to its own
   pass's baseline.

Writes results/latency_predictor.{csv,md} and results/latency_predictor_plans.csv.
Run: python benchmarks/latency_predictor.py [--models convnext_tiny mobilenetv2_100 deit_tiny_patch16_224]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
from common import RESULTS, write_results

from updp.latency.base import MeasureConfig
from updp.latency.predictor import evaluate, fit, sized_plans
from updp.latency.table import LatencyTable, ratio
from updp.pruner import PruningPlan, create_model, default_input_size, find_blocks
from updp.search.timing import PlanTimer, block_groups


def ratios(timer: PlanTimer, model: str, plans: list[PruningPlan]) -> tuple[float, list[float | None]]:
    base, *results = timer.measure_many([PruningPlan(model), *plans])
    return base.median_ms, [ratio(r, base) if r.ok else None for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["convnext_tiny", "mobilenetv2_100", "deit_tiny_patch16_224"])
    ap.add_argument("--fit", type=int, default=20, help="random plans measured for the fit (besides single blocks)")
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), torch or tensorrt")
    ap.add_argument("--device", help="cuda: the onnxruntime/torch backend on the GPU")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--name", default="latency_predictor", help="results/NAME.{csv,md}")
    args = ap.parse_args()
    cfg = MeasureConfig(min_runs=100, threads=2, batch_size=args.batch_size)
    options = {"device": args.device} if args.device else {}
    rows, details = [], []
    for model in args.models:
        base = create_model(model)
        specs = find_blocks(base, default_input_size(base)).worthwhile
        blocks = [s.name for s in specs]
        groups = block_groups(specs)
        timer = PlanTimer(model, args.backend, cfg, cache=None, **options)
        singles = [PruningPlan(model, {b}) for b in blocks]
        fit_plans = sized_plans(model, blocks, args.fit, seed=1)
        held = [p for p in sized_plans(model, blocks, args.held_out + len(fit_plans), seed=2)
                if p not in fit_plans and len(p) > 1][:args.held_out]
        t0 = time.perf_counter()
        base_ms, fit_ratios = ratios(timer, model, singles + fit_plans)
        fit_s = time.perf_counter() - t0
        single_ratios = fit_ratios[:len(singles)]
        table = LatencyTable(base_ms, {b: 1 - r for b, r in zip(blocks, single_ratios) if r is not None})
        fitted = fit(model, groups, singles + fit_plans, fit_ratios, base_ms)
        t0 = time.perf_counter()
        _, held_ratios = ratios(timer, model, held)
        held_s = time.perf_counter() - t0
        for name, predictor, n_fit, secs in (("table", table.predicted_ratio, len(singles), None),
                                              ("fitted", fitted.predicted_ratio, len(singles) + len(fit_plans),
                                               fit_s)):
            summary = evaluate(predictor, held, held_ratios)
            rows.append({"model": model, "predictor": name, "blocks": len(blocks),
                         "groups": len(set(groups.values())), "baseline_ms": base_ms, "plans_fit": n_fit,
                         "plans_held_out": summary["plans"], "median_ape_pct": summary["median_ape_pct"],
                         "p95_ape_pct": summary["p95_ape_pct"], "max_ape_pct": summary["max_ape_pct"],
                         "fit_pass_s": secs if name == "fitted" else None, "held_out_pass_s": held_s,
                         "alpha": fitted.alpha if name == "fitted" else None})
        details += [{"model": model, "pruned": p.to_str(), "n_pruned": len(p), "measured_ratio": r,
                     "table_ratio": table.predicted_ratio(p), "fitted_ratio": fitted.predicted_ratio(p)}
                    for p, r in zip(held, held_ratios)]
        print(rows[-2], rows[-1], sep="\n", flush=True)
    pd.DataFrame(details).to_csv(RESULTS / f"{args.name}_plans.csv", index=False)
    where = f"{args.backend} on {args.device or 'the CPU'}, batch {args.batch_size}"
    write_results(args.name, pd.DataFrame(rows),
                  "Latency predictors on held-out measured plans: additive table vs fitted model",
                  f"{where}, 3x224x224, fp32, 2 threads; every figure a ratio to the baseline timed "
                  "in the same interleaved pass (20 rounds x 5 runs per variant). Fit pass: baseline, every "
                  f"worthwhile block alone, {args.fit} random plans of evenly spread sizes (seed 1); the table uses "
                  "the single blocks only. Held-out pass (separate, later): baseline and "
                  f"{args.held_out} other random plans of 2+ blocks (seed 2). APE = |predicted - measured| / measured "
                  "ratio on the held-out plans only. fit_pass_s: seconds of the fit pass (export + timing). Per-plan "
                  "rows: {args.name}_plans.csv.\n\nCommand: python benchmarks/latency_predictor.py "
                  f"--models {' '.join(args.models)} --fit {args.fit} --held-out {args.held_out} --backend "
                  f"{args.backend} --batch-size {args.batch_size}{' --device ' + args.device if args.device else ''}")


if __name__ == "__main__":
    main()
