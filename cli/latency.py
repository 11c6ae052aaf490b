"""``updp latency``: measure, import trtexec results, per-block table, calibration."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from updp.core.errors import UpdpError, warn

if TYPE_CHECKING:
    from updp.core.plan import PruningPlan

SUBCOMMANDS = ("measure", "export", "import", "table", "calibrate")


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    from updp.latency.backends import NAMES

    p.add_argument("model", metavar="MODEL", help="timm model name")
    p.add_argument("--backend", choices=NAMES, default="auto",
                   help="auto = tensorrt on a GPU with TensorRT installed, else onnxruntime (default: auto)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--img-size", type=int, metavar="PX", help="square input size (default: the model's own)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--num-classes", type=int, metavar="N")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for onnxruntime/torch (default: all)")
    p.add_argument("--runs", type=int, default=50, metavar="N", help="at least N timed runs (default 50)")
    p.add_argument("--min-time", type=float, default=1.0, metavar="S", help="and at least S seconds (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="time limit per measurement")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device for onnxruntime/torch (default: CPU / torch's)")
    p.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache reused across builds")
    p.add_argument("--trt-opt-level", type=int, choices=range(6), metavar="0-5",
                   help="TensorRT builder optimization level (default: TensorRT's, 3); recorded with each figure")
    p.add_argument("--compile", action="store_true", help="torch backend: time torch.compile(model)")
    p.add_argument("--isolate", action="store_true",
                   help="time ONNX backends in a child process killed at --timeout (hard limit)")
    _add_cache_args(p)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="FILE", help="latency cache (default: $UPDP_CACHE_DIR or ~/.cache/updp)")
    p.add_argument("--no-cache", action="store_true", help="measure again, store nothing")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="measure latency; import trtexec results; per-block latency table",
                       description="Latency of a model or of a merged pruning plan. 'updp latency MODEL' is "
                                   "short for 'updp latency measure MODEL'.")
    lsub = p.add_subparsers(dest="latency_command", metavar="SUBCOMMAND")

    m = lsub.add_parser("measure", help="time a model or merged plan (the default)",
                        description="Time MODEL (merged with --plan) on a backend: median, mean, p90, p99 and "
                                    "count, with the device, versions, threads, precision, batch and shape.")
    _add_measure_args(m)
    m.add_argument("--plan", metavar="PLAN", help="blocks to prune and merge (names or a JSON file)")
    m.add_argument("--format", choices=["text", "json"], default="text")
    m.set_defaults(func=cmd_measure)

    e = lsub.add_parser("export", help="write the ONNX of the plans a latency predictor needs, and a trtexec script",
                        description="For a target that only runs trtexec: the ONNX of every plan the predictor "
                                    "needs (merged), manifest.json (plan key -> file) and run_trtexec.sh, which runs "
                                    "trtexec on each (TensorRT 10 or 11) and keeps the logs in DIR/outputs. Then "
                                    "'updp latency import DIR' and 'updp search --backend trtexec --latency-device "
                                    "NAME --latency-mode table'.")
    e.add_argument("model", metavar="MODEL", help="timm model name")
    e.add_argument("--plans", default="calibration", metavar="SET",
                   help="table (baseline + each block alone), calibration (table + the fit and held-out plans a "
                        "search with the same --fit-plans/--held-out-plans/--seed/--keep picks; the default), or "
                        "a FILE of plans (JSON list of block-name lists, or one comma-joined plan per line)")
    e.add_argument("--out", required=True, metavar="DIR", help="folder to write (an earlier export there resumes)")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--img-size", type=int, metavar="PX", help="square input size (default: the model's own)")
    e.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="fp16 is exported as a float16 ONNX (strongly typed on TensorRT 10 and 11)")
    e.add_argument("--num-classes", type=int, metavar="N")
    e.add_argument("--fit-plans", type=int, default=16, metavar="N", help="as the search's --fit-plans (default 16)")
    e.add_argument("--held-out-plans", type=int, default=8, metavar="N", help="as the search's (default 8)")
    e.add_argument("--seed", type=int, default=0, help="as the search's --seed (default 0)")
    e.add_argument("--keep", action="append", default=[], metavar="BLOCK", help="as the search's --keep (repeatable)")
    e.set_defaults(func=cmd_export)

    i = lsub.add_parser("import", help="store trtexec measurements in the cache",
                        description="DIR from 'updp latency export': every trtexec log (else --exportTimes JSON) in "
                                    "DIR/outputs, matched to its plan through the manifest. FILE: one trtexec log, "
                                    "--exportTimes JSON or trex metadata JSON (needs --model). Stored (median = GPU "
                                    "Compute Time median) under backend 'trtexec' with the device name, where "
                                    "'updp search --backend trtexec' reads them.")
    i.add_argument("file", metavar="DIR|FILE", help="an export folder, or one trtexec output file")
    i.add_argument("--model", metavar="MODEL", help="FILE only: timm model name the engine was built from")
    i.add_argument("--plan", metavar="PLAN", help="FILE only: the plan the engine was built from (default: unpruned)")
    i.add_argument("--batch-size", type=int, help="FILE only: override the batch parsed from the log")
    i.add_argument("--img-size", type=int, metavar="PX", help="FILE only: override the input size parsed from the log")
    i.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="FILE only: override the parsed precision")
    i.add_argument("--device", metavar="NAME", help="device name when a file has none (exportTimes JSON)")
    i.add_argument("--format", choices=["text", "json"], default="text")
    _add_cache_args(i)
    i.set_defaults(func=cmd_import)

    t = lsub.add_parser("table", help="per-block latency table (latency saved by merging each block alone)",
                        description="Measure the baseline and each worthwhile block merged alone; a plan is "
                                    "then predicted as baseline minus the sum of its blocks' savings.")
    _add_measure_args(t)
    t.add_argument("--out", metavar="FILE", help="where to write the table JSON (default: latency_table_MODEL.json)")
    t.set_defaults(func=cmd_table)

    c = lsub.add_parser("calibrate", help="fit the latency model; table and model error on held-out random plans",
                        description="One interleaved pass times the baseline, --fit random plans (sizes spread "
                                    "evenly) and --plans other random plans. The fitted latency model (per-group "
                                    "counts and interactions, from the table's single blocks and the --fit plans) "
                                    "and the additive table are both judged on the --plans plans only.")
    _add_measure_args(c)
    c.add_argument("--table", metavar="FILE", required=True, help="table JSON from 'updp latency table'")
    c.add_argument("--plans", type=int, default=30, metavar="N", help="held-out random plans (default 30)")
    c.add_argument("--fit", type=int, default=20, metavar="N",
                   help="random plans measured to fit the model (default 20; 0: judge the table only)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", metavar="FILE", help="CSV of predicted vs measured per held-out plan")
    c.add_argument("--model-out", metavar="FILE", help="fitted model JSON (default: latency_model_MODEL.json)")
    c.set_defaults(func=cmd_calibrate)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def rewrite_argv(argv: list[str]) -> list[str]:
    """``updp latency MODEL ...`` means ``updp latency measure MODEL ...``."""
    for i, arg in enumerate(argv):
        if arg == "latency":
            rest = argv[i + 1:]
            if rest and rest[0] not in (*SUBCOMMANDS, "-h", "--help"):
                return [*argv[:i + 1], "measure", *rest]
            break
        if not arg.startswith("-"):
            break
    return argv


_COUNTS = ("batch_size", "img_size", "runs", "threads", "num_classes", "plans")
_SECONDS = ("min_time", "timeout")


def _check_positive(args: argparse.Namespace) -> None:
    """Counts and times that cannot be zero or negative, refused before any file is read or model built."""
    for name in _COUNTS + _SECONDS:
        value, flag = getattr(args, name, None), "--" + name.replace("_", "-")
        if not isinstance(value, (int, float)) or (value > 0 and math.isfinite(value)):
            continue
        kind = "number of seconds" if name in _SECONDS else "integer"
        raise UpdpError(f"{flag} must be a positive {kind}, got {value:g}; pass {flag} with a value above 0 "
                        "or leave it out for the default")


def _check_plan(model_name: str, model, names: list[str]) -> None:
    """Every block a plan names exists in the model (block names do not depend on the input size)."""
    from updp.core.errors import PlanError
    from updp.pruner import default_input_size, find_blocks

    known = {b.name for b in find_blocks(model, default_input_size(model), costed=False).blocks}
    unknown = [n for n in dict.fromkeys(names) if n not in known]
    if unknown:
        raise PlanError(f"--plan: {model_name} has no block {', '.join(unknown)}; list its blocks with "
                        f"'updp blocks {model_name}'")


def _cache(args: argparse.Namespace):
    from updp.latency.cache import LatencyCache

    return None if args.no_cache else LatencyCache(args.cache)


def _timer(args: argparse.Namespace):
    from updp.latency.base import MeasureConfig
    from updp.search.timing import PlanTimer

    cfg = MeasureConfig(batch_size=args.batch_size, precision=args.precision, min_runs=args.runs,
                        min_time_s=args.min_time, timeout_s=args.timeout, threads=args.threads)
    options = {}
    if args.backend in ("onnxruntime", "torch") and args.device:
        options["device"] = args.device
    if args.backend in ("tensorrt", "auto") and args.timing_cache:
        options["timing_cache"] = args.timing_cache
    if args.backend in ("tensorrt", "auto") and args.trt_opt_level is not None:
        options["optimization_level"] = args.trt_opt_level
    if args.backend == "torch" and args.compile:
        options["compile"] = True
    timer = PlanTimer(args.model, args.backend, cfg, _cache(args), args.num_classes, args.img_size,
                      isolate=args.isolate, **options)
    if args.backend == "auto":
        print(f"updp: backend 'auto' picked {timer.backend.name}", file=sys.stderr, flush=True)
    return timer


def _fmt_result(r) -> str:
    if not r.ok:
        return f"FAILED: {r.error}"
    p90 = "n/a" if math.isnan(r.p90_ms) else f"{r.p90_ms:.4f}"
    lines = [f"median {r.median_ms:.4f} ms  mean {r.mean_ms:.4f}  p90 {p90}  p99 {r.p99_ms:.4f}  "
             f"count {r.count}{'  (cached)' if r.cached else ''}",
             f"backend {r.backend} ({r.source}), precision {r.precision}, batch {r.batch_size}, "
             f"input {'x'.join(map(str, r.input_shape))}"]
    lines += [f"  {k}: {v}" for k, v in r.context.items() if v is not None]
    return "\n".join(lines)


def _emit(result, fmt: str, **extra) -> int:
    if fmt == "json":
        print(json.dumps({**result.as_dict(), **extra}, indent=2, default=str))
    else:
        print(_fmt_result(result))
    return 0 if result.ok else 1


def _plan(model: str, text: str | None) -> PruningPlan:
    """The ``PruningPlan`` a ``--plan`` names (block names or a JSON file); unpruned without one."""
    from updp.core.plan import PruningPlan
    from updp.pruner.plan import parse_plan

    return PruningPlan(model, frozenset(parse_plan(text) if text else ()))


def cmd_measure(args: argparse.Namespace) -> int:
    _check_positive(args)
    timer = _timer(args)
    plan = _plan(args.model, args.plan)
    return _emit(timer.measure(plan), args.format, model=args.model, pruned=list(plan))


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from updp.latency.base import MeasureConfig
    from updp.pruner import create_model, default_input_size, find_blocks
    from updp.search.remote import PLAN_SETS, SCRIPT, export_plans, needed_plans, plans_from_file

    _check_positive(args)
    for flag, value in (("--fit-plans", args.fit_plans), ("--held-out-plans", args.held_out_plans)):
        if value < 0:
            raise UpdpError(f"{flag} must be zero or more, got {value}")
    base = create_model(args.model, args.num_classes).eval()
    shape = tuple(default_input_size(base, args.img_size))
    found = find_blocks(base, shape).blocks
    unknown = [k for k in args.keep if k not in {b.name for b in found}]
    if unknown:
        raise UpdpError(f"--keep names unknown blocks: {', '.join(unknown)} (see 'updp blocks {args.model}')")
    specs = [b for b in found if b.worthwhile and b.name not in args.keep]
    if args.plans in PLAN_SETS:
        entries = needed_plans(args.model, specs, args.plans, args.fit_plans, args.held_out_plans, args.seed)
    else:
        entries = plans_from_file(args.model, args.plans, [b.name for b in found if b.supported])
    cfg = MeasureConfig(batch_size=args.batch_size, input_shape=shape, precision=args.precision)
    command = " ".join(["updp latency export", *sys.argv[3:]]) if sys.argv[1:3] == ["latency", "export"] else ""
    with tqdm(total=len(entries), desc="export", unit="plan", dynamic_ncols=True) as bar:
        manifest = export_plans(base, entries, args.out, cfg, args.num_classes, command, bar.update)
    roles = {}
    for entry in manifest.plans:
        roles[entry["role"]] = roles.get(entry["role"], 0) + 1
    print(f"wrote {len(entries)} ONNX files ({', '.join(f'{n} {r}' for r, n in roles.items())}; input "
          f"{args.batch_size}x{'x'.join(map(str, shape))}, {args.precision}) to {args.out}")
    print(f"next: on the target, sh {Path(args.out) / SCRIPT}; then updp latency import {args.out}")
    return 0


def cmd_import_dir(args: argparse.Namespace) -> int:
    from updp.search.remote import SCRIPT, import_outputs

    used = [f"--{n.replace('_', '-')}" for n in ("model", "plan", "batch_size", "img_size", "precision")
            if getattr(args, n) is not None]
    if used:
        raise UpdpError(f"{', '.join(used)}: a folder's manifest says the model, plans, shape and precision; "
                        "these flags are for one FILE")
    report = import_outputs(args.file, _cache(args), args.device)
    for key, why in report.failed.items():
        warn(f"plan {key}: not imported ({why})")
    if report.ignored:
        warn(f"{len(report.ignored)} file(s) in outputs/ belong to no plan of the manifest, ignored: "
             f"{', '.join(report.ignored[:3])}{' ...' if len(report.ignored) > 3 else ''}")
    total = len(report.stored) + len(report.failed) + len(report.missing)
    devices = ", ".join(sorted(report.devices)) or "none"
    if args.format == "json":
        print(json.dumps({"model": report.model, "stored": len(report.stored), "plans": total, "devices":
                          sorted(report.devices), "failed": report.failed,
                          "missing": [p.key for p in report.missing]}, indent=2))
    else:
        print(f"imported {len(report.stored)} of {total} plans of {report.model} (device: {devices})"
              + ("" if args.no_cache else f" into {_cache(args).path}"))
        if report.missing:
            print(f"{len(report.missing)} plans have no output yet: run sh {Path(args.file) / SCRIPT} on the target")
    return 0 if report.stored and not report.failed else 1


def cmd_import(args: argparse.Namespace) -> int:
    from updp.core.plan import PruningPlan
    from updp.latency.cache import CacheKey, LatencyCache
    from updp.latency.trtexec import parse_file
    from updp.pruner import create_model, default_input_size
    from updp.pruner.plan import parse_plan

    _check_positive(args)
    if Path(args.file).is_dir():
        return cmd_import_dir(args)
    if not args.model:
        raise UpdpError(f"'{args.file}' is one file: pass --model MODEL (the timm model its engine was built from)")
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("precision", args.precision)) if v is not None}
    if args.img_size is not None:
        overrides["input_shape"] = (3, args.img_size, args.img_size)
    result = parse_file(args.file, **overrides)
    model = create_model(args.model)
    names = parse_plan(args.plan) if args.plan else []
    _check_plan(args.model, model, names)
    plan = PruningPlan(args.model, frozenset(names))
    if not result.input_shape:  # not in the file: the model's own input size
        result = _replace(result, input_shape=tuple(default_input_size(model, args.img_size)))
    device = args.device or result.context.get("device")
    if not device:
        raise UpdpError(f"'{args.file}' names no device; pass --device NAME")
    result = _replace(result, context={**result.context, "device": device})
    version = str(result.context.get("tensorrt_version", "unknown"))
    key = CacheKey(plan.key, args.model, tuple(result.input_shape), result.batch_size,
                   result.precision, "trtexec", device, (("tensorrt", version),))
    if not args.no_cache:
        LatencyCache(args.cache).put(key, result)
    return _emit(result, args.format, model=args.model, pruned=list(plan), plan_key=key.plan_key)


def _replace(result, **changes):
    import dataclasses

    return dataclasses.replace(result, **changes)


def _blocks(model: str, img_size: int | None, num_classes: int | None) -> list[str]:
    from updp.pruner import create_model, default_input_size, find_blocks

    base = create_model(model, num_classes)
    blocks = [b.name for b in find_blocks(base, default_input_size(base, img_size)).worthwhile]
    if not blocks:
        raise UpdpError(f"{model} has no block worth pruning; see 'updp blocks {model}'")
    return blocks


def cmd_table(args: argparse.Namespace) -> int:
    from updp.latency.table import build_table

    _check_positive(args)
    timer = _timer(args)
    blocks = _blocks(args.model, args.img_size, args.num_classes)
    print(f"timing the baseline and {len(blocks)} single-block plans, interleaved...", file=sys.stderr)
    table = build_table(timer.measure_many, args.model, blocks)
    out = Path(args.out or f"latency_table_{args.model}.json")
    table.save(out)
    print(f"baseline {table.baseline_ms:.4f} ms ({timer.backend.name}, {timer.device}); saved by merging each alone:")
    print(table.frame().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for block, error in table.failed.items():
        warn(f"block {block} could not be timed ({error}); plans with it cannot be predicted")
    print(f"wrote {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from updp.core.fileio import atomic_path
    from updp.latency.predictor import evaluate, fit, sized_plans
    from updp.latency.table import LatencyTable, calibrate, error_summary, random_plans, ratio
    from updp.pruner import PruningPlan, create_model, default_input_size, find_blocks
    from updp.search.timing import block_groups, single_block_ratios

    _check_positive(args)
    if args.fit < 0:
        raise UpdpError(f"--fit must be zero or more, got {args.fit}")
    table = LatencyTable.load(args.table)
    timer = _timer(args)
    blocks = list(table.saved_frac)
    held = random_plans(args.model, blocks, args.plans, args.seed)
    fit_plans = [p for p in sized_plans(args.model, blocks, args.fit + len(held), args.seed + 1)
                 if p not in held][:args.fit]
    print(f"timing the baseline, {len(fit_plans)} plans to fit and {len(held)} held-out plans, interleaved...",
          file=sys.stderr)
    measured = {}

    def measure_many(plans):  # one pass for both sets; the table's calibration reads the held-out share
        results = timer.measure_many([PruningPlan(args.model), *fit_plans, *plans[1:]])
        measured.update(base=results[0], fit=results[1:len(fit_plans) + 1])
        return [results[0], *results[len(fit_plans) + 1:]]

    df = calibrate(table, measure_many, held)
    if args.out:
        with atomic_path(args.out) as tmp:
            df.to_csv(tmp, index=False)
    summary = error_summary(df)
    for row in df[df["error"].notna()].itertuples():
        warn(f"plan {row.pruned} could not be timed: {row.error}")
    print(f"per-block table vs measurement on {summary['plans']} held-out random plans ({timer.backend.name}): "
          f"median APE {summary['median_ape_pct']:.2f} %, p95 {summary['p95_ape_pct']:.2f} %, "
          f"max {summary['max_ape_pct']:.2f} %" + (f"; {summary['failed']} failed" if summary["failed"] else ""))
    if not fit_plans:
        return 0
    base = create_model(args.model, args.num_classes)
    specs = [s for s in find_blocks(base, default_input_size(base, args.img_size)).worthwhile if s.name in blocks]
    singles, single_ratios = single_block_ratios(table)
    fit_ratios = [ratio(r, measured["base"]) if r.ok else None for r in measured["fit"]]
    model = fit(args.model, block_groups(specs), [*singles, *fit_plans], [*single_ratios, *fit_ratios],
                measured["base"].median_ms, {**table.context, "fit_pass_backend": timer.backend.name})
    ok = df["error"].isna()
    model.held_out = evaluate(model.predicted_ratio, [p for p, k in zip(held, ok) if k],
                              df.loc[ok, "measured_ratio"].tolist())
    out = Path(args.model_out or f"latency_model_{args.model}.json")
    model.to_json(out)
    h = model.held_out
    print(f"fitted latency model ({len(singles) + len(fit_plans)} plans fitted) on the same {h['plans']} held-out "
          f"plans: median APE {h['median_ape_pct']:.2f} %, p95 {h['p95_ape_pct']:.2f} %, max {h['max_ape_pct']:.2f} "
          f"%; wrote {out}")
    return 0
