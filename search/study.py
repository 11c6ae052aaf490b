"""The Optuna study: sampler, objective, and workers sharing one study.

Any number of workers (processes on one host, or on many with PostgreSQL)
share a study: each takes a worker slot that seeds its sampler differently, a
plan already evaluated or being evaluated by another trial is not scored
again, and a trial left RUNNING by a killed worker is failed and retried once
(a dead process on this host: at once; elsewhere: when its RDB heartbeat is
stale). Storage URLs, locks and retries are in :mod:`updp.search.storage`.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import inspect
import json
import os
import random
import re
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from updp.core.errors import UpdpError
from updp.core.fileio import pid_alive
from updp.core.plan import PruningPlan
from updp.search.metrics import search_value
from updp.search.space import SearchSpace
from updp.search.storage import RetryOnce, open_lock, open_storage, redact_url, retried_trial, storage_url, study_lock

__all__ = ["CandidateFailed", "DistinctSampler", "Objective",
           "fail_stale_trials", "finish_study", "make_sampler", "open_storage",
           "open_study", "optimize", "redact_url", "retried_trial", "SAMPLERS", "SEEDINGS", "Seeding", "greedy_fits",
           "seed_study", "storage_url",
           "trial_plan",
           "measured_count", "summary_counts", "worker_id", "worker_seed", "worker_slot"]

_SLOTS: dict[tuple[int, Path], int] = {}  # (pid, lock dir) -> slot; its lock file stays open while the process runs


class CandidateFailed(Exception):
    """A candidate plan that could not be evaluated; the trial is FAILED with this reason."""


# --- workers ----------------------------------------------------------------------------------

def worker_id() -> str:
    """This process as a trial's ``worker`` attribute: ``host:pid`` (at call time: a forked worker has its own)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_slot(lock_dir: Path) -> int:
    """This process's worker index: ``$RANK`` under torchrun, else the smallest free slot in ``lock_dir``.

    A slot is an flock on ``lock_dir/.worker-{i}.lock`` held until the process
    exits, so the first worker is always 0 and a restarted worker reuses a freed slot.
    """
    if "RANK" in os.environ:
        if not os.environ["RANK"].isdigit():
            raise UpdpError(f"RANK={os.environ['RANK']!r} is not a worker index; unset it or set it to 0, 1, ...")
        return int(os.environ["RANK"])
    key = (os.getpid(), Path(lock_dir).resolve())  # a forked child takes its own slot
    if key not in _SLOTS:
        key[1].mkdir(parents=True, exist_ok=True)
        _SLOTS[key] = _take_slot(key[1])
    return _SLOTS[key]


def _take_slot(lock_dir: Path) -> int:
    i = 0
    while True:
        fd = open_lock(lock_dir / f".worker-{i}.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return i  # fd stays open: the lock is held until this process exits
        except BlockingIOError:
            os.close(fd)
            i += 1


def worker_seed(seed: int, worker: int) -> int:
    """``seed`` for worker 0 (a one-worker run stays reproducible), a different seed for every other worker."""
    return seed if worker == 0 else (seed + worker * 0x9E3779B1) % 2 ** 32


SAMPLERS = ("ehvi", "nsga2", "tpe", "gp", "random")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def make_sampler(sampler: str | optuna.samplers.BaseSampler, seed: int, trials: int, worker: int = 0,
                 space: SearchSpace | None = None, mode: str = "blocks", latency: Callable | None = None):
    """An Optuna sampler, seeded per worker: a name of ``SAMPLERS``, ``module:Class``, or an instance.

    ``ehvi`` (:class:`updp.search.ehvi.EHVISampler`) needs the ``space`` and the ``latency`` predictor.

    ``module:Class`` names an installed sampler class (an OptunaHub package, your
    own module); it must subclass ``optuna.samplers.BaseSampler`` and is built
    with ``seed=`` when it takes one. An instance is used as it is.
    """
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    seed = worker_seed(seed, worker)
    if sampler == "ehvi":
        if space is None or latency is None:
            raise UpdpError("the ehvi sampler needs the search space and a latency predictor")
        from updp.search.ehvi import EHVISampler

        return EHVISampler(space, mode, latency, seed=seed)
    if sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(10, min(50, trials // 5)), seed=seed)
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if sampler == "gp":
        try:
            return optuna.samplers.GPSampler(seed=seed)
        except ImportError as e:
            raise UpdpError(f"the gp sampler needs scipy ({e}); pip install scipy, or use another sampler") from None
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if isinstance(sampler, str) and _IMPORT_PATH.match(sampler):
        return _imported_sampler(sampler, seed)
    raise UpdpError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)} or an import path "
                    "module:Class of an Optuna sampler")


