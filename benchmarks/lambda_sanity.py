"""Lambda-schedule sanity: the same plan trained with progressive fading vs pruned from step 0.

Same baseline, plan, budget (epochs), seed and data; only the lambda schedule
differs. Run after benchmarks/sampler_comparison.py (it reuses that run's baseline):
    python benchmarks/lambda_sanity.py
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import pandas as pd
from common import write_results

from updp.core.config import from_dict
from updp.pipeline.config import RunConfig
from updp.pipeline.final import train_plan
from updp.pruner import create_model
from updp.pruner.checkpoint import load_state, raw_state_dict, read_file
from updp.search.scoring import recalibrate_bn
from updp.train.data import fixed_batches, load_splits
from updp.train.loop import evaluate

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
PLAN = ["stages.0.blocks.1", "stages.1.blocks.1", "stages.2.blocks.1", "stages.2.blocks.3", "stages.2.blocks.5",
        "stages.3.blocks.1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--baseline", default="runs/bench_search_quality/baseline.pt")
    ap.add_argument("--epochs", type=float, default=3)
    args = ap.parse_args()
    splits = load_splits(args.data, 32)
    baseline = create_model("convnext_atto", len(splits.classes))
    load_state(baseline, raw_state_dict(read_file(args.baseline)), args.baseline)
    val = fixed_batches(splits.val, len(splits.val))
    cfg = from_dict(RunConfig, {"model": "convnext_atto", "data": {"root": args.data},
                                "train": {"epochs": args.epochs, "lr": 1e-3}})
    rows = [{"schedule": "baseline (unpruned)", "val_top1": evaluate(baseline, val)["top1"]}]
    for name, frac in (("progressive: lambda 1 -> 0 over 60 % of training", 0.6), ("pruned at step 0", 0.0)):
        run = Path("runs/bench_lambda") / f"frac{frac}"
        run.mkdir(parents=True, exist_ok=True)
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lambda_end_frac=frac))
        student = train_plan(copy.deepcopy(baseline), PLAN, splits, c, run, desc=f"lambda_end {frac}")
        recalibrate_bn(student, fixed_batches(splits.train_eval, 1024))
        rows.append({"schedule": name, "val_top1": evaluate(student, val)["top1"]})
    write_results("lambda_sanity", pd.DataFrame(rows), "Lambda-schedule sanity (convnext_atto, CIFAR-10 subset)",
                  f"Plan: {', '.join(PLAN)} (6 of 12 blocks). Both runs: {args.epochs} epochs, AdamW lr 1e-3 cosine, "
                  "batch 64, seed 0, KD alpha 0.5 T 2 from the same baseline; top-1 on the 1,000 val images "
                  "after BN re-estimation.")


if __name__ == "__main__":
    main()
