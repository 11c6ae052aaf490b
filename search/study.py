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
import json
import os
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

from updp.errors import UpdpError
from updp.fileio import pid_alive
from updp.search.space import SearchSpace
from updp.search.storage import (RetryOnce, open_lock, open_storage, redact_url, retried_trial, storage_url,
                                 study_lock)

__all__ = ["CandidateFailed", "Objective", "fail_stale_trials", "finish_study", "make_sampler", "open_storage",
           "open_study", "optimize", "plan_key", "redact_url", "retried_trial", "seed_study", "storage_url",
           "summary_counts", "worker_id", "worker_seed", "worker_slot"]

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


def make_sampler(name: str, seed: int, trials: int, worker: int = 0):
    """NSGA-II or TPE, seeded per worker; both read the latency-budget constraint each trial sets."""
    seed = worker_seed(seed, worker)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(10, min(50, trials // 5)), seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    raise UpdpError(f"unknown sampler '{name}'; use 'nsga2' or 'tpe'")


def open_study(storage, name: str, sampler) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True,
                               directions=["maximize", "minimize"])


def seed_study(study: optuna.Study, space: SearchSpace, mode: str) -> None:
    """Enqueue the unpruned model and a few simple plans, once, in a new study (once among racing workers)."""
    with study_lock(study):
        if study.get_trials(deepcopy=False):
            return
        for plan in space.seed_plans(mode):
            study.enqueue_trial(space.params(plan, mode), user_attrs={"seed_plan": True})


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
    return {"complete": n[TrialState.COMPLETE], "fail": n[TrialState.FAIL], "pruned": n[TrialState.PRUNED],
            "running": n[TrialState.RUNNING], "waiting": n[TrialState.WAITING],
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

def plan_key(plan: frozenset[str]) -> str:
    return ";".join(sorted(plan))


def _other_trial_with_plan(trial: optuna.Trial, key: str) -> int | None:
    """Record the trial's plan; the number of another COMPLETE or RUNNING trial with the same plan.

    Record first, then look, under the study lock: of workers racing on one plan
    exactly one goes on (without a lock, as with MySQL, at most one).
    """
    with study_lock(trial.study):
        trial.set_user_attr("plan_key", key)
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.number != trial.number and t.user_attrs.get("plan_key") == key:
                return t.number
    return None


class Objective:
    """Scores a trial's plan with the supernet and gives its latency: (top-1 up, ms down).

    A plan another trial has evaluated (or is evaluating) is not scored again:
    the trial is PRUNED with ``duplicate_of`` set.
    """

    def __init__(self, space: SearchSpace, mode: str, scorer: Callable, latency: Callable,
                 budget_ms: float | None):
        self.space, self.mode, self.scorer, self.latency, self.budget_ms = space, mode, scorer, latency, budget_ms

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", worker_id())  # first: from here on a killed worker is detected by pid
        plan = self.space.suggest(trial, self.mode)
        trial.set_user_attr("pruned", sorted(plan))
        trial.set_user_attr("n_pruned", len(plan))
        twin = _other_trial_with_plan(trial, plan_key(plan))
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned(f"plan already evaluated by trial {twin}")
        return self._evaluate(trial, plan)

    def _evaluate(self, trial: optuna.Trial, plan: frozenset[str]) -> tuple[float, float]:
        t0 = time.perf_counter()
        try:
            ms, source, context = self.latency(plan)
        except CandidateFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            raise
        t1 = time.perf_counter()
        score = self.scorer(plan)
        t2 = time.perf_counter()
        trial.set_user_attr("latency_ms", ms)
        trial.set_user_attr("latency_source", source)
        trial.set_user_attr("latency_context", json.loads(json.dumps(context, default=str)))
        trial.set_user_attr("loss", score["loss"])
        trial.set_user_attr("latency_s", t1 - t0)
        trial.set_user_attr("score_s", t2 - t1)
        if self.budget_ms:
            trial.set_constraint("latency_budget", ms - self.budget_ms)  # feasible when <= 0
        return score["top1"], ms
