"""At equal measured latency, does progressive depth pruning keep more accuracy than the alternatives?

For each model and dataset: one baseline, trained by the pipeline; one search (`updp search`: latency
table, supernet, Optuna study); for each speed-up level, updp's plan is the best-scoring plan the search
found under baseline latency / level (with ``--band B``: only among plans at most B faster than that budget,
where the most-pruned plans score best and would take every level). Then, for each seed, five students of
that baseline, each trained for the same epochs with the same distillation from the baseline (FadeConfig:
lr, KD weight and temperature), then BN re-estimated on the same 1,024 training images:

- updp: updp's plan, progressive training (each pruned block fades from its original form), merged.
- removal: updp's plan with every activation removed at step 0 (DepthShrinker-style), merged.
- drop: residual blocks replaced by identity, the least influential first (pruning_methods.py); their
  number is the one whose model times nearest to updp's merged model.
- random: a random plan of as many blocks as updp's (a new draw per seed), progressive training, merged.
- channels: Torch-Pruning channel pruning (its L2 group magnitude importance, one ratio for every layer),
  the ratio timed nearest to updp's merged model.

Every final model (merged where the method merges) is exported to ONNX and timed in one interleaved
ONNX Runtime pass per model and dataset (CPU, batch 1, the training resolution); `latency_vs_updp` is
its ratio to updp's model of the same level and seed, and `latency_match` says whether it is within 3 %.
Merging is checked in fp64 on validation images (`merge_rel_diff_fp64`). Training (baseline, supernet,
students) runs where the pipeline's runtime puts it: a CUDA GPU with bf16 when the machine has one
(`train_device`), the CPU otherwise; merging, export and timing always run on the CPU.

Full mode appends its rows to results/benchmarks/depth_pruning.csv (rows of other models and datasets
are kept) and rebuilds results/benchmarks/README.md (mean +- std table, a plot of top-1 vs speed-up).
``--quick``: a tiny model on the shipped demo data, one level, one seed, a few steps each; checks every
method runs and merges exactly (exit status 1 otherwise), says nothing about who wins.

Run: python benchmarks/compare_depth_pruning.py --model convnext_atto --dataset cifar10
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import torch
from common import RESULTS, context, device_name, require_data
from pruning_methods import drop_blocks, droppable, nearest_latency, prune_channels, random_plan

from updp.core.config import from_dict
from updp.core.fileio import write_json
from updp.core.onnx_export import export_onnx
from updp.latency.base import MeasureConfig
from updp.latency.interleave import measure_interleaved, relative_to
from updp.pipeline import rundir
from updp.pipeline.config import RunConfig
from updp.pipeline.search import run_search
from updp.pruner import PruningPlan, apply_plan, merge_model
from updp.pruner.cost import count_macs, count_params
from updp.pruner.discovery import find_blocks
from updp.train.bn import recalibrate_bn
from updp.train.data import fixed_batches
from updp.train.loop import evaluate
from updp.train.progressive_training import FadeConfig, distillation_trainer, train_plan

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {"cifar10": (SHARED / "cifar10", 32), "imagenette": (SHARED / "imagenette", 64),
            "demo": (ROOT / "data" / "cifar10_demo.npz", 32)}
METHODS = ("updp", "removal", "drop", "random", "channels")
MERGED = ("updp", "removal", "random")
TOLERANCE = 0.03  # latency within 3 % of updp's counts as matched
OUT = RESULTS / "benchmarks"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, demo data, one level and seed (CI check)")
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    ap.add_argument("--img-size", type=int, help="training and timing resolution (default: 32 CIFAR, 64 Imagenette)")
    ap.add_argument("--levels", type=float, nargs="+", default=[1.3, 1.6], help="target speed-ups")
    ap.add_argument("--band", type=float, default=0.0,
                    help="updp's plan only among plans at most this fraction faster than a level's budget "
                         "(0: any plan within the budget)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--baseline-epochs", type=float, default=30)
    ap.add_argument("--supernet-epochs", type=float, default=6)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--train-epochs", type=float, default=6, help="fine-tuning epochs, the same for every method")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads when timing")
    ap.add_argument("--torch-threads", type=int, help="torch threads for training (default: torch's own)")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model in the final pass")
    ap.add_argument("--run", default=str(ROOT / "benchmarks" / "runs" / "depth_pruning"),
                    help="cache of baselines, searches and trained students (resumable)")
    ap.add_argument("--out", help="folder of depth_pruning.csv and README.md (default: results/benchmarks)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.dataset, args.levels, args.seeds = "test_convnext", "demo", [1.3], 1
        args.baseline_epochs, args.supernet_epochs, args.trials, args.train_epochs = 0.3, 0.3, 8, 0.1
        args.runs, args.run = 20, args.run + "_quick"
        args.out = args.out or str(Path(args.run) / "results")
    args.out = Path(args.out or OUT)
    args.data, default_size = DATASETS[args.dataset]
    args.img_size = args.img_size or default_size
    return args


def search(args) -> tuple:
    """(inputs, baseline, its val top-1, the search's trials, baseline latency): cached in the run folder."""
    cfg = from_dict(RunConfig, {
        "model": args.model,
        "data": {"root": str(args.data), "img_size": args.img_size, "batch_size": args.batch_size,
                 "eval_images": 500},
        "baseline": {"epochs": args.baseline_epochs},
        # the sandwich rule, as every cell in results/benchmarks was searched (its cached supernets reused)
        "supernet": {"epochs": args.supernet_epochs, "sampling": "sandwich"},
        "latency": {"backend": "onnxruntime", "threads": args.threads, "merge_forms": "default",
                    "runs": 20 if args.quick else 100},
        # and top-1 on 500 held-out images as the search score, as those cells were searched (their cached
        # studies resumed)
        "search": {"trials": args.trials, "metric": "top1", "score_on": "held_out"}})
    run = Path(args.run) / f"{args.model}_{args.dataset}_{args.img_size}" / "search"
    run.mkdir(parents=True, exist_ok=True)
    run_search(cfg, run)
    inp = rundir.check_inputs(cfg, run)
    baseline = rundir.baseline_model(inp).cpu().float().eval()  # on the CPU for matching, export and timing
    trials = pd.read_csv(run / "trials.csv", keep_default_na=False)
    base_ms = json.loads((run / "search_summary.json").read_text())["context"]["baseline_latency_ms"]
    top1 = evaluated(baseline, fixed_batches(inp.splits.val, len(inp.splits.val)), inp.rt)
    return inp, baseline, top1, trials, base_ms


def evaluated(model: torch.nn.Module, batches, rt) -> float:
    """Top-1 of a copy of ``model`` on ``rt``'s device (a CUDA GPU when the run has one), the model untouched."""
    return evaluate(rt.prepare(copy.deepcopy(model)), batches, rt)["top1"]


def updp_plan(trials: pd.DataFrame, model: str, base_ms: float, level: float, band: float = 0.0) -> PruningPlan:
    """The best-scoring plan the search found within baseline latency / level; with ``band`` > 0 only among plans
    at most that fraction faster than the budget (so a level is not won by a far faster plan). The plan nearest
    the budget where none is in that window."""
    done = trials[trials.state == "COMPLETE"].astype({"score": float, "latency_ms": float})  # PRUNED rows: no value
    budget = base_ms / level
    floor = budget / (1.0 + band) if band > 0 else 0.0
    within = done[(done.latency_ms <= budget) & (done.latency_ms >= floor)]
    pick = (within.sort_values(["score", "latency_ms"], ascending=[False, True]) if len(within)
            else done.loc[[(done.latency_ms - budget).abs().idxmin()]]).iloc[0]
    return PruningPlan.from_str(model, pick.pruned)


def match(baseline, plan: PruningPlan, inp, args, folder: Path) -> dict:
    """Blocks to drop and the channel ratio whose models time nearest to updp's merged model (cached)."""
    path = folder / "match.json"
    if path.is_file():
        return json.loads(path.read_text())
    shape = (3, args.img_size, args.img_size)
    mc = MeasureConfig(input_shape=shape, min_runs=20 if args.quick else 60, threads=args.threads)
    reference = merge_model(apply_plan(copy.deepcopy(baseline), plan.names, lam=0.0))
    blocks = [b.name for b in find_blocks(baseline, shape, costed=False).blocks]
    order = droppable(baseline, blocks, fixed_batches(inp.splits.train_eval, 256, 0))
    dropped = {k: drop_blocks(baseline, order[:k]) for k in range(1, len(order))}
    k, drop_ratio, _ = nearest_latency(reference, dropped, mc)
    grid = [round(0.05 * i, 2) for i in range(1, 13)]
    r, _, ratios = nearest_latency(reference, {r: prune_channels(baseline, r, shape) for r in grid}, mc)
    lo = max([g for g in grid if ratios.get(g, 0) >= 1.0 and g <= r] or [max(0.0, r - 0.05)])
    fine = [round(lo + 0.01 * i, 2) for i in range(1, 10) if lo + 0.01 * i < 0.8]
    r, channel_ratio, _ = nearest_latency(reference, {f: prune_channels(baseline, f, shape) for f in [r, *fine]}, mc)
    found = {"drop_blocks": order[:k], "drop_latency_ratio": drop_ratio, "channel_ratio": r,
             "channel_latency_ratio": channel_ratio, "block_influence_order": order}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, found)
    return found


