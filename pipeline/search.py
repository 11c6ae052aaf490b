"""``updp search``: one resumable run directory from inputs to the Pareto report.

Stages (each skipped when already complete, so a killed run resumes):
baseline weights, latency table, supernet training, Optuna study, hybrid
verification, report. Every input is checked before any long work starts.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from tqdm import tqdm

from updp.core.config import override
from updp.core.errors import UpdpError, warn
from updp.core.fileio import write_json
from updp.core.plan import PruningPlan
from updp.latency.base import MeasureConfig
from updp.latency.cache import LatencyCache
from updp.latency.predictor import LatencyModel, evaluate, fit
from updp.latency.table import LatencyTable, build_table, ratio
from updp.pipeline.config import RunConfig
from updp.pipeline.rundir import (
    Inputs,
    baseline_model,
    check_inputs,
    load_run_config,
    prepare_run_dir,
    report_lock,
    save_config,
    stage,
    training_lock,
)
from updp.search import study as st
from updp.search.forms import FormPlan, plan_forms
from updp.search.metrics import METRIC_NAMES, SCORE_SPLITS
from updp.search.remote import ImportedTimer, calibration_plans, needed_plans
from updp.search.report import write_report
from updp.search.scoring import resident, score_plan
from updp.search.space import SearchSpace
from updp.search.supernet import Supernet
from updp.search.timing import PlanTimer, block_groups, single_block_ratios
from updp.train.data import fixed_batches
from updp.train.loop import TrainConfig, Trainer
from updp.train.runtime import barrier, broadcast_object


def plan_timer(inp: Inputs) -> PlanTimer | ImportedTimer:
    """The run's timer; with ``--backend trtexec``, the imported figures (all the predictor needs, else an error)."""
    lc = inp.cfg.latency
    mc = MeasureConfig(batch_size=lc.batch_size, precision=lc.precision, min_runs=lc.runs, threads=lc.threads)
    if lc.backend != "trtexec":
        cache = LatencyCache(inp.run_dir / "latency_cache.sqlite")
        return PlanTimer(inp.cfg.model, lc.backend, mc, cache, inp.num_classes, inp.latency_img_size)
    mc = dataclasses.replace(mc, input_shape=(3, inp.latency_img_size, inp.latency_img_size))
    timer = ImportedTimer(inp.cfg.model, mc, LatencyCache(lc.cache), lc.device)
    s = inp.cfg.search
    entries = needed_plans(inp.cfg.model, inp.space.candidates, "calibration", lc.fit_plans, lc.held_out_plans, s.seed)
    timer.require(entries, export_command(inp))
    return timer


def export_command(inp: Inputs) -> str:
    """The ``updp latency export`` that writes the ONNX of every plan this run's predictor needs."""
    cfg, lc = inp.cfg, inp.cfg.latency
    keep = "".join(f" --keep {k}" for k in cfg.search.keep)
    return (f"updp latency export {cfg.model} --plans calibration --fit-plans {lc.fit_plans} --held-out-plans "
            f"{lc.held_out_plans} --seed {cfg.search.seed} --img-size {inp.latency_img_size} --batch-size "
            f"{lc.batch_size} --precision {lc.precision} --num-classes {inp.num_classes}{keep} --out DIR")


