"""The contract every latency backend fulfils.

``LatencyBackend.measure`` fixes what a figure means; backends only write
``load``, ``run_once`` and ``release``:

- units: milliseconds per batch, input already on the device (no host-device
  copies in the timed region where the backend has a device);
- warm-up: at least ``warmup_runs`` runs and ``warmup_ms`` milliseconds;
- timed: at least ``min_runs`` runs and ``min_time_s`` seconds, at most
  ``max_runs`` runs; each run timed on its own (device events where the
  backend has them, else ``time.perf_counter``);
- statistics: median, mean, p90, p99 (nearest rank), min, max, count;
- a time limit: a measurement that passes ``timeout_s`` stops and returns a
  failure record. Failures (export, engine build, out of memory) are records
  with ``error`` set, never exceptions, so a search can store them.

``measure`` is ``prepare`` (export when needed), ``load``, ``timed_runs`` for
the warm-up and ``timed_runs`` for the figures, then ``release``; drivers
that time several models in turn (``interleave``) use the same public steps.
"""
from __future__ import annotations

import abc
import contextlib
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from updp.core.errors import UpdpError
from updp.latency.context import host_context
from updp.latency.result import LatencyResult, failure, summarize

PRECISIONS = ("fp32", "fp16", "int8")


class BackendUnavailable(UpdpError):
    """The backend's packages or device are missing; the message says what to install."""


class MeasurementTimeout(Exception):
    """Raised inside ``measure`` when the time limit is reached."""


@dataclass(frozen=True)
class MeasureConfig:
    batch_size: int = 1
    input_shape: tuple[int, ...] = (3, 224, 224)
    precision: str = "fp32"
    warmup_runs: int = 10
    warmup_ms: float = 200.0
    min_runs: int = 50
    min_time_s: float = 1.0
    max_runs: int = 10_000
    timeout_s: float = 300.0
    threads: int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UpdpError(f"unknown precision '{self.precision}'; use one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1 or self.min_runs < 1:
            raise UpdpError("batch size and run count must be at least 1")

    @property
    def full_shape(self) -> tuple[int, ...]:
        return (self.batch_size, *self.input_shape)


class LatencyBackend(abc.ABC):
    """Base class: a backend times one loaded model ``run_once`` at a time.

    ``target`` is an ``nn.Module`` or the path of an ONNX file; backends whose
    ``needs_onnx`` is true get an ONNX file (a module is exported first).
    """

    name: str = ""
    needs_onnx: bool = True
    supported_precisions: tuple[str, ...] = ("fp32",)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (missing package or device), or None."""
        return None

    @abc.abstractmethod
    def load(self, target: Any, cfg: MeasureConfig) -> None:
        """Prepare the model and an input of ``cfg.full_shape`` on the device."""

    @abc.abstractmethod
    def run_once(self) -> float | None:
        """One inference; returns its device time in ms, or None to use the host clock."""

    def release(self) -> None:
        """Free what ``load`` took."""

    def context(self) -> dict[str, Any]:
        """Device and library versions of this backend (callable before ``load``)."""
        return {}

    def identity(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """``(device, versions)``: what a cached figure must match to be reused."""
        ctx = self.context()
        skip = {"device", "compile", "torch_threads", "execution_provider", "timing_cache", "thread_spinning"}
        versions = tuple(sorted((k, str(v)) for k, v in ctx.items() if k not in skip))
        return str(ctx.get("device", "unknown")), versions

    @classmethod
    def precision_error(cls, precision: str) -> str | None:
        """Why this backend cannot time ``precision`` (a failure reason), or None."""
        if precision in cls.supported_precisions:
            return None
        return f"backend '{cls.name}' does not support {precision} (supported: {', '.join(cls.supported_precisions)})"

    @classmethod
    def interleaved_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The constructor options for one of several instances timed in turn (``measure_interleaved``).

        The default is ``options`` unchanged; a backend whose idle threads would
        take the cores from the instance that runs next turns that off here.
        """
        return options

    def measure(self, target: Any, cfg: MeasureConfig, workdir: str | Path | None = None) -> LatencyResult:
        fields = dict(backend=self.name, precision=cfg.precision, batch_size=cfg.batch_size,
                      input_shape=tuple(cfg.input_shape))
        if (unsupported := self.precision_error(cfg.precision)) is not None:
            return failure(unsupported, **fields)
        deadline = time.monotonic() + cfg.timeout_s
        try:
            with contextlib.ExitStack() as stack:
                folder = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="updp-onnx-"))
                self.load(self.prepare(target, cfg, Path(folder)), cfg)
            self.timed_runs(deadline, cfg.warmup_runs, cfg.warmup_ms / 1e3, cfg.max_runs)
            samples = self.timed_runs(deadline, cfg.min_runs, cfg.min_time_s, cfg.max_runs)
            ctx = {**host_context(), **self.context(), "threads": cfg.threads}
            return summarize(samples, context=ctx, **fields)
        except MeasurementTimeout:
            return failure(f"timed out after {cfg.timeout_s:g} s", **fields)
        except Exception as e:  # noqa: BLE001 - any backend failure becomes a record
            return failure(failure_reason(e), **fields)
        finally:
            self.release()

    def prepare(self, target: Any, cfg: MeasureConfig, folder: Path) -> Any:
        """What ``load`` gets for ``target``: the module itself, or an ONNX file (a module exported into ``folder``).

        Raises:
            UpdpError: the ONNX file does not exist, or this backend cannot take that kind of target.
        """
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(target, (str, Path)):
            if not Path(target).is_file():
                raise UpdpError(f"ONNX file '{target}' does not exist")
            if not self.needs_onnx:
                raise UpdpError(f"backend '{self.name}' times an nn.Module, not an ONNX file")
            return target
        if not self.needs_onnx:
            return target
        from updp.core.onnx_export import export_onnx  # torch is imported only when a module is given

        half = cfg.precision == "fp16" and self.wants_half_onnx()
        return export_onnx(target, cfg.full_shape, folder / "model.onnx", half=half)

    def wants_half_onnx(self) -> bool:
        """Whether fp16 must be in the ONNX graph itself (strongly typed TensorRT 11)."""
        return False

    def timed_runs(self, deadline: float, min_runs: int, min_time_s: float, max_runs: int) -> list[float]:
        """Call ``run_once`` (after ``load``) for ``min_runs`` runs and ``min_time_s`` seconds, at most ``max_runs``.

        Args:
            deadline: a ``time.monotonic()`` instant; checked before each run.

        Returns:
            The time of each run in ms: the device's figure where ``run_once`` gives one, else the host clock's.

        Raises:
            MeasurementTimeout: ``deadline`` passed before the runs were done.
        """
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_time_s):
            if time.monotonic() > deadline:
                raise MeasurementTimeout
            t0 = time.perf_counter()
            device_ms = self.run_once()
            samples.append(device_ms if device_ms is not None else (time.perf_counter() - t0) * 1e3)
        return samples


def failure_reason(error: BaseException) -> str:
    """The one line a failure record keeps of an exception: an ``UpdpError``'s message, else type, message, place."""
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, UpdpError):
        return first  # written for the user, and one line by the project's rule
    if isinstance(error, MemoryError):
        return "out of memory"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {first[:300]}{where}"
