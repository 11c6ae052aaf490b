"""The training loop shared by baseline, supernet and progressive training.

One loop, three uses: ``step_fn`` does the forward and backward passes of one
batch (plain cross-entropy, the supernet's sandwich rule, or distillation
with a lambda schedule). The loop owns the device, mixed precision, the
optimizer, the cosine schedule, progress, per-epoch metrics and atomic
checkpoints. A checkpoint is written every ``checkpoint_minutes`` inside an
epoch, at every epoch end and when training is interrupted (Ctrl-C or
SIGTERM: the step in flight finishes first), and ``fit`` resumes from it
exactly.

Exactness comes from randomness that depends only on the seed and on where
the loop is: the batch order of an epoch on (seed, epoch), each image's
augmentation on (seed, stage, epoch, image) wherever it is decoded (main
process or a DataLoader worker), and timm's drop-path on (seed, stage, step).
Nothing else that ran in the process (another stage, a latency table, an
earlier interrupted attempt) changes what a step sees.

``batch_size`` is the global batch. Under torchrun each of the N processes
takes its 1/N share of every global batch (the same images in the same
steps whatever N is), the model is wrapped in DistributedDataParallel and
only rank 0 writes checkpoints and metrics. Checkpoints hold only tensors and
plain types and are loaded with ``weights_only=True``: a planted file cannot
run code.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
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
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from updp.core.errors import CheckpointError, UpdpError
from updp.core.fileio import atomic_path
from updp.pruner.norms import plain_batchnorm, sync_batchnorm
from updp.train.runtime import CPU, Runtime, barrier, mean_over_ranks


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


class StepContext:
    """What a step function gets: the model to run (DDP-wrapped under torchrun), autocast and backward.

    ``forward`` returns fp32 logits, so losses (and distillation) are computed in fp32;
    ``backward`` scales the loss for fp16; ``accumulate`` is for all but the last of several
    backward passes in one step (gradients are reduced across processes once, at the last).
    """

    def __init__(self, net: nn.Module, rt: Runtime, scaler: torch.amp.GradScaler):
        self.net, self.rt, self.scaler = net, rt, scaler

    def forward(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        with self.rt.autocast():
            return (module or self.net)(x).float()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def accumulate(self):
        no_sync = getattr(self.net, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()


# A step returns its figures as floats or 0-d tensors (losses stay on the device: reading one waits for the GPU)
StepFn = Callable[[StepContext, torch.Tensor, torch.Tensor, int], dict]
# steps between two readings of the step's figures (progress bar); the epoch's last step is always read
SHOW_EVERY = 25


def ce_step(label_smoothing: float = 0.1) -> StepFn:
    def step(ctx: StepContext, x, y, _step):
        loss = F.cross_entropy(ctx.forward(x), y, label_smoothing=label_smoothing)
        ctx.backward(loss)
        return {"loss": loss.detach()}
    return step


@torch.no_grad()
def evaluate(model: nn.Module, batches, rt: Runtime = CPU, shard: bool = False) -> dict:
    """Top-1 (%) and mean cross-entropy over ``batches`` (a loader or a list of batches).

    Sums stay on the device until the end (one host round trip). ``shard``: under torchrun each
    process evaluates every N-th batch and the sums are added over the processes.
    """
    was = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # correct, loss, images
    for k, (x, y) in enumerate(batches):
        if shard and rt.distributed and k % rt.world_size != rt.rank:
            continue
        x, y = rt.batch(x, y)
        with rt.autocast():
            out = model(x).float()
        sums[0] += (out.argmax(-1) == y).sum()
        sums[1] += F.cross_entropy(out, y, reduction="sum")
        sums[2] += len(y)
    if shard and rt.distributed:
        import torch.distributed as dist

        dist.all_reduce(sums)
    model.train(was)
    correct, loss, total = sums.tolist()
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1), "images": int(total)}


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


class EpochOrder(Sampler):
    """This process's share of an epoch's global batches, from global batch ``skip`` on.

    The epoch's order is a permutation seeded by (seed, epoch); global batch ``b`` is its
    ``b``-th slice of ``batch_size`` images, and rank ``r`` of ``world`` takes the ``r``-th
    1/world of it, so every step sees the same images on any number of processes. Yields
    (epoch, index) keys for :class:`SeededAugment`.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.local = batch_size // world
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, self.n // self.batch - self.skip) * self.local

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for b in range(self.skip, self.n // self.batch):
            start = b * self.batch + self.rank * self.local
            for i in order[start:start + self.local].tolist():
                yield self.epoch, i


class SeededAugment(Dataset):
    """``dataset[i]`` with the RNGs seeded from (seed, stage, epoch, i) first: an image's augmentation
    is the same in any process, worker or resumed run."""

    def __init__(self, dataset: Dataset, seed: int, stage: str):
        self.dataset, self.seed, self.stage = dataset, seed, stage

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        s = zlib.crc32(f"{self.seed}:{self.stage}:{epoch}:{i}".encode())
        torch.default_generator.manual_seed(s)
        random.seed(s)
        return self.dataset[i]


class Trainer:
    """Runs ``step_fn`` over ``train_set`` for ``cfg.epochs``; resumable from ``ckpt``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_set: Dataset, step_fn: StepFn,
                 ckpt: str | os.PathLike, val_batches=None, metrics_csv: str | os.PathLike | None = None,
                 desc: str = "train", extra_state: Callable[[], dict] | None = None, rt: Runtime = CPU,
                 find_unused_parameters: bool = False):
        if cfg.batch_size <= 0:
            raise UpdpError(f"batch size must be positive, got {cfg.batch_size}")
        if len(train_set) < cfg.batch_size:
            raise UpdpError(f"{desc}: {len(train_set)} training images are fewer than the batch size "
                            f"{cfg.batch_size}; pass --batch-size {max(1, len(train_set))} or smaller, or add images")
        if cfg.batch_size % rt.world_size:
            raise UpdpError(f"{desc}: the global batch size {cfg.batch_size} does not split evenly over "
                            f"{rt.world_size} processes; pass a --batch-size that is a multiple of {rt.world_size}")
        if rt.sync_bn and rt.distributed:  # BN statistics over the global batch; plain BNs again after fit
            model = sync_batchnorm(model)
        self.model, self.cfg, self.train_set, self.step_fn = rt.prepare(model), cfg, train_set, step_fn
        self.ckpt, self.val_batches, self.desc, self.rt = Path(ckpt), val_batches, desc, rt
        self.find_unused_parameters = find_unused_parameters
        self.metrics_csv = Path(metrics_csv) if metrics_csv else None
        self.extra_state = extra_state
        self.steps_per_epoch = len(train_set) // cfg.batch_size
        self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        # timm's recipe: no weight decay on 1-D parameters (norms, biases, ConvNeXt gamma, the BNs pruning adds).
        self.opt = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, int(cfg.warmup_frac * self.total_steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _cosine(s, warmup, self.total_steps))
        self.scaler = rt.grad_scaler()
        self.step = 0
        self.metrics: list[dict] = []
        self.interrupt = Interrupt()
        self.updating = False  # True while parameters are being written (a cut there leaves them half-updated)

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, complete: bool = False) -> None:
        """Rank 0 writes the checkpoint (atomically); the other processes hold the same state."""
        self.saved_at = time.monotonic()
        if not self.rt.is_main:
            return
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 "scaler": self.scaler.state_dict(), "step": self.step, "metrics": self.metrics,
                 "complete": complete, "config": asdict(self.cfg)}
        with atomic_path(self.ckpt) as tmp:
            torch.save(state, tmp)

    def resume(self) -> bool:
        """Load the checkpoint if there is one; True if training had already finished."""
        if not self.ckpt.is_file():
            return False
        try:
            state = torch.load(self.ckpt, map_location=self.rt.device, weights_only=True)
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
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # --- loop ----------------------------------------------------------------------------------

    def _loader(self) -> tuple[DataLoader, EpochOrder]:
        """One loader for the whole fit (workers persist across epochs); its sampler picks epoch and skip."""
        rt = self.rt
        order = EpochOrder(len(self.train_set), self.cfg.batch_size, self.cfg.seed, rt.rank, rt.world_size)
        loader = DataLoader(SeededAugment(self.train_set, self.cfg.seed, self.desc), batch_size=order.local,
                            sampler=order, drop_last=True, **rt.loader_options())
        return loader, order

    def _network(self) -> nn.Module:
        """What the steps run: the model, compiled if asked, wrapped in DDP under torchrun."""
        net = self.model
        if self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(net, device_ids=[self.rt.device] if self.rt.cuda else None,
                                          find_unused_parameters=self.find_unused_parameters)
        return torch.compile(net) if self.rt.compile else net

    def fit(self) -> list[dict]:
        barrier(self.rt)  # a checkpoint rank 0 is still writing is read by nobody
        if self.resume():
            plain_batchnorm(self.model)
            return self.metrics
        self.model.train()
        self.ctx = StepContext(self._network(), self.rt, self.scaler)
        loader, order = self._loader()
        self.saved_at = time.monotonic()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True,
                   disable=not self.rt.is_main)
        with torch.random.fork_rng(devices=[]), self.interrupt.installed():
            try:
                while self.step < self.total_steps:
                    epoch, skip = divmod(self.step, self.steps_per_epoch)
                    order.set_epoch(epoch, skip)
                    self._epoch(epoch, iter(loader), bar)
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
        barrier(self.rt)
        plain_batchnorm(self.model)
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

    def _stop_requested(self) -> bool:
        """Every process stops at the same step when any one was asked to (Ctrl-C, SIGTERM)."""
        if not self.rt.distributed:
            return self.interrupt.requested
        import torch.distributed as dist

        flag = torch.tensor([float(self.interrupt.requested)], device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.interrupt.requested = bool(flag.item())
        return self.interrupt.requested

    def _epoch(self, epoch: int, batches, bar: tqdm) -> None:
        t0, seen = time.perf_counter(), 0
        rt, period = self.rt, self.rt.checkpoint_minutes * 60
        while self.step < self.total_steps and not self._stop_requested():
            try:
                x, y = next(batches)
            except StopIteration:
                return
            x, y = rt.batch(x, y)
            torch.manual_seed(step_seed(self.cfg.seed, self.desc, self.step))  # drop-path
            self.opt.zero_grad(set_to_none=True)
            # BN running statistics move in the forward pass: keep them to undo a step cut short
            self.buffers = [b.clone() for b in self.model.buffers()]
            info = self.step_fn(self.ctx, x, y, self.step)
            if self.cfg.grad_clip:
                self.scaler.unscale_(self.opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.updating = True
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            self.step += 1
            self.updating = False
            self.buffers = None
            seen += len(y) * rt.world_size
            last = self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps
            if last or self.step % SHOW_EVERY == 0:  # the same steps in every process (a collective under torchrun)
                self.last = mean_over_ranks(rt, {k: float(v) for k, v in info.items()})
                bar.set_postfix(epoch=epoch, **{k: f"{v:.3g}" for k, v in self.last.items()},
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
            if self.step % self.steps_per_epoch and time.monotonic() - self.saved_at >= period:
                self.save()  # inside the epoch; the epoch's end saves anyway
            bar.update(1)

    def _end_epoch(self, epoch: int, bar: tqdm) -> None:
        row = {"epoch": epoch, "step": self.step, "lr": self.sched.get_last_lr()[0],
               **{f"train_{k}": v for k, v in getattr(self, "last", {}).items()}}
        if self.extra_state:
            row.update(self.extra_state())
        if self.val_batches is not None:
            val = evaluate(self.model, self.val_batches, self.rt, shard=True)
            row.update({f"val_{k}": v for k, v in val.items()})
            if self.rt.is_main:
                bar.write(f"{self.desc} epoch {epoch}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
            self.model.train()
        self.metrics.append(row)
        if self.metrics_csv and self.rt.is_main:
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