def merge_forms(inp: Inputs, timer: PlanTimer | ImportedTimer) -> tuple[Inputs, FormPlan | None]:
    """The merge planner's choice (``merge_forms.json``, rank 0 times it once); the space without the blocks no
    form speeds up on the target. None with ``--merge-forms default`` and for imported trtexec figures.

    Raises:
        UpdpError: no block of the space is faster merged, in any form, on the target.
    """
    if inp.cfg.latency.merge_forms == "default" or isinstance(timer, ImportedTimer):
        return inp, None
    path = inp.run_dir / "merge_forms.json"
    if not path.is_file() and (inp.run_dir / "latency_table.json").is_file():
        # a run begun before the planner: its table timed the MAC-worthwhile blocks in the default forms
        return dataclasses.replace(inp, space=inp.space.without(s.name for s in inp.space.candidates
                                                                 if not s.worthwhile)), None
    if not path.is_file() and inp.rt.is_main:
        print(f"updp: timing each merged form of {len(set(block_groups(inp.space.candidates).values()))} groups of "
              f"identical blocks ({timer.backend_name}, interleaved)...", flush=True)
        plan_forms(timer, inp.space.candidates).save(path)
    barrier(inp.rt)
    forms = FormPlan.load(path)
    timer.forms = forms.forms
    dropped = set(forms.dropped) | {s.name for s in inp.space.candidates if s.name not in forms.forms}
    if not dropped:
        return inp, forms
    if not forms.forms:
        raise UpdpError(f"no block of {inp.cfg.model} is faster merged, in any form, on this target "
                        f"({timer.backend_name}, {timer.device}): see {path}")
    warn(f"not worth pruning on this target (no merged form is faster): {', '.join(sorted(forms.dropped))}")
    return dataclasses.replace(inp, space=inp.space.without(dropped)), forms


def latency_table(inp: Inputs, timer: PlanTimer) -> LatencyTable:
    """The per-block latency table: timed once, by rank 0 under torchrun (the other ranks wait for it)."""
    path = inp.run_dir / "latency_table.json"
    if not path.is_file() and inp.rt.is_main:
        print(f"updp: timing the baseline and {len(inp.space.names)} single-block plans ({timer.backend_name}"
              f"{', interleaved' if timer.backend_name != 'trtexec' else ': imported figures'})...", flush=True)
        build_table(timer.measure_many, inp.cfg.model, inp.space.names).save(path)
    barrier(inp.rt)
    return LatencyTable.load(path)


def latency_model(inp: Inputs, timer: PlanTimer, table: LatencyTable) -> LatencyModel | None:
    """The fitted latency model of the run (``latency_model.json``), or None with ``latency.fit_plans`` 0.

    One interleaved pass (rank 0) times the baseline, ``fit_plans`` random plans (more when the model's
    features need them) and ``held_out_plans`` others; the model is fitted to those and the table's
    single blocks, and its error and the table's are measured on the held-out plans only.
    """
    lc, model = inp.cfg.latency, inp.cfg.model
    path = inp.run_dir / "latency_model.json"
    if lc.mode == "measure":  # every plan is measured: nothing to predict but the budget (from the table)
        return None
    if lc.fit_plans and not path.is_file() and inp.rt.is_main:
        specs = [s for s in inp.space.candidates if s.name not in table.failed]
        groups = block_groups(specs)
        singles, single_ratios = single_block_ratios(table)
        fit_plans, held = calibration_plans(model, specs, lc.fit_plans, lc.held_out_plans, inp.cfg.search.seed)
        n_fit = len(fit_plans)
        print(f"updp: timing {len(fit_plans)} random plans to fit the latency model and {len(held)} to check it "
              f"({timer.backend_name})...", flush=True)
        base, *results = timer.measure_many([PruningPlan(model), *fit_plans, *held])
        if not base.ok:
            raise UpdpError(f"the baseline latency of {model} could not be measured ({base.error})")
        ratios = [ratio(r, base) if r.ok else None for r in results]
        fitted = fit(model, groups, [*singles, *fit_plans], [*single_ratios, *ratios[:n_fit]], table.baseline_ms,
                     {k: v for k, v in table.context.items() if k != "round_medians_ms"}, table.failed)
        fitted.held_out = {"fitted": evaluate(fitted.predicted_ratio, held, ratios[n_fit:]),
                           "table": evaluate(table.predicted_ratio, held, ratios[n_fit:])}
        fitted.to_json(path)
    barrier(inp.rt)
    return LatencyModel.load(path) if lc.fit_plans and path.is_file() else None


