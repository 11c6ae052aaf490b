"""Original vs merged: params, MACs, CPU latency (torch eager and ONNX Runtime), batch 1.

Three blocks pruned per model; both models timed in one run, interleaved in
rounds so machine drift hits both alike. Run: python benchmarks/merge_latency.py
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import pandas as pd
import torch
from common import write_results

from updp.core.onnx_export import export_onnx
from updp.pruner import create_model, merge_model
from updp.pruner.cost import count_macs, count_params

PLANS = {"convnext_tiny": ["stages.2.blocks.1", "stages.2.blocks.4", "stages.2.blocks.7"],
         "mobilenetv2_100": ["blocks.2.1", "blocks.3.1", "blocks.3.2"]}
RUNS, ROUNDS, WARMUP = 40, 5, 20  # 200 timed runs per model and backend


def _runners(model: torch.nn.Module, onnx_path: Path, x: torch.Tensor) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}

    def torch_once():
        with torch.no_grad():
            model(x)

    return {"torch": torch_once, "onnxruntime": lambda: sess.run(None, feed)}


def _time(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench(name: str, plan: list[str], tmp: Path) -> list[dict]:
    original = create_model(name).eval()
    merged = merge_model(original, plan)
    x = torch.randn(1, 3, 224, 224)
    variants = {"original": original, "merged": merged}
    runners = {v: _runners(m, export_onnx(m, tuple(x.shape), tmp / f"{name}_{v}.onnx"), x) for v, m in variants.items()}
    times = {(v, b): [] for v in variants for b in ("torch", "onnxruntime")}
    for (v, b) in times:
        _time(runners[v][b], WARMUP)
    for _ in range(ROUNDS):
        for (v, b) in times:
            times[(v, b)] += _time(runners[v][b], RUNS)
    rows = []
    for v, m in variants.items():
        row = {"model": name, "variant": v, "pruned": len(plan) if v == "merged" else 0,
               "params_M": count_params(m) / 1e6, "GMACs": count_macs(m, x) / 1e9}
        for b in ("torch", "onnxruntime"):
            row[f"{b}_median_ms"] = statistics.median(times[(v, b)])
            row[f"{b}_runs"] = len(times[(v, b)])
        rows.append(row)
    for b in ("torch", "onnxruntime"):
        rows[1][f"{b}_speedup"] = rows[0][f"{b}_median_ms"] / rows[1][f"{b}_median_ms"]
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for name, plan in PLANS.items() for r in bench(name, plan, Path(tmp))]
    notes = ("Batch 1, 3x224x224, float32, CPU. Plans: " +
             "; ".join(f"{k}: {', '.join(v)}" for k, v in PLANS.items()) +
             f". Median of {RUNS * ROUNDS} runs per cell after {WARMUP} warm-up runs, interleaved in {ROUNDS} rounds.")
    write_results("merge_latency", pd.DataFrame(rows), "Original vs merged: params, MACs, CPU latency", notes)


if __name__ == "__main__":
    main()
