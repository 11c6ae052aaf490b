"""Per-block latency table: predict a plan's latency from single-block savings.

The baseline and every block merged alone are timed in one interleaved pass
(see ``interleave``), so each saving is a ratio to a baseline measured in the
same moments: ``frac[b] = 1 - t(b merged) / t(baseline)``. A plan is predicted
as ``baseline * (1 - sum(frac[b] for b in plan))``. ``calibrate`` times random
plans, again interleaved with the baseline, and reports the prediction error.

A block whose own measurement failed is kept in ``failed`` with the reason;
predicting a plan that holds it raises ``UnmeasuredBlock``, so a search marks
that one trial failed and goes on.
"""
from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd

from updp.core.errors import UpdpError
from updp.core.fileio import read_json_as, write_json
from updp.core.plan import PruningPlan
from updp.latency.result import LatencyResult

MIN_RATIO = 0.05
MeasureMany = Callable[[Sequence[PruningPlan]], list[LatencyResult]]


class UnmeasuredBlock(UpdpError):
    """A plan holds a block whose single-block latency could not be measured when the table was built.

    Attributes:
        failed: each such block of the plan and the error recorded for it.
    """

    def __init__(self, failed: dict[str, str]):
        self.failed = dict(failed)
        detail = "; ".join(f"'{b}': {e}" for b, e in self.failed.items())
        super().__init__(f"the latency table has no saving for {detail}; leave "
                         f"{'these blocks' if len(self.failed) > 1 else 'this block'} out of the plan, or rebuild "
                         "the table ('updp latency table') once the cause is fixed")


@dataclass
class LatencyTable:
    baseline_ms: float
    saved_frac: dict[str, float]
    context: dict = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # block -> why its measurement failed

    @property
    def saved_ms(self) -> dict[str, float]:
        return {b: f * self.baseline_ms for b, f in self.saved_frac.items()}

    def predicted_ratio(self, pruned: Iterable[str]) -> float:
        """``1 - sum(savings)``, floored at ``MIN_RATIO``: noisy savings can add up past the baseline.

        Raises:
            UnmeasuredBlock: the plan holds a block whose measurement failed.
            UpdpError: the plan holds a block the table does not know.
        """
        pruned = list(pruned)
        failed = {b: self.failed[b] for b in pruned if b in self.failed}
        if failed:
            raise UnmeasuredBlock(failed)
        unknown = [b for b in pruned if b not in self.saved_frac]
        if unknown:
            raise UpdpError(f"the latency table has no entry for {', '.join(unknown)}; rebuild it")
        return max(MIN_RATIO, 1.0 - sum(self.saved_frac[b] for b in pruned))

    def predict(self, pruned: Iterable[str]) -> float:
        """Predicted latency in ms of a plan (a ``PruningPlan`` or block names); raises as ``predicted_ratio``."""
        return self.baseline_ms * self.predicted_ratio(pruned)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        """A saved table; files written before ``failed`` existed load with no failed block."""
        return read_json_as(cls, path, "latency table")

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


def _measure_with_baseline(measure_many: MeasureMany, model: str,
                           plans: Sequence[PruningPlan]) -> tuple[LatencyResult, list[LatencyResult]]:
    """The unpruned model and ``plans`` in one pass.

    Raises:
        UpdpError: the baseline failed: no ratio, hence no table or calibration, is possible.
    """
    results = measure_many([PruningPlan(model), *plans])
    if len(results) != len(plans) + 1:
        raise UpdpError(f"measure_many gave {len(results)} results for {len(plans) + 1} plans")
    base = results[0]
    if not base.ok:
        raise UpdpError(f"the baseline latency of {model} could not be measured ({base.error}); no per-block "
                        "table is possible: fix that cause (see the message) and run again")
    return base, results[1:]


