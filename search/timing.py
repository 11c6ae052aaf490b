"""Latency of pruning plans: merge the plan, time it on a backend, through the cache.

This is where the pruner and the latency subsystem meet; ``updp.latency``
itself only ever sees an ``nn.Module`` and an opaque plan key.
"""
from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from updp import __version__
from updp.core.errors import UpdpError
from updp.core.onnx_export import export_onnx
from updp.latency.backends import resolve_backend
from updp.latency.base import MeasureConfig
from updp.latency.cache import CacheKey, LatencyCache
from updp.latency.interleave import measure_interleaved
from updp.latency.isolate import measure_isolated
from updp.latency.result import LatencyResult, failure
from updp.pruner import PruningPlan, create_model, default_input_size, merge_model


class PlanTimer:
    """Times merged plans of one model on one backend, reusing cached figures."""

    def __init__(self, model_name: str, backend: str = "auto", cfg: MeasureConfig | None = None,
                 cache: LatencyCache | None = None, num_classes: int | None = None, img_size: int | None = None,
                 isolate: bool = False, **backend_options):
        self.model_name = model_name
        self.base = create_model(model_name, num_classes).eval()
        shape = default_input_size(self.base, img_size)
        self.cfg = dataclasses.replace(cfg or MeasureConfig(), input_shape=shape)
        self.backend = resolve_backend(backend, **backend_options)
        self.cache = cache
        self.isolate = isolate and self.backend.needs_onnx
        self.backend_options = backend_options
        self.forms: dict[str, str] = {}  # block -> merged form (the merge planner's choice); default otherwise
        self.device, versions = self.backend.identity()
        extra = {("updp", __version__), ("torch_export", _torch_version()), ("threads", str(self.cfg.threads))}
        self.versions = tuple(sorted({*versions, *extra}))

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def plan(self, pruned: Iterable[str] = ()) -> PruningPlan:
        """``pruned`` as a plan of this timer's model (a ``PruningPlan`` of another model is an error)."""
        if isinstance(pruned, PruningPlan):
            if pruned.model != self.model_name:
                raise UpdpError(f"a plan of {pruned.model} cannot be timed on {self.model_name}")
            return pruned
        return PruningPlan(self.model_name, frozenset(pruned))

    def key(self, pruned: Iterable[str]) -> CacheKey:
        plan = self.plan(pruned)
        forms = tuple(sorted((b, f) for b, f in self.forms.items() if b in plan))
        versions = self.versions + ((("merge_forms", repr(forms)),) if forms else ())
        return CacheKey(plan.key, self.model_name, tuple(self.cfg.input_shape), self.cfg.batch_size,
                        self.cfg.precision, self.backend.name, self.device, versions)

    def merged(self, plan: PruningPlan):
        """The model with ``plan`` merged, each block in its form (``forms``)."""
        return merge_model(self.base, plan, self.forms) if plan else self.base

    def measure(self, pruned: Iterable[str] = ()) -> LatencyResult:
        """One plan timed alone, through the cache (a hit is returned as it was stored)."""
        pruned = self.plan(pruned)
        key = self.key(pruned)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        model = self.merged(pruned)
        result = self._isolated(model) if self.isolate else self.backend.measure(model, self.cfg)
        if self.cache is not None:
            self.cache.put(key, result)
        return result

    def measure_many(self, plans: Sequence[Iterable[str]], rounds: int = 20) -> list[LatencyResult]:
        """Time several plans in one interleaved pass (comparable ratios on a drifting machine).

        Not cached: the figures are ratios valid within this one pass. What the
        passes produce persists elsewhere (``latency_table.json``, trial attributes, ``final.json``).
        """
        return self.measure_models([self.merged(self.plan(p)) for p in plans], rounds)

    def measure_models(self, models: Sequence, rounds: int = 20) -> list[LatencyResult]:
        """Modules of this model timed in one interleaved pass (not cached: ratios valid within the pass)."""
        return measure_interleaved(type(self.backend), list(models), self.cfg, rounds, **self.backend_options)

    def _isolated(self, model) -> LatencyResult:
        """Export here, time in a child process that is killed at the time limit."""
        with tempfile.TemporaryDirectory(prefix="updp-onnx-") as tmp:
            half = self.cfg.precision == "fp16" and self.backend.wants_half_onnx()
            try:
                path = export_onnx(model, self.cfg.full_shape, Path(tmp) / "model.onnx", half=half)
            except UpdpError as e:
                return failure(str(e), backend=self.backend.name, precision=self.cfg.precision,
                               batch_size=self.cfg.batch_size, input_shape=tuple(self.cfg.input_shape))
            return measure_isolated(self.backend.name, path, self.cfg, **self.backend_options)


def _torch_version() -> str:
    import torch

    return torch.__version__


def block_groups(specs) -> dict[str, str]:
    """Blocks of one stage, family and shape share a group in the fitted latency model (and so a cost)."""
    return {s.name: f"s{s.stage}:{s.family}:{s.in_chs}>{s.out_chs}/{s.stride}" for s in specs}


def single_block_ratios(table) -> tuple[list[PruningPlan], list[float]]:
    """The table's single-block measurements as (plan, ratio to the baseline) pairs for a fit."""
    model = table.context.get("model", "")
    return [PruningPlan(model, {b}) for b in table.saved_frac], [1.0 - f for f in table.saved_frac.values()]