class DistinctSampler(optuna.samplers.BaseSampler):
    """Any sampler, steered away from plans the study has already tried.

    Binary block masks make repeats common (NSGA-II's crossover and mutation of a converged population
    give the same child again; Optuna issues 2021 and 5440): every repeat is a trial that teaches the
    sampler nothing. This wrapper asks ``base`` for all of a trial's parameters at once (its relative
    sample, the rest one by one as Optuna would), and while the plan they make (after the per-stage cap)
    is one a trial of the study holds already, moves to a neighbour: one block flipped, or one stage's
    count stepped by one, chosen at random (seeded). After ``max_tries`` moves it gives up and the
    objective answers the repeat from the study without scoring it (``duplicate_of``).
    """

    def __init__(self, base: optuna.samplers.BaseSampler, space: SearchSpace, mode: str = "blocks",
                 seed: int | None = None, max_tries: int = 200):
        self.base, self.space, self.mode, self.max_tries = base, space, mode, max_tries
        self.rng = random.Random(seed)
        self.moves = 0  # neighbour moves made, for reports

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict:
        return self.space.distributions(self.mode)

    def sample_relative(self, study, trial, search_space: dict) -> dict:
        base_space = self.base.infer_relative_search_space(study, trial)
        params = self.base.sample_relative(study, trial, base_space) if base_space else {}
        for name, dist in search_space.items():
            if name not in params:
                params[name] = self.base.sample_independent(study, trial, name, dist)
        seen = {t.user_attrs["plan"] for t in study.get_trials(deepcopy=False) if "plan" in t.user_attrs}
        for _ in range(self.max_tries):
            if self.space.from_params(params, self.mode).to_str() not in seen:
                break
            params = self._neighbour(params, search_space)
            self.moves += 1
        return params

    def _neighbour(self, params: dict, search_space: dict) -> dict:
        name = self.rng.choice(sorted(search_space))
        out = dict(params)
        if self.mode == "blocks":
            out[name] = not out[name]
        else:
            dist = search_space[name]
            step = self.rng.choice((-1, 1))
            out[name] = min(dist.high, max(dist.low, out[name] + step))
        return out

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)


def _imported_sampler(path: str, seed: int) -> optuna.samplers.BaseSampler:
    module, _, name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        raise UpdpError(f"cannot import sampler module '{module}' ({e}); install it or fix --sampler") from None
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)):
        raise UpdpError(f"--sampler {path}: '{name}' is not an Optuna sampler class "
                        "(a subclass of optuna.samplers.BaseSampler)")
    takes_seed = "seed" in inspect.signature(cls.__init__).parameters
    return cls(seed=seed) if takes_seed else cls()


def open_study(storage, name: str, sampler) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True,
                               directions=["maximize", "minimize"])


# how studies saved before an attribute existed scored their trials: top-1 on the held-out images
LEGACY_SCORING = {"metric": "top1", "score_on": "held_out"}