@torch.no_grad()
def merge_diff_fp64(student: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest |merged - unmerged| logit in fp64 on ``x``, relative to the largest logit."""
    s64 = copy.deepcopy(student).double().eval()
    m64 = merge_model(s64)
    ref = s64(x.double())
    return ((m64(x.double()) - ref).abs().max() / ref.abs().max()).item()


def train_row(method: str, level: float, seed: int, plan: PruningPlan, matched: dict, inp, baseline, args,
              folder: Path) -> dict:
    """One student trained, BN re-estimated, merged (where it merges), exported and scored; cached."""
    out = folder / f"{method}_seed{seed}"
    done = out / "row.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    splits, shape, rt = inp.splits, (3, args.img_size, args.img_size), inp.rt
    fc = FadeConfig(epochs=args.train_epochs)
    desc = f"{method} {level}x seed {seed}"
    t0 = time.perf_counter()
    val = fixed_batches(splits.val, len(splits.val))
    diff = float("nan")
    if method in MERGED:
        if method == "random":
            plan = random_plan(inp.space, len(plan), seed=1000 * round(level * 100) + seed)
        f = dataclasses.replace(fc, lambda_end_frac=0.0) if method == "removal" else fc
        student = train_plan(baseline, plan, splits, f, out, batch_size=args.batch_size, seed=seed, desc=desc,
                             rt=rt)
        recalibrate_bn(student, fixed_batches(splits.train_eval, 1024, seed), rt)
        student = student.cpu().float()  # merged, checked and exported in fp32 on the CPU
        diff = merge_diff_fp64(student, val[0][0][:16])
        final = merge_model(student.eval())
        pruned, n = plan.to_str(), len(plan)
    else:
        if method == "drop":
            student, pruned = drop_blocks(baseline, matched["drop_blocks"]), ",".join(matched["drop_blocks"])
            n = len(matched["drop_blocks"])
        else:
            student = prune_channels(baseline, matched["channel_ratio"], shape)
            pruned, n = f"channels {matched['channel_ratio']:.2f}", 0
        distillation_trainer(student, baseline, splits, fc, out, batch_size=args.batch_size, seed=seed,
                             desc=desc, rt=rt).fit()
        recalibrate_bn(student, fixed_batches(splits.train_eval, 1024, seed), rt)
        final = student.cpu().float().eval()
    x1 = torch.zeros(1, *shape)
    export_onnx(final, (1, *shape), out / "final.onnx")
    row = {"method": method, "model": args.model, "dataset": args.dataset, "img_size": args.img_size,
           "level": level, "seed": seed, "plan": pruned, "n_pruned": n,
           "top1": evaluated(final, val, rt), "params": count_params(final), "macs": count_macs(final, x1),
           "merge_rel_diff_fp64": diff, "train_epochs": args.train_epochs, "train_s": time.perf_counter() - t0,
           "train_device": device_name(rt)}
    write_json(done, row)
    return row


def time_rows(rows: list[dict], baseline, folder: Path, args) -> pd.DataFrame:
    """Every row's ONNX model and the baseline in one interleaved ONNX Runtime pass."""
    shape = (3, args.img_size, args.img_size)
    base_onnx = export_onnx(baseline, (1, *shape), folder / "baseline.onnx")
    files = [base_onnx] + [folder / f"L{r['level']}" / f"{r['method']}_seed{r['seed']}" / "final.onnx" for r in rows]
    mc = MeasureConfig(input_shape=shape, min_runs=args.runs, threads=args.threads)
    results = measure_interleaved("onnxruntime", files, mc, rounds=20 if not args.quick else 4)
    base = results[0]
    df = pd.DataFrame(rows)
    df["latency_ms"] = [r.median_ms if r.ok else float("nan") for r in results[1:]]
    df["speedup"] = [1.0 / relative_to(r, base) if r.ok else float("nan") for r in results[1:]]
    ref = {(r["level"], r["seed"]): res for r, res in zip(rows, results[1:]) if r["method"] == "updp"}
    df["latency_vs_updp"] = [relative_to(res, ref[(r["level"], r["seed"])]) if res.ok else float("nan")
                             for r, res in zip(rows, results[1:])]
    df["latency_match"] = (df.latency_vs_updp - 1.0).abs() <= TOLERANCE
    df["baseline_latency_ms"] = base.median_ms
    df["latency_device"] = base.context.get("device")
    return df


def run(args) -> pd.DataFrame:
    require_data(str(args.data))
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    inp, baseline, base_top1, trials, base_ms = search(args)
    cell = Path(args.run) / f"{args.model}_{args.dataset}_{args.img_size}"
    rows = []
    for level in args.levels:
        folder = cell / f"L{level}"
        plan = updp_plan(trials, args.model, base_ms, level, args.band)
        matched = match(baseline, plan, inp, args, folder)
        for seed in range(args.seeds):
            for method in METHODS:
                rows.append(train_row(method, level, seed, plan, matched, inp, baseline, args, folder))
    df = time_rows(rows, baseline, cell, args)
    if "train_device" not in df:  # rows cached before the column existed: every one of them trained on the CPU
        df["train_device"] = "cpu"
    df["train_device"] = df.train_device.fillna("cpu")
    shape = (1, 3, args.img_size, args.img_size)
    df["baseline_top1"] = base_top1
    df["baseline_params"] = count_params(baseline)
    df["baseline_macs"] = count_macs(baseline, torch.zeros(shape))
    df["val_images"] = len(inp.splits.val)
    df["train_images"] = len(inp.splits.train)
    return df


def merge_rows(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """The CSV's rows of other models, datasets and resolutions, plus ``new``."""
    if not path.is_file():
        return new
    old = pd.read_csv(path)
    key = ["model", "dataset", "img_size"]
    keep = ~old.set_index(key).index.isin(new.set_index(key).index)
    merged = pd.concat([old[keep], new], ignore_index=True)
    if "train_device" in merged:  # rows written before the column existed were all trained on the CPU
        merged["train_device"] = merged.train_device.fillna("cpu")
    return merged


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per model, dataset, level and method; each method's verdict against updp."""
    g = df.groupby(["model", "dataset", "img_size", "level", "method"], sort=False)
    s = g.agg(seeds=("seed", "nunique"), top1_mean=("top1", "mean"), top1_std=("top1", "std"),
              speedup_mean=("speedup", "mean"), latency_ms=("latency_ms", "mean"),
              latency_vs_updp=("latency_vs_updp", "mean"), matched=("latency_match", "all"),
              params=("params", "mean"), macs=("macs", "mean"), baseline_top1=("baseline_top1", "first")).reset_index()
    verdicts = []
    for r in s.itertuples():
        u = s[(s.model == r.model) & (s.dataset == r.dataset) & (s.img_size == r.img_size) & (s.level == r.level)
              & (s.method == "updp")].iloc[0]
        spread = max(u.top1_std, r.top1_std) if r.seeds > 1 else float("nan")
        gap = u.top1_mean - r.top1_mean
        verdicts.append("-" if r.method == "updp" else "tie" if not abs(gap) > spread
                        else "updp ahead" if gap > 0 else "updp behind")
    s["vs_updp"] = verdicts
    return s


def plot(df: pd.DataFrame, path: Path) -> None:
    """Top-1 vs measured speed-up, one panel per model and dataset, every method (mean +- std over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(df.groupby(["model", "dataset", "img_size"], sort=False))
    cols = min(3, len(cells))
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax, ((model, dataset, size), d) in zip(axes.flat, cells):
        for method, m in d.groupby("method", sort=False):
            g = m.groupby("level")
            ax.errorbar(g.speedup.mean(), g.top1.mean(), xerr=g.speedup.std(), yerr=g.top1.std(), marker="o",
                        capsize=3, label=method, linestyle="none")
        ax.axhline(d.baseline_top1.iloc[0], color="grey", linestyle=":", label="baseline")
        ax.set(title=f"{model}, {dataset} {size}px", xlabel="measured speed-up (ONNX Runtime CPU, batch 1)",
               ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(df: pd.DataFrame, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "depth_pruning.csv"
    df = merge_rows(csv, df)
    df.to_csv(csv, index=False)
    s = summary(df)
    plot(df, out / "depth_pruning.png")
    shown = s.assign(top1=[f"{m:.1f} ± {sd:.1f}" for m, sd in zip(s.top1_mean, s.top1_std.fillna(0))],
                     speedup=s.speedup_mean.round(2), latency_vs_updp=s.latency_vs_updp.round(3),
                     params=(s.params / 1e6).round(3), macs=(s.macs / 1e6).round(1))
    cols = ["model", "dataset", "img_size", "level", "method", "seeds", "top1", "speedup", "latency_vs_updp",
            "matched", "params", "macs", "vs_updp"]
    baselines = df.groupby(["model", "dataset", "img_size"]).agg(
        top1=("baseline_top1", "first"), latency_ms=("baseline_latency_ms", "first"),
        train_images=("train_images", "first"), val_images=("val_images", "first"),
        train_epochs=("train_epochs", "first")).reset_index()
    commands = sorted(set(df.command.dropna()) if "command" in df else {command})
    ctx = "\n".join(f"- {k}: {v}" for k, v in context().items())
    md = f"""# Depth pruning at matched latency: updp against the alternatives

{__doc__.split(chr(10) + chr(10), 1)[1].rsplit(chr(10) + chr(10), 1)[0]}

`top1`: mean ± std over seeds on the whole validation split (%); `speedup`: baseline latency / the model's
(interleaved, per-round ratio); `latency_vs_updp`: the model's latency / updp's (same level, seed);
`matched`: within 3 % of updp's for every seed; params in millions, MACs in millions at the training
resolution; `vs_updp`: `tie` where the top-1 gap is not larger than the larger of the two stds.

{shown[cols].to_markdown(index=False)}

Baselines (trained by the pipeline; the same weights for every method):

{baselines.to_markdown(index=False, floatfmt='.4g')}

![top-1 vs speed-up](depth_pruning.png)

Commands:
{chr(10).join(f'- `{c}`' for c in commands)}

Context:
{ctx}
"""
    (out / "README.md").write_text(md)
    print(md)


def main(argv=None) -> int:
    args = parse_args(argv)
    df = run(args)
    command = "python benchmarks/compare_depth_pruning.py " + (
        "--quick" if args.quick else
        f"--model {args.model} --dataset {args.dataset} --img-size {args.img_size} --levels "
        f"{' '.join(map(str, args.levels))}{f' --band {args.band}' if args.band else ''} --seeds {args.seeds} "
        f"--baseline-epochs {args.baseline_epochs} "
        f"--supernet-epochs {args.supernet_epochs} --trials {args.trials} --train-epochs {args.train_epochs}")
    df["command"] = command
    write(df, args.out, command)
    bad = df[df.method.isin(MERGED) & ~(df.merge_rel_diff_fp64 < 1e-9)]
    missing = set(METHODS) - set(df.method)
    if len(bad) or missing or df.latency_ms.isna().any():
        print(f"FAILED: merged not exact in {len(bad)} rows; methods missing: {sorted(missing) or 'none'}; "
              f"untimed rows: {int(df.latency_ms.isna().sum())}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
