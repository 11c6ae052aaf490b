"""Search quality on convnext_atto (12 blocks, 4,096 plans) with a baseline the pipeline trains.

1. Baseline (trained here; by default on the shipped demo data,
   data/cifar10_demo.npz: 2,500 train / 500 val CIFAR-10 images), latency
   table, supernet: the same stages `updp search` runs.
2. Every one of the 4,096 plans scored with the supernet; latency from the
   per-block table: the true Pareto front under this proxy.
3. An Optuna NSGA-II study of 100 trials on the same proxy; hypervolume of its
   front / hypervolume of the exhaustive front; seconds per trial.
4. Spearman rank correlation between supernet scores and top-1 after a short
   real fine-tune, on 10 plans.

Run: python benchmarks/search_quality.py [--data PATH]   (an .npz like the demo's, or a
folder with train/ and val/ class folders, e.g. the 5,000 / 1,000-image CIFAR-10 subset)

Cost: step 2 scores 4,096 plans whatever the data (250 held-out + 128 calibration
images each); results/search_quality.md records 0.16 s per plan on a 2-core CPU,
about 11 minutes for that step alone. The other steps scale with the training set.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import torch
from common import RESULTS, write_results
from tqdm import tqdm

from updp.core.config import from_dict
from updp.pipeline import rundir
from updp.pipeline import search as runner
from updp.pipeline.config import RunConfig
from updp.pruner import PruningPlan, apply_plan
from updp.search import study as st
from updp.search.report import pareto_front
from updp.search.scoring import score_plan
from updp.train.bn import recalibrate_bn
from updp.train.data import fixed_batches
from updp.train.loop import TrainConfig, Trainer, evaluate, kd_loss

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "cifar10_demo.npz"


def hypervolume(points: pd.DataFrame, ref_score: float, ref_latency: float) -> float:
    """2-D hypervolume of (score up, latency down) points against a reference point."""
    front = pareto_front(points.assign(state="COMPLETE"))
    area, prev_latency = 0.0, ref_latency
    for row in front.sort_values("latency_ms", ascending=False).itertuples():
        area += (prev_latency - row.latency_ms) * max(0.0, row.score - ref_score)
        prev_latency = row.latency_ms
    return area


def finetune_top1(baseline: torch.nn.Module, plan: PruningPlan, inp, steps: int) -> float:
    """Top-1 on val after ``steps`` of distillation training of the pruned subnet."""
    student = apply_plan(copy.deepcopy(baseline), plan, lam=0.0)
    teacher = copy.deepcopy(baseline).eval()

    def step(ctx, x, y, _):
        with torch.no_grad():
            t = ctx.forward(x, teacher)
        loss = kd_loss(ctx.forward(x), t, y, 0.5, 2.0, 0.1)
        ctx.backward(loss)
        return {"loss": loss.item()}

    epochs = steps / (len(inp.splits.train) // 64)
    ckpt = inp.run_dir / f"ft_{plan.key}.pt"
    ckpt.unlink(missing_ok=True)
    Trainer(student, TrainConfig(epochs=epochs, lr=5e-4), inp.splits.train, step, ckpt, desc="finetune").fit()
    ckpt.unlink(missing_ok=True)
    recalibrate_bn(student, fixed_batches(inp.splits.train_eval, 512))
    return evaluate(student, fixed_batches(inp.splits.val, 1000))["top1"]


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


def prepare(data: str, run: str, pool: int | None = None, model: str = "convnext_atto", keep: list[str] = ()) -> Setup:
    """Baseline, latency table, supernet (the stages `updp search` runs) and every plan scored, cached in ``run``.

    With ``pool``, only that many random distinct plans are scored (seeded), not all 4,096.
    """
    cfg = from_dict(RunConfig, {"model": model, "search": {"keep": list(keep)},
                                "data": {"root": data, "img_size": 32, "calib_images": 128, "eval_images": 250},
                                "baseline": {"epochs": 12}, "supernet": {"epochs": 4},
                                "latency": {"backend": "onnxruntime", "threads": 2, "runs": 100,
                                            "merge_forms": "default"}})
    run_dir = Path(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    inp = rundir.check_inputs(cfg, run_dir)
    timer = runner.plan_timer(inp)
    table = runner.latency_table(inp, timer)
    baseline = rundir.baseline_model(inp)
    baseline_top1 = evaluate(baseline, fixed_batches(inp.splits.val, 1000))["top1"]
    supernet = runner.train_supernet(inp, copy.deepcopy(baseline))
    calib = fixed_batches(inp.splits.train_eval, cfg.data.calib_images)
    held = fixed_batches(inp.splits.held_out, cfg.data.eval_images)
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
            s = score_plan(supernet, plan, calib, held)
            rows.append({"pruned": plan.to_str(), "score": s["top1"], "loss": s["loss"],
                         "latency_ms": table.predict(plan), "n_pruned": len(plan)})
        exhaustive = pd.DataFrame(rows)
        exhaustive.to_csv(exhaustive_csv, index=False)
        print(f"exhaustive: {len(rows)} plans in {time.perf_counter() - t0:.0f} s")
    return Setup(cfg, inp, timer, table, baseline, baseline_top1, supernet, calib, held, exhaustive)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA), help=f"dataset .npz or folder (default {DEFAULT_DATA})")
    ap.add_argument("--run", default="runs/bench_search_quality")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--finetune-steps", type=int, default=140)
    args = ap.parse_args()
    setup = prepare(args.data, args.run)
    cfg, inp, timer, table, baseline = setup.cfg, setup.inp, setup.timer, setup.table, setup.baseline
    baseline_top1, supernet, calib, held, exhaustive = (setup.baseline_top1, setup.supernet, setup.calib, setup.held,
                                                        setup.exhaustive)

    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=st.make_sampler("nsga2", 0, args.trials))
    st.seed_study(study, inp.space, "blocks")
    scorer = lambda plan: score_plan(supernet, plan, calib, held)  # noqa: E731
    objective = st.Objective(inp.space, "blocks", scorer, runner.PlanLatency("table", timer, table), None)
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=args.trials)
    wall = time.perf_counter() - t0
    found = pd.DataFrame([{"pruned": st.trial_plan(t, cfg.model).to_str(), "score": t.values[0],
                           "latency_ms": t.values[1], "score_s": t.user_attrs["score_s"],
                           "latency_s": t.user_attrs["latency_s"]} for t in study.trials])
    ref_score, ref_latency = exhaustive.score.min(), exhaustive.latency_ms.max() * 1.01
    hv_true = hypervolume(exhaustive, ref_score, ref_latency)
    hv_found = hypervolume(found, ref_score, ref_latency)
    distinct = found.pruned.nunique()

    true_front = pareto_front(exhaustive.assign(state="COMPLETE"))
    picks = list(dict.fromkeys(list(true_front.pruned.iloc[:: max(1, len(true_front) // 6)]) +
                               list(exhaustive.sample(10, random_state=0).pruned)))[:10]
    corr_rows = []
    for p in picks:
        plan = PruningPlan.from_str(cfg.model, p)
        corr_rows.append({"pruned": p, "n_pruned": len(plan),
                          "supernet_top1": float(exhaustive.set_index("pruned").loc[p, "score"]),
                          "finetuned_top1": finetune_top1(baseline, plan, inp, args.finetune_steps)})
    corr = pd.DataFrame(corr_rows)
    corr.to_csv(RESULTS / "search_quality_spearman.csv", index=False)
    rho = corr.supernet_top1.corr(corr.finetuned_top1, method="spearman")

    summary = pd.DataFrame([{
        "model": "convnext_atto", "plans": len(exhaustive), "baseline_val_top1": baseline_top1,
        "trials": args.trials, "distinct_plans_tried": distinct, "hv_exhaustive": hv_true, "hv_optuna": hv_found,
        "hv_ratio": hv_found / hv_true, "front_exhaustive": len(true_front),
        "s_per_trial_total": wall / args.trials, "s_per_trial_scoring": found.score_s.mean(),
        "s_per_trial_latency": found.latency_s.mean(), "spearman_10_plans": rho,
        "finetune_steps": args.finetune_steps}])
    write_results("search_quality", summary, f"Search quality on convnext_atto ({Path(args.data).name})",
                  "Supernet score = top-1 on 250 held-out training images after BN re-estimation on 128 images; "
                  "latency = per-block table prediction (ONNX Runtime CPU, batch 1, 3x224x224, fp32), the same "
                  "proxy for the exhaustive and the Optuna front. Hypervolume reference: (min score of all plans, "
                  "1.01 x max latency). Spearman: supernet score vs val top-1 after a short distillation fine-tune "
                  f"({args.finetune_steps} steps, batch 64) of 10 plans; rows in search_quality_spearman.csv.")


if __name__ == "__main__":
    main()
