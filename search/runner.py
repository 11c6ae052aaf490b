"""``updp search``: one resumable run directory from inputs to the Pareto report.

Stages (each skipped when already complete, so a killed run resumes):
baseline weights, latency table, supernet training, Optuna study, hybrid
verification, report. Every input is checked before any long work starts.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from tqdm import tqdm

from updp.config import ConfigError, load_yaml, override, write_yaml
from updp.data import fixed_batches, load_splits
from updp.errors import UpdpError, warn
from updp.fileio import remove_stale_tmp, write_json
from updp.latency.base import MeasureConfig
from updp.latency.cache import LatencyCache
from updp.latency.table import LatencyTable, build_table, ratio
from updp.plan_latency import PlanTimer
from updp.pruner import create_model, find_blocks
from updp.pruner.checkpoint import load_state, raw_state_dict, read_file
from updp.search import study as st
from updp.search.config import RunConfig, validate
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
    validate(cfg)
    splits = load_splits(cfg.data.root, cfg.data.img_size)
    num_classes = cfg.num_classes or len(splits.classes)
    if num_classes < len(splits.classes):
        raise ConfigError(f"num_classes {num_classes} is smaller than the {len(splits.classes)} classes of "
                          f"'{cfg.data.root}'; drop --num-classes or pass at least {len(splits.classes)}")
    if len(splits.train) < cfg.data.batch_size:
        raise ConfigError(f"'{cfg.data.root}' has {len(splits.train)} training images (after holding out every "
                          f"10th for scoring), fewer than the batch size {cfg.data.batch_size}; pass "
                          f"--batch-size {max(1, len(splits.train))} or smaller")
    model = create_model(cfg.model, num_classes)
    if cfg.checkpoint and not cfg.pretrained:
        load_state(model, raw_state_dict(read_file(cfg.checkpoint)), cfg.checkpoint)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, cfg.data.img_size, cfg.data.img_size))
    except Exception as e:  # noqa: BLE001 - the model's own complaint, in one line
        raise UpdpError(f"{cfg.model} cannot take {cfg.data.img_size}px images: {str(e).splitlines()[0][:200]}")
    blocks = find_blocks(model, (3, cfg.data.img_size, cfg.data.img_size)).blocks
    if not blocks:
        raise UpdpError(f"{cfg.model} has no prunable block (see 'updp blocks {cfg.model}')")
    space = SearchSpace.build(blocks, cfg.search.keep, cfg.search.max_per_stage)
    url = st.storage_url(cfg.search.storage)
    if url and ":***@" in url:
        raise ConfigError("the run's storage URL was saved without its password; pass --storage URL again, or "
                          "set UPDP_STORAGE, or write the password as ${VAR} in the URL")
    storage = st.open_storage(url, run_dir)
    return Inputs(cfg, run_dir, splits, space, storage, num_classes)


@contextlib.contextmanager
def _exclusive(run_dir: Path):
    """One process at a time trains the baseline and supernet; other workers wait here.

    The lock file is never truncated and never followed through a symbolic link.
    """
    path = run_dir / ".train.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UpdpError(f"cannot open the run's lock file '{path}' ({e.strerror}); it must be a plain file, "
                        "not a link: remove it and retry") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def baseline_model(inp: Inputs) -> torch.nn.Module:
    """The model with baseline weights: from --checkpoint, or trained here on the data."""
    cfg = inp.cfg
    if cfg.pretrained and not cfg.checkpoint:
        return _pretrained(cfg.model, inp.num_classes)
    model = seeded_model(cfg.model, inp.num_classes, cfg.search.seed)
    if cfg.checkpoint:
        load_state(model, raw_state_dict(read_file(cfg.checkpoint)), cfg.checkpoint)
        return model
    tc = TrainConfig(epochs=cfg.baseline.epochs, batch_size=cfg.data.batch_size, lr=cfg.baseline.lr)
    Trainer(model, tc, inp.splits.train, ce_step(model), inp.run_dir / "baseline.pt",
            val_batches=fixed_batches(inp.splits.val, 1000, cfg.search.seed), metrics_csv=inp.run_dir / "baseline_metrics.csv",
            desc="baseline").fit()
    return model


def seeded_model(name: str, num_classes: int, seed: int) -> torch.nn.Module:
    """The model's initial weights depend on the seed alone, not on what ran before in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, num_classes)


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
    """The latency budget in ms; an impossible one is an error before any training.

    ``budget_frac`` places the budget inside the range the table measured (between the
    baseline and the most-pruned allowed plan), so it is reachable on any machine.
    """
    s = inp.cfg.search
    floor = table.predict(inp.space.repair(set(inp.space.names)))
    if s.budget_frac is not None:
        if floor >= table.baseline_ms:
            warn(f"the latency table measured no saving (most-pruned plan {floor:.4g} ms, baseline "
                 f"{table.baseline_ms:.4g} ms): searching without a budget")
            return None
        return table.baseline_ms - s.budget_frac * (table.baseline_ms - floor)
    ms = s.latency_budget_ms or (table.baseline_ms / s.target_speedup if s.target_speedup else None)
    if ms is None:
        return None
    if floor > ms:
        raise UpdpError(f"impossible budget: {ms:.4g} ms, but even the most-pruned allowed plan is predicted at "
                        f"{floor:.4g} ms (baseline {table.baseline_ms:.4g} ms); relax the budget, "
                        "allow more blocks per stage, keep fewer, or give --budget-frac F (a fraction of the "
                        "measured range)")
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
        a = trial.user_attrs
        if trial.state == TrialState.COMPLETE:
            bar.write(f"trial {trial.number:4d}: top-1 {trial.values[0]:6.2f} %  latency {trial.values[1]:8.4f} ms "
                      f"({a.get('latency_source')})  pruned {a.get('n_pruned')}")
        elif "duplicate_of" in a:
            bar.write(f"trial {trial.number:4d}: same plan as trial {a['duplicate_of']}, not scored again")
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


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    """``config.yaml`` of the run, with any literal password of the storage URL masked."""
    storage = cfg.search.storage
    if storage and st.redact_url(storage) != storage:
        warn("the storage URL's password is not saved in config.yaml; to resume, pass --storage again "
             "or use ${VAR} / UPDP_STORAGE")
        cfg = override(cfg, {"search.storage": st.redact_url(storage)})
    write_yaml(run_dir / "config.yaml", cfg)


