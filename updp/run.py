"""``updp run`` and ``updp train``: the whole pipeline in one resumable run directory."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from updp.errors import UpdpError
from updp.latency.backends import resolve_backend
from updp.progressive import append_final_section, finalize, train_plan
from updp.search import runner
from updp.search.config import RunConfig


def choose_plan(cfg: RunConfig, run_dir: Path) -> list[str]:
    """The configured plan, else the search's best plan under the budget, else its best pruned front plan."""
    if cfg.train.plan:
        return list(cfg.train.plan)
    summary_path = run_dir / "search_summary.json"
    if not summary_path.is_file():
        raise UpdpError(f"no plan to train: give --plan, or run 'updp search' into '{run_dir}' first")
    best = json.loads(summary_path.read_text()).get("best")
    if best and best.get("pruned"):
        return best["pruned"].split(";")
    front = pd.read_csv(run_dir / "pareto.csv", keep_default_na=False)
    pruned = front[front.n_pruned > 0].sort_values("score", ascending=False)
    if pruned.empty:
        raise UpdpError("the search found no pruned plan worth training; relax the budget or run more trials")
    return pruned.iloc[0].pruned.split(";")


def train_and_merge(cfg: RunConfig, run_dir: Path, plan: list[str] | None = None) -> dict:
    """Progressive training of the plan from the baseline, then merge, verify, export, time."""
    final = run_dir / "final.json"
    if final.is_file():
        print(f"updp: nothing to do: '{run_dir}' already has its final model (final.json); "
              "delete final.json to redo the final stage", flush=True)
        return json.loads(final.read_text())
    runner.prepare_run_dir(run_dir)
    inp = runner._check_inputs(cfg, run_dir)
    plan = plan or choose_plan(cfg, run_dir)
    unknown = [b for b in plan if b not in inp.space.names]
    if unknown:
        raise UpdpError(f"cannot train plan: {', '.join(unknown)} not prunable here (see 'updp blocks {cfg.model}')")
    with runner._exclusive(run_dir):
        baseline = runner.baseline_model(inp)
    print(f"updp: progressive training of {len(plan)} pruned blocks: {', '.join(plan)}", flush=True)
    with runner.stage(run_dir, "progressive_training"):
        student = train_plan(baseline, plan, inp.splits, cfg, run_dir)
    with runner.stage(run_dir, "merge_verify_export_latency"):
        backend = resolve_backend(cfg.latency.backend).name
        result = finalize(baseline, student, plan, inp.splits, cfg, run_dir, backend, inp.num_classes)
        append_final_section(run_dir, result)
    return result


def run_all(cfg: RunConfig, run_dir: Path) -> dict:
    """Baseline, supernet, search, progressive training, merge, report: each stage once."""
    if not (run_dir / "final.json").is_file():  # a finished run skips straight to its "nothing to do"
        runner.run_search(cfg, run_dir)
    return train_and_merge(cfg, run_dir)
