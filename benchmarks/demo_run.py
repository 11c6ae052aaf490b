"""The README's main command, timed: `updp run --config configs/demo.yaml` into a fresh run directory.

Writes results/demo_run.{csv,md}: wall time per stage (from the run's
timings.json) and the final figures (final.json). Run: python benchmarks/demo_run.py
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from common import write_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    run_dir = ROOT / "runs" / "demo_bench"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "updp", "run", "--config", str(ROOT / "configs" / "demo.yaml"),
                    "--run", str(run_dir)], check=True, cwd=ROOT)
    total = time.perf_counter() - t0
    timings = json.loads((run_dir / "timings.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    rows = [{"stage": k, "seconds": v} for k, v in timings.items()] + [{"stage": "total (command)", "seconds": total}]
    keys = ["baseline_top1", "merged_top1", "params_baseline", "params_merged", "macs_baseline", "macs_merged",
            "latency_backend", "latency_input", "latency_baseline_ms", "latency_merged_ms", "speedup",
            "max_abs_logit_diff_merged_vs_subnet", "n_pruned", "pruned", "merge_forms"]
    notes = "Final model:\n\n" + "\n".join(f"- {k}: {final.get(k)}" for k in keys)
    shutil.copy(run_dir / "pareto.png", ROOT / "results" / "demo_pareto.png")
    write_results("demo_run", pd.DataFrame(rows), "Demo run (`updp run --config configs/demo.yaml`)", notes)


if __name__ == "__main__":
    main()
