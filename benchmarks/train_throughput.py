"""Training throughput: updp's loop against a plain timm-style loop, same model, batch, device, precision.

Two pairs, each timed in one process, interleaved in rounds (A B A B ...) so
machine drift hits both alike:

- baseline: updp's ``Trainer`` with its cross-entropy step vs a plain loop
  (DataLoader, autocast forward, backward, gradient clipping, AdamW from
  timm's optimizer factory, cosine LR step);
- progressive: updp's progressive-training step (teacher forward, student
  with every pruned block fading, distillation loss) vs the same computation
  in a plain loop.

Images/s is steady state: from the start of the 2nd step to the start of the
last, so process, loader and checkpoint start-up are left out of both. Data
are random tensors already in memory: what is timed is the loop, not image
decoding. The ratio is updp / plain per round; its median is reported.

Run: python benchmarks/train_throughput.py [--model convnext_atto --img-size 64 --batch 32 --steps 20]
     python benchmarks/train_throughput.py --device cuda --model convnext_tiny --img-size 224 --batch 128
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from common import write_results
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, TensorDataset

from updp.pruner import PruningPlan, apply_plan, create_model, find_blocks, set_lambda
from updp.train.loop import TrainConfig, Trainer, ce_step, kd_loss
from updp.train.progressive_training import FadeConfig, train_plan
from updp.train.runtime import RuntimeConfig, resolve


class Clock:
    """Timestamps of step starts; images/s between the 2nd and the last."""

    def __init__(self, batch: int):
        self.batch, self.t = batch, []

    def tick(self) -> None:
        self.t.append(time.perf_counter())

    def images_per_s(self) -> float:
        return (len(self.t) - 2) * self.batch / (self.t[-1] - self.t[1])


def _data(n: int, size: int, classes: int = 10) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen))


def updp_baseline(model, data, args, rt, tmp: Path) -> float:
    clock, inner = Clock(args.batch), ce_step()

    def step(ctx, x, y, i):
        clock.tick()
        return inner(ctx, x, y, i)

    cfg = TrainConfig(epochs=args.steps / (len(data) // args.batch), batch_size=args.batch)
    Trainer(model, cfg, data, step, tmp / f"b{time.monotonic_ns()}.pt", desc="updp", rt=rt).fit()
    return clock.images_per_s()


def _update(loss, model, opt, sched, scaler) -> None:
    """A plain loop's backward and update: loss scaling, clipping, optimizer and LR steps."""
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    sched.step()


def plain_baseline(model, data, args, rt, tmp: Path) -> float:
    """A timm-style training loop, nothing more."""
    clock = Clock(args.batch)
    model = rt.prepare(model).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    scaler = rt.grad_scaler()
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, **rt.loader_options())
    for _, (x, y) in zip(range(args.steps), loader):
        clock.tick()
        x, y = rt.batch(x, y)
        with rt.autocast():
            out = model(x)
        _update(F.cross_entropy(out.float(), y, label_smoothing=0.1), model, opt, sched, scaler)
    return clock.images_per_s()


class Splits:  # what train_plan reads: training images and a validation set (one tiny batch: epoch-end cost)
    def __init__(self, data: TensorDataset):
        self.train, self.val = data, torch.utils.data.Subset(data, range(8))


