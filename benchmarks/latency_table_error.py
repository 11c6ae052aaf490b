"""Error of the per-block latency table against measurement on random plans.

For each model: baseline + every worthwhile block merged alone, then 30 random
plans measured and predicted (baseline minus the sum of single-block savings).
ONNX Runtime on CPU, batch 1, 224 px, fp32. Run: python benchmarks/latency_table_error.py
"""
from __future__ import annotations

import pandas as pd
from tqdm import tqdm

from common import RESULTS, write_results
from updp.latency.base import MeasureConfig
from updp.latency.table import build_table, calibrate, error_summary, random_plans
from updp.plan_latency import PlanTimer
from updp.pruner import create_model, default_input_size, find_blocks

MODELS = ("convnext_tiny", "mobilenetv2_100")
PLANS = 30


def main() -> None:
    cfg = MeasureConfig(min_runs=50, min_time_s=1.0, threads=2)
    rows, details = [], []
    for model in MODELS:
        base = create_model(model)
        blocks = [b.name for b in find_blocks(base, default_input_size(base)).worthwhile]
        timer = PlanTimer(model, "onnxruntime", cfg, cache=None)
        table = build_table(timer.measure, blocks, progress=lambda it: tqdm(it, desc=f"{model} table"))
        df = calibrate(table, timer.measure, random_plans(blocks, PLANS, seed=0),
                       progress=lambda it: tqdm(it, desc=f"{model} plans"))
        details.append(df.assign(model=model))
        rows.append({"model": model, "blocks": len(blocks), "baseline_ms": table.baseline_ms,
                     **error_summary(df), "mean_pruned": df["n_pruned"].mean()})
    pd.concat(details).to_csv(RESULTS / "latency_table_error_plans.csv", index=False)
    write_results("latency_table_error", pd.DataFrame(rows), "Per-block latency table vs measurement",
                  f"{PLANS} random plans per model (each worthwhile block pruned with probability 1/2, seed 0); "
                  "ONNX Runtime CPU, batch 1, 3x224x224, fp32, 2 threads, each figure the median of >= 50 runs "
                  "and >= 1 s. APE = |predicted - measured| / measured. Per-plan rows: "
                  "latency_table_error_plans.csv.")


if __name__ == "__main__":
    main()
