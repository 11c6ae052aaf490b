"""DDP on the CPU (gloo): 2 processes vs 1, same global batch, 50 steps of timm's test_convnext.

Each configuration runs ``tests/ddp_worker.py`` under ``torchrun --standalone``
(updp's Trainer: the global batch of 32 split over the processes,
DistributedDataParallel on 2); the two alternate over the rounds so machine
drift hits both alike. Reported: the wall time of each (whole torchrun
command, start-up included; median over the rounds) and how far the 2-process
loss curve (mean over ranks, per step) is from the 1-process one. The suite
asserts the curve agreement (tests/test_scale.py); this records the figures.

Run: python benchmarks/ddp_cpu.py [--rounds 3 --steps 50]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import write_results

WORKER = Path(__file__).resolve().parents[1] / "tests" / "ddp_worker.py"


def run(out: Path, nproc: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(out), str(steps)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    walls: dict[int, list[float]] = {1: [], 2: []}
    diffs = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)
            for n in (1, 2):
                walls[n].append(run(out, n, args.steps))
            one = json.loads((out / "losses_1_0.json").read_text())
            r0, r1 = (json.loads((out / f"losses_2_{r}.json").read_text()) for r in (0, 1))
            diffs.append(max(abs((a + b) / 2 - c) / abs(c) for a, b, c in zip(r0, r1, one)))
    rows = [{"processes": n, "backend": "gloo" if n > 1 else "none", "global_batch": 32,
             "per_process_batch": 32 // n, "steps": args.steps, "wall_s_median": statistics.median(w),
             "wall_s_min": min(w), "wall_s_max": max(w),
             "max_rel_loss_diff_vs_1": 0.0 if n == 1 else max(diffs)} for n, w in walls.items()]
    write_results("ddp_cpu", pd.DataFrame(rows), "DDP on the CPU: 2 processes (gloo) vs 1, same global batch",
                  f"timm test_convnext at 32 px, random data, {args.steps} steps of updp's Trainer, global batch 32, "
                  f"OMP_NUM_THREADS=1 per process; {args.rounds} rounds, 1 and 2 processes alternating. Wall time is "
                  "the whole torchrun command (Python, torch and process-group start-up included). The loss "
                  "difference is the largest over all steps and rounds of |mean over ranks - 1-process| / "
                  "1-process: float summation order only (the model has no BatchNorm). On 2 cores two processes "
                  "share the machine the single one had to itself; the figure is for correctness, not a speed-up."
                  f"\n\nCommand: python benchmarks/ddp_cpu.py --rounds {args.rounds} --steps {args.steps}")


if __name__ == "__main__":
    main()
