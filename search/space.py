"""The search space: which blocks may be pruned, how a trial picks a plan, seed plans."""
from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from updp.core.errors import UpdpError
from updp.core.plan import PruningPlan
from updp.pruner.spec import BlockSpec


@dataclass(frozen=True)
class SearchSpace:
    """Candidate blocks (worthwhile, not kept) of ``model`` grouped by stage, with a per-stage cap."""

    model: str
    candidates: tuple[BlockSpec, ...]
    max_per_stage: int | None = None

    @classmethod
    def build(cls, model: str, blocks: list[BlockSpec], keep: list[str] = (),
              max_per_stage: int | None = None, cheaper_only: bool = True) -> "SearchSpace":
        """The blocks not kept that are worthwhile (a merged form with fewer MACs), or, with ``cheaper_only``
        false, every supported one: the merge planner then keeps those that some form makes faster on the target.
        """
        names = {b.name for b in blocks}
        unknown = [k for k in keep if k not in names]
        if unknown:
            raise UpdpError(f"--keep names unknown blocks: {', '.join(unknown)} (see 'updp blocks MODEL')")
        candidates = tuple(b for b in blocks if (b.worthwhile if cheaper_only else b.supported) and b.name not in keep)
        if not candidates:
            what = "worthwhile (merged form cheaper)" if cheaper_only else "prunable"
            raise UpdpError(f"no block is left to prune: none is {what} or all are kept")
        return cls(model, candidates, max_per_stage)

    def without(self, names) -> "SearchSpace":
        """This space less the blocks ``names``."""
        names = set(names)
        return SearchSpace(self.model, tuple(b for b in self.candidates if b.name not in names), self.max_per_stage)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.candidates]

    @property
    def stages(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = defaultdict(list)
        for b in self.candidates:
            out[b.stage].append(b.name)
        return dict(out)

    def cap(self, stage: int) -> int:
        n = len(self.stages[stage])
        return n if self.max_per_stage is None else min(n, self.max_per_stage)

    def plan(self, names: Iterable[str] = ()) -> PruningPlan:
        return PruningPlan(self.model, frozenset(names))

    def repair(self, pruned: Iterable[str]) -> PruningPlan:
        """Drop pruned blocks beyond the per-stage cap (latest blocks of the stage first)."""
        pruned = set(pruned)
        out = set()
        for stage, names in self.stages.items():
            chosen = [n for n in names if n in pruned]
            out.update(chosen[:self.cap(stage)])
        return self.plan(out)

    def suggest(self, trial, mode: str = "blocks") -> PruningPlan:
        """A plan from an Optuna trial: one boolean per block, or a pruned count per stage."""
        if mode == "blocks":
            return self.repair({n for n in self.names if trial.suggest_categorical(n, [False, True])})
        if mode == "stages":
            return self.plan(n for s, names in self.stages.items()
                             for n in self._by_saving(names)[:trial.suggest_int(f"stage{s}", 0, self.cap(s))])
        raise UpdpError(f"unknown search space '{mode}'; use 'blocks' or 'stages'")

    def _by_saving(self, names: list[str]) -> list[str]:
        """Stage blocks ordered by MACs saved by merging (largest first, later blocks on ties)."""
        saving = {b.name: b.macs - b.merged_macs for b in self.candidates}
        return sorted(names, key=lambda n: (-saving[n], -names.index(n)))

    def distributions(self, mode: str = "blocks") -> dict:
        """The Optuna distribution of each trial parameter ``suggest`` asks for."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        if mode == "blocks":
            return {n: CategoricalDistribution([False, True]) for n in self.names}
        return {f"stage{s}": IntDistribution(0, self.cap(s)) for s in self.stages}

    def from_params(self, params: dict, mode: str = "blocks") -> PruningPlan:
        """The plan ``suggest`` makes of these parameter values."""
        if mode == "blocks":
            return self.repair(n for n in self.names if params[n])
        return self.plan(n for s, names in self.stages.items() for n in self._by_saving(names)[:params[f"stage{s}"]])

    def size(self, mode: str = "blocks") -> int:
        """How many distinct plans the space holds (the per-stage cap applied)."""
        total = 1
        for s, names in self.stages.items():
            total *= sum(math.comb(len(names), k) for k in range(self.cap(s) + 1)) if mode == "blocks" else \
                self.cap(s) + 1
        return total

    def params(self, pruned: PruningPlan, mode: str = "blocks") -> dict:
        """Trial parameters that reproduce ``pruned`` (for ``study.enqueue_trial``)."""
        if mode == "blocks":
            return {n: n in pruned for n in self.names}
        return {f"stage{s}": sum(n in pruned for n in names) for s, names in self.stages.items()}

    def most_pruned(self, rng: random.Random) -> PruningPlan:
        return self.plan(n for s, names in self.stages.items() for n in rng.sample(names, self.cap(s)))

    def random_plan(self, rng: random.Random) -> PruningPlan:
        return self.repair({n for n in self.names if rng.random() < 0.5})

    def seed_plans(self, mode: str = "blocks") -> list[PruningPlan]:
        """Unpruned, most pruned (latest blocks), every other block, one middle block per stage."""
        plans = [self.plan(),
                 self.repair(self.names) if mode == "blocks" else
                 self.plan(n for s, names in self.stages.items() for n in self._by_saving(names)[:self.cap(s)]),
                 self.repair(self.names[1::2]),
                 self.plan(names[len(names) // 2] for names in self.stages.values())]
        if mode == "stages":
            plans = [self.plan(n for s, names in self.stages.items()
                               for n in self._by_saving(names)[:sum(x in p for x in names)]) for p in plans]
        return list(dict.fromkeys(plans))
