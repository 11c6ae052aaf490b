"""Per-block latency table: predict a plan's latency from single-block savings.

The baseline and every block merged alone are timed in one interleaved pass
(see ``interleave``), so each saving is a ratio to a baseline measured in the
same moments: ``frac[b] = 1 - t(b merged) / t(baseline)``. A plan is predicted
as ``baseline * (1 - sum(frac[b] for b in plan))``. ``calibrate`` times random
plans, again interleaved with the baseline, and reports the prediction error.
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

MIN_RATIO = 0.05
MeasureMany = Callable[[Sequence[frozenset[str]]], list[LatencyResult]]


@dataclass
class LatencyTable:
    baseline_ms: float
    saved_frac: dict[str, float]
    context: dict = field(default_factory=dict)

    @property
    def saved_ms(self) -> dict[str, float]:
        return {b: f * self.baseline_ms for b, f in self.saved_frac.items()}

    def predicted_ratio(self, pruned: Iterable[str]) -> float:
        """``1 - sum(savings)``, floored at ``MIN_RATIO``: noisy savings can add up past the baseline."""
        pruned = list(pruned)
        unknown = [b for b in pruned if b not in self.saved_frac]
        if unknown:
            raise UpdpError(f"the latency table has no entry for {', '.join(unknown)}; rebuild it")
        return max(MIN_RATIO, 1.0 - sum(self.saved_frac[b] for b in pruned))

    def predict(self, pruned: Iterable[str]) -> float:
        return self.baseline_ms * self.predicted_ratio(pruned)

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
        return pd.DataFrame([{"block": b, "saved_ms": f * self.baseline_ms, "saved_pct": 100 * f}
                             for b, f in self.saved_frac.items()])


def ratio(result: LatencyResult, reference: LatencyResult) -> float:
    """``result / reference``: per-round ratios when both come from one interleaved pass."""
    from updp.latency.interleave import relative_to

    for r, what in ((reference, "the baseline"), (result, "a plan")):
        if not r.ok:
            raise UpdpError(f"latency of {what} could not be measured: {r.error}")
    if "round_medians_ms" in result.context and "round_medians_ms" in reference.context:
        return relative_to(result, reference)
    return result.median_ms / reference.median_ms


def build_table(measure_many: MeasureMany, blocks: Sequence[str]) -> LatencyTable:
    """Time the baseline and each block merged alone, in one pass."""
    results = measure_many([frozenset(), *(frozenset([b]) for b in blocks)])
    base = results[0]
    frac = {b: 1.0 - ratio(r, base) for b, r in zip(blocks, results[1:])}
    ctx = {**base.context, "backend": base.backend, "precision": base.precision, "batch_size": base.batch_size,
           "input_shape": list(base.input_shape)}
    ctx.pop("round_medians_ms", None)
    return LatencyTable(base.median_ms, frac, ctx)


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


def calibrate(table: LatencyTable, measure_many: MeasureMany, plans: Sequence[frozenset[str]]) -> pd.DataFrame:
    """Predicted vs measured latency per plan (both relative to a baseline timed in the same pass)."""
    results = measure_many([frozenset(), *plans])
    base = results[0]
    rows = []
    for plan, r in zip(plans, results[1:]):
        measured, predicted = ratio(r, base), table.predicted_ratio(plan)
        rows.append({"pruned": ",".join(sorted(plan)), "n_pruned": len(plan),
                     "measured_ms": measured * base.median_ms, "predicted_ms": predicted * base.median_ms,
                     "measured_ratio": measured, "predicted_ratio": predicted,
                     "ape_pct": 100 * abs(predicted - measured) / measured})
    return pd.DataFrame(rows)


def error_summary(df: pd.DataFrame) -> dict[str, float]:
    return {"plans": len(df), "median_ape_pct": float(df["ape_pct"].median()),
            "p95_ape_pct": float(df["ape_pct"].quantile(0.95)), "max_ape_pct": float(df["ape_pct"].max())}
