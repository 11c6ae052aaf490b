"""A fitted latency predictor: a plan's latency ratio from what the plan prunes, group by group.

The additive table predicts ``1 - sum(saving of each block)`` from single-block
measurements, each about the size of a CPU's timing noise, and savings that
do not add up (fusion, memory traffic, a stage that becomes cheap enough to
change the bottleneck) are missed. This model is fitted instead, to measured
plans:

- blocks of one *group* (same stage and shape: the caller says which) share
  their cost, so a block's saving is estimated from every plan that prunes
  any block of its group, not from one noisy measurement;
- per group the ratio moves with the count ``n`` of pruned blocks and
  ``n**2`` (savings that grow or shrink as a stage empties), plus the
  product of the counts of adjacent groups (a stage that feeds a cheaper one);
- ordinary ridge regression (numpy), alpha chosen by leave-one-out error on
  the fit plans, on ``ratio = latency(plan) / latency(baseline)`` with the
  baseline timed in the same interleaved pass.

It is judged only on held-out measured plans (``evaluate``), never on the
plans it was fitted on. ``LatencyModel.to_json`` keeps the fit data and the
held-out error with the coefficients, so a run's predictor can be audited.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from updp.core.errors import UpdpError
from updp.core.fileio import read_json_as, write_json
from updp.core.plan import PruningPlan
from updp.latency.table import UnmeasuredBlock

ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MIN_RATIO = 0.05


def feature_names(groups: Sequence[str]) -> list[str]:
    """``n:G`` and ``n2:G`` per group, ``pair:G1*G2`` per adjacent pair (groups in forward order)."""
    names = [f"n:{g}" for g in groups] + [f"n2:{g}" for g in groups]
    return names + [f"pair:{a}*{b}" for a, b in zip(groups, groups[1:])]


def _features(counts: Mapping[str, float], groups: Sequence[str]) -> list[float]:
    n = [float(counts.get(g, 0)) for g in groups]
    return n + [v * v for v in n] + [a * b for a, b in zip(n, n[1:])]


@dataclass
class LatencyModel:
    """Coefficients of the fitted ratio model, with what it was fitted on and how well it held out."""

    model: str
    baseline_ms: float
    groups: dict[str, str]  # block -> group, blocks in forward order
    features: list[str]
    coef: list[float]
    intercept: float = 1.0
    alpha: float = 0.0
    fit_plans: list[dict] = field(default_factory=list)  # {"pruned": str, "ratio": float}
    held_out: dict = field(default_factory=dict)  # summary of evaluate() on plans it never saw
    context: dict = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # blocks the table could not time: plans with them fail

    @property
    def group_order(self) -> list[str]:
        return list(dict.fromkeys(self.groups.values()))

    def _x(self, pruned: Iterable[str]) -> np.ndarray:
        pruned = list(pruned)
        failed = {b: self.failed[b] for b in pruned if b in self.failed}
        if failed:
            raise UnmeasuredBlock(failed)
        counts: dict[str, int] = {}
        unknown = []
        for b in pruned:
            if b not in self.groups:
                unknown.append(b)
                continue
            counts[self.groups[b]] = counts.get(self.groups[b], 0) + 1
        if unknown:
            raise UpdpError(f"the latency model of {self.model} has no block {', '.join(unknown)}; refit it")
        return np.array(_features(counts, self.group_order))

    def predicted_ratio(self, pruned: Iterable[str]) -> float:
        x = self._x(pruned)
        if not x.any():
            return 1.0  # the baseline is the baseline
        return max(MIN_RATIO, float(self.intercept + x @ np.array(self.coef)))

    def predict(self, pruned: Iterable[str]) -> float:
        """Predicted latency in ms of a plan (a ``PruningPlan`` or block names)."""
        return self.baseline_ms * self.predicted_ratio(pruned)

    def to_json(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyModel":
        return read_json_as(cls, path, "latency model")


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, np.ndarray]:
    """Intercept and coefficients of ridge regression (intercept not penalized; features scaled to unit RMS)."""
    scale = np.sqrt((x ** 2).mean(axis=0))
    scale[scale == 0] = 1.0
    xs = np.hstack([np.ones((len(x), 1)), x / scale])
    penalty = alpha * len(x) * np.eye(xs.shape[1])
    penalty[0, 0] = 0.0
    w = np.linalg.solve(xs.T @ xs + penalty, xs.T @ y)
    return float(w[0]), w[1:] / scale


def _loo_error(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """Median relative leave-one-out error of a ridge fit (what alpha would do on a plan it did not see)."""
    errors = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        b, w = _ridge(x[keep], y[keep], alpha)
        errors.append(abs(b + x[i] @ w - y[i]) / y[i])
    return float(np.median(errors))


def features_needed(groups: Mapping[str, str]) -> int:
    """Measured plans a fit needs at least: one more than the features."""
    return len(feature_names(list(dict.fromkeys(groups.values())))) + 1


def fit(model: str, groups: Mapping[str, str], plans: Sequence[PruningPlan], ratios: Sequence[float],
        baseline_ms: float, context: dict | None = None, failed: Mapping[str, str] | None = None) -> LatencyModel:
    """Fit the ratio model to measured plans (``ratios[i]`` = plan i / the pass's baseline).

    Raises:
        UpdpError: fewer measured plans than features plus one, or a plan with a block outside ``groups``.
    """
    order = list(dict.fromkeys(groups.values()))
    names = feature_names(order)
    pairs = [(p, r) for p, r in zip(plans, ratios) if r is not None and math.isfinite(r)]
    if len(pairs) < len(names) + 1:
        raise UpdpError(f"fitting the latency model of {model} needs at least {len(names) + 1} measured plans "
                        f"({len(names)} features), got {len(pairs)}")
    draft = LatencyModel(model, baseline_ms, dict(groups), names, [0.0] * len(names))
    x = np.array([draft._x(p) for p, _ in pairs])
    y = np.array([r for _, r in pairs])
    alpha = min(ALPHAS, key=lambda a: (_loo_error(x, y, a), -a))  # ties: the stronger penalty
    intercept, coef = _ridge(x, y, alpha)
    return LatencyModel(model, baseline_ms, dict(groups), names, coef.tolist(), intercept, alpha,
                        [{"pruned": p.to_str(), "ratio": r} for p, r in pairs], {}, dict(context or {}),
                        dict(failed or {}))


def evaluate(predict_ratio, plans: Sequence[PruningPlan], ratios: Sequence[float]) -> dict:
    """Absolute percentage error of ``predict_ratio(plan)`` against measured ratios on ``plans``."""
    ape = [100 * abs(predict_ratio(p) - r) / r for p, r in zip(plans, ratios) if r is not None and math.isfinite(r)]
    if not ape:
        return {"plans": 0, "median_ape_pct": math.nan, "p95_ape_pct": math.nan, "max_ape_pct": math.nan}
    return {"plans": len(ape), "median_ape_pct": float(np.median(ape)), "p95_ape_pct": float(np.percentile(ape, 95)),
            "max_ape_pct": float(max(ape))}


def sized_plans(model: str, blocks: Sequence[str], n: int, seed: int = 0) -> list[PruningPlan]:
    """``n`` distinct random plans whose sizes are spread evenly over 1..len(blocks) (a search visits all sizes;
    each block with probability 1/2 would give mostly half-pruned plans)."""
    rng = np.random.default_rng(seed)
    plans: list[PruningPlan] = []
    tries = 0
    while len(plans) < n and tries < 50 * n:
        tries += 1
        k = int(rng.integers(1, len(blocks) + 1))
        plan = PruningPlan(model, frozenset(rng.choice(list(blocks), size=k, replace=False).tolist()))
        if plan not in plans:
            plans.append(plan)
    return plans