def updp_progressive(baseline, plan, data, args, rt, tmp: Path) -> float:
    clock = Clock(args.batch)
    splits = Splits(data)
    fc = FadeConfig(epochs=args.steps / (len(data) // args.batch))
    out = tmp / f"p{time.monotonic_ns()}"
    out.mkdir()
    original = Trainer.__init__

    def timed_init(self, *a, **kw):  # wrap the step function train_plan builds, to timestamp it
        original(self, *a, **kw)
        fit = self.fit

        def fit_timed():
            inner = self.step_fn

            def step(ctx, x, y, i):
                clock.tick()
                return inner(ctx, x, y, i)

            self.step_fn = step
            return fit()
        self.fit = fit_timed

    Trainer.__init__ = timed_init
    try:
        train_plan(baseline, plan, splits, fc, out, batch_size=args.batch, seed=0, rt=rt)
    finally:
        Trainer.__init__ = original
    return clock.images_per_s()


def plain_progressive(baseline, plan, data, args, rt, tmp: Path) -> float:
    """The same computation as progressive training (teacher, fading student, distillation), plain."""
    clock = Clock(args.batch)
    teacher = rt.prepare(copy.deepcopy(baseline)).eval().requires_grad_(False)
    student = rt.prepare(apply_plan(copy.deepcopy(baseline), plan.names, lam=1.0)).train()
    opt = create_optimizer_v2(student, opt="adamw", lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    scaler = rt.grad_scaler()
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, **rt.loader_options())
    end = int(0.6 * args.steps)
    for i, (x, y) in zip(range(args.steps), loader):
        clock.tick()
        set_lambda(student, max(0.0, 1 - i / end))
        x, y = rt.batch(x, y)
        with torch.no_grad(), rt.autocast():
            t = teacher(x)
        with rt.autocast():
            s = student(x)
        _update(kd_loss(s.float(), t.float(), y, 0.5, 2.0, 0.1), student, opt, sched, scaler)
    return clock.images_per_s()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="steps per loop and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--name", default="train_throughput", help="results/NAME.{csv,md}")
    args = ap.parse_args()
    rt = resolve(RuntimeConfig(device=args.device, amp=args.amp, workers=args.workers))
    torch.manual_seed(0)
    base = create_model(args.model, 10)
    blocks = find_blocks(base, (3, args.img_size, args.img_size)).blocks
    plan = PruningPlan(args.model, [b.name for b in blocks[1::3]])  # every third block
    data = _data(args.batch * (args.steps + 1), args.img_size)
    pairs = {"baseline": (lambda tmp: updp_baseline(copy.deepcopy(base), data, args, rt, tmp),
                          lambda tmp: plain_baseline(copy.deepcopy(base), data, args, rt, tmp)),
             "progressive": (lambda tmp: updp_progressive(base, plan, data, args, rt, tmp),
                             lambda tmp: plain_progressive(base, plan, data, args, rt, tmp))}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for loop, (ours, plain) in pairs.items():
            ours(tmp), plain(tmp)  # warm-up round, not counted
            a, b = [], []
            for _ in range(args.rounds):
                a.append(ours(tmp))
                b.append(plain(tmp))
            ratios = [x / y for x, y in zip(a, b)]
            rows.append({"loop": loop, "model": args.model, "device": str(rt.device), "precision": rt.amp,
                         "batch": args.batch, "input": f"{args.img_size}px", "steps_per_round": args.steps,
                         "rounds": args.rounds, "updp_img_s": statistics.median(a),
                         "plain_img_s": statistics.median(b), "ratio": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios)})
            print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name(rt.device) if rt.cuda else "none"
    write_results(args.name, pd.DataFrame(rows), "Training throughput: updp's loop vs a plain timm-style loop",
                  f"Steady-state images/s (2nd to last step start) of each loop, {args.steps} steps per round, "
                  f"{args.rounds} rounds interleaved (updp, plain, updp, ...) after one warm-up round; ratio = "
                  f"updp / plain per round, median (min, max). Same model, batch, device ({rt.device}, GPU: {gpu}), "
                  f"precision ({rt.amp}), optimizer (timm AdamW), gradient clipping; random in-memory data. "
                  f"Progressive: {len(plan)} of {len(blocks)} blocks pruned (every third), fading over 60 % of the "
                  "steps, the baseline as teacher.\n\nCommand: python benchmarks/train_throughput.py "
                  f"--model {args.model} --img-size {args.img_size} --batch {args.batch} --steps {args.steps} "
                  f"--rounds {args.rounds} --device {args.device} --amp {args.amp}")


if __name__ == "__main__":
    main()