def predictor_summary(model: LatencyModel | None, mode: str = "table") -> str:
    """What predicts a plan's latency in this run, and how well it did on plans it was not fitted on."""
    if mode == "measure":
        return "none: every plan measured (the budget from the additive per-block table)"
    if model is None:
        return "additive per-block table (latency_table.json)"
    f, t = model.held_out.get("fitted", {}), model.held_out.get("table", {})
    if not f.get("plans"):
        return f"fitted latency model (latency_model.json, {len(model.fit_plans)} plans): no held-out check"
    return (f"fitted latency model (latency_model.json, {len(model.fit_plans)} measured plans): median APE "
            f"{f['median_ape_pct']:.2f} %, p95 {f['p95_ape_pct']:.2f} % on {f['plans']} held-out plans "
            f"(additive table on the same plans: {t['median_ape_pct']:.2f} %, p95 {t['p95_ape_pct']:.2f} %)")


def budget(inp: Inputs, table: LatencyTable, predictor=None) -> float | None:
    """The latency budget in ms; an impossible one is an error before any training.

    ``budget_frac`` places the budget inside the range the table measured (between the
    baseline and the most-pruned allowed plan), so it is reachable on any machine.
    """
    s = inp.cfg.search
    predictor = predictor or table
    floor = predictor.predict(inp.space.repair(n for n in inp.space.names if n not in table.failed))
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


def train_supernet(inp: Inputs, model: torch.nn.Module, predict: Callable[[PruningPlan], float] | None = None,
                   budget_ms: float | None = None) -> Supernet:
    """The supernet trained as configured; ``predict`` and ``budget_ms`` serve ``--supernet-sampling budget``."""
    cfg = inp.cfg
    supernet = Supernet(model, inp.space)
    near = None
    if predict is not None and budget_ms:
        def near(plan: PruningPlan) -> float:
            try:
                return abs(predict(plan) - budget_ms)
            except UpdpError:  # a block the table could not time: never the nearest
                return float("inf")
    sampling = cfg.supernet.sampling
    if sampling == "budget" and near is None:  # the budget fell away (the table measured no saving): nothing to aim at
        warn("--supernet-sampling budget: the search has no latency budget, so the supernet samples subnets "
             "uniformly")
        sampling = "uniform"
    tc = TrainConfig(epochs=cfg.supernet.epochs, batch_size=cfg.data.batch_size, lr=cfg.supernet.lr,
                     seed=cfg.search.seed)
    step = supernet.sandwich_step(cfg.supernet.random_plans, cfg.supernet.kd_alpha, cfg.supernet.kd_temperature,
                                  seed=cfg.search.seed, sampling=sampling, near=near)
    # a subnet skips the branch its blocks do not use: those parameters take no part in its pass
    Trainer(supernet.model, tc, inp.splits.train, step, inp.run_dir / "supernet.pt",
            metrics_csv=inp.run_dir / "supernet_metrics.csv", desc="supernet", rt=inp.rt,
            find_unused_parameters=True).fit()
    return supernet


class PlanLatency:
    """Latency of a plan for the objective: measured, or predicted by the fitted model (else the table).

    ``verify`` (hybrid mode) measures a plan interleaved with the baseline and
    scales the ratio to the table's baseline, so it compares with predictions.
    """

    def __init__(self, mode: str, timer: PlanTimer, table: LatencyTable, model: LatencyModel | None = None):
        self.mode, self.timer, self.table, self.model = mode, timer, table, model

    def __call__(self, plan: PruningPlan):
        if self.mode == "measure":
            r = self.timer.measure(plan)
            if not r.ok:
                raise st.CandidateFailed(r.error)
            return r.median_ms, "measured", r.context
        try:
            if self.model is not None:
                return self.model.predict(plan), "predicted", {"predictor": "latency_model.json"}
            return self.table.predict(plan), "predicted", {"table": "latency_table.json"}
        except UpdpError as e:  # a block the table could not time
            raise st.CandidateFailed(str(e)) from None

    def verify(self, plan: PruningPlan):
        base, mine = self.timer.measure_many([PruningPlan(plan.model), plan])
        try:
            r = ratio(mine, base)
        except UpdpError as e:
            raise st.CandidateFailed(str(e)) from None
        context = {k: v for k, v in mine.context.items() if k != "round_medians_ms"}
        return r * self.table.baseline_ms, "measured", {**context, "measured_ratio_to_baseline": r,
                                                       "scaled_by_table_baseline_ms": self.table.baseline_ms}


