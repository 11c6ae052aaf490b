"""Ranking fidelity: does the supernet's score order plans as their trained accuracy does?

Same setup as ``search_quality.py`` (convnext_atto, CIFAR-10 subset at 32 px, its trained baseline and
supernet and every plan scored; cached in ``--run``). ``--plans`` plans are picked, half evenly along the
exhaustive Pareto front and half at random among the dominated plans (seeded); each is trained with updp's
real progressive training (``train_plan``: lambda fading, distillation from the baseline) for the same
budget and seed, its BN statistics re-estimated, merged, and its top-1 measured on the validation split.

Reported: Kendall tau and Spearman between supernet score and merged top-1 over the plans, and the top-1
regret of the search's pick: under a budget at the median latency of the picked plans, the plan with the
best supernet score vs the best trained top-1 among those within the budget.

Variants, each against the same trained top-1s: ways of scoring with the same supernet (more held-out or
calibration images, a short fine-tune per candidate, 500 to 4,000 training images instead of held-out ones,
the agreement with the unpruned model, 100 x exp(-KL), instead of the labels), and supernets trained from
the same baseline another way (``--supernets``: uniform or budget-weighted subnet sampling instead of the
sandwich rule, twice the epochs), with what each costs. The benchmark's own supernet keeps the sandwich rule
(updp's default when these runs were made; this comparison made ``uniform`` the default), so its cached runs
stay comparable.

``--plans-from NAME`` re-scores the plans of an earlier run against the trained top-1s it recorded, without
training them again.

Writes results/NAME.{csv,md} and results/NAME_plans.csv.
Run: python benchmarks/ranking_fidelity.py [--plans 12] [--epochs 6] [--data DIR --img-size 64 ...]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from common import RESULTS, combine_results, device_name, require_data, shown, write_results
from search_quality import DEFAULT_DATA, prepare

from updp.pruner import PruningPlan, merge_model
from updp.search.metrics import METRICS, search_value
from updp.search.report import pareto_front
from updp.search.scoring import calibrated, resident, score_plan
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
    ap.add_argument("--pool", type=int, help="pick the plans among this many scored random plans, not all 4,096")
    ap.add_argument("--name", default="ranking_fidelity_demo", help="results/NAME.{csv,md}")
    ap.add_argument("--combine", action="store_true", help="only rebuild results/ranking_fidelity.{csv,md}")
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--baseline-epochs", type=float, default=12)
    ap.add_argument("--supernet-epochs", type=float, default=4)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--eval-images", type=int, default=250)
    ap.add_argument("--noise-seeds", type=int, default=2,
                    help="train the first plan again with this many other seeds: the ground truth's noise floor")
    ap.add_argument("--truth-seeds", type=int, default=1,
                    help="train every plan with this many seeds; its ground truth is their mean top-1")
    ap.add_argument("--supernet-sampling", default="sandwich",
                    help="subnet sampling of the benchmark's own supernet (sandwich: as the cached runs were made)")
    ap.add_argument("--plans-from", metavar="NAME",
                    help="re-score the plans of results/NAME_plans.csv against their trained top-1 there (no "
                         "training; the baseline and supernet are this run's own)")
    ap.add_argument("--supernets", nargs="*", default=["uniform", "budget", "epochs_x2"],
                    help="supernet variants trained from the same baseline: uniform, budget, epochs_x2")
    args = ap.parse_args()
    if args.combine:
        return combine()
    overrides = {"data.img_size": args.img_size, "baseline.epochs": args.baseline_epochs,
                 "supernet.epochs": args.supernet_epochs, "data.calib_images": args.calib_images,
                 "data.eval_images": args.eval_images, "supernet.sampling": args.supernet_sampling}
    require_data(args.data)
    setup = prepare(args.data, args.run, 1 if args.plans_from else args.pool, model=args.model, **overrides)
    if args.plans_from:
        plans, args.noise_std = earlier_plans(setup, args)
    else:
        plans = train_truth(setup, args)
    results = [row for name, kw in variants(setup).items() for row in fidelity(setup, plans, name, args, **kw)]
    report(setup, plans, results, args)
    for name in args.supernets:
        # same baseline weights, a supernet trained another way; only the unpruned plan is scored up front
        extra = {"uniform": {"supernet.sampling": "uniform"},
                 "budget": {"supernet.sampling": "budget", "search.budget_frac": 0.5},
                 "epochs_x2": {"supernet.epochs": 2 * args.supernet_epochs}}[name]
        other = prepare(args.data, str(Path(args.run) / f"supernet_{name}"), 1, model=args.model,
                        **{**overrides, **extra, "checkpoint": str(Path(args.run) / "baseline.pt")})
        results.extend(fidelity(other, plans, f"supernet_{name}", args))
        more = 4 * args.eval_images  # and with more held-out images, as the main supernet's variant
        results.extend(fidelity(other, plans, f"supernet_{name}_eval_images_{more}", args, eval_images=more))
        report(setup, plans, results, args)  # written after each supernet: a run cut short keeps what it measured


def train_truth(setup, args) -> pd.DataFrame:
    """The picked plans, each trained (cached in ``--run``): merged top-1, the mean over ``--truth-seeds``;
    sets ``args.noise_std``, one training run's std."""
    inp, ex = setup.inp, setup.exhaustive.set_index("pruned")
    val = fixed_batches(inp.splits.val, len(inp.splits.val))
    truth_csv = Path(args.run) / f"ranking_truth_{args.epochs:g}.csv"
    done = pd.read_csv(truth_csv, keep_default_na=False) if truth_csv.is_file() else pd.DataFrame()
    rows = done.to_dict("records")
    for text in pick_plans(setup.exhaustive, args.plans, args.seed):
        if text in set(done.get("pruned", [])):
            continue
        top1, train_s = trained_top1(setup, text, args.seed, args.epochs, val, Path(args.run))
        rows.append({"pruned": text, "n_pruned": text.count(",") + 1, "latency_ms": float(ex.loc[text, "latency_ms"]),
                     "supernet_top1": float(ex.loc[text, "score"]), "merged_top1": top1, "train_s": train_s})
        pd.DataFrame(rows).to_csv(truth_csv, index=False)
        print(rows[-1], flush=True)
    # the noise floor of the ground truth: plans trained again with other seeds (the first plan, or all of them)
    noise_csv = Path(args.run) / f"ranking_noise_{args.epochs:g}.csv"
    noise = pd.read_csv(noise_csv, keep_default_na=False).to_dict("records") if noise_csv.is_file() else []

    def retrained(text: str, seed: int) -> float:
        known = [r["merged_top1"] for r in noise if r["pruned"] == text and r["seed"] == seed]
        if known:
            return known[0]
        top1, _ = trained_top1(setup, text, seed, args.epochs, val, Path(args.run))
        noise.append({"pruned": text, "seed": seed, "merged_top1": top1})
        pd.DataFrame(noise).to_csv(noise_csv, index=False)
        return top1

    first = rows[0]
    noise_top1 = [first["merged_top1"]] + [retrained(first["pruned"], seed)
                                           for seed in range(args.seed + 1, args.seed + 1 + args.noise_seeds)]
    by_plan = {r["pruned"]: [r["merged_top1"]] + [retrained(r["pruned"], seed) for seed in
                                                  range(args.seed + 1, args.seed + args.truth_seeds)] for r in rows}
    if args.truth_seeds > 1:  # the std of one training run, pooled over every plan
        args.noise_std = float(np.sqrt(np.mean([np.var(v, ddof=1) for v in by_plan.values()])))
    else:
        args.noise_std = float(pd.Series(noise_top1).std()) if len(noise_top1) > 1 else float("nan")
    for r in rows:  # the ground truth: the mean over the training seeds
        r["merged_top1_seed0"], r["merged_top1"] = r["merged_top1"], float(np.mean(by_plan[r["pruned"]]))
    return pd.DataFrame(rows)


