"""Lambda schedules: each pruned block fades from 1 to 0 over a step range."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from updp.core.errors import UpdpError

SCHEDULES = ("linear", "cosine")

@dataclass(frozen=True)
class LambdaSchedule:
    """Lambda 1 until ``start``, falling to 0 at ``end`` (linear or cosine), then 0.

    ``offsets`` delays the fade of named blocks by a number of steps.
    """

    start: int
    end: int
    kind: str = "linear"
    offsets: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise UpdpError(f"unknown lambda schedule '{self.kind}'; use one of {', '.join(SCHEDULES)}")
        if self.end < self.start:
            raise UpdpError(f"lambda schedule ends ({self.end}) before it starts ({self.start})")

    def __call__(self, step: int, name: str | None = None) -> float:
        step -= self.offsets.get(name, 0) if name is not None else 0
        if self.end <= self.start:  # no fade: pruned from ``start`` on
            return 1.0 if step < self.start else 0.0
        if step <= self.start:
            return 1.0
        if step >= self.end:
            return 0.0
        t = (step - self.start) / (self.end - self.start)
        return 1.0 - t if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))

    def lambdas(self, step: int, names: Sequence[str]) -> dict[str, float]:
        return {n: self(step, n) for n in names}

    @classmethod
    def staggered(cls, names: Sequence[str], start: int, end: int, spacing: int,
                  kind: str = "linear") -> "LambdaSchedule":
        """Blocks start fading ``spacing`` steps apart, in the given order."""
        return cls(start, end, kind, {n: i * spacing for i, n in enumerate(names)})