def _progress(total: int, metric: str):
    bar = tqdm(total=total, desc="search", unit="trial", dynamic_ncols=True)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        bar.n = min(done, total)
        bar.refresh()
        a = trial.user_attrs
        if trial.state == TrialState.COMPLETE:
            bar.write(f"trial {trial.number:4d}: {METRIC_NAMES[metric]} {trial.values[0]:6.2f} %  "
                      f"latency {trial.values[1]:8.4f} ms "
                      f"({a.get('latency_source')})  pruned {a.get('n_pruned')}")
        elif "duplicate_of" in a:
            bar.write(f"trial {trial.number:4d}: same plan as trial {a['duplicate_of']}, not scored again")
        else:
            bar.write(f"trial {trial.number:4d}: {trial.state.name} {trial.user_attrs.get('fail_reason', '')}")
    return callback, bar


def worker_sampler(sampler: str | optuna.samplers.BaseSampler, space: SearchSpace, mode: str, seed: int,
                   trials: int, worker: int, latency: Callable | None = None) -> st.DistinctSampler:
    """The sampler of one worker of a study: ``sampler`` seeded by the worker's slot (workers sharing a study
    propose different plans), steered away from the plans the study holds. ``latency``: the predictor the
    ehvi sampler prices plans with."""
    base = st.make_sampler(sampler, seed, trials, worker, space, mode, latency)
    return st.DistinctSampler(base, space, mode, seed=st.worker_seed(seed, worker))


def study_seeding(space: SearchSpace, mode: str, seeding: str, target: int, sampler="ehvi") -> st.Seeding:
    """The first trials of a new study for ``--seeding``. auto: the greedy chains when ``target`` trials allow
    them, except for the ehvi sampler, whose model finds the front's ends without them (and the chains cost it
    hypervolume on every space of ``results/search_quality.md``)."""
    auto = seeding == "auto" and sampler != "ehvi" and st.greedy_fits(space, mode, target)
    return st.Seeding(space, mode, seeding == "greedy" or auto)


def run_search(cfg: RunConfig, run_dir: Path, sampler: optuna.samplers.BaseSampler | None = None) -> dict:
    """Every stage of ``updp search``; ``sampler`` (Python only) replaces the configured one."""
    prepare_run_dir(run_dir)
    with stage(run_dir, "checks"):
        inp = check_inputs(cfg, run_dir)
        save_config(run_dir, override(cfg, {"latency.img_size": inp.latency_img_size}))  # recorded once
        timer = plan_timer(inp)
    with training_lock(run_dir):
        with stage(run_dir, "latency_table"):
            inp, forms = merge_forms(inp, timer)
            table = latency_table(inp, timer)
            if cfg.search.latency_budget_ms or cfg.search.target_speedup:
                budget(inp, table)  # an impossible budget is an error before the model's timing pass too
            fitted = latency_model(inp, timer, table)
            budget_ms = budget(inp, table, fitted)
        with stage(run_dir, "baseline"):
            model = baseline_model(inp)
        with stage(run_dir, "supernet"):
            supernet = train_supernet(inp, model, (fitted or table).predict, budget_ms)
    s = cfg.search
    worker = st.worker_slot(run_dir)
    sampler = worker_sampler(sampler or s.sampler, inp.space, s.space, s.seed, s.trials, worker,
                             (fitted or table).predict)
    study = st.open_study(inp.storage, s.study_name, sampler)
    for key in ("metric", "score_on"):  # what every trial of the study is scored by, for a resume to check
        if key not in study.user_attrs:
            study.set_user_attr(key, getattr(s, key))
    target = s.trials
    if target > inp.space.size(s.space):  # every plan once is all a study can complete
        target = inp.space.size(s.space)
        warn(f"the search space holds only {target} distinct plans: searching {target}, not {s.trials}")
    seeding = study_seeding(inp.space, s.space, s.seeding, target, s.sampler if sampler is None else sampler)
    seeding.enqueue(study)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done >= target:
        print(f"updp: nothing to do: the study already has {done} completed trials (asked for {s.trials}); "
              "pass --trials N to add more", flush=True)
        st.finish_study(study, target)
    else:
        calib = resident(fixed_batches(inp.splits.train_eval, cfg.data.calib_images, s.seed), inp.rt)
        images = getattr(inp.splits, SCORE_SPLITS[s.score_on])
        scored = resident(fixed_batches(images, cfg.data.eval_images, s.seed), inp.rt)
        scorer = lambda plan: score_plan(supernet, plan, calib, scored, s.finetune_steps, rt=inp.rt)  # noqa: E731
        latency = PlanLatency(cfg.latency.mode, timer, table, fitted)
        objective = st.Objective(inp.space, s.space, scorer, latency, budget_ms,
                                 verify=latency.verify if cfg.latency.mode == "hybrid" else None,
                                 verify_top=cfg.latency.verify_top, metric=s.metric)
        callback, bar = _progress(target, s.metric)
        if worker:
            print(f"updp: worker {worker} joins the study (sampler seed {st.worker_seed(s.seed, worker)})", flush=True)
        with stage(run_dir, "search"):
            try:
                counts = st.optimize(study, objective, target, callbacks=[seeding, callback])
            finally:
                bar.close()
        print(f"updp: search: {counts['complete']} trials complete, {counts['fail']} failed, {counts['pruned']} "
              f"pruned ({counts['duplicates_skipped']} repeated plans not scored again; {counts['distinct_plans']} "
              f"distinct plans in {counts['started']} trials, {sampler.moves} proposed repeats moved to an untried "
              "neighbour)", flush=True)
    barrier(inp.rt)  # under torchrun every rank is a worker of the study: rank 0 reports once all are done
    with stage(run_dir, "report"):
        context = run_context(cfg, timer, budget_ms, table, inp, fitted, forms)
        summary = report(run_dir, study, context) if inp.rt.is_main else {}
    return broadcast_object(inp.rt, summary)