def earlier_plans(setup, args) -> tuple[pd.DataFrame, float]:
    """The plans and trained top-1s of an earlier run (``--plans-from``), priced by this run's latency table;
    the noise floor that run measured."""
    name = args.plans_from
    plans = pd.read_csv(RESULTS / f"{name}_plans.csv", keep_default_na=False)
    plans = plans[[c for c in plans.columns if not c.startswith("score_")]]
    plans["latency_ms"] = [setup.table.predict(PruningPlan.from_str(setup.cfg.model, p)) for p in plans.pruned]
    earlier = pd.read_csv(RESULTS / f"{name}.csv").iloc[0]
    args.truth_seeds = int(earlier.get("truth_seeds", 1))
    return plans, float(earlier.truth_seed_std)


def report(setup, plans: pd.DataFrame, results: list[dict], args) -> None:
    """results/NAME.{csv,md} and NAME_plans.csv from the variants measured so far, and the combined table."""
    summary = pd.DataFrame(results)
    plans = plans.copy()
    for name in summary.variant:
        plans[f"score_{name}"] = summary.set_index("variant").loc[name, "scores"]
    summary = summary.drop(columns="scores")
    plans.to_csv(RESULTS / f"{args.name}_plans.csv", index=False)
    inp = setup.inp
    write_results(args.name, summary, "Ranking fidelity: supernet score vs trained, merged top-1",
                  f"{len(plans)} plans of {setup.cfg.model} ({len(plans) // 2} along the exhaustive front, the rest "
                  f"random dominated ones), each trained with updp's progressive training for {args.epochs:g} "
                  + (f"epochs (seed {args.seed})" if args.truth_seeds == 1 else f"epochs with {args.truth_seeds} "
                     f"seeds ({args.seed} to {args.seed + args.truth_seeds - 1}; its ground truth is their mean)")
                  + ", BN re-estimated on 1,024 images, merged, top-1 on "
                  f"{len(inp.splits.val)} validation images. Regret: budget = median latency of the plans; the "
                  "plan with the best supernet score under it vs the best trained top-1 under it. Each variant "
                  "scores the same plans against the same trained top-1s; score_s_per_plan is its cost per "
                  "candidate in a search, supernet_train_s what training its supernet took. truth_seed_std: the "
                  + (f"std of the first plan's trained top-1 over {args.noise_seeds + 1} training seeds"
                     if args.truth_seeds == 1 else "std of one training run's top-1 (pooled over the plans' seeds)")
                  + f", the noise floor of the ground truth (range of the {len(plans)} trained top-1s: "
                  f"{plans.merged_top1.max() - plans.merged_top1.min():.2f} points). Per-plan rows: "
                  f"{args.name}_plans.csv."
                  + (f" Plans and trained top-1s: those of {args.plans_from} (trained from that run's baseline; "
                     "this run trained its baseline and supernet again with the same recipe and scores them)."
                     if args.plans_from else "")
                  + "\n\nCommand: python benchmarks/ranking_fidelity.py --data "
                  f"{shown(args.data)} --plans {args.plans} --epochs {args.epochs:g}"
                  + (f" --pool {args.pool}" if args.pool else "") + f" --model {args.model} --img-size "
                  f"{args.img_size} --baseline-epochs {args.baseline_epochs:g} --supernet-epochs "
                  f"{args.supernet_epochs:g} --calib-images {args.calib_images} --eval-images {args.eval_images} "
                  f"--supernet-sampling {args.supernet_sampling} --supernets {' '.join(args.supernets)} "
                  f"--noise-seeds {args.noise_seeds} --truth-seeds {args.truth_seeds} --name {args.name} "
                  + (f"--plans-from {args.plans_from} " if args.plans_from else "") + f"--run {args.run}")
    combine()


