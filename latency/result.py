"""The latency record every backend, the trtexec importer and the cache share.

Units are milliseconds per batch. A record always carries its context (device,
versions, precision, batch, input shape); a failed measurement is a record
too, with ``error`` set and no statistics.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence


@dataclass(frozen=True)
class LatencyResult:
    backend: str
    precision: str
    batch_size: int
    input_shape: tuple[int, ...]  # one sample: (C, H, W)
    median_ms: float = math.nan
    mean_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    min_ms: float = math.nan
    max_ms: float = math.nan
    count: int = 0
    context: dict[str, Any] = field(default_factory=dict)
    source: str = "measured"  # measured | trtexec | predicted
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.count > 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyResult":
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)

    def with_cached(self, cached: bool) -> "LatencyResult":
        return replace(self, cached=cached)


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile.

    trtexec uses the same rank in exact arithmetic; its float32 arithmetic picks
    the next rank at p99 when the count is a multiple of 100.
    """
    if not sorted_ms:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_ms)))
    return float(sorted_ms[rank - 1])


def summarize(samples_ms: Sequence[float], **fields: Any) -> LatencyResult:
    """A record from per-run times in ms; ``fields`` give backend, precision, context..."""
    s = sorted(samples_ms)
    if not s:
        return LatencyResult(error=fields.pop("error", "no timed runs"), **fields)
    return LatencyResult(median_ms=float(statistics.median(s)), mean_ms=float(statistics.fmean(s)),
                         p90_ms=percentile(s, 90), p99_ms=percentile(s, 99), min_ms=float(s[0]),
                         max_ms=float(s[-1]), count=len(s), **fields)


def failure(reason: str, **fields: Any) -> LatencyResult:
    """A failed measurement: the search stores it as a FAILED trial with this reason."""
    return LatencyResult(error=reason, **fields)
