"""Interleaved measurement: several models timed in alternating bursts.

On a machine whose speed drifts (shared cores, frequency scaling), figures
taken minutes apart are not comparable. Timing every variant in short
alternating bursts gives each the same share of every slow and fast moment,
so their ratios are meaningful even when the absolute figures drift.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from updp.latency.backends import resolve_backend
from updp.latency.base import LatencyBackend, MeasureConfig
from updp.latency.context import host_context
from updp.latency.result import LatencyResult, failure, summarize


def _load(backend: LatencyBackend, target: Any, cfg: MeasureConfig, folder: Path) -> str | None:
    try:
        backend.load(backend._prepare(target, cfg, folder), cfg)
        backend._loop(time.monotonic() + cfg.timeout_s, cfg.warmup_runs, cfg.warmup_ms / 1e3, cfg.max_runs)
        return None
    except Exception as e:  # noqa: BLE001 - a variant that cannot load is a failure record
        return f"{type(e).__name__}: {str(e)[:300]}"


def measure_interleaved(backend: str, targets: Sequence[Any], cfg: MeasureConfig, rounds: int = 10,
                        **options: Any) -> list[LatencyResult]:
    """Time each target ``ceil(min_runs / rounds)`` runs per round, ``rounds`` rounds, in turn."""
    if backend == "onnxruntime":
        # Spinning threads of the session that just ran would steal the cores from the next one.
        options = {"spin": False, **options}
    backends = [resolve_backend(backend, **options) for _ in targets]
    fields = dict(backend=backends[0].name, precision=cfg.precision, batch_size=cfg.batch_size,
                  input_shape=tuple(cfg.input_shape))
    per_round = max(1, math.ceil(cfg.min_runs / rounds))
    samples: list[list[float]] = [[] for _ in targets]
    round_medians: list[list[float]] = [[] for _ in targets]
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="updp-interleave-")))
        errors = [_load(b, t, cfg, folder / str(i)) for i, (b, t) in enumerate(zip(backends, targets))]
        for b in backends:
            stack.callback(b.release)
        deadline = time.monotonic() + cfg.timeout_s * len(targets)
        for _ in range(rounds):
            for i, b in enumerate(backends):
                if errors[i] is None:
                    burst = b._loop(deadline, per_round, 0.0, per_round)
                    samples[i] += burst
                    round_medians[i].append(statistics.median(burst))
        ctx = {**host_context(), **backends[0].context(), "threads": cfg.threads, "interleaved": len(targets),
               "rounds": rounds}
    return [failure(err, **fields) if err else summarize(s, context={**ctx, "round_medians_ms": m}, **fields)
            for err, s, m in zip(errors, samples, round_medians)]


def relative_to(result: LatencyResult, reference: LatencyResult) -> float:
    """Median over rounds of the per-round ratio of medians: drift between rounds cancels."""
    mine, ref = result.context["round_medians_ms"], reference.context["round_medians_ms"]
    return statistics.median(a / b for a, b in zip(mine, ref))
