"""The training loop shared by baseline, supernet and progressive training.

One loop, three uses: ``step_fn`` does the forward and backward passes of one
batch (plain cross-entropy, the supernet's sandwich rule, or distillation
with a lambda schedule). The loop owns the optimizer, the cosine schedule,
progress, per-epoch metrics and atomic checkpoints. A checkpoint is written
at every epoch end and when training is interrupted (Ctrl-C or SIGTERM: the
step in flight finishes first), and ``fit`` resumes from it exactly.

Exactness comes from randomness that depends only on (seed, stage, step):
before each step the global RNG, which the augmentations and timm's
drop-path draw from, is seeded from them, and the batch order of an epoch
from (seed, epoch). Nothing else that ran in the process (another stage, a
latency table, an earlier interrupted attempt) changes what a step sees.
Checkpoints hold only tensors and plain types and are loaded with
``weights_only=True``: a planted file cannot run code.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from updp.core.errors import CheckpointError, UpdpError
from updp.core.fileio import atomic_path

StepFn = Callable[[torch.Tensor, torch.Tensor, int], dict]


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    grad_clip: float = 5.0


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, temperature: float,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """``(1 - a) * CE + a * T^2 * KL(teacher/T || student/T)`` (method.md section 7)."""
    ce = F.cross_entropy(student, target, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def ce_step(model: nn.Module, label_smoothing: float = 0.1) -> StepFn:
    def step(x, y, _step):
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        loss.backward()
        return {"loss": loss.item()}
    return step


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> dict:
    """Top-1 (%) and mean cross-entropy over ``batches`` (a loader or a list of batches)."""
    was = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches:
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(-1) == y).sum().item()
        total += len(y)
    model.train(was)
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1), "images": total}


class Interrupt:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True

        for s in old:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def step_seed(seed: int, stage: str, step: int) -> int:
    """The seed of one training step: a function of the run's seed, the stage and the step alone."""
    return zlib.crc32(f"{seed}:{stage}:{step}".encode())


