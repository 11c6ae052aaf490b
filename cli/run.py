"""``updp run`` and ``updp train``."""
from __future__ import annotations

import argparse

from updp.cli.search import add_run_args, resolve_config
from updp.core.errors import UpdpError


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="the whole pipeline: baseline, supernet, search, progressive training, merge",
                       description="Run every stage into one run directory, skipping stages already complete "
                                   "(so an interrupted run resumes): baseline training when no checkpoint is "
                                   "given, latency table, supernet, Optuna search, progressive training of the "
                                   "best plan under the budget, merge, verification, export and report.")
    add_run_args(r)
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("train", help="progressive training of one plan, then merge, verify, export, time",
                       description="Train PLAN (default: the best plan of the run's search) from the baseline "
                                   "with lambda fading and distillation, then merge and export it.")
    add_run_args(t)
    t.add_argument("--plan", metavar="PLAN", help="blocks to prune (names or a JSON file)")
    t.set_defaults(func=cmd_train)


def is_main() -> bool:
    from updp.pipeline.rundir import is_main

    return is_main()


def _config(args):
    return resolve_config(args, allow_existing=True)


def _print(result: dict, run_dir) -> None:
    print(f"final model in {run_dir}: top-1 {result['baseline_top1']:.2f} % -> {result['merged_top1']:.2f} % "
          f"(val), params {result['params_baseline']:,} -> {result['params_merged']:,}")
    if "speedup" in result:
        print(f"latency ({result['latency_backend']}, {result['latency_input']}): {result['latency_baseline_ms']:#.4g} "
              f"-> {result['latency_merged_ms']:#.4g} ms, speedup {result['speedup']:.3f}x; "
              f"merged vs subnet max abs logit diff {result['max_abs_logit_diff_merged_vs_subnet']:.3g}")
    print(f"report: {run_dir / 'report.md'}")


def cmd_run(args: argparse.Namespace) -> int:
    from updp.pipeline.run import run_all

    cfg, run_dir = _config(args)
    result = run_all(cfg, run_dir)
    if is_main():  # under torchrun rank 0 speaks for the job
        _print(result, run_dir)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from updp.pipeline.run import train_and_merge
    from updp.pruner import PruningPlan
    from updp.pruner.plan import parse_plan

    plan = parse_plan(args.plan) if args.plan is not None else None
    if plan is not None and not plan:
        raise UpdpError(f"--plan '{args.plan}' is empty: name at least one block (see 'updp blocks MODEL')")
    cfg, run_dir = _config(args)
    result = train_and_merge(cfg, run_dir, PruningPlan(cfg.model, plan) if plan else None)
    if is_main():
        _print(result, run_dir)
    return 0

