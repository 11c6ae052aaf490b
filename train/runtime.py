"""Where and how training runs: device, mixed precision, data workers, processes (torchrun).

``RuntimeConfig`` is what users set (``--device``, ``--amp``, ...); ``Runtime``
is its resolution on this machine and in this process: the device of this
rank, the autocast dtype, the rank and world size torchrun gave it. Every
training stage (baseline, supernet, scoring, progressive training,
evaluation) takes one ``Runtime``.

Under ``torchrun`` each process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from its environment and joins the default process group
(NCCL on CUDA, gloo on CPU); rank ``r`` uses GPU ``LOCAL_RANK`` when the
device is ``auto`` or ``cuda``. Only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from updp.core.config import ConfigError, option

AMP_MODES = ("auto", "bf16", "fp16", "off")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    """Device, precision and data loading of every training stage."""

    device: str = option("auto", "auto, cpu, cuda or cuda:N (auto: CUDA when available; under torchrun each "
                         "process takes GPU LOCAL_RANK)", "--device", metavar="DEV")
    amp: str = option("auto", "mixed precision of training and evaluation (auto: bf16 on a CUDA GPU that has it, "
                      "else fp16 on CUDA, off on CPU)", "--amp", AMP_MODES)
    workers: int | None = option(None, "DataLoader worker processes per training process (default: from the CPU "
                                 "count, 0 on a CPU device)", "--workers", metavar="N")
    compile: bool = option(False, "torch.compile the model for the training steps", "--compile")
    checkpoint_minutes: float = option(10, "also checkpoint inside an epoch every M minutes", "--checkpoint-minutes",
                                       metavar="M")
    sync_bn: bool = option(False, "under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)",
                           "--sync-bn")


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    try:
        return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (start several processes with "
                          "torchrun)") from None


@dataclass(frozen=True)
class Runtime:
    """The resolved runtime of this process (see the module docstring)."""

    device: torch.device = torch.device("cpu")
    amp: str = "off"
    workers: int = 0
    compile: bool = False
    checkpoint_minutes: float = 10.0
    sync_bn: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self.amp, torch.float32)

    def describe(self) -> str:
        procs = f", {self.world_size} processes" if self.distributed else ""
        return f"{self.device}, amp {self.amp}{procs}"

    def autocast(self):
        """Mixed precision for forward passes; losses are computed on ``.float()`` outputs outside it."""
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, enabled for fp16 only (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model on the device; channels-last memory for CNNs on CUDA (same function, faster kernels)."""
        model.to(self.device)
        if self.cuda and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model.to(memory_format=torch.channels_last)
        return model

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device (asynchronous copies from pinned memory)."""
        if x.device == self.device and y.device == self.device:
            return x, y
        x = x.to(self.device, non_blocking=True)
        if self.cuda and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def loader_options(self) -> dict:
        """DataLoader keyword arguments: workers (persistent), pinned memory on CUDA."""
        opts = {"num_workers": self.workers, "pin_memory": self.cuda}
        if self.workers:
            opts.update(persistent_workers=True, prefetch_factor=4)
        return opts


CPU = Runtime()


def _device(spec: str, local_rank: int) -> torch.device:
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not (spec.startswith("cuda:") and spec[5:].isdigit()):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r} (flag --device or config key "
                          "'runtime.device')")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec} asked for, but this torch sees no CUDA GPU (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    index = local_rank if spec == "cuda" else int(spec[5:])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device cuda:{index} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def _amp(spec: str, device: torch.device) -> str:
    if spec not in AMP_MODES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {spec!r} (flag --amp or config key "
                          "'runtime.amp')")
    if spec != "auto":
        return spec
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def default_workers(device: torch.device, world_size: int) -> int:
    """Data workers per process: none on a CPU device (they would compete with the model for the cores),
    else the CPUs this process may use, shared among the local processes, one left for the main thread."""
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(0, min(8, cpus // max(1, local) - 1))


def resolve(cfg: RuntimeConfig) -> Runtime:
    """This process's runtime; a device or precision this machine cannot give is a ConfigError here."""
    rank, world, local_rank = distributed_env()
    device = _device(cfg.device, local_rank)
    if cfg.workers is not None and cfg.workers < 0:
        raise ConfigError(f"workers must be zero or more, got {cfg.workers} (flag --workers)")
    if not cfg.checkpoint_minutes > 0:
        raise ConfigError(f"checkpoint_minutes must be positive, got {cfg.checkpoint_minutes} "
                          "(flag --checkpoint-minutes)")
    if cfg.sync_bn and device.type != "cuda":
        raise ConfigError("sync_bn needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); drop --sync-bn "
                          "on the CPU")
    workers = default_workers(device, world) if cfg.workers is None else cfg.workers
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    return Runtime(device, _amp(cfg.amp, device), workers, cfg.compile, float(cfg.checkpoint_minutes),
                   cfg.sync_bn, rank, world)


def init_distributed(rt: Runtime, timeout_minutes: float = 30) -> None:
    """Join the default process group once (torchrun's rendezvous); nothing in a single process.

    A rank that dies makes the others' next collective fail after at most ``timeout_minutes``
    (gloo fails at once when the peer's connection closes), so a job never hangs.
    """
    import torch.distributed as dist

    if not rt.distributed or dist.is_initialized():
        return
    if rt.cuda:
        torch.cuda.set_device(rt.device)
    dist.init_process_group("nccl" if rt.cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=rt.device if rt.cuda else None)


def leave_distributed() -> None:
    """Leave the process group after a finished command (torch asks for it: a gloo group left to the
    interpreter's exit can abort the process, "terminate called without an active exception").

    Only after success: when a peer has gone, the process exits with its error and torchrun ends the rest.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(rt: Runtime, obj=None):
    """Rank 0's ``obj`` on every rank (a no-op in one process)."""
    if not rt.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(rt: Runtime, values: dict[str, float]) -> dict[str, float]:
    """Per-step metrics averaged over the ranks (each rank saw its share of the global batch)."""
    if not rt.distributed or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=rt.device if rt.cuda else "cpu")
    dist.all_reduce(t)
    return dict(zip(keys, (t / rt.world_size).tolist()))