def study_scoring(storage, name: str) -> dict:
    """How the study ``name`` in ``storage`` scores its trials: ``metric`` and ``score_on`` (the images); a key
    is missing for a new study, or one without a completed trial."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return {}
    attrs = study.user_attrs
    legacy = LEGACY_SCORING if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else {}
    return {k: attrs.get(k, legacy.get(k)) for k in LEGACY_SCORING if attrs.get(k, legacy.get(k)) is not None}


SEEDINGS = ("auto", "greedy", "simple")


def greedy_fits(space: SearchSpace, mode: str, target: int) -> bool:
    """Whether ``--seeding auto`` takes the greedy chains: block mode, and at least 5 trials per block to spend
    (the chains take about 4 per block)."""
    return mode == "blocks" and target >= 5 * len(space.names)


class Seeding:
    """The first trials of a new study: simple seed plans, and with ``greedy`` two greedy chains.

    Simple: the unpruned model, the most pruned plan, every other block, one middle block per stage.
    Greedy (block space only) adds each block pruned alone, and each block of the most pruned plan restored
    alone. Once those trials are finished, a callback (this object, passed to :func:`optimize`) enqueues
    two chains, interleaved: from the unpruned end, blocks pruned in order of supernet score lost per
    millisecond saved (the plans pruning the first 2, 3, ... of them); from the most pruned end, blocks
    restored in order of score regained per millisecond spent. Together they trace the front from both
    ends (a supernet can rank heavily pruned plans above lightly pruned ones); the sampler then refines
    around them. About 4 trials per block; enqueued once among racing workers.
    """

    def __init__(self, space: SearchSpace, mode: str, greedy: bool = False):
        self.space, self.mode, self.greedy = space, mode, greedy and mode == "blocks"

    def enqueue(self, study: optuna.Study) -> None:
        """Enqueue the seed plans, once, in a new study."""
        with study_lock(study):
            if study.get_trials(deepcopy=False):
                return
            plans = self.space.seed_plans(self.mode)
            for plan in plans:
                study.enqueue_trial(self.space.params(plan, self.mode), user_attrs={"seed_plan": True})
            if self.greedy:
                most = self._most_pruned()
                singles = [self.space.plan([n]) for n in self.space.names] + [
                    self.space.plan(most - {n}) for n in sorted(most)]
                for plan in dict.fromkeys(singles):
                    if plan not in plans:
                        study.enqueue_trial(self.space.params(plan, self.mode), user_attrs={"seed_plan": "single"})
                study.set_user_attr("greedy_chain", "pending")

    def _most_pruned(self) -> set[str]:
        return set(self.space.repair(self.space.names).pruned)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if study.user_attrs.get("greedy_chain") != "pending":
            return
        with study_lock(study):
            trials = study.get_trials(deepcopy=False)
            if study.user_attrs.get("greedy_chain") != "pending" or any(
                    t.user_attrs.get("seed_plan") == "single" and t.state in (TrialState.WAITING, TrialState.RUNNING)
                    for t in trials):
                return
            tried = {t.user_attrs.get("plan") for t in trials} | {
                self.space.from_params(t.params, self.mode).to_str() for t in trials if t.params}
            for plan in self.chain(trials):
                if plan.to_str() not in tried:
                    study.enqueue_trial(self.space.params(plan, self.mode), user_attrs={"seed_plan": "greedy"})
            study.set_user_attr("greedy_chain", "enqueued")

    def chain(self, trials: list[optuna.trial.FrozenTrial]) -> list[PruningPlan]:
        """Both greedy chains from these trials' single-block results, interleaved (blocks without one go last)."""
        done = {trial_plan(t, self.space.model): t.values for t in trials if t.state == TrialState.COMPLETE}
        forward = self._forward(done)
        backward = self._backward(done)
        plans = [p for pair in zip(forward, backward) for p in pair]
        plans += forward[len(backward):] + backward[len(forward):]
        return list(dict.fromkeys(plans))

    def _forward(self, done: dict) -> list[PruningPlan]:
        """From the unpruned plan: prune blocks in order of score lost per ms saved (a full stage passed over)."""
        base = done.get(self.space.plan())
        if base is None:
            return []

        def lost_per_ms(name: str) -> float:  # a block without a result, or saving nothing, goes last
            values = done.get(self.space.plan([name]))
            if values is None or base[1] - values[1] <= 0:
                return float("inf")
            return (base[0] - values[0]) / (base[1] - values[1])

        order = sorted(self.space.names, key=lost_per_ms)
        stage = {b.name: b.stage for b in self.space.candidates}
        chosen, plans = [], []
        for name in order:
            if sum(stage[n] == stage[name] for n in chosen) < self.space.cap(stage[name]):
                chosen.append(name)
                if len(chosen) > 1:
                    plans.append(self.space.plan(chosen))
        return plans

    def _backward(self, done: dict) -> list[PruningPlan]:
        """From the most pruned plan: restore blocks in order of score regained per ms spent (most first)."""
        most = self._most_pruned()
        base = done.get(self.space.plan(most))
        if base is None:
            return []

        def regained_per_ms(name: str) -> float:  # a block without a result, or costing nothing, goes last
            values = done.get(self.space.plan(most - {name}))
            if values is None or values[1] - base[1] <= 0:
                return float("-inf")
            return (values[0] - base[0]) / (values[1] - base[1])

        order = sorted(sorted(most), key=regained_per_ms, reverse=True)
        return [self.space.plan(most - set(order[:k])) for k in range(2, len(order))]


