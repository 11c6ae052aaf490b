"""Facts about blocks: a small frozen dataclass per prunable block (plans are ``updp.core.plan``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


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