def build_table(measure_many: MeasureMany, model: str, blocks: Sequence[str]) -> LatencyTable:
    """Time the baseline and each block merged alone, in one pass; a block that fails goes to ``failed``.

    Raises:
        UpdpError: the baseline could not be measured.
    """
    base, results = _measure_with_baseline(measure_many, model, [PruningPlan(model, {b}) for b in blocks])
    frac = {b: 1.0 - ratio(r, base) for b, r in zip(blocks, results) if r.ok}
    failed = {b: r.error or "no timed runs" for b, r in zip(blocks, results) if not r.ok}
    ctx = {**base.context, "model": model, "backend": base.backend, "precision": base.precision,
           "batch_size": base.batch_size, "input_shape": list(base.input_shape)}
    ctx.pop("round_medians_ms", None)
    return LatencyTable(base.median_ms, frac, ctx, failed)


def random_plans(model: str, blocks: Sequence[str], n: int, seed: int = 0) -> list[PruningPlan]:
    """``n`` distinct non-empty random plans of ``model`` (each block in with probability 1/2)."""
    rng = random.Random(seed)
    plans: list[PruningPlan] = []
    limit = 2 ** len(blocks) - 1
    while len(plans) < min(n, limit):
        plan = PruningPlan(model, frozenset(b for b in blocks if rng.random() < 0.5))
        if plan and plan not in plans:
            plans.append(plan)
    return plans


def calibrate(table: LatencyTable, measure_many: MeasureMany, plans: Sequence[PruningPlan]) -> pd.DataFrame:
    """Predicted vs measured latency per plan (both relative to a baseline timed in the same pass).

    A plan that could not be measured or predicted is a row with its ``error`` and NaN figures.

    Raises:
        UpdpError: the plans are of several models or of another model than the table's, or the baseline failed.
    """
    if not plans:
        return pd.DataFrame(columns=_CALIBRATION_COLUMNS)
    model = _one_model(table, plans)
    base, results = _measure_with_baseline(measure_many, model, plans)
    return pd.DataFrame([_calibration_row(table, plan, r, base) for plan, r in zip(plans, results)],
                        columns=_CALIBRATION_COLUMNS)


_CALIBRATION_COLUMNS = ["pruned", "n_pruned", "measured_ms", "predicted_ms", "measured_ratio", "predicted_ratio",
                        "ape_pct", "error"]


def _one_model(table: LatencyTable, plans: Sequence[PruningPlan]) -> str:
    models = sorted({p.model for p in plans} | ({table.context["model"]} if table.context.get("model") else set()))
    if len(models) != 1:
        raise UpdpError(f"calibration needs the table's model and plans of that one model; got {', '.join(models)}")
    return models[0]


def _calibration_row(table: LatencyTable, plan: PruningPlan, result: LatencyResult,
                     base: LatencyResult) -> dict:
    row = {"pruned": plan.to_str(), "n_pruned": len(plan), **dict.fromkeys(_CALIBRATION_COLUMNS[2:7], math.nan),
           "error": None}
    try:
        predicted = table.predicted_ratio(plan)
    except UpdpError as e:
        return {**row, "error": str(e)}
    row.update(predicted_ms=predicted * base.median_ms, predicted_ratio=predicted)
    if not result.ok:
        return {**row, "error": result.error or "no timed runs"}
    measured = ratio(result, base)
    return {**row, "measured_ms": measured * base.median_ms, "measured_ratio": measured,
            "ape_pct": 100 * abs(predicted - measured) / measured}


def error_summary(df: pd.DataFrame) -> dict[str, float]:
    """APE statistics over the plans that were measured; ``failed`` counts those with an error."""
    failed = int(df["error"].notna().sum()) if "error" in df else 0
    return {"plans": len(df) - failed, "failed": failed, "median_ape_pct": float(df["ape_pct"].median()),
            "p95_ape_pct": float(df["ape_pct"].quantile(0.95)), "max_ape_pct": float(df["ape_pct"].max())}
