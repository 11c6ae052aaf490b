"""``PruningPlan``: which blocks of a model are pruned, the one plan type of every layer.

A plan travels from the sampler's suggestion through trials, the latency
cache and table, reports, training, merging and checkpoints as this type; in
text (CSV, JSON, trial attributes, ``--plan``) it is ``to_str()``: block names
in forward order joined by commas.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from updp.core.errors import PlanError

SEPARATOR = ","
# Release 0.1.0 joined names with ';' in trials.csv, pareto.csv and search_summary.json.
_SPLIT = re.compile(r"[,;]")


def _forward_order(name: str) -> list:
    """timm block names sort in forward order when their numbers compare as numbers (stages.10 after stages.9)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


@dataclass(frozen=True)
class PruningPlan:
    """The blocks of ``model`` that are pruned; ``key`` joins scores, latencies and trials."""

    model: str
    pruned: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self):
        if isinstance(self.pruned, str):
            raise PlanError(f"a plan's blocks must be a collection of names, not the string {self.pruned!r}; "
                            "use PruningPlan.from_str")
        names = frozenset(self.pruned)
        bad = [n for n in names if not isinstance(n, str) or not n.strip() or _SPLIT.search(n) or n != n.strip()]
        if bad:
            raise PlanError(f"invalid block name{'s' * (len(bad) > 1)} in a plan: {', '.join(map(repr, bad))}")
        object.__setattr__(self, "pruned", names)

    @classmethod
    def from_str(cls, model: str, text: str | None) -> PruningPlan:
        """The inverse of :meth:`to_str`; also reads the ';'-joined plans of release 0.1.0 run directories."""
        return cls(model, frozenset(n.strip() for n in _SPLIT.split(text or "") if n.strip()))

    def to_str(self) -> str:
        return SEPARATOR.join(self.names)

    @property
    def names(self) -> tuple[str, ...]:
        """Block names in forward order (the order a staggered schedule fades them)."""
        return tuple(sorted(self.pruned, key=_forward_order))

    @property
    def key(self) -> str:
        """A stable hash of model and blocks (the same as release 0.1.0's, so its latency caches stay valid)."""
        body = self.model + "|" + ",".join(sorted(self.pruned))
        return hashlib.sha1(body.encode()).hexdigest()[:16]

    def with_blocks(self, names: Iterable[str]) -> PruningPlan:
        return PruningPlan(self.model, self.pruned | frozenset(names))

    def __len__(self) -> int:
        return len(self.pruned)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.pruned

    def __str__(self) -> str:
        return self.to_str() or "(none)"