def prepare_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_tmp(run_dir):
        print(f"updp: removed '{path}', left by a process killed while writing", flush=True)


def run_search(cfg: RunConfig, run_dir: Path) -> dict:
    prepare_run_dir(run_dir)
    with stage(run_dir, "checks"):
        inp = _check_inputs(cfg, run_dir)
        save_config(run_dir, cfg)
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
    worker = st.worker_slot(run_dir)
    sampler = st.make_sampler(s.sampler, s.seed, s.trials, worker)
    study = st.open_study(inp.storage, s.study_name, sampler)
    st.seed_study(study, inp.space, s.space)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done >= s.trials:
        print(f"updp: nothing to do: the study already has {done} completed trials (asked for {s.trials}); "
              "pass --trials N to add more", flush=True)
        st.finish_study(study, s.trials)
    else:
        calib = fixed_batches(inp.splits.train_eval, cfg.data.calib_images, s.seed)
        held = fixed_batches(inp.splits.held_out, cfg.data.eval_images, s.seed)
        scorer = lambda plan: score_plan(supernet, plan, calib, held, s.finetune_steps)  # noqa: E731
        objective = st.Objective(inp.space, s.space, scorer, PlanLatency(cfg.latency.mode, timer, table), budget_ms)
        callback, bar = _progress(s.trials)
        if worker:
            print(f"updp: worker {worker} joins the study (sampler seed {st.worker_seed(s.seed, worker)})", flush=True)
        with stage(run_dir, "search"):
            try:
                counts = st.optimize(study, objective, s.trials, callbacks=[callback])
            finally:
                bar.close()
        print(f"updp: search: {counts['complete']} trials complete, {counts['fail']} failed, {counts['pruned']} "
              f"pruned ({counts['duplicates_skipped']} repeated plans not scored again)", flush=True)
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
    storage = st.open_storage(st.storage_url(cfg.search.storage), run_dir)
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
