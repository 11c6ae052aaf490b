"""``updp search`` and ``updp report``."""
from __future__ import annotations

import argparse
from pathlib import Path

from updp.core.errors import UpdpError

# CLI flag -> dotted config key
OVERRIDES = {
    "model": "model", "checkpoint": "checkpoint", "pretrained": "pretrained", "num_classes": "num_classes", "data": "data.root",
    "img_size": "data.img_size", "batch_size": "data.batch_size", "trials": "search.trials",
    "sampler": "search.sampler", "space": "search.space", "seed": "search.seed",
    "latency_budget_ms": "search.latency_budget_ms", "target_speedup": "search.target_speedup",
    "budget_frac": "search.budget_frac",
    "max_per_stage": "search.max_per_stage", "finetune_steps": "search.finetune_steps",
    "storage": "search.storage", "backend": "latency.backend", "latency_mode": "latency.mode",
    "latency_img_size": "latency.img_size", "precision": "latency.precision", "threads": "latency.threads",
    "baseline_epochs": "baseline.epochs", "supernet_epochs": "supernet.epochs",
}


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags shared by search, train and run (each maps to a config key)."""
    p.add_argument("--config", metavar="YAML", help="config file (CLI flags override it)")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/<model>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR (its config.yaml, plus CLI overrides)")
    p.add_argument("--model", help="timm model name")
    p.add_argument("--checkpoint", metavar="FILE", help="baseline weights (default: train a baseline on DATA)")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="start from timm's pretrained weights (needs the model hub to be reachable)")
    p.add_argument("--num-classes", type=int, metavar="N", help="default: the number of classes in DATA")
    p.add_argument("--data", metavar="DIR", help="ImageFolder dataset with train/ and val/, or an .npz")
    p.add_argument("--img-size", type=int, metavar="PX", help="training/scoring image size")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--trials", type=int, metavar="N", help="completed trials to reach")
    p.add_argument("--sampler", choices=["nsga2", "tpe"])
    p.add_argument("--space", choices=["blocks", "stages"], help="one boolean per block, or a count per stage")
    p.add_argument("--seed", type=int)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--latency-budget-ms", type=float, metavar="MS")
    g.add_argument("--target-speedup", type=float, metavar="X", help="budget = baseline latency / X")
    g.add_argument("--budget-frac", type=float, metavar="F",
                   help="budget = baseline - F x (baseline - most-pruned plan), both as the latency table measured "
                        "them: 0 < F <= 1, reachable on any machine")
    p.add_argument("--keep", action="append", metavar="BLOCK", help="never prune BLOCK (repeatable)")
    p.add_argument("--max-per-stage", type=int, metavar="N")
    p.add_argument("--finetune-steps", type=int, metavar="N", help="short fine-tune per candidate (default 0)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL, or journal:PATH (default: RUN/study.db)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"])
    p.add_argument("--latency-mode", choices=["measure", "table", "hybrid"])
    p.add_argument("--latency-img-size", type=int, metavar="PX", help="input size of every latency figure, search and final (default: --img-size)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"])
    p.add_argument("--threads", type=int)
    p.add_argument("--baseline-epochs", type=float)
    p.add_argument("--supernet-epochs", type=float)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="supernet + Optuna search over which blocks to prune; Pareto report",
                       description="Train a weight-sharing supernet of MODEL on DATA, then search which blocks "
                                   "to prune with Optuna, scoring each plan by supernet accuracy and latency on "
                                   "the target. Writes everything to the run directory; rerun with --resume "
                                   "RUN to continue (several workers may share one study).")
    add_run_args(p)
    p.set_defaults(func=cmd_search)

    r = sub.add_parser("report", help="rebuild a search run's report (CSV, Pareto plot, Markdown)",
                       description="Write trials.csv, pareto.csv, pareto.png and report.md of RUN from its study.")
    r.add_argument("run", metavar="RUN", help="run directory")
    r.set_defaults(func=cmd_report)


def resolve_config(args: argparse.Namespace, extra: dict[str, str] | None = None, allow_existing: bool = False):
    from updp.core.config import from_dict, load_yaml, override
    from updp.pipeline.config import RunConfig, validate
    from updp.pipeline.search import load_run_config

    existing = allow_existing and args.run and not args.config and (Path(args.run) / "config.yaml").is_file()
    if args.resume or existing:  # 'updp train --run RUN' continues RUN like --resume
        run_dir = Path(args.resume or args.run)
        cfg = load_run_config(run_dir)
    else:
        cfg = load_yaml(RunConfig, args.config) if args.config else from_dict(RunConfig, {})
        run_dir = None
    changes = {key: getattr(args, flag) for flag, key in {**OVERRIDES, **(extra or {})}.items()}
    if args.keep:
        changes["search.keep"] = list(args.keep)
    cfg = override(cfg, changes)
    validate(cfg)
    if run_dir is None:
        if not cfg.model:
            raise UpdpError("no model given: pass --model NAME or a --config with 'model'")
        run_dir = Path(args.run or cfg.run_dir or f"runs/{cfg.model}")
        if (run_dir / "config.yaml").is_file() and not allow_existing:
            raise UpdpError(f"'{run_dir}' already holds a run; continue it with --resume {run_dir} "
                            "or choose another --run")
    return cfg, run_dir


def cmd_search(args: argparse.Namespace) -> int:
    from updp.pipeline.search import run_search

    cfg, run_dir = resolve_config(args)
    summary = run_search(cfg, run_dir)
    _print_summary(run_dir, summary)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from updp.pipeline.search import report_only

    run_dir = Path(args.run)
    _print_summary(run_dir, report_only(run_dir))
    return 0


def _print_summary(run_dir: Path, summary: dict) -> None:
    best = summary.get("best")
    print(f"{summary.get('complete', summary['trials'])} completed trials ({summary.get('fail', 0)} failed, "
          f"{summary.get('pruned', 0)} pruned), {summary['front']} on the Pareto front; report: {run_dir / 'report.md'}, "
          f"plot: {run_dir / 'pareto.png'}")
    if best:
        print(f"best plan under the budget: trial {int(best['trial'])}, top-1 {best['score']:.2f} %, "
              f"{best['latency_ms']:.4g} ms ({best['latency_source']}), pruned: {best['pruned'] or '(none)'}")
    else:
        print("no completed plan meets the budget")
