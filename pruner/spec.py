"""Facts about blocks and plans: small frozen dataclasses with stable keys."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class BlockSpec:
    """One prunable (or reported-unsupported) block of a model, in forward order.

    ``macs``/``params`` are the original block's, ``merged_macs``/``merged_params``
    those of its merged form at the measured input shape. ``reason`` is set when
    the block's class is known but this instance cannot be pruned exactly.
    """

    name: str
    stage: int
    index: int
    family: str
    block_class: str
    in_chs: int
    out_chs: int
    stride: int
    macs: int = 0
    params: int = 0
    merged_macs: int = 0
    merged_params: int = 0
    reason: str | None = None

    @property
    def supported(self) -> bool:
        return self.reason is None

    @property
    def worthwhile(self) -> bool:
        """Pruning pays only where the merged form is cheaper than the original."""
        return self.supported and self.merged_macs < self.macs

    def as_dict(self) -> dict:
        d = asdict(self)
        if not self.supported:  # no merged form: no merged cost (0 would read as "free")
            d["merged_macs"] = d["merged_params"] = None
        d["supported"] = self.supported
        d["worthwhile"] = self.worthwhile
        return d


@dataclass(frozen=True)
class PruningPlan:
    """Which blocks of ``model`` are pruned; ``key`` joins scores, latencies and trials."""

    model: str
    pruned: frozenset[str] = field(default_factory=frozenset)

    @property
    def key(self) -> str:
        body = self.model + "|" + ",".join(sorted(self.pruned))
        return hashlib.sha1(body.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.pruned)
