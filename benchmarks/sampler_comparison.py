"""Optuna samplers on one supernet and one latency proxy: hypervolume of the front found vs the exhaustive front.

Same setup as ``search_quality.py`` (convnext_atto, 12 blocks, 4,096 plans, CIFAR-10 subset at 32 px; cached in
``--run``): every plan is scored once with the supernet and priced by the latency table, so each trial of a
study here is a look-up of the exhaustive table through updp's own ``Objective`` (a repeated plan is not
scored again: PRUNED with ``duplicate_of``, not counted). For each sampler configuration and seed, a study
runs until ``--trials`` COMPLETE trials; the hypervolume of its front after 25, 50 and 100 completed trials
is divided by the exhaustive front's (reference point: the lowest score of all plans, 1.01 x the highest
latency). ``distinct_plans`` = distinct plans tried / trials started (repeats included); overhead = seconds
per trial of the study loop (sampling, storage, updp's bookkeeping; the look-up itself is ~0).

Configurations: ``nsga2`` (updp's sampler before this benchmark: no steering), and each of NSGA-II, TPE
(multivariate), GPSampler, random and updp's ``ehvi`` (the score modelled, the latency priced by the table)
inside ``DistinctSampler`` (a proposed repeat moves to an untried neighbour), with and without the greedy
chains. Every study starts from updp's seed plans (``seed_study``).

Writes results/search_quality_samplers.{csv,md}. Run: python benchmarks/sampler_comparison.py [--seeds 5]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import optuna
import pandas as pd
from common import RESULTS, require_data, write_results
from search_quality import DEFAULT_DATA, combine, hypervolume, prepare

from updp.pipeline import search as runner
from updp.pipeline.config import SearchConfig
from updp.pruner import PruningPlan
from updp.search import study as st
from updp.search.metrics import METRIC_AXES, METRICS, search_value

CHECKPOINTS = (25, 50, 100)
DEFAULT = "ehvi+distinct"  # updp's defaults: --sampler ehvi, always steered, --seeding auto (no chains for ehvi)
DEFAULT_METRIC = SearchConfig().metric


def configurations(space, trials: int, latency) -> dict:
    """name -> (sampler for a seed, greedy seeding)."""
    def distinct(name):
        return lambda seed: st.DistinctSampler(st.make_sampler(name, seed, trials, 0, space, "blocks", latency),
                                               space, "blocks", seed=seed)

    return {"nsga2": (lambda seed: st.make_sampler("nsga2", seed, trials), False),
            "nsga2+distinct": (distinct("nsga2"), False), "tpe+distinct": (distinct("tpe"), False),
            "gp+distinct": (distinct("gp"), False), "random+distinct": (distinct("random"), False),
            "nsga2+distinct+greedy": (distinct("nsga2"), True), "tpe+distinct+greedy": (distinct("tpe"), True),
            "gp+distinct+greedy": (distinct("gp"), True), "random+distinct+greedy": (distinct("random"), True),
            "ehvi+distinct": (distinct("ehvi"), False), "ehvi+distinct+greedy": (distinct("ehvi"), True)}


def score_noise(setup, metric: str) -> dict:
    """How much of the exhaustive scores a search can learn: their spread, the sampling error of top-1 on the
    held-out images (binomial, at the mean score), and the share of their variance an additive per-block model
    explains (least squares on every plan; what is left is mostly that sampling error)."""
    ex = setup.exhaustive
    names = setup.inp.space.names
    bits = np.array([[n in set(p.split(",")) for n in names] for p in ex.pruned], dtype=float)
    x = np.c_[np.ones(len(ex)), bits]
    coef, *_ = np.linalg.lstsq(x, ex.score.to_numpy(), rcond=None)
    resid = ex.score.to_numpy() - x @ coef
    p, n = ex.top1.mean() / 100, setup.cfg.data.eval_images
    se = 100 * math.sqrt(p * (1 - p) / n) if metric == "top1" else math.nan  # binomial: top-1 only
    return {"score_std": ex.score.std(), "eval_se": se, "r2_additive": 1 - resid.var() / ex.score.var()}


def run_study(setup, sampler, trials: int, greedy: bool = False, metric: str = "top1"
              ) -> tuple[pd.DataFrame, float, int]:
    lookup = setup.exhaustive.set_index("pruned")
    model = setup.cfg.model

    def scorer(plan: PruningPlan) -> dict:
        row = lookup.loc[plan.to_str()]
        return {"top1": float(row.top1), "loss": float(row.loss)}

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    seeding = st.Seeding(setup.inp.space, "blocks", greedy)
    seeding.enqueue(study)
    objective = st.Objective(setup.inp.space, "blocks", scorer, runner.PlanLatency("table", setup.timer, setup.table),
                             None, metric=metric)
    t0 = time.perf_counter()
    st.optimize(study, objective, trials, callbacks=[seeding])
    wall = time.perf_counter() - t0
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    found = pd.DataFrame([{"pruned": st.trial_plan(t, model).to_str(), "score": t.values[0],
                           "latency_ms": t.values[1]} for t in done])
    started = len(study.trials)
    distinct = len({st.trial_plan(t, model).to_str() for t in study.trials})
    return found, wall / started, distinct / started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--run", default="runs/bench_search_quality")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--keep", nargs="*", default=[], help="blocks left out of the space (a subset of a larger one)")
    ap.add_argument("--name", default="search_quality_samplers", help="results/NAME.{csv,md}")
    ap.add_argument("--metric", default=DEFAULT_METRIC, choices=METRICS, help="what the search maximizes")
    args = ap.parse_args()
    require_data(args.data)
    setup = prepare(args.data, args.run, model=args.model, keep=args.keep)
    ex = setup.exhaustive = setup.exhaustive.assign(top1=setup.exhaustive.score)  # the cache's score is top-1
    ex["score"] = [search_value({"top1": t, "loss": loss}, args.metric) for t, loss in zip(ex.top1, ex.loss)]
    ref_score, ref_latency = ex.score.min(), ex.latency_ms.max() * 1.01
    hv_true = hypervolume(ex, ref_score, ref_latency)
    rows = []
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for name, (make, greedy) in configurations(setup.inp.space, args.trials, setup.table.predict).items():
        if args.only and name not in args.only:
            continue
        for seed in range(args.seeds):
            found, overhead, distinct = run_study(setup, make(seed), args.trials, greedy, args.metric)
            row = {"model": setup.cfg.model, "sampler": name, "seed": seed, "trials": len(found),
                   "distinct_plans": distinct, "overhead_s_per_trial": overhead}
            for k in CHECKPOINTS:
                row[f"hv_ratio_{k}"] = hypervolume(found.iloc[:k], ref_score, ref_latency) / hv_true
            rows.append(row)
            print(row, flush=True)
    per_seed = pd.DataFrame(rows)
    seeds_csv = RESULTS / f"{args.name}_seeds.csv"
    if seeds_csv.is_file():  # configurations not run this time keep their earlier rows
        earlier = pd.read_csv(seeds_csv)
        per_seed = pd.concat([earlier[~earlier.sampler.isin(per_seed.sampler)], per_seed], ignore_index=True)
    per_seed.to_csv(seeds_csv, index=False)
    g = per_seed.groupby("sampler", sort=False)
    summary = pd.DataFrame({
        "model": setup.cfg.model, "space_blocks": len(setup.inp.space.names), "plans": len(ex),
        "sampler": list(g.groups), "metric": args.metric, "trials": args.trials, "seeds": g.size().values,
        **{f"hv_ratio_{k}_mean": g[f"hv_ratio_{k}"].mean().values for k in CHECKPOINTS},
        **{f"hv_ratio_{k}_std": g[f"hv_ratio_{k}"].std().values for k in CHECKPOINTS},
        "distinct_plans_mean": g.distinct_plans.mean().values,
        "overhead_s_per_trial": g.overhead_s_per_trial.mean().values})
    summary["hv_ratio_mean"] = summary[f"hv_ratio_{args.trials}_mean"]
    summary["hv_ratio_std"] = summary[f"hv_ratio_{args.trials}_std"]
    best = summary.hv_ratio_mean.idxmax()
    summary["is_default"] = (summary.sampler == DEFAULT) & (args.metric == DEFAULT_METRIC)
    noise = score_noise(setup, args.metric)
    for k, v in noise.items():
        summary[k] = v
    # one build of the space's table from another (the latency table is timed again on each build's machine)
    summary["baseline_top1"] = setup.baseline_top1
    summary["table_built"] = time.strftime("%Y-%m-%d", time.gmtime(setup.table_mtime))
    write_results(args.name, summary,
                  f"Samplers on {setup.cfg.model}: hypervolume ratio to the exhaustive front ({len(ex)} plans)",
                  f"Baseline val top-1 {setup.baseline_top1:.1f} %; supernet score = {METRIC_AXES[args.metric]} "
                  f"on {setup.cfg.data.eval_images} held-out training images after BN re-estimation on "
                  f"{setup.cfg.data.calib_images}; latency = the per-block table (ONNX Runtime CPU, input "
                  f"{'x'.join(map(str, setup.timer.cfg.input_shape))}). "
                  f"{args.seeds} seeds per configuration, {args.trials} COMPLETE trials each; hv_ratio_K: after K "
                  f"completed trials. Best mean at {args.trials}: {summary.sampler[best]}. The scores: std "
                  f"{noise['score_std']:.2f} points over all plans"
                  + (f"; top-1 on {setup.cfg.data.eval_images} images has a sampling error of "
                     f"{noise['eval_se']:.2f}" if args.metric == "top1" else "")
                  + f"; an additive per-block model explains {100 * noise['r2_additive']:.0f} % of their variance. "
                  "Per-seed rows: "
                  f"{args.name}_seeds.csv. Space: {len(setup.inp.space.names)} blocks"
                  + (f" (left out: {', '.join(args.keep)})" if args.keep else "") + ".\n\nCommand: python "
                  f"benchmarks/sampler_comparison.py --seeds {args.seeds} --trials {args.trials} --model {args.model}"
                  + (f" --keep {' '.join(args.keep)}" if args.keep else "")
                  + (f" --only {' '.join(args.only)}" if args.only else "")
                  + f" --metric {args.metric} --name {args.name} --run {args.run}")
    combine()


if __name__ == "__main__":
    main()
