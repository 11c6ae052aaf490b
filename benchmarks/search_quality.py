"""What the search-quality benchmarks share, and their combined table.

``prepare``: a baseline the pipeline trains (by default on the shipped demo data,
data/cifar10_demo.npz: 2,500 train / 500 val CIFAR-10 images, 32 px), the latency
table and the supernet (the stages `updp search` runs), then every plan of the
space scored with the supernet and priced by the table: the true Pareto front
under this proxy. Cached in the run directory. Cost: ~0.15 s per plan on a 2-core
CPU (4,096 plans: ~10 minutes; 16,384: ~40).

``sampler_comparison.py`` (samplers vs that front) and ``ranking_fidelity.py``
(supernet score vs trained accuracy) build on it. Run as a script, this rebuilds
results/search_quality.{csv,md} from the sampler comparisons in results/.
"""
from __future__ import annotations

import copy
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from common import combine_results
from tqdm import tqdm

from updp.core.config import from_dict
from updp.pipeline import rundir
from updp.pipeline import search as runner
from updp.pipeline.config import RunConfig
from updp.pruner import PruningPlan
from updp.search.report import pareto_front
from updp.search.scoring import resident, score_plan
from updp.train.data import fixed_batches
from updp.train.loop import evaluate

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "cifar10_demo.npz"


def hypervolume(points: pd.DataFrame, ref_score: float, ref_latency: float) -> float:
    """2-D hypervolume of (score up, latency down) points against a reference point."""
    front = pareto_front(points.assign(state="COMPLETE"))
    area, prev_latency = 0.0, ref_latency
    for row in front.sort_values("latency_ms", ascending=False).itertuples():
        area += (prev_latency - row.latency_ms) * max(0.0, row.score - ref_score)
        prev_latency = row.latency_ms
    return area


@dataclass
class Setup:
    """What every search-quality benchmark shares: one trained baseline and supernet, one latency proxy, and the
    score and predicted latency of every plan of the space."""

    cfg: RunConfig
    inp: object
    timer: object
    table: object
    baseline: torch.nn.Module
    baseline_top1: float
    supernet: object
    calib: list
    held: list
    exhaustive: pd.DataFrame
    supernet_s: float = 0.0  # seconds its training took
    table_mtime: float = 0.0  # when the exhaustive table was written


def prepare(data: str, run: str, pool: int | None = None, model: str = "convnext_atto", keep: list[str] = (),
            **overrides) -> Setup:
    """Baseline, latency table, supernet (the stages `updp search` runs) and every plan scored, cached in ``run``.

    With ``pool``, only that many random distinct plans are scored (seeded), not all 4,096. ``overrides``:
    dotted config keys (``data.img_size=64``, ``supernet.epochs=2``) over the benchmark's defaults.
    """
    base = {"model": model, "search": {"keep": list(keep)},
            "data": {"root": data, "img_size": 32, "calib_images": 128, "eval_images": 250},
            "baseline": {"epochs": 12}, "supernet": {"epochs": 4, "sampling": "sandwich"},  # as cached runs were
            "latency": {"backend": "onnxruntime", "threads": 2, "runs": 100, "merge_forms": "default"}}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (base.setdefault(section, {}) if section else base)[name] = value
    cfg = from_dict(RunConfig, base)
    run_dir = Path(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    inp = rundir.check_inputs(cfg, run_dir)
    timer = runner.plan_timer(inp)
    table = runner.latency_table(inp, timer)
    rt = inp.rt  # the runtime.* keys: a CUDA GPU when this machine has one, the CPU otherwise
    baseline = rt.prepare(rundir.baseline_model(inp))
    baseline_top1 = evaluate(baseline, fixed_batches(inp.splits.val, 1000), rt)["top1"]
    t0, timing = time.perf_counter(), run_dir / "supernet_train_s.json"
    fresh = not (run_dir / "supernet.pt").exists()
    supernet = runner.train_supernet(inp, copy.deepcopy(baseline), table.predict, runner.budget(inp, table))
    if fresh:  # trained in one go here (a resumed or older supernet's time is unknown)
        timing.write_text(json.dumps(time.perf_counter() - t0))
    supernet_s = json.loads(timing.read_text()) if timing.is_file() else float("nan")
    calib = resident(fixed_batches(inp.splits.train_eval, cfg.data.calib_images), rt)
    held = resident(fixed_batches(inp.splits.held_out, cfg.data.eval_images), rt)
    names = inp.space.names

    exhaustive_csv = run_dir / ("exhaustive.csv" if pool is None else f"pool{pool}.csv")
    if exhaustive_csv.is_file():
        exhaustive = pd.read_csv(exhaustive_csv, keep_default_na=False)
    else:
        rows, t0 = [], time.perf_counter()
        plans = list(itertools.product([False, True], repeat=len(names)))
        if pool is not None:
            plans = [plans[0]] + random.Random(0).sample(plans[1:], pool - 1)
        for bits in tqdm(plans, desc="exhaustive", unit="plan", mininterval=10):
            plan = PruningPlan(cfg.model, frozenset(n for n, b in zip(names, bits) if b))
            s = score_plan(supernet, plan, calib, held, rt=rt)
            rows.append({"pruned": plan.to_str(), "score": s["top1"], "loss": s["loss"],
                         "latency_ms": table.predict(plan), "n_pruned": len(plan)})
        exhaustive = pd.DataFrame(rows)
        exhaustive.to_csv(exhaustive_csv, index=False)
        print(f"exhaustive: {len(rows)} plans in {time.perf_counter() - t0:.0f} s")
    return Setup(cfg, inp, timer, table, baseline, baseline_top1, supernet, calib, held, exhaustive, supernet_s,
                 exhaustive_csv.stat().st_mtime)


def combine() -> pd.DataFrame:
    """results/search_quality.{csv,md}: every space's sampler comparison (``sampler_comparison.py``) in one table."""
    return combine_results(
        "search_quality", "search_quality_samplers*.csv", "_seeds",
        ["model", "space_blocks", "plans", "sampler", "metric", "trials", "seeds", "hv_ratio_mean", "hv_ratio_std",
         "hv_ratio_25_mean", "hv_ratio_50_mean", "distinct_plans_mean", "overhead_s_per_trial", "is_default",
         "score_std", "eval_se", "r2_additive", "baseline_top1", "table_built"],
        "Search quality: samplers vs the exhaustive Pareto front",
        "Hypervolume of the front each sampler configuration finds in `trials` COMPLETE trials, divided by the "
        "exhaustive front's (every plan of the space scored with the same supernet and priced by the same latency "
        "table; mean and std over `seeds` seeds; hv_ratio_25/50: after 25 and 50 trials). distinct_plans_mean: "
        "distinct plans / trials started. overhead_s_per_trial: the study loop's own seconds per trial (the "
        "scoring look-up is ~0). is_default: updp's default search configuration (`--sampler ehvi`, repeats "
        "steered away, `--seeding auto`: no greedy chains with ehvi). score_std, eval_se, r2_additive: the spread "
        "of the space's scores, the sampling error of top-1 on the held-out images, and the share of the "
        "variance an additive per-block model explains (the rest is mostly that error: noise no sampler can "
        "learn). baseline_top1, table_built: which build of the space's table (its baseline, supernet and latency "
        "table trained and timed again: builds on different machines differ; `_build1` parts are earlier builds of "
        "a space measured again since). Details and per-seed rows: the search_quality_samplers*.md files.",
        "python benchmarks/search_quality.py")

if __name__ == "__main__":
    combine()
