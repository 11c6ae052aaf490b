"""What the search maximizes for a scored plan: held-out top-1, or the likelihood of the true class."""
from __future__ import annotations

import math

METRICS = ("likelihood", "top1")
METRIC_NAMES = {"top1": "top-1", "likelihood": "likelihood"}
METRIC_AXES = {"top1": "supernet top-1 on held-out images (%)",
               "likelihood": "supernet likelihood on held-out images (%, 100 x exp(-cross-entropy))"}


def search_value(score: dict, metric: str) -> float:
    """The value the search maximizes for a plan scored by :func:`score_plan`.

    ``top1``: held-out top-1 (%). ``likelihood``: 100 x exp(-mean cross-entropy), the geometric mean of
    the probability given to the true class (%). Both are read from the same pass; the likelihood moves
    with every image's confidence, not only with the few whose arg-max flips, so on a few hundred images
    it is far less noisy than top-1.
    """
    if metric == "top1":
        return float(score["top1"])
    if metric == "likelihood":
        return 100.0 * math.exp(-float(score["loss"]))
    raise ValueError(f"unknown search metric {metric!r}: choose from {', '.join(METRICS)}")
