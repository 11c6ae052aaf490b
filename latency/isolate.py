"""Run one measurement in a child process with a hard time limit.

An engine build that hangs, a driver crash or the kernel's OOM killer then
cost one failure record, never the caller: the child is killed at the limit
and its death is reported with the reason. The child is a fresh interpreter
(``python -m updp.latency.isolate``) that reads its job as JSON on stdin and
writes the record as JSON on stdout.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from updp.latency.base import MeasureConfig
from updp.latency.result import LatencyResult, failure


def _death_reason(code: int, stderr: str) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (likely out of memory)" if -code == signal.SIGKILL else ""
        return f"measurement process killed by {name}{hint}"
    last = (stderr.strip().splitlines() or ["no output"])[-1][:300]
    return f"measurement process exited with code {code}: {last}"


def measure_isolated(backend: str, onnx_path: str | Path, cfg: MeasureConfig, timeout_s: float | None = None,
                     **options: Any) -> LatencyResult:
    """``resolve_backend(backend, **options).measure(onnx_path, cfg)`` in a child killed after ``timeout_s``."""
    job = {"backend": backend, "options": options, "onnx": str(onnx_path), "cfg": dataclasses.asdict(cfg)}
    limit = timeout_s if timeout_s is not None else cfg.timeout_s + 60
    fields = dict(backend=backend, precision=cfg.precision, batch_size=cfg.batch_size,
                  input_shape=tuple(cfg.input_shape))
    try:
        proc = subprocess.run([sys.executable, "-m", "updp.latency.isolate"], input=json.dumps(job, default=str),
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return failure(f"timed out: measurement killed after {limit:g} s", **fields)
    if proc.returncode != 0:
        return failure(_death_reason(proc.returncode, proc.stderr), **fields)
    try:
        return LatencyResult.from_dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError) as e:
        return failure(f"measurement process gave no readable result ({e})", **fields)


def _main() -> None:
    from updp.latency.backends import resolve_backend

    job = json.loads(sys.stdin.read())
    cfg = job["cfg"]
    cfg = MeasureConfig(**{**cfg, "input_shape": tuple(cfg["input_shape"])})
    try:
        result = resolve_backend(job["backend"], **job["options"]).measure(job["onnx"], cfg)
    except Exception as e:  # noqa: BLE001 - reported to the parent as a record
        result = failure(f"{type(e).__name__}: {e}", backend=job["backend"], precision=cfg.precision,
                         batch_size=cfg.batch_size, input_shape=tuple(cfg.input_shape))
    print(json.dumps(result.as_dict()))


if __name__ == "__main__":
    _main()