def seed_study(study: optuna.Study, space: SearchSpace, mode: str) -> None:
    """Enqueue the simple seed plans once in a new study (:class:`Seeding` without the greedy chain)."""
    Seeding(space, mode).enqueue(study)


# --- stale trials and retries -----------------------------------------------------------------

def _dead_worker_trials(study: optuna.Study) -> list[tuple[int, str]]:
    host, me = socket.gethostname(), os.getpid()
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("worker", ""))
        w_host, _, pid = worker.rpartition(":")
        if w_host == host and pid.isdigit() and int(pid) != me and not pid_alive(int(pid)):
            out.append((t._trial_id, worker))
    return out


def _fail_and_retry(study: optuna.Study, trial_id: int, reason: str | None) -> bool:
    """Fail a stale RUNNING trial and enqueue its retry; False when another worker got there first."""
    storage = study._storage
    try:
        if reason:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    RetryOnce()(study, storage.get_trial(trial_id))
    return True


def fail_stale_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker is dead, each retried once; the number failed here.

    Every storage: a worker process on this host that no longer runs. RDB
    storages also: a trial whose heartbeat is older than the grace period.
    """
    count = sum(_fail_and_retry(study, trial_id, f"worker process {worker} died")
                for trial_id, worker in _dead_worker_trials(study))
    storage = study._storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        count += sum(_fail_and_retry(study, trial_id, None)  # the storage recorded the reason
                     for trial_id in storage._get_stale_trial_ids(study._study_id))
    return count


# --- the optimize loop ------------------------------------------------------------------------

def summary_counts(study: optuna.Study) -> dict:
    """Trials by state, and how many were skipped as duplicate plans."""
    trials = study.get_trials(deepcopy=False)
    n = Counter(t.state for t in trials)
    plans = {t.user_attrs["plan"] for t in trials if "plan" in t.user_attrs}
    return {"complete": n[TrialState.COMPLETE], "fail": n[TrialState.FAIL], "pruned": n[TrialState.PRUNED],
            "running": n[TrialState.RUNNING], "waiting": n[TrialState.WAITING], "started": len(trials),
            "distinct_plans": len(plans),
            "duplicates_skipped": sum(t.state == TrialState.PRUNED and "duplicate_of" in t.user_attrs
                                      for t in trials)}


def _drop_waiting(study: optuna.Study, trial_id: int) -> None:
    storage = study._storage
    with contextlib.suppress(UpdateFinishedTrialError):
        if storage.set_trial_state_values(trial_id, TrialState.RUNNING):  # False: another worker took it
            storage.set_trial_user_attr(trial_id, "worker", worker_id())
            storage.set_trial_user_attr(trial_id, "dropped", "target reached")
            storage.set_trial_state_values(trial_id, TrialState.PRUNED)


def finish_study(study: optuna.Study, target: int) -> dict:
    """End of a worker's loop: fail stale trials; once ``target`` trials are COMPLETE, drop late retries."""
    fail_stale_trials(study)
    if summary_counts(study)["complete"] >= target:
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            _drop_waiting(study, t._trial_id)
    return summary_counts(study)


def optimize(study: optuna.Study, objective: Callable, target: int, callbacks=(),
             catch=(CandidateFailed,)) -> dict:
    """Run trials until the study has ``target`` COMPLETE ones; the counts of :func:`summary_counts`.

    Optuna's own per-trial log lines (a traceback per failed trial) are silenced
    meanwhile: callers print their own. Interrupted or not, the study is left
    finished (:func:`finish_study`) before this returns or re-raises.
    """
    fail_stale_trials(study)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        if summary_counts(study)["complete"] < target:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.optimize(objective, catch=tuple(catch), gc_after_trial=False,
                               callbacks=[MaxTrialsCallback(target, states=(TrialState.COMPLETE,)),
                                          lambda s, _: fail_stale_trials(s), *callbacks])
    finally:
        optuna.logging.set_verbosity(verbosity)
        counts = finish_study(study, target)
    return counts


# --- the objective ----------------------------------------------------------------------------

