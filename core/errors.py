"""The one exception base class of the project.

Every error a user can cause (unknown model, bad plan, corrupted file) is an
``UpdpError`` whose message says how to fix it; the CLI prints it on one line.
"""
from __future__ import annotations

import sys


class UpdpError(Exception):
    """A user-facing error: the message is shown as is, without a traceback."""


class UnknownModelError(UpdpError):
    """A model name timm does not know, or a path that is not a checkpoint."""


class PlanError(UpdpError):
    """A pruning plan that names unknown blocks or cannot be applied."""


class CheckpointError(UpdpError):
    """A checkpoint file that is missing, corrupted or for another model."""


def warn(message: str) -> None:
    """A one-line warning on stderr, in the CLI's voice."""
    print(f"updp: warning: {message}", file=sys.stderr, flush=True)