def score_images(cfg: RunConfig, inp: Inputs | None = None) -> str:
    """The images each candidate is scored on, in words (how many, when the run's splits are loaded)."""
    split = SCORE_SPLITS[cfg.search.score_on]
    n = min(cfg.data.eval_images, len(getattr(inp.splits, split))) if inp else cfg.data.eval_images
    where = "training images" if cfg.search.score_on == "train" else "held-out training images"
    return f"{n} {where} (BN re-estimated on {cfg.data.calib_images} training images per candidate)"


def run_context(cfg: RunConfig, timer: PlanTimer, budget_ms: float | None, table: LatencyTable | None,
                inp: Inputs | None = None, model: LatencyModel | None = None, forms: FormPlan | None = None) -> dict:
    training = {"training": inp.rt.describe()} if inp else {}
    merge = forms.summary() if forms else "each family's default form (not timed on the target)"
    return {**training, "latency_predictor": predictor_summary(model, cfg.latency.mode), "merge_forms": merge,
            "model": cfg.model, "metric": cfg.search.metric, "score_images": score_images(cfg, inp),
            "supernet_sampling": cfg.supernet.sampling,
            "sampler": str(cfg.search.sampler),
            "seeding": cfg.search.seeding,
            "data": cfg.data.root, "accuracy_input": f"{cfg.data.img_size}px",
            "latency_mode": cfg.latency.mode, "budget_ms": budget_ms,
            "baseline_latency_ms": table.baseline_ms if table else None, "backend": timer.backend_name,
            "device": timer.device, "precision": timer.cfg.precision, "batch_size": timer.cfg.batch_size,
            "latency_input": "x".join(map(str, timer.cfg.input_shape)),
            "versions": ", ".join(f"{k} {v}" for k, v in timer.versions)}


def report(run_dir: Path, study: optuna.Study, context: dict) -> dict:
    """Write the report from the study as it stands; workers finishing together cannot leave an older one last."""
    with report_lock(run_dir):
        summary = write_report(run_dir, study, context, context.get("budget_ms"))
        write_json(run_dir / "search_summary.json", {**summary, "context": context, "time": time.time()})
    return summary


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
        from updp.pipeline.final import append_final_section
        append_final_section(run_dir, json.loads(final.read_text()))
    return summary
