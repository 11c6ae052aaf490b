"""The Optuna study: storage, sampler, objective, stale-trial recovery.

Storage is any Optuna storage URL; ``journal:PATH`` (or a path ending in
``.journal``/``.log``) is a JournalStorage file, which several processes on
one machine share without SQLite's locking trouble. RDB storages get
heartbeats, so a killed worker's trial is failed and retried; journal files
get the same from ``fail_stale_trials`` at every worker start.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from updp.errors import UpdpError
from updp.search.space import SearchSpace

WORKER = f"{socket.gethostname()}:{os.getpid()}"


class CandidateFailed(Exception):
    """A candidate plan that could not be evaluated; the trial is FAILED with this reason."""


def open_storage(url: str | None, run_dir: Path):
    """An Optuna storage for ``url`` (default: ``study.db`` SQLite in the run directory)."""
    url = url or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    try:
        if url.startswith("journal:") or url.endswith((".journal", ".log")):
            path = Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they are what we want
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=20, grace_period=60,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except Exception as e:  # noqa: BLE001 - every storage failure is a user-facing error
        raise UpdpError(f"cannot open study storage '{url}': {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def make_sampler(name: str, seed: int, trials: int):
    """NSGA-II or TPE; both read the latency-budget constraint each trial sets."""
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
    """Enqueue the unpruned model and a few simple plans, once, in a new study."""
    if study.trials:
        return
    for plan in space.seed_plans(mode):
        study.enqueue_trial(space.params(plan, mode), user_attrs={"seed_plan": True})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study) -> int:
    """Fail and re-enqueue RUNNING trials whose worker process on this host is gone."""
    host = socket.gethostname()
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if w_host == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "worker process died")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            count += 1
    return count


class Objective:
    """Scores a trial's plan with the supernet and gives its latency: (top-1 up, ms down)."""

    def __init__(self, space: SearchSpace, mode: str, scorer: Callable, latency: Callable,
                 budget_ms: float | None):
        self.space, self.mode, self.scorer, self.latency, self.budget_ms = space, mode, scorer, latency, budget_ms

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        plan = self.space.suggest(trial, self.mode)
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("pruned", sorted(plan))
        trial.set_user_attr("n_pruned", len(plan))
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
