"""``updp search`` and ``updp report``."""
from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

from updp.core.errors import UpdpError


def _arg_type(tp):
    """The argparse type of a config field's annotation (``int | None`` -> int)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return _arg_type(args[0]) if len(args) == 1 and typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def add_run_args(p: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """The flags of search, train and run: generated from the run config's fields (one declaration each).

    ``sections`` limits the flags to those top-level config sections (plus the top-level keys).
    """
    from updp.core.config import flags
    from updp.pipeline.config import RunConfig

    p.add_argument("--config", metavar="YAML", help="config file (CLI flags override it)")
    p.add_argument("--run", "--run-dir", dest="run", metavar="DIR",
                   help="run directory (default: runs/<model>); under torchrun spell it --run-dir (torchrun "
                        "reads --run as its own --run-path)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR (its config.yaml, plus CLI overrides)")
    for f in flags(RunConfig):
        section = f.key.split(".")[0] if "." in f.key else None
        if sections is not None and section is not None and section not in sections:
            continue
        tp, kw = _arg_type(f.type), {"dest": _dest(f.key), "help": f.help, "default": None}
        if tp is bool:
            p.add_argument(f.flag, action="store_true", **kw)
        elif typing.get_origin(tp) is list:
            p.add_argument(f.flag, action="append", metavar=f.metavar, **kw)
        else:
            metavar = f.metavar or (None if f.choices else f.flag.lstrip("-").upper().replace("-", "_"))
            p.add_argument(f.flag, type=tp, choices=f.choices, metavar=metavar, **kw)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set search.trials=100 --set supernet.lr=5e-4 (repeatable; "
                        "applied after the flags)")


def _dest(key: str) -> str:
    return "cfg__" + key.replace(".", "__")


def _flag_changes(args: argparse.Namespace) -> dict:
    return {k.removeprefix("cfg__").replace("__", "."): v for k, v in vars(args).items() if k.startswith("cfg__")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="supernet + Optuna search over which blocks to prune; Pareto report",
                       description="Train a weight-sharing supernet of MODEL on DATA, then search which blocks "
                                   "to prune with Optuna, scoring each plan by supernet accuracy and latency on "
                                   "the target. Writes everything to the run directory; rerun with --resume "
                                   "RUN to continue (several workers may share one study).")
    add_run_args(p, sections=("data", "baseline", "supernet", "latency", "search", "runtime"))
    p.set_defaults(func=cmd_search)

    r = sub.add_parser("report", help="rebuild a search run's report (CSV, Pareto plot, Markdown)",
                       description="Write trials.csv, pareto.csv, pareto.png and report.md of RUN from its study.")
    r.add_argument("run", metavar="RUN", help="run directory")
    r.set_defaults(func=cmd_report)


def resolve_config(args: argparse.Namespace, allow_existing: bool = False):
    from updp.core.config import from_dict, load_yaml, override, set_key
    from updp.pipeline.config import RunConfig, validate
    from updp.pipeline.search import load_run_config

    existing = allow_existing and args.run and not args.config and (Path(args.run) / "config.yaml").is_file()
    if args.resume or existing:  # 'updp train --run RUN' continues RUN like --resume
        run_dir = Path(args.resume or args.run)
        cfg = load_run_config(run_dir)
    else:
        cfg = load_yaml(RunConfig, args.config) if args.config else from_dict(RunConfig, {})
        run_dir = None
    cfg = override(cfg, _flag_changes(args))
    for assignment in args.set:
        cfg = set_key(cfg, assignment)
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
    from updp.pipeline.rundir import is_main
    from updp.pipeline.search import run_search

    cfg, run_dir = resolve_config(args)
    summary = run_search(cfg, run_dir)
    if is_main():  # under torchrun rank 0 speaks for the job
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
          f"{summary.get('pruned', 0)} pruned), {summary['front']} on the Pareto front; "
          f"report: {run_dir / 'report.md'}, "
          f"plot: {run_dir / 'pareto.png'}")
    if best:
        from updp.search.metrics import METRIC_NAMES

        name = METRIC_NAMES[summary.get("metric", "top1")]
        print(f"best plan under the budget: trial {int(best['trial'])}, {name} {best['score']:.2f} %, "
              f"{best['latency_ms']:.4g} ms ({best['latency_source']}), pruned: {best['pruned'] or '(none)'}")
    else:
        print("no completed plan meets the budget")
