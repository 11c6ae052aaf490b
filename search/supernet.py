"""The weight-sharing supernet: every candidate block switchable between original and pruned.

Each candidate block is wrapped in its progressive form once; a plan sets
lambda 0 on its blocks and 1 on the rest, so every subnet shares the
original weights (plus the BNs the pruned forms add). Each step trains the full
model, its output distilling the subnets the ``sampling`` rule draws:

- ``sandwich``: the most-pruned allowed plan and ``random_plans`` random plans;
- ``uniform``: ``random_plans + 1`` random plans;
- ``budget``: the most-pruned plan and ``random_plans`` plans each the nearest to the
  latency budget of ``BUDGET_DRAWS`` random ones (``near(plan)``: distance to it).
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from updp.core.plan import PruningPlan
from updp.pruner.plan import apply_plan, set_lambda
from updp.search.space import SearchSpace
from updp.train.loop import StepContext, kd_loss

BUDGET_DRAWS = 8


class Supernet:
    def __init__(self, model: nn.Module, space: SearchSpace):
        self.model = apply_plan(model, space.names, lam=1.0)
        self.space = space

    def set_plan(self, pruned: Iterable[str]) -> None:
        pruned = set(pruned)
        set_lambda(self.model, {n: 0.0 if n in pruned else 1.0 for n in self.space.names})

    def plans(self, rng: random.Random, random_plans: int = 1, sampling: str = "sandwich",
              near: Callable[[PruningPlan], float] | None = None) -> list[PruningPlan]:
        """The subnets one step trains besides the full model (see the module's docstring)."""
        if sampling == "uniform":
            return [self.space.random_plan(rng) for _ in range(random_plans + 1)]
        if sampling == "budget":
            if near is None:
                raise ValueError("budget sampling needs near(plan), the distance to the latency budget")
            return [self.space.most_pruned(rng)] + [
                min((self.space.random_plan(rng) for _ in range(BUDGET_DRAWS)), key=near) for _ in range(random_plans)]
        if sampling != "sandwich":
            raise ValueError(f"unknown supernet sampling {sampling!r}")
        return [self.space.most_pruned(rng)] + [self.space.random_plan(rng) for _ in range(random_plans)]

    def sandwich_step(self, random_plans: int = 1, kd_alpha: float = 0.5, temperature: float = 2.0,
                      label_smoothing: float = 0.1, seed: int = 0, sampling: str = "sandwich",
                      near: Callable[[PruningPlan], float] | None = None):
        """A ``StepFn``: backward through the full model and the subnets of :meth:`plans`.

        The plans depend on (seed, step) alone, so under torchrun every process trains the same
        subnets in a step; gradients are reduced across processes once, at the last backward.
        """
        def step(ctx: StepContext, x, y, step_index):
            rng = random.Random(seed * 100_003 + step_index)
            plans = self.plans(rng, random_plans, sampling, near)
            with ctx.accumulate():
                self.set_plan(())
                full = ctx.forward(x)
                loss_full = F.cross_entropy(full, y, label_smoothing=label_smoothing)
                ctx.backward(loss_full)
            teacher = full.detach()
            sub_losses = []
            for k, plan in enumerate(plans):
                self.set_plan(plan)
                with ctx.accumulate() if k < len(plans) - 1 else contextlib.nullcontext():
                    loss = kd_loss(ctx.forward(x), teacher, y, kd_alpha, temperature, label_smoothing)
                    ctx.backward(loss)
                sub_losses.append(loss.detach())
            self.set_plan(())
            return {"loss": loss_full.detach(), "sub_loss": torch.stack(sub_losses).mean()}
        return step
