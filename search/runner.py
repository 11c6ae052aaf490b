"""``updp search``: one resumable run directory from inputs to the Pareto report.

Stages (each skipped when already complete, so a killed run resumes):
baseline weights, latency table, supernet training, Optuna study, hybrid
verification, report. Every input is checked before any long work starts.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from tqdm import tqdm

from updp.config import ConfigError, load_yaml, write_yaml
from updp.data import first_images, load_splits
from updp.errors import UpdpError
from updp.fileio import write_json
from updp.latency.base import MeasureConfig
from updp.latency.cache import LatencyCache
from updp.latency.table import LatencyTable, build_table, ratio
from updp.plan_latency import PlanTimer
from updp.pruner import create_model, find_blocks
from updp.pruner.checkpoint import load_state, raw_state_dict, read_file
from updp.search import study as st
from updp.search.config import RunConfig
from updp.search.report import write_report
from updp.search.scoring import score_plan
from updp.search.space import SearchSpace
from updp.search.supernet import Supernet
from updp.training import TrainConfig, Trainer, ce_step


@dataclass
class Inputs:
    """Everything checked up front."""

    cfg: RunConfig
    run_dir: Path
    splits: object
    space: SearchSpace
    storage: object
    num_classes: int


def _check_inputs(cfg: RunConfig, run_dir: Path) -> Inputs:
    if not cfg.model:
        raise ConfigError("no model given: pass --model NAME or set 'model' in the config")
    if not cfg.data.root:
        raise ConfigError("no dataset given: pass --data DIR or set 'data.root' in the config")
    if cfg.latency.mode not in ("measure", "table", "hybrid"):
        raise ConfigError(f"unknown latency mode '{cfg.latency.mode}'; use measure, table or hybrid")
    if cfg.search.latency_budget_ms and cfg.search.target_speedup:
        raise ConfigError("give either a latency budget or a target speedup, not both")
    splits = load_splits(cfg.data.root, cfg.data.img_size)
    num_classes = cfg.num_classes or len(splits.classes)
    model = create_model(cfg.model, num_classes)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, cfg.data.img_size, cfg.data.img_size))
    except Exception as e:  # noqa: BLE001 - the model's own complaint, in one line
        raise UpdpError(f"{cfg.model} cannot take {cfg.data.img_size}px images: {str(e).splitlines()[0][:200]}")
    blocks = find_blocks(model, (3, cfg.data.img_size, cfg.data.img_size)).blocks
    if not blocks:
        raise UpdpError(f"{cfg.model} has no prunable block (see 'updp blocks {cfg.model}')")
    space = SearchSpace.build(blocks, cfg.search.keep, cfg.search.max_per_stage)
    storage = st.open_storage(cfg.search.storage, run_dir)
    return Inputs(cfg, run_dir, splits, space, storage, num_classes)


@contextlib.contextmanager
def _exclusive(run_dir: Path):
    """One process at a time trains the baseline and supernet; other workers wait here."""
    with open(run_dir / ".train.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def baseline_model(inp: Inputs) -> torch.nn.Module:
    """The model with baseline weights: from --checkpoint, or trained here on the data."""
    cfg = inp.cfg
    if cfg.pretrained and not cfg.checkpoint:
        return _pretrained(cfg.model, inp.num_classes)
    model = create_model(cfg.model, inp.num_classes)
    if cfg.checkpoint:
        load_state(model, raw_state_dict(read_file(cfg.checkpoint)), cfg.checkpoint)
        return model
    tc = TrainConfig(epochs=cfg.baseline.epochs, batch_size=cfg.data.batch_size, lr=cfg.baseline.lr)
    Trainer(model, tc, inp.splits.train, ce_step(model), inp.run_dir / "baseline.pt",
            val_batches=first_images(inp.splits.val, 1000), metrics_csv=inp.run_dir / "baseline_metrics.csv",
            desc="baseline").fit()
    return model


def _pretrained(name: str, num_classes: int) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - no network, no weights for this name, ...
        raise UpdpError(f"cannot load timm pretrained weights for {name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); pass --checkpoint FILE instead") from None


def _timer(inp: Inputs) -> PlanTimer:
    lc = inp.cfg.latency
    mc = MeasureConfig(batch_size=lc.batch_size, precision=lc.precision, min_runs=lc.runs, threads=lc.threads)
    cache = LatencyCache(inp.run_dir / "latency_cache.sqlite")
    return PlanTimer(inp.cfg.model, lc.backend, mc, cache, inp.num_classes, lc.img_size)


def latency_table(inp: Inputs, timer: PlanTimer) -> LatencyTable:
    path = inp.run_dir / "latency_table.json"
    if path.is_file():
        return LatencyTable.load(path)
    print(f"updp: timing the baseline and {len(inp.space.names)} single-block plans ({timer.backend.name}, "
          f"interleaved)...", flush=True)
    table = build_table(timer.measure_many, inp.space.names)
    table.save(path)
    return table


def budget(inp: Inputs, table: LatencyTable) -> float | None:
    """The latency budget in ms; an impossible one is an error before any training."""
    s = inp.cfg.search
    ms = s.latency_budget_ms or (table.baseline_ms / s.target_speedup if s.target_speedup else None)
    if ms is None:
        return None
    floor = table.predict(inp.space.repair(set(inp.space.names)))
    if floor > ms:
        raise UpdpError(f"impossible budget: {ms:.4g} ms, but even the most-pruned allowed plan is predicted at "
                        f"{floor:.4g} ms (baseline {table.baseline_ms:.4g} ms); relax the budget, "
                        "allow more blocks per stage or keep fewer")
    return ms


def train_supernet(inp: Inputs, model: torch.nn.Module) -> Supernet:
    cfg = inp.cfg
    supernet = Supernet(model, inp.space)
    tc = TrainConfig(epochs=cfg.supernet.epochs, batch_size=cfg.data.batch_size, lr=cfg.supernet.lr,
                     seed=cfg.search.seed)
    step = supernet.sandwich_step(cfg.supernet.random_plans, cfg.supernet.kd_alpha, cfg.supernet.kd_temperature,
                                  seed=cfg.search.seed)
    Trainer(supernet.model, tc, inp.splits.train, step, inp.run_dir / "supernet.pt",
            metrics_csv=inp.run_dir / "supernet_metrics.csv", desc="supernet").fit()
    return supernet


class PlanLatency:
    """Latency of a plan for the objective: measured, or predicted by the table."""

    def __init__(self, mode: str, timer: PlanTimer, table: LatencyTable):
        self.mode, self.timer, self.table = mode, timer, table

    def __call__(self, plan: frozenset[str]):
        if self.mode == "measure":
            r = self.timer.measure(plan)
            if not r.ok:
                raise st.CandidateFailed(r.error)
            return r.median_ms, "measured", r.context
        return self.table.predict(plan), "predicted", {"table": "latency_table.json"}


def _progress(total: int):
    bar = tqdm(total=total, desc="search", unit="trial", dynamic_ncols=True)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        bar.n = min(done, total)
        bar.refresh()
        if trial.state == TrialState.COMPLETE:
            a = trial.user_attrs
            bar.write(f"trial {trial.number:4d}: top-1 {trial.values[0]:6.2f} %  latency {trial.values[1]:8.4f} ms "
                      f"({a.get('latency_source')})  pruned {a.get('n_pruned')}")
        else:
            bar.write(f"trial {trial.number:4d}: {trial.state.name} {trial.user_attrs.get('fail_reason', '')}")
    return callback, bar


def verify_front(inp: Inputs, study: optuna.Study, timer: PlanTimer, table: LatencyTable) -> None:
    """Hybrid mode: measure the best predicted plans in one interleaved pass with the baseline.

    Trials are immutable once finished, so the figures go to the study's user
    attribute ``verified_latency_ms`` ({trial number: ms}).
    """
    from updp.search.report import pareto_front, trials_frame

    verified = dict(study.user_attrs.get("verified_latency_ms", {}))
    budget = inp.cfg.latency.verify_top
    while budget > 0:  # measuring moves plans on or off the front: repeat until it is all measured
        front = pareto_front(trials_frame(study))
        todo = [r for r in front.itertuples() if r.n_pruned and str(r.trial) not in verified][:budget]
        if not todo:
            return
        budget -= len(todo)
        print(f"updp: measuring {len(todo)} predicted front plans (interleaved with the baseline)...", flush=True)
        results = timer.measure_many([frozenset(), *(frozenset(r.pruned.split(";")) for r in todo)])
        for r, res in zip(todo, results[1:]):
            with contextlib.suppress(UpdpError):  # a plan that fails to time keeps its prediction
                verified[str(r.trial)] = ratio(res, results[0]) * table.baseline_ms
        study.set_user_attr("verified_latency_ms", verified)


@contextlib.contextmanager
def stage(run_dir: Path, name: str):
    """Record a stage's wall time in ``timings.json`` (seconds; a resumed stage adds up)."""
    path = run_dir / "timings.json"
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        write_json(path, timings)