def combine() -> None:
    """results/ranking_fidelity.{csv,md}: every dataset's run (results/ranking_fidelity_*.csv) in one table."""
    combine_results(
        "ranking_fidelity", "ranking_fidelity_*.csv", "_plans",
        ["model", "dataset", "img_size", "plans", "variant", "metric", "scored_split", "eval_images", "kendall_tau",
         "spearman", "regret_top1",
         "truth_seeds", "truth_seed_std", "merged_top1_range", "baseline_val_top1", "train_epochs", "score_s_per_plan",
         "supernet_train_s", "train_device"],
        "Ranking fidelity: supernet score vs trained, merged top-1",
        "Per run: 12 plans (half along the exhaustive or pooled front, half dominated), each trained with updp's "
        "progressive training (same budget and seed), merged, top-1 on the validation split; Kendall tau and "
        "Spearman between each variant's supernet score and that top-1; regret: trained top-1 of the best-scored "
        "plan under the median latency vs the best trained one there. metric: the score, held-out top-1 or the "
        "likelihood (100 x exp(-cross-entropy), `+likelihood` variants: updp's default search metric now), both "
        "from one scoring pass; `teacher_kl`: 100 x exp(-KL) to the unpruned model's predictions. scored_split, "
        "eval_images: the images scored (train_eval: training images, updp's default now; held-out ones where "
        "blank; runs before cifar10_b30_rescore give the number asked for, and CIFAR-10's held-out split holds "
        "500). truth_seeds: each plan trained with that many seeds, its ground truth their mean; "
        "truth_seed_std: the std of one training run's top-1 (with 1 seed: the first plan retrained with 2 more), "
        "the noise floor against merged_top1_range. `default`: the run's own supernet (sandwich rule in the runs "
        "before cifar10_b30, uniform sampling, updp's default now, from there on). Details: the "
        "ranking_fidelity_*.md files.",
        "python benchmarks/ranking_fidelity.py --combine")


