"""Per-block latency table: predict a plan's latency from single-block savings.

``saved[b] = latency(baseline) - latency(only b merged)``; a plan is
predicted as ``baseline - sum(saved[b] for b in plan)``. ``calibrate``
measures random plans and reports the prediction's error.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd

from updp.errors import UpdpError
from updp.fileio import write_json
from updp.latency.result import LatencyResult

Measure = Callable[[frozenset[str]], LatencyResult]


@dataclass
class LatencyTable:
    baseline_ms: float
    saved_ms: dict[str, float]
    context: dict = field(default_factory=dict)

    def predict(self, pruned: Iterable[str]) -> float:
        pruned = list(pruned)
        unknown = [b for b in pruned if b not in self.saved_ms]
        if unknown:
            raise UpdpError(f"the latency table has no entry for {', '.join(unknown)}; rebuild it")
        return self.baseline_ms - sum(self.saved_ms[b] for b in pruned)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        try:
            with open(path) as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise UpdpError(f"cannot read latency table '{path}': {e}") from None

    def frame(self) -> pd.DataFrame:
        rows = [{"block": b, "saved_ms": s, "saved_pct": 100 * s / self.baseline_ms} for b, s in self.saved_ms.items()]
        return pd.DataFrame(rows)


def _checked(result: LatencyResult, what: str) -> float:
    if not result.ok:
        raise UpdpError(f"latency of {what} could not be measured: {result.error}")
    return result.median_ms


def build_table(measure: Measure, blocks: Sequence[str], progress: Callable | None = None) -> LatencyTable:
    """Measure the baseline and each block merged alone."""
    base = measure(frozenset())
    baseline = _checked(base, "the baseline")
    saved = {}
    for block in (progress(blocks) if progress else blocks):
        saved[block] = baseline - _checked(measure(frozenset([block])), f"block {block}")
    ctx = {**base.context, "backend": base.backend, "precision": base.precision, "batch_size": base.batch_size,
           "input_shape": list(base.input_shape)}
    return LatencyTable(baseline, saved, ctx)


def random_plans(blocks: Sequence[str], n: int, seed: int = 0) -> list[frozenset[str]]:
    """``n`` distinct non-empty random plans (each block in with probability 1/2)."""
    rng = random.Random(seed)
    plans: list[frozenset[str]] = []
    limit = 2 ** len(blocks) - 1
    while len(plans) < min(n, limit):
        plan = frozenset(b for b in blocks if rng.random() < 0.5)
        if plan and plan not in plans:
            plans.append(plan)
    return plans


def calibrate(table: LatencyTable, measure: Measure, plans: Iterable[frozenset[str]],
              progress: Callable | None = None) -> pd.DataFrame:
    """Predicted vs measured latency per plan, with the absolute percentage error."""
    rows = []
    plans = list(plans)
    for plan in (progress(plans) if progress else plans):
        measured = _checked(measure(plan), f"plan {sorted(plan)}")
        predicted = table.predict(plan)
        rows.append({"pruned": ",".join(sorted(plan)), "n_pruned": len(plan), "measured_ms": measured,
                     "predicted_ms": predicted, "ape_pct": 100 * abs(predicted - measured) / measured})
    return pd.DataFrame(rows)


def error_summary(df: pd.DataFrame) -> dict[str, float]:
    return {"plans": len(df), "median_ape_pct": float(df["ape_pct"].median()),
            "p95_ape_pct": float(df["ape_pct"].quantile(0.95)), "max_ape_pct": float(df["ape_pct"].max())}
