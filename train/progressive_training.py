"""Progressive training of a pruning plan (method.md sections 2 and 7).

The student starts as the baseline; each pruned block fades from its
original form (lambda 1) to its pruned form (lambda 0) on the schedule, the
baseline distilling it; then lambda stays 0 while the pruned form converges.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from updp.core.config import option
from updp.pruner import LambdaSchedule, PruningPlan, apply_plan, set_lambda
from updp.pruner.schedule import SCHEDULES
from updp.train.data import Splits, fixed_batches
from updp.train.loop import StepContext, TrainConfig, Trainer, kd_loss
from updp.train.runtime import CPU, Runtime


@dataclass(frozen=True)
class FadeConfig:
    """How the pruned blocks fade and how the baseline distils them."""

    epochs: float = option(6, "progressive training epochs", "--train-epochs", metavar="N")
    lr: float = option(1e-3, "progressive training learning rate", "--train-lr")
    schedule: str = option("linear", "lambda schedule", "--schedule", SCHEDULES)
    lambda_end_frac: float = option(0.6, "lambda reaches 0 at this fraction of training", "--lambda-end-frac",
                                    metavar="F")
    stagger_frac: float = option(0.0, "each block starts fading this fraction of training after the previous")
    kd_alpha: float = option(0.5, "weight of the distillation loss (the rest: cross-entropy)", "--kd-alpha")
    kd_temperature: float = option(2.0, "distillation temperature")


def schedule_for(fc: FadeConfig, plan: list[str], total_steps: int) -> LambdaSchedule:
    end = int(fc.lambda_end_frac * total_steps)
    spacing = int(fc.stagger_frac * total_steps)
    if spacing:
        return LambdaSchedule.staggered(plan, 0, max(1, end - spacing * (len(plan) - 1)), spacing, fc.schedule)
    return LambdaSchedule(0, end, fc.schedule)


def train_plan(baseline: nn.Module, plan: PruningPlan, splits: Splits, fc: FadeConfig, out_dir: Path, *,
               batch_size: int, seed: int, desc: str = "progressive", rt: Runtime = CPU) -> nn.Module:
    """Train the pruned subnet from the baseline with lambda fading and distillation; resumable.

    The student and the teacher (the baseline) are on ``rt``'s device; the student comes back there.
    ``fc.lambda_end_frac`` 0 prunes every block at step 0 (no fade).
    """
    names = plan.names
    student = apply_plan(copy.deepcopy(baseline), names, lam=1.0)
    state = {"lam": 1.0}
    schedule: list[LambdaSchedule] = []

    def fade(i: int) -> dict:
        lams = schedule[0].lambdas(i, names)
        set_lambda(student, lams)
        state["lam"] = sum(lams.values()) / max(1, len(lams))
        return {"lam": state["lam"]}

    trainer = distillation_trainer(student, baseline, splits, fc, out_dir, batch_size=batch_size, seed=seed,
                                   desc=desc, rt=rt, before_step=fade,
                                   extra_state=lambda: {"lambda": state["lam"]})
    schedule.append(schedule_for(fc, names, trainer.total_steps))
    trainer.fit()
    set_lambda(student, 0.0)
    return student


def distillation_trainer(student: nn.Module, teacher: nn.Module, splits: Splits, fc: FadeConfig, out_dir: Path, *,
                         batch_size: int, seed: int, desc: str = "distil", rt: Runtime = CPU,
                         before_step: Callable[[int], dict] | None = None,
                         extra_state: Callable[[], dict] | None = None) -> Trainer:
    """A resumable trainer of ``student`` on cross-entropy plus distillation from ``teacher`` (frozen).

    ``fc`` gives the epochs, learning rate and distillation weights; ``before_step(i)`` runs before each step's
    forward (progressive training sets the lambdas there) and returns figures for the step's metrics.
    Checkpoint ``out_dir/train.pt``, metrics ``out_dir/train_metrics.csv``. Call ``fit()`` on it.
    """
    teacher = rt.prepare(copy.deepcopy(teacher).eval().requires_grad_(False))
    trainer_cfg = TrainConfig(epochs=fc.epochs, batch_size=batch_size, lr=fc.lr, seed=seed)
    # progressive blocks at lambda 0 or 1 skip a branch: those parameters take no part in some steps
    trainer = Trainer(student, trainer_cfg, splits.train, None, out_dir / "train.pt",
                      val_batches=fixed_batches(splits.val, 1000, seed), metrics_csv=out_dir / "train_metrics.csv",
                      desc=desc, extra_state=extra_state, rt=rt, find_unused_parameters=True)

    def step(ctx: StepContext, x, y, i):
        figures = before_step(i) if before_step else {}
        with torch.no_grad():
            target = ctx.forward(x, teacher)
        loss = kd_loss(ctx.forward(x), target, y, fc.kd_alpha, fc.kd_temperature, 0.1)
        ctx.backward(loss)
        return {"loss": loss.detach(), **figures}

    trainer.step_fn = step
    return trainer
