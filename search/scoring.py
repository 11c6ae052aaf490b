"""Scoring a plan with the supernet: BN re-estimation, optional short fine-tune, top-1 and loss on the scoring images.

Scoring never changes the supernet the next candidate sees: with no
fine-tune only BN statistics move, and they are restored afterwards; with a
fine-tune the plan is scored on a copy.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from updp.search.supernet import Supernet
from updp.train.bn import bn_modules, recalibrate_bn
from updp.train.loop import evaluate
from updp.train.runtime import CPU, Runtime

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _finetune(model: nn.Module, batches: Iterable, steps: int, lr: float, rt: Runtime) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    it = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            x, y = next(it)
        x, y = rt.batch(x, y)
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            out = model(x).float()
        F.cross_entropy(out, y).backward()  # bf16 needs no loss scaling; fp16 fine-tunes run in fp32
        opt.step()


def score_plan(supernet: Supernet, pruned: Iterable[str], calib: Batches, held_out: Batches,
               finetune_steps: int = 0, finetune_batches: Iterable | None = None, lr: float = 1e-4,
               rt: Runtime = CPU) -> dict:
    """Top-1 (%) and loss of the plan on ``held_out`` (the images it is scored on: training or held-out ones,
    ``--score-on``) after BN re-estimation on ``calib``.

    The supernet stays on ``rt``'s device; pass batches already there (:func:`resident`) and a
    candidate costs no host copy beyond its metrics.
    """
    supernet.set_plan(pruned)
    if finetune_steps:
        model = copy.deepcopy(supernet.model)
        _finetune(model, finetune_batches or calib, finetune_steps, lr, rt)
        recalibrate_bn(model, calib, rt)
        return evaluate(model, held_out, rt)
    with calibrated(supernet, pruned, calib, rt) as model:
        return evaluate(model, held_out, rt)


@contextlib.contextmanager
def calibrated(supernet: Supernet, pruned: Iterable[str], calib: Batches, rt: Runtime = CPU):
    """The supernet set to the plan, its BN statistics re-estimated on ``calib``; both undone on exit."""
    supernet.set_plan(pruned)
    bns = bn_modules(supernet.model)
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    try:
        recalibrate_bn(supernet.model, calib, rt)
        yield supernet.model
    finally:
        for bn, state in zip(bns, saved):
            bn.load_state_dict(state)
        supernet.set_plan(())


def resident(batches: Batches, rt: Runtime) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches copied to the device once, for scoring every candidate there."""
    return [rt.batch(x, y) for x, y in batches]
