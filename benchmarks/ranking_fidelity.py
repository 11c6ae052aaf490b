"""Ranking fidelity: does the supernet's score order plans as their trained accuracy does?

Same setup as ``search_quality.py`` (convnext_atto, CIFAR-10 subset at 32 px, its trained baseline and
supernet and every plan scored; cached in ``--run``). ``--plans`` plans are picked, half evenly along the
exhaustive Pareto front and half at random among the dominated plans (seeded); each is trained with updp's
real progressive training (``train_plan``: lambda fading, distillation from the baseline) for the same
budget and seed, its BN statistics re-estimated, merged, and its top-1 measured on the validation split.

Reported: Kendall tau and Spearman between supernet score and merged top-1 over the plans, and the top-1
regret of the search's pick: under a budget at the median latency of the picked plans, the plan with the
best supernet score vs the best trained top-1 among those within the budget.

Writes results/ranking_fidelity.{csv,md} and results/ranking_fidelity_plans.csv.
Run: python benchmarks/ranking_fidelity.py [--plans 12] [--epochs 6]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from common import RESULTS, write_results
from search_quality import DEFAULT_DATA, prepare

from updp.pruner import PruningPlan, merge_model
from updp.search.report import pareto_front
from updp.train.bn import recalibrate_bn
from updp.train.data import fixed_batches
from updp.train.loop import evaluate
from updp.train.progressive_training import FadeConfig, train_plan


def pick_plans(exhaustive: pd.DataFrame, n: int, seed: int) -> list[str]:
    """Half along the front (evenly by latency), the rest random dominated plans; no unpruned plan."""
    pruned = exhaustive[exhaustive.n_pruned > 0]
    front = pareto_front(pruned.assign(state="COMPLETE")).sort_values("latency_ms")
    on_front = list(front.pruned.iloc[[round(i * (len(front) - 1) / max(1, n // 2 - 1)) for i in range(n // 2)]])
    rest = pruned[~pruned.pruned.isin(front.pruned)].sample(n - len(dict.fromkeys(on_front)), random_state=seed)
    return list(dict.fromkeys(on_front + list(rest.pruned)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--run", default="runs/bench_search_quality")
    ap.add_argument("--plans", type=int, default=12)
    ap.add_argument("--epochs", type=float, default=6, help="progressive training epochs per plan (the demo's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    setup = prepare(args.data, args.run)
    inp, ex = setup.inp, setup.exhaustive.set_index("pruned")
    val = fixed_batches(inp.splits.val, len(inp.splits.val))
    rows = []
    for text in pick_plans(setup.exhaustive, args.plans, args.seed):
        plan = PruningPlan.from_str(setup.cfg.model, text)
        out = Path(args.run) / f"rank_{plan.key}"
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        student = train_plan(setup.baseline, plan, inp.splits, FadeConfig(epochs=args.epochs), out,
                             batch_size=setup.cfg.data.batch_size, seed=args.seed, desc=f"{len(plan)} pruned")
        recalibrate_bn(student, fixed_batches(inp.splits.train_eval, 1024, args.seed))
        top1 = evaluate(merge_model(student.eval()), val)["top1"]
        rows.append({"pruned": text, "n_pruned": len(plan), "latency_ms": float(ex.loc[text, "latency_ms"]),
                     "supernet_top1": float(ex.loc[text, "score"]), "merged_top1": top1,
                     "train_s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    plans = pd.DataFrame(rows)
    plans.to_csv(RESULTS / "ranking_fidelity_plans.csv", index=False)
    budget = plans.latency_ms.median()
    within = plans[plans.latency_ms <= budget]
    pick = within.loc[within.supernet_top1.idxmax()]
    summary = pd.DataFrame([{
        "model": setup.cfg.model, "dataset": Path(args.data).name, "img_size": setup.cfg.data.img_size,
        "plans": len(plans), "kendall_tau": plans.supernet_top1.corr(plans.merged_top1, method="kendall"),
        "spearman": plans.supernet_top1.corr(plans.merged_top1, method="spearman"),
        "regret_top1": within.merged_top1.max() - pick.merged_top1, "budget_ms": budget,
        "baseline_val_top1": setup.baseline_top1, "train_epochs": args.epochs,
        "train_s_per_plan": plans.train_s.mean(), "supernet_sampler": "sandwich (full, most pruned, 1 random)",
        "supernet_epochs": setup.cfg.supernet.epochs, "calib_images": setup.cfg.data.calib_images,
        "finetune_steps": 0}])
    write_results("ranking_fidelity", summary, "Ranking fidelity: supernet score vs trained, merged top-1",
                  f"{len(plans)} plans of {setup.cfg.model} ({len(plans) // 2} along the exhaustive front, the rest "
                  f"random dominated ones), each trained with updp's progressive training for {args.epochs:g} "
                  f"epochs (seed {args.seed}), BN re-estimated on 1,024 images, merged, top-1 on "
                  f"{len(inp.splits.val)} validation images. Regret: budget = median latency of the plans; the "
                  "plan with the best supernet score under it vs the best trained top-1 under it. Per-plan rows: "
                  f"ranking_fidelity_plans.csv.\n\nCommand: python benchmarks/ranking_fidelity.py --plans "
                  f"{args.plans} --epochs {args.epochs:g}")


if __name__ == "__main__":
    main()
