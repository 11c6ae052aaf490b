"""Error of the per-block latency table against measurement on random plans.

For each model: baseline + every worthwhile block merged alone, then 30 random
plans measured and predicted (baseline minus the sum of single-block savings).
ONNX Runtime on CPU, batch 1, 224 px, fp32. Run: python benchmarks/latency_table_error.py
"""
from __future__ import annotations

import pandas as pd
from common import RESULTS, write_results

from updp.latency.base import MeasureConfig
from updp.latency.table import build_table, calibrate, error_summary, random_plans
from updp.pruner import create_model, default_input_size, find_blocks
from updp.search.timing import PlanTimer

MODELS = ("convnext_tiny", "mobilenetv2_100")
PLANS = 30


def main() -> None:
    cfg = MeasureConfig(min_runs=100, threads=2)
    rows, details = [], []
    for model in MODELS:
        base = create_model(model)
        blocks = [b.name for b in find_blocks(base, default_input_size(base)).worthwhile]
        timer = PlanTimer(model, "onnxruntime", cfg, cache=None)
        table = build_table(timer.measure_many, model, blocks)
        df = calibrate(table, timer.measure_many, random_plans(model, blocks, PLANS, seed=0))
        details.append(df.assign(model=model))
        rows.append({"model": model, "blocks": len(blocks), "baseline_ms": table.baseline_ms,
                     **error_summary(df), "mean_pruned": df["n_pruned"].mean()})
    pd.concat(details).to_csv(RESULTS / "latency_table_error_plans.csv", index=False)
    write_results("latency_table_error", pd.DataFrame(rows), "Per-block latency table vs measurement",
                  f"{PLANS} random plans per model (each worthwhile block pruned with probability 1/2, seed 0); "
                  "ONNX Runtime CPU, batch 1, 3x224x224, fp32, 2 threads. Table and calibration plans are each "
                  "timed in one interleaved pass with the baseline (20 rounds x 5 runs per variant); latencies "
                  "are ratios to that pass's baseline (median of per-round ratios). "
                  "APE = |predicted - measured| / measured. Per-plan rows: "
                  "latency_table_error_plans.csv.")


if __name__ == "__main__":
    main()