def trial_plan(trial: optuna.trial.FrozenTrial, model: str) -> PruningPlan:
    """The plan a trial evaluated: its ``plan`` attribute (``PruningPlan.to_str``).

    Trials of release 0.1.0 studies kept a sorted list in ``pruned`` instead.
    """
    a = trial.user_attrs
    return PruningPlan.from_str(model, a["plan"]) if "plan" in a else PruningPlan(model, a.get("pruned", ()))


def _other_trial_with_plan(trial: optuna.Trial, plan: PruningPlan) -> int | None:
    """Record the trial's plan; the number of another COMPLETE or RUNNING trial with the same plan.

    Record first, then look, under the study lock: of workers racing on one plan
    exactly one goes on (without a lock, as with MySQL, at most one).
    """
    with study_lock(trial.study):
        trial.set_user_attr("plan", plan.to_str())
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if "plan" not in t.user_attrs and "pruned" not in t.user_attrs:
                continue  # a trial just started that has not recorded its plan: it will see this one's
            if t.number != trial.number and trial_plan(t, plan.model) == plan:
                return t.number
    return None


def _dominated(study: optuna.Study, score: float, ms: float) -> bool:
    """Whether a COMPLETE trial of ``study`` is at least as good on both objectives (score up, ms down)."""
    return any(t.values[0] >= score and t.values[1] <= ms
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def measured_count(study: optuna.Study) -> int:
    return sum(t.user_attrs.get("latency_source") == "measured" and t.user_attrs.get("predicted_latency_ms")
               is not None for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


class Objective:
    """Scores a trial's plan with the supernet and gives its latency: (``metric`` up, ms down).

    ``latency(plan)`` gives ``(ms, source, context)``: measured, or predicted by
    the latency table. With ``verify`` (hybrid mode), a predicted plan whose
    point would join the current Pareto front is measured before the trial
    ends, up to ``verify_top`` plans per study: the trial's latency value (the
    one the sampler, the front and the report use) is then the measured one,
    its prediction kept in ``predicted_latency_ms``.

    A plan another trial has evaluated (or is evaluating) is not scored again:
    the trial is PRUNED with ``duplicate_of`` set.
    """

    def __init__(self, space: SearchSpace, mode: str, scorer: Callable, latency: Callable,
                 budget_ms: float | None, verify: Callable | None = None, verify_top: int = 0, metric: str = "top1"):
        self.space, self.mode, self.scorer, self.latency, self.budget_ms = space, mode, scorer, latency, budget_ms
        self.verify, self.verify_top, self.metric = verify, verify_top, metric

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", worker_id())  # first: from here on a killed worker is detected by pid
        plan = self.space.suggest(trial, self.mode)
        trial.set_user_attr("n_pruned", len(plan))
        twin = _other_trial_with_plan(trial, plan)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned(f"plan already evaluated by trial {twin}")
        return self._evaluate(trial, plan)

    def _latency(self, trial: optuna.Trial, fn: Callable, plan: PruningPlan) -> tuple[float, str, dict]:
        try:
            return fn(plan)
        except CandidateFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            raise

    def _evaluate(self, trial: optuna.Trial, plan: PruningPlan) -> tuple[float, float]:
        t0 = time.perf_counter()
        ms, source, context = self._latency(trial, self.latency, plan)
        t1 = time.perf_counter()
        score = self.scorer(plan)
        value = search_value(score, self.metric)
        t2 = time.perf_counter()
        if (self.verify and source == "predicted" and plan and measured_count(trial.study) < self.verify_top
                and not _dominated(trial.study, value, ms)):
            trial.set_user_attr("predicted_latency_ms", ms)
            ms, source, context = self._latency(trial, self.verify, plan)
        trial.set_user_attr("latency_ms", ms)
        trial.set_user_attr("latency_source", source)
        trial.set_user_attr("latency_context", json.loads(json.dumps(context, default=str)))
        trial.set_user_attr("loss", score["loss"])
        trial.set_user_attr("top1", score["top1"])
        trial.set_user_attr("latency_s", t1 - t0 + time.perf_counter() - t2)
        trial.set_user_attr("score_s", t2 - t1)
        if self.budget_ms:
            trial.set_constraint("latency_budget", ms - self.budget_ms)  # feasible when <= 0
        return value, ms
