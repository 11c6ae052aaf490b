"""Interleaved measurement: several models timed in alternating bursts.

On a machine whose speed drifts (shared cores, frequency scaling), figures
taken minutes apart are not comparable. Timing every variant in short
alternating bursts gives each the same share of every slow and fast moment,
so their ratios are meaningful even when the absolute figures drift.

A variant that fails (export, load, warm-up, a burst that raises or passes
its time limit) gets a failure record saying what happened and when, and sits
out the later rounds; the others go on. Each variant has ``cfg.timeout_s`` of
its own for its load, warm-up and bursts: time spent on the others does not
count against it.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from updp.latency.backends import backend_class, resolve_backend
from updp.latency.base import LatencyBackend, MeasureConfig, MeasurementTimeout, failure_reason
from updp.latency.context import host_context
from updp.latency.result import LatencyResult, failure, summarize


@dataclass
class _Variant:
    """One target's backend, its own time budget, and what it has gathered so far."""

    backend: LatencyBackend
    timeout_s: float
    spent_s: float = 0.0
    samples: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)
    error: str | None = None

    def attempt(self, step: Callable[[float], Any], when: str) -> Any:
        """``step(deadline)`` on this variant's remaining time; an exception becomes its ``error`` (None returned)."""
        start = time.monotonic()
        try:
            return step(start + self.timeout_s - self.spent_s)
        except MeasurementTimeout:
            self.error = f"timed out after {self.timeout_s:g} s {when}"
        except Exception as e:  # noqa: BLE001 - a failing variant is a record; the others go on
            self.error = f"{failure_reason(e)} {when}"
        finally:
            self.spent_s += time.monotonic() - start
        return None

    def burst(self, runs: int, when: str) -> None:
        samples = self.attempt(lambda deadline: self.backend.timed_runs(deadline, runs, 0.0, runs), when)
        if self.error is None:
            self.samples += samples
            self.round_medians.append(statistics.median(samples))


def _load_and_warm_up(variant: _Variant, target: Any, cfg: MeasureConfig, folder: Path) -> None:
    backend = variant.backend

    def step(deadline: float) -> None:
        backend.load(backend.prepare(target, cfg, folder), cfg)
        backend.timed_runs(deadline, cfg.warmup_runs, cfg.warmup_ms / 1e3, cfg.max_runs)

    variant.attempt(step, "while loading and warming up")


def measure_interleaved(backend: str | type[LatencyBackend], targets: Sequence[Any], cfg: MeasureConfig,
                        rounds: int = 10, **options: Any) -> list[LatencyResult]:
    """Time each target ``ceil(min_runs / rounds)`` runs per round, ``rounds`` rounds, in turn.

    Args:
        backend: a backend name, or a ``LatencyBackend`` subclass; one instance is made per target.
        targets: ``nn.Module``s or ONNX files, as ``LatencyBackend.measure`` takes them.

    Returns:
        One record per target, in order. A record that is ``ok`` holds ``round_medians_ms`` in its context
        (see ``relative_to``); a failed one says what failed and in which round. Never raises for a failing
        target, even when all of them fail.
    """
    cls = backend_class(backend)
    fields = dict(backend=cls.name, precision=cfg.precision, batch_size=cfg.batch_size,
                  input_shape=tuple(cfg.input_shape))
    if (unsupported := cls.precision_error(cfg.precision)) is not None:
        return [failure(unsupported, **fields) for _ in targets]
    variants = [_Variant(resolve_backend(cls, **cls.interleaved_options(options)), cfg.timeout_s) for _ in targets]
    per_round = max(1, math.ceil(cfg.min_runs / rounds))
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="updp-interleave-")))
        for i, (variant, target) in enumerate(zip(variants, targets)):
            stack.callback(variant.backend.release)  # last loaded, first released (TensorRT stacks CUDA contexts)
            _load_and_warm_up(variant, target, cfg, folder / str(i))
        for r in range(1, rounds + 1):
            for variant in variants:
                if variant.error is None:
                    variant.burst(per_round, f"in round {r} of {rounds}")
        ctx = _context(variants, cfg, rounds)
    return [failure(v.error, **fields) if v.error else
            summarize(v.samples, context={**ctx, "round_medians_ms": v.round_medians}, **fields) for v in variants]


def _context(variants: list[_Variant], cfg: MeasureConfig, rounds: int) -> dict[str, Any]:
    """Host and backend context, from a variant that ran (none may have; then there is nothing to describe)."""
    timed = next((v.backend for v in variants if v.error is None), None)
    if timed is None:
        return {}
    return {**host_context(), **timed.context(), "threads": cfg.threads, "interleaved": len(variants),
            "rounds": rounds}


def relative_to(result: LatencyResult, reference: LatencyResult) -> float:
    """Median over rounds of the per-round ratio of medians: drift between rounds cancels."""
    mine, ref = result.context["round_medians_ms"], reference.context["round_medians_ms"]
    return statistics.median(a / b for a, b in zip(mine, ref))