def run_search(cfg: RunConfig, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.search.seed)  # model initialisation and everything after it are reproducible
    with stage(run_dir, "checks"):
        inp = _check_inputs(cfg, run_dir)
        write_yaml(run_dir / "config.yaml", cfg)
        timer = _timer(inp)
    with _exclusive(run_dir):
        with stage(run_dir, "latency_table"):
            table = latency_table(inp, timer)
            budget_ms = budget(inp, table)
        with stage(run_dir, "baseline"):
            model = baseline_model(inp)
        with stage(run_dir, "supernet"):
            supernet = train_supernet(inp, model)
    s = cfg.search
    sampler = st.make_sampler(s.sampler, s.seed, s.trials)
    study = st.open_study(inp.storage, s.study_name, sampler)
    st.seed_study(study, inp.space, s.space)
    st.fail_stale_trials(study)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done >= s.trials:
        print(f"updp: nothing to do: the study already has {done} completed trials (asked for {s.trials}); "
              "pass --trials N to add more", flush=True)
    else:
        calib = first_images(inp.splits.train_eval, cfg.data.calib_images)
        held = first_images(inp.splits.held_out, cfg.data.eval_images)
        scorer = lambda plan: score_plan(supernet, plan, calib, held, s.finetune_steps)  # noqa: E731
        objective = st.Objective(inp.space, s.space, scorer, PlanLatency(cfg.latency.mode, timer, table), budget_ms)
        callback, bar = _progress(s.trials)
        with stage(run_dir, "search"):
            study.optimize(objective, catch=(st.CandidateFailed,), gc_after_trial=False,
                           callbacks=[MaxTrialsCallback(s.trials, states=(TrialState.COMPLETE,)), callback])
        bar.close()
    if cfg.latency.mode == "hybrid":
        with stage(run_dir, "verify_front"):
            verify_front(inp, study, timer, table)
    with stage(run_dir, "report"):
        return report(run_dir, study, run_context(cfg, timer, budget_ms, table))


