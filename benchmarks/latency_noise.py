"""Run-to-run noise of the CPU backends: coefficient of variation of the median over repeats.

Each repeat is one full measurement (>= 50 runs and >= 1 s after warm-up) of
the unpruned model, batch 1, 224 px, fp32. Run: python benchmarks/latency_noise.py
"""
from __future__ import annotations

import statistics

import pandas as pd
from common import write_results

from updp.latency.base import MeasureConfig
from updp.search.timing import PlanTimer

MODELS = ("convnext_atto", "mobilenetv2_100")
BACKENDS = ("onnxruntime", "torch")
REPEATS = 5


def main() -> None:
    cfg = MeasureConfig(min_runs=50, min_time_s=1.0, threads=2)
    rows = []
    for model in MODELS:
        for backend in BACKENDS:
            timer = PlanTimer(model, backend, cfg, cache=None)
            medians = []
            for _ in range(REPEATS):
                r = timer.measure()
                assert r.ok, r.error
                medians.append(r.median_ms)
            mean = statistics.fmean(medians)
            rows.append({"model": model, "backend": backend, "repeats": REPEATS,
                         "median_of_medians_ms": statistics.median(medians), "min_ms": min(medians),
                         "max_ms": max(medians), "cv_pct": 100 * statistics.stdev(medians) / mean,
                         "runs_per_repeat": r.count})
    write_results("latency_noise", pd.DataFrame(rows), "Run-to-run noise of the CPU latency backends",
                  f"Batch 1, 3x224x224, fp32, 2 threads; {REPEATS} repeats of one measurement "
                  "(>= 50 runs and >= 1 s after >= 10 runs / 200 ms of warm-up); cv = stdev/mean of the medians.")


if __name__ == "__main__":
    main()