def trained_top1(setup, text: str, seed: int, epochs: float, val, run: Path) -> tuple[float, float]:
    """Merged top-1 on ``val`` of the plan ``text`` after updp's progressive training; seconds it took."""
    inp, rt = setup.inp, setup.inp.rt
    plan = PruningPlan.from_str(setup.cfg.model, text)
    out = run / (f"rank_{plan.key}" if seed == 0 else f"rank_{plan.key}_seed{seed}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    student = train_plan(setup.baseline, plan, inp.splits, FadeConfig(epochs=epochs), out, rt=rt,
                         batch_size=setup.cfg.data.batch_size, seed=seed, desc=f"{len(plan)} pruned, seed {seed}")
    recalibrate_bn(student, fixed_batches(inp.splits.train_eval, 1024, seed), rt)
    merged = rt.prepare(merge_model(student.cpu().float().eval()))  # merged in fp32 on the CPU, as `updp run` does
    return evaluate(merged, val, rt)["top1"], time.perf_counter() - t0


def variants(setup) -> dict:
    """Ways of scoring a plan with the supernet: the default, and one change each."""
    d = setup.cfg.data
    train = 16 * d.eval_images  # training images (BN calibration's split): 2x to 16x the held-out ones
    return {"default": {}, f"eval_images_{4 * d.eval_images}": {"eval_images": 4 * d.eval_images},
            f"calib_images_{4 * d.calib_images}": {"calib_images": 4 * d.calib_images},
            "finetune_20_steps": {"finetune_steps": 20},
            **{f"train_images_{n}": {"eval_images": n, "source": "train_eval"} for n in (train // 8, train // 4,
                                                                                        train // 2, train)},
            f"teacher_kl_{4 * d.eval_images}": {"eval_images": 4 * d.eval_images, "teacher_kl": True},
            f"teacher_kl_train_{train}": {"eval_images": train, "source": "train_eval", "teacher_kl": True}}


def teacher_agreement(setup, pruned: list[str], calib, images) -> list[dict]:
    """Per plan, ``100 x exp(-KL(baseline || plan))`` on ``images``: how closely the pruned subnet (BN
    re-estimated on ``calib``) reproduces the unpruned model's predictions, labels unused. Progressive
    training distils from that model, so this is what it starts from."""
    rt, teacher = setup.inp.rt, setup.baseline.eval()
    with torch.no_grad(), rt.autocast():
        target = [F.log_softmax(teacher(x).float(), -1) for x, _ in images]
    n = sum(len(x) for x, _ in images)
    out = []
    for text in pruned:
        with calibrated(setup.supernet, PruningPlan.from_str(setup.cfg.model, text), calib, rt) as model:
            was = model.training
            model.eval()
            with torch.no_grad(), rt.autocast():
                kl = sum(F.kl_div(F.log_softmax(model(x).float(), -1), t, reduction="sum", log_target=True).item()
                         for (x, _), t in zip(images, target))
            model.train(was)
        out.append({"teacher_kl": 100.0 * np.exp(-kl / n)})
    return out


def fidelity(setup, plans: pd.DataFrame, name: str, args, calib_images: int | None = None,
             eval_images: int | None = None, finetune_steps: int = 0, source: str = "held_out",
             teacher_kl: bool = False) -> list[dict]:
    """Kendall tau, Spearman and regret of one scoring variant on the trained plans, once per search metric.

    The same scoring pass gives both metrics: held-out top-1 (variant ``name``) and the likelihood,
    100 x exp(-cross-entropy) (variant ``name+likelihood``). ``source``: the split scored (``train_eval``:
    training images the supernet has seen). ``teacher_kl``: the agreement with the unpruned model instead
    (:func:`teacher_agreement`; one metric, ``teacher_kl``).
    """
    inp, d, rt = setup.inp, setup.cfg.data, setup.inp.rt
    calib = resident(fixed_batches(inp.splits.train_eval, calib_images or d.calib_images, setup.cfg.search.seed), rt)
    images = resident(fixed_batches(getattr(inp.splits, source), eval_images or d.eval_images,
                                    setup.cfg.search.seed), rt)
    t0 = time.perf_counter()
    if teacher_kl:
        scored = teacher_agreement(setup, list(plans.pruned), calib, images)
    else:
        scored = [score_plan(setup.supernet, PruningPlan.from_str(setup.cfg.model, p), calib, images, finetune_steps,
                             rt=rt) for p in plans.pruned]
    score_s = (time.perf_counter() - t0) / len(plans)
    budget = plans.latency_ms.median()
    within = plans.latency_ms <= budget
    rows = []
    for metric in ("teacher_kl",) if teacher_kl else METRICS:
        s = pd.Series([x["teacher_kl"] if teacher_kl else search_value(x, metric) for x in scored],
                      index=plans.index)
        pick = s[within].idxmax()
        rows.append({
            "model": setup.cfg.model, "dataset": Path(args.data).name, "img_size": d.img_size, "plans": len(plans),
            "variant": name if metric in ("top1", "teacher_kl") else f"{name}+{metric}", "metric": metric,
            "kendall_tau": s.corr(plans.merged_top1, method="kendall"),
            "spearman": s.corr(plans.merged_top1, method="spearman"),
            "regret_top1": plans.merged_top1[within].max() - plans.merged_top1[pick], "budget_ms": budget,
            "score_s_per_plan": score_s, "calib_images": calib_images or d.calib_images,
            "eval_images": sum(len(y) for _, y in images), "scored_split": source,
            "finetune_steps": finetune_steps,
            "supernet_sampling": setup.cfg.supernet.sampling, "supernet_epochs": setup.cfg.supernet.epochs,
            "supernet_train_s": setup.supernet_s, "baseline_val_top1": setup.baseline_top1,
            "train_epochs": args.epochs, "val_images": len(inp.splits.val), "train_device": device_name(rt),
            "merged_top1_range": f"{plans.merged_top1.min():.1f}-{plans.merged_top1.max():.1f}",
            "truth_seed_std": args.noise_std, "truth_seeds": args.truth_seeds, "scores": list(s)})
    return rows


if __name__ == "__main__":
    main()
