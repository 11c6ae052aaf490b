"""updp: latency-aware progressive depth pruning for timm vision models.

The import package gathers the top-level folders of the repository:
``updp.pruner`` (blocks, pruned forms, merging), ``updp.latency`` (timing
backends) and ``updp.search`` (supernet and Optuna study).
"""
from __future__ import annotations

__version__ = "0.1.0"

from updp.core.errors import UpdpError  # noqa: E402 - after __version__, which core may read

__all__ = ["UpdpError", "__version__"]
