"""What the search maximizes for a scored plan: top-1, or the likelihood of the true class, and on which images."""
from __future__ import annotations

import math

METRICS = ("likelihood", "top1")
METRIC_NAMES = {"top1": "top-1", "likelihood": "likelihood"}
METRIC_AXES = {"top1": "supernet top-1 (%)",
               "likelihood": "supernet likelihood (%, 100 x exp(-cross-entropy))"}
# the images a candidate is scored on: training images (the split BN re-estimation draws from), or the held-out
# slice of the training set the supernet never trains on
SCORE_SPLITS = {"train": "train_eval", "held_out": "held_out"}


def search_value(score: dict, metric: str) -> float:
    """The value the search maximizes for a plan scored by :func:`score_plan`.

    ``top1``: top-1 (%). ``likelihood``: 100 x exp(-mean cross-entropy), the geometric mean of
    the probability given to the true class (%). Both are read from the same pass; the likelihood moves
    with every image's confidence, not only with the few whose arg-max flips, so on a few hundred images
    it is far less noisy than top-1.
    """
    if metric == "top1":
        return float(score["top1"])
    if metric == "likelihood":
        return 100.0 * math.exp(-float(score["loss"]))
    raise ValueError(f"unknown search metric {metric!r}: choose from {', '.join(METRICS)}")