class Trainer:
    """Runs ``step_fn`` over ``train_set`` for ``cfg.epochs``; resumable from ``ckpt``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_set: Dataset, step_fn: StepFn,
                 ckpt: str | os.PathLike, val_batches=None, metrics_csv: str | os.PathLike | None = None,
                 desc: str = "train", extra_state: Callable[[], dict] | None = None):
        if cfg.batch_size <= 0:
            raise UpdpError(f"batch size must be positive, got {cfg.batch_size}")
        if len(train_set) < cfg.batch_size:
            raise UpdpError(f"{desc}: {len(train_set)} training images are fewer than the batch size "
                            f"{cfg.batch_size}; pass --batch-size {max(1, len(train_set))} or smaller, or add images")
        self.model, self.cfg, self.train_set, self.step_fn = model, cfg, train_set, step_fn
        self.ckpt, self.val_batches, self.desc = Path(ckpt), val_batches, desc
        self.metrics_csv = Path(metrics_csv) if metrics_csv else None
        self.extra_state = extra_state
        self.steps_per_epoch = len(train_set) // cfg.batch_size
        self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        # timm's recipe: no weight decay on 1-D parameters (norms, biases, ConvNeXt gamma, the BNs pruning adds).
        self.opt = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, int(cfg.warmup_frac * self.total_steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _cosine(s, warmup, self.total_steps))
        self.step = 0
        self.metrics: list[dict] = []
        self.interrupt = Interrupt()
        self.updating = False  # True while parameters are being written (a cut there leaves them half-updated)

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, complete: bool = False) -> None:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 "step": self.step, "metrics": self.metrics, "complete": complete, "config": asdict(self.cfg)}
        with atomic_path(self.ckpt) as tmp:
            torch.save(state, tmp)

    def resume(self) -> bool:
        """Load the checkpoint if there is one; True if training had already finished."""
        if not self.ckpt.is_file():
            return False
        try:
            state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            if not state.get("complete"):  # a finished stage needs only its weights
                self._load_optimizer(state)
            self.step, self.metrics = int(state["step"]), list(state["metrics"])
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any damage to the file is reported the same way
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise CheckpointError(f"training checkpoint '{self.ckpt}' is unreadable, unsafe or for another model "
                                  f"({type(e).__name__}: {reason}); delete it to start over") from None
        return bool(state.get("complete"))

    def _load_optimizer(self, state: dict) -> None:
        groups = len(state["opt"]["param_groups"])
        if groups != len(self.opt.param_groups):
            raise CheckpointError(f"training checkpoint '{self.ckpt}' was written by an older updp ({groups} "
                                  f"optimizer group{'s' * (groups != 1)}); delete it to restart this stage")
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    # --- loop ----------------------------------------------------------------------------------

    def _batches(self, epoch: int, skip: int):
        """The epoch's shuffled batches from batch ``skip`` on; skipped ones are never loaded."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        order = torch.randperm(len(self.train_set), generator=gen)[skip * self.cfg.batch_size:]
        # the loader draws its own base seed from this generator, not from the global RNG
        return DataLoader(Subset(self.train_set, order.tolist()), batch_size=self.cfg.batch_size, shuffle=False,
                          drop_last=True, generator=torch.Generator().manual_seed(gen.initial_seed() + skip))

    def fit(self) -> list[dict]:
        if self.resume():
            return self.metrics
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True)
        with torch.random.fork_rng(devices=[]), self.interrupt.installed():
            try:
                while self.step < self.total_steps:
                    epoch, skip = divmod(self.step, self.steps_per_epoch)
                    self._epoch(epoch, skip, bar)
                    if self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps:
                        self._end_epoch(epoch, bar)
                    if self.interrupt.requested:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                bar.close()
                self._save_interrupted()  # a further Ctrl-C here stops at once; the last checkpoint stays
                raise
        bar.close()
        self.save(complete=True)
        return self.metrics

    def _save_interrupted(self) -> None:
        """Keep the state after the last whole step (the previous checkpoint if parameters were half-written)."""
        if self.updating:
            return
        if getattr(self, "buffers", None) is not None:  # cut mid-step: BN statistics back to the last whole step
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), self.buffers):
                    b.copy_(saved)
        self.save()

    def _epoch(self, epoch: int, skip: int, bar: tqdm) -> None:
        t0, seen = time.perf_counter(), 0
        batches = iter(self._batches(epoch, skip))
        while self.step < self.total_steps and not self.interrupt.requested:
            torch.manual_seed(step_seed(self.cfg.seed, self.desc, self.step))  # augmentation, drop-path
            try:
                x, y = next(batches)
            except StopIteration:
                return
            self.opt.zero_grad(set_to_none=True)
            # BN running statistics move in the forward pass: keep them to undo a step cut short
            self.buffers = [b.clone() for b in self.model.buffers()]
            info = self.step_fn(x, y, self.step)
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.updating = True
            self.opt.step()
            self.sched.step()
            self.step += 1
            self.updating = False
            self.buffers = None
            seen += len(y)
            self.last = info
            bar.update(1)
            bar.set_postfix(epoch=epoch, **{k: f"{v:.3g}" for k, v in info.items()},
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")

    def _end_epoch(self, epoch: int, bar: tqdm) -> None:
        row = {"epoch": epoch, "step": self.step, "lr": self.sched.get_last_lr()[0],
               **{f"train_{k}": v for k, v in getattr(self, "last", {}).items()}}
        if self.extra_state:
            row.update(self.extra_state())
        if self.val_batches is not None:
            row.update({f"val_{k}": v for k, v in evaluate(self.model, self.val_batches).items()})
            bar.write(f"{self.desc} epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                                  if isinstance(v, float)))
            self.model.train()
        self.metrics.append(row)
        if self.metrics_csv:
            _write_csv(self.metrics_csv, self.metrics)
        self.save()


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
