"""The ``updp`` command line: thin subcommands over the library.

Errors a user can cause print one line and exit 2; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable

from updp import __version__
from updp.core.errors import UpdpError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _fmt_count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_blocks(args: argparse.Namespace) -> int:
    import pandas as pd

    from updp.pruner.discovery import find_blocks
    from updp.pruner.export import load_model
    from updp.pruner.models import create_model, default_input_size
    from updp.pruner.registry import supported_classes

    loaded = load_model(args.model, args.checkpoint, args.num_classes)
    # A pruned checkpoint's blocks are wrapped already: list the plain architecture's.
    model = create_model(loaded.name, loaded.num_classes) if loaded.plan else loaded.model
    size = default_input_size(model, args.img_size)
    found = find_blocks(model, size)
    others = ", ".join(f"{k} x{v}" for k, v in found.other_block_classes.items())
    if not found.blocks:
        raise UpdpError(f"{loaded.name} has no block of a supported family "
                        f"({f'unsupported blocks: {others}' if others else 'no other blocks found either'}); "
                        f"supported: {', '.join(supported_classes())}")
    rows = [dict(b.as_dict(), pruned=b.name in loaded.plan) for b in found.blocks]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if args.format == "csv":
        print(pd.DataFrame(rows).to_csv(index=False), end="")
        return 0
    table = pd.DataFrame([{
        "name": b.name, "stage": b.stage, "family": b.family, "in": b.in_chs, "out": b.out_chs,
        "stride": b.stride, "MACs": _fmt_count(b.macs),
        "merged MACs": _fmt_count(b.merged_macs) if b.supported else "-",
        "params": _fmt_count(b.params), "merged params": _fmt_count(b.merged_params) if b.supported else "-",
        "worthwhile": "yes" if b.worthwhile else ("no" if b.supported else "unsupported"),
    } for b in found.blocks])
    print(f"{loaded.name}: {len(found.blocks)} blocks at input {'x'.join(map(str, size))}, "
          f"{len(found.worthwhile)} worth pruning (merged form cheaper)")
    print(table.to_string(index=False))
    for reason in sorted({b.reason for b in found.blocks if b.reason}):
        names = [b.name for b in found.blocks if b.reason == reason]
        print(f"unsupported ({len(names)}): {reason}")
    if others:
        print(f"not listed, of no supported family ({sum(found.other_block_classes.values())}): {others}")
    if loaded.plan:
        print(f"already pruned in this checkpoint ({len(loaded.plan)}): {', '.join(loaded.plan)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from updp.pruner.export import merge_and_export
    from updp.pruner.plan import parse_plan

    report = merge_and_export(args.model, parse_plan(args.plan) if args.plan else [], args.out,
                              args.checkpoint, args.img_size, args.allow_costlier, args.num_classes)
    if args.format == "json":
        print(json.dumps(report, indent=2))
        return 0
    ratio = lambda a, b: f"{b / a:.3f}x" if a else "-"  # noqa: E731
    print(f"merged {report['n_pruned']} blocks of {report['model']} into {args.out}")
    print(f"  params  {_fmt_count(report['params_before']):>9} -> {_fmt_count(report['params_after']):>9}"
          f"  ({ratio(report['params_before'], report['params_after'])})")
    print(f"  MACs    {_fmt_count(report['macs_before']):>9} -> {_fmt_count(report['macs_after']):>9}"
          f"  ({ratio(report['macs_before'], report['macs_after'])})")
    print(f"  merged vs subnet max abs diff: fp64 {report['max_abs_diff_fp64']:.2e}, "
          f"fp32 {report['max_abs_diff_fp32']:.2e}; ONNX Runtime vs torch {report['onnx_max_abs_diff']:.2e}")
    print("  wrote merged.pt, merged.onnx, merge.json (load with updp.pruner.load_checkpoint)")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="timm model name (e.g. convnext_atto) or an updp checkpoint file")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="weights for MODEL: a plain/timm state_dict or an updp checkpoint (random weights if omitted)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="classifier size (default: read from --checkpoint, else the model's own)")
    p.add_argument("--img-size", type=int, metavar="PX",
                   help="square input size in pixels, one the model accepts (default: the model's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="updp", description="Latency-aware progressive depth pruning for timm CNNs and ViTs.",
        epilog="Run 'updp COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"updp {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("blocks", help="list a model's prunable blocks with their costs",
                       description="List the prunable blocks of MODEL in forward order: family, channels, "
                                   "stride, MACs/params of the original and merged forms, and whether "
                                   "pruning is worthwhile (merged form cheaper).")
    _add_model_args(p)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser("merge", help="merge a pruning plan into a smaller model and export it",
                       description="Prune the blocks of PLAN at lambda 0, fold each into its merged form, "
                                   "check exactness, and write merged.pt, merged.onnx and merge.json to DIR.")
    _add_model_args(p)
    p.add_argument("--plan", metavar="PLAN",
                   help="comma-separated block names (as 'updp blocks' prints them) or a JSON file with that list; "
                        "optional when MODEL is a pruned updp checkpoint")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--allow-costlier", action="store_true",
                   help="also merge blocks whose merged form costs more MACs than the original")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_merge)

    from updp.cli import latency, run, search
    latency.register(sub)
    search.register(sub)
    run.register(sub)
    return parser


def _os_error(e: OSError) -> str:
    where = f"'{e.filename}'" if e.filename else "a file"
    also = f" -> '{e.filename2}'" if getattr(e, "filename2", None) else ""
    return (f"cannot access {where}{also}: {e.strerror or e}; check free space and permissions "
            "(rerun with --debug for the traceback)")


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _peer_stopped(e: BaseException) -> int:
    """One line for an error under torchrun that most likely comes from a peer going away; exit status 1."""
    text = str(e).strip()
    print(f"updp: error: process {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']} stopped "
          f"({type(e).__name__}: {text.splitlines()[0][:200] if text else ''}); "
          "torchrun stops the others; run the same command again to resume from the last checkpoint",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    from updp.cli.latency import rewrite_argv

    parser = build_parser()
    args = parser.parse_args(rewrite_argv(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        if "torch.distributed" in sys.modules:  # a torchrun job joined a process group: leave it
            from updp.train.runtime import leave_distributed

            leave_distributed()
        return code
    except UpdpError as e:
        if args.debug:
            raise
        print(f"updp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # more Ctrl-C while we say goodbye: no traceback
        print("updp: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, read-only folder, a file where a folder should be...
        if args.debug:
            raise
        if e.filename is None and _distributed():  # a socket error between torchrun's processes, not a file
            return _peer_stopped(e)
        print(f"updp: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI never shows a raw traceback unasked
        if args.debug:
            raise
        if _distributed():  # under torchrun: most likely a peer went away
            return _peer_stopped(e)
        print(f"updp: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
