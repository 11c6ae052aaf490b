"""``updp run`` and ``updp train``: the whole pipeline in one resumable run directory."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from updp.core.errors import UpdpError, warn
from updp.latency.backends import resolve_backend
from updp.pipeline import rundir
from updp.pipeline.config import RunConfig
from updp.pipeline.final import append_final_section, finalize
from updp.pipeline.search import run_search
from updp.pruner import PruningPlan
from updp.search.forms import FormPlan
from updp.search.report import pareto_front
from updp.train.progressive_training import train_plan
from updp.train.runtime import broadcast_object


def choose_plan(cfg: RunConfig, run_dir: Path) -> PruningPlan:
    """The configured plan, else the search's best plan under the budget, else its best pruned front plan."""
    if cfg.train.plan:
        return PruningPlan(cfg.model, cfg.train.plan)
    summary_path = run_dir / "search_summary.json"
    if not summary_path.is_file():
        raise UpdpError(f"no plan to train: give --plan, or run 'updp search' into '{run_dir}' first")
    best = json.loads(summary_path.read_text()).get("best")
    if best and best.get("pruned"):
        return PruningPlan.from_str(cfg.model, best["pruned"])
    front = pd.read_csv(run_dir / "pareto.csv", keep_default_na=False)
    pruned = front[front.n_pruned > 0]
    if pruned.empty and (run_dir / "trials.csv").is_file():  # nothing within the budget: the whole trade-off
        pruned = pareto_front(pd.read_csv(run_dir / "trials.csv", keep_default_na=False)).query("n_pruned > 0")
        if not pruned.empty:
            warn("no plan met the latency budget: training the best-scoring pruned plan of the unconstrained "
                 "Pareto front instead (give --plan to choose another)")
    if pruned.empty:
        raise UpdpError("the search found no pruned plan worth training; relax the budget or run more trials")
    return PruningPlan.from_str(cfg.model, pruned.sort_values("score", ascending=False).iloc[0].pruned)


def train_and_merge(cfg: RunConfig, run_dir: Path, plan: PruningPlan | None = None) -> dict:
    """Progressive training of the plan from the baseline, then merge, verify, export, time."""
    final = run_dir / "final.json"
    if final.is_file():
        print(f"updp: nothing to do: '{run_dir}' already has its final model (final.json); "
              "delete final.json to redo the final stage", flush=True)
        return json.loads(final.read_text())
    rundir.prepare_run_dir(run_dir)
    inp = rundir.check_inputs(cfg, run_dir)
    plan = plan or choose_plan(cfg, run_dir)
    unknown = [b for b in plan if b not in inp.space.names]
    if unknown:
        raise UpdpError(f"cannot train plan: {', '.join(unknown)} not prunable here (see 'updp blocks {cfg.model}')")
    with rundir.training_lock(run_dir):
        baseline = rundir.baseline_model(inp)
    print(f"updp: progressive training of {len(plan)} pruned blocks: {', '.join(plan)}", flush=True)
    with rundir.stage(run_dir, "progressive_training"):
        student = train_plan(baseline, plan, inp.splits, cfg.train, run_dir,
                             batch_size=cfg.data.batch_size, seed=cfg.search.seed, rt=inp.rt)
    result = {}
    if inp.rt.is_main:  # one process merges, exports and times; the others wait for its final.json
        with rundir.stage(run_dir, "merge_verify_export_latency"):
            backend = cfg.latency.backend
            backend = backend if backend == "trtexec" else resolve_backend(backend).name
            forms_file = run_dir / "merge_forms.json"
            forms = FormPlan.load(forms_file).forms if forms_file.is_file() else None
            result = finalize(baseline, student, plan, inp.splits, cfg, run_dir, backend, inp.num_classes,
                              inp.latency_img_size, inp.rt, forms)
            append_final_section(run_dir, result)
    return broadcast_object(inp.rt, result)


def run_all(cfg: RunConfig, run_dir: Path) -> dict:
    """Baseline, supernet, search, progressive training, merge, report: each stage once."""
    if not (run_dir / "final.json").is_file():  # a finished run skips straight to its "nothing to do"
        run_search(cfg, run_dir)
    return train_and_merge(cfg, run_dir)