def run_context(cfg: RunConfig, timer: PlanTimer, budget_ms: float | None, table: LatencyTable | None) -> dict:
    return {"model": cfg.model, "data": cfg.data.root, "accuracy_input": f"{cfg.data.img_size}px",
            "latency_mode": cfg.latency.mode, "budget_ms": budget_ms,
            "baseline_latency_ms": table.baseline_ms if table else None, "backend": timer.backend.name,
            "device": timer.device, "precision": timer.cfg.precision, "batch_size": timer.cfg.batch_size,
            "latency_input": "x".join(map(str, timer.cfg.input_shape)),
            "versions": ", ".join(f"{k} {v}" for k, v in timer.versions)}


def report(run_dir: Path, study: optuna.Study, context: dict) -> dict:
    summary = write_report(run_dir, study, context, context.get("budget_ms"))
    write_json(run_dir / "search_summary.json", {**summary, "context": context, "time": time.time()})
    return summary


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UpdpError(f"'{run_dir}' is not an updp run directory (no config.yaml)")
    return load_yaml(RunConfig, path)


def report_only(run_dir: Path) -> dict:
    """``updp report RUN``: rebuild the report from the run's study and saved context."""
    cfg = load_run_config(run_dir)
    storage = st.open_storage(cfg.search.storage, run_dir)
    try:
        study = optuna.load_study(study_name=cfg.search.study_name, storage=storage)
    except KeyError:
        raise UpdpError(f"run '{run_dir}' has no study '{cfg.search.study_name}' yet") from None
    saved = run_dir / "search_summary.json"
    context = json.loads(saved.read_text())["context"] if saved.is_file() else {"model": cfg.model,
                                                                                 "data": cfg.data.root}
    summary = report(run_dir, study, context)
    final = run_dir / "final.json"
    if final.is_file():  # keep the final-model section that 'updp run' / 'updp train' added
        from updp.progressive import append_final_section
        append_final_section(run_dir, json.loads(final.read_text()))
    return summary
