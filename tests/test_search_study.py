"""Optuna storage, workers sharing a study, stale and failed trials, the report."""
from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import study_workers as sw
from optuna.trial import TrialState

from updp.core.errors import UpdpError
from updp.search import study as st
from updp.search.metrics import METRICS, search_value
from updp.search.report import best_under_budget, pareto_front, write_report

FORK = multiprocessing.get_context("fork")  # workers start at once: this process is past its imports


@pytest.mark.parametrize("url", [None, "journal:{tmp}/study.journal"])
def test_storage_round_trip(tmp_path, url):
    storage = st.open_storage(url.format(tmp=tmp_path) if url else None, tmp_path)
    study = st.open_study(storage, "s", st.make_sampler("tpe", 0, 10))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=3)
    again = st.open_study(st.open_storage(url.format(tmp=tmp_path) if url else None, tmp_path), "s", None)
    assert len(again.trials) == 3
    if url is None:
        assert (tmp_path / "study.db").is_file()


@pytest.mark.parametrize("url", ["postgresql://nobody@127.0.0.1:1/none", "sqlite:////no/such/dir/x.db",
                                 "notascheme://x"])
def test_unusable_storage_is_a_clear_error(tmp_path, url):
    with pytest.raises(UpdpError, match="cannot open study storage"):
        st.open_storage(url, tmp_path)


# --- task: a storage URL's secrets -------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("postgresql://user:s3cret@db.example:5432/optuna", "postgresql://user:***@db.example:5432/optuna"),
    ("postgresql+psycopg2://u:p%40ss@h/db?sslmode=require", "postgresql+psycopg2://u:***@h/db?sslmode=require"),
    ("mysql://u:pa@ss/w@h/db", "mysql://u:***@h/db"),  # unencoded '@' and '/': hide up to the last '@'
    ("postgresql://:only-a-password@h/db", "postgresql://:***@h/db"),
    ("postgresql://u:${PGPASS}@h/db", "postgresql://u:${PGPASS}@h/db"),  # a reference is no secret
    ("postgresql://user@h/db", "postgresql://user@h/db"),
    ("postgresql://h:5432/db", "postgresql://h:5432/db"),
    ("sqlite:////runs/a:b@c/study.db", "sqlite:////runs/a:b@c/study.db"),
    ("journal:/runs/x.journal", "journal:/runs/x.journal"),
])
def test_redact_url(url, shown):
    assert st.redact_url(url) == shown


@pytest.mark.parametrize("url", ["postgresql+psycopg2://nobody:Sup3r-s3cret@127.0.0.1:1/none",
                                 "postgresql+psycopg2://nobody:${UPDP_TEST_PASSWORD}@127.0.0.1:1/none",
                                 "notascheme://nobody:Sup3r-s3cret@x/y",
                                 "notascheme://nobody:${UPDP_TEST_PASSWORD}@x/y"])
@pytest.mark.parametrize("password", ["Sup3r-s3cret", "Sup3r-{s3cret}"])
def test_error_messages_never_show_the_password(tmp_path, monkeypatch, url, password):
    monkeypatch.setenv("UPDP_TEST_PASSWORD", password)
    url = url.replace("Sup3r-s3cret", password)
    with pytest.raises(UpdpError, match="cannot open study storage") as e:
        st.open_storage(url, tmp_path)
    assert "s3cret" not in str(e.value) and "nobody:***@" in str(e.value), str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # nor in a chained traceback


def test_storage_url_falls_back_to_UPDP_STORAGE(monkeypatch):
    monkeypatch.delenv("UPDP_STORAGE", raising=False)
    assert st.storage_url(None) is None and st.storage_url("journal:/a.journal") == "journal:/a.journal"
    monkeypatch.setenv("UPDP_STORAGE", "postgresql://u:${PW}@h/db")
    assert st.storage_url(None) == "postgresql://u:${PW}@h/db"
    assert st.storage_url("sqlite:////x.db") == "sqlite:////x.db"


@pytest.mark.parametrize("url", ["sqlite:///${UPDP_TEST_DIR}/env.db", "journal:${UPDP_TEST_DIR}/env.journal"])
def test_storage_url_variables_are_read_when_the_storage_is_opened(tmp_path, monkeypatch, url):
    monkeypatch.setenv("UPDP_TEST_DIR", str(tmp_path / "from-env"))
    (tmp_path / "from-env").mkdir()
    st.open_study(st.open_storage(url, tmp_path), "s", None)
    assert [p.name for p in (tmp_path / "from-env").glob("env.*") if not p.name.endswith("lock")]


def test_unset_storage_url_variable_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("UPDP_NO_SUCH_VAR", raising=False)
    with pytest.raises(UpdpError) as e:
        st.open_storage("postgresql://u:${UPDP_NO_SUCH_VAR}@h/db", tmp_path)
    assert "UPDP_NO_SUCH_VAR" in str(e.value) and "\n" not in str(e.value)


# --- task: concurrent first open ----------------------------------------------------------------

def test_workers_opening_a_new_sqlite_study_at_once_all_succeed(tmp_path):
    assert sw.open_all_at_once(f"sqlite:///{tmp_path}/new-{{k}}.db", tmp_path, n=6, rounds=3) == [0] * 6
    assert st.open_study(st.open_storage(f"sqlite:///{tmp_path}/new-2.db", tmp_path), "first", None).trials == []


# --- task: workers sharing a study --------------------------------------------------------------

@pytest.fixture
def fast_tmp(tmp_path):
    """tmpfs when there is one: SQLite syncs every commit, and a study commits some 40 times a trial."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir=shm, prefix="updp-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _url(kind: str, d: Path) -> str:
    return f"journal:{d}/s.journal" if kind == "journal" else f"sqlite:///{d}/s.db"


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_workers_share_one_study_without_losing_trials(fast_tmp, kind):
    url = _url(kind, fast_tmp)
    procs = [sw.start(url, fast_tmp, 20, 0.05) for _ in range(3)]
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    trials = st.open_study(st.open_storage(url, fast_tmp), sw.STUDY, None).trials
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none duplicated, none lost
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 20 <= len(complete) <= 22
    assert all(t.state == TrialState.COMPLETE or "duplicate_of" in t.user_attrs for t in trials)
    assert max(Counter(t.user_attrs["plan"] for t in complete).values()) == 1  # no plan evaluated twice
    assert len({t.user_attrs["worker"] for t in complete}) == 3
    assert sum("seed_plan" in t.user_attrs for t in trials) == len(sw.toy_space().seed_plans())  # seeded once


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_killed_workers_lose_no_trial_and_retry_each_once(fast_tmp, kind):
    url = _url(kind, fast_tmp)
    sw.run(url, fast_tmp, workers=4, kills=2, target=24, sleep_s=0.2)
    sw.check(st.open_study(st.open_storage(url, fast_tmp), sw.STUDY, None), 24, workers=4, kills=2)


def _hold_slot(lock_dir: Path, out: Path) -> None:
    slot = st.worker_slot(lock_dir)
    assert st.worker_slot(lock_dir) == slot  # asked again: the same slot
    out.with_suffix(".tmp").write_text(str(slot))
    out.with_suffix(".tmp").replace(out)
    time.sleep(600)


def _slot_of_new_worker(lock_dir: Path, name: str) -> tuple[multiprocessing.Process, int]:
    out = lock_dir / f"{name}.slot"
    p = FORK.Process(target=_hold_slot, args=(lock_dir, out))
    p.start()
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return p, int(out.read_text())


def test_worker_slots_are_the_smallest_free_index_and_freed_by_a_dead_worker(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    a, slot_a = _slot_of_new_worker(tmp_path, "a")
    b, slot_b = _slot_of_new_worker(tmp_path, "b")
    c, slot_c = _slot_of_new_worker(tmp_path, "c")
    os.kill(a.pid, signal.SIGKILL)
    a.join()
    d, slot_d = _slot_of_new_worker(tmp_path, "d")
    for p in (b, c, d):
        p.kill()
        p.join()
    assert (slot_a, slot_b, slot_c, slot_d) == (0, 1, 2, 0)


def test_worker_slot_under_torchrun_is_the_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert st.worker_slot(tmp_path / "unused") == 3 and not (tmp_path / "unused").exists()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UpdpError, match="RANK"):
        st.worker_slot(tmp_path)


def _first_plans(sampler, n: int = 6) -> list[dict]:
    study = optuna.create_study(sampler=sampler, directions=["maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_int("a", 0, 1000), t.suggest_int("b", 0, 1000)), n_trials=n)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("name, seeded", [
    ("nsga2", lambda: optuna.samplers.NSGAIISampler(population_size=10, seed=7)),
    ("tpe", lambda: optuna.samplers.TPESampler(seed=7, multivariate=True)),
])
def test_each_worker_seeds_its_sampler_differently_and_worker_0_as_before(name, seeded):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert _first_plans(st.make_sampler(name, 7, 50, worker=0)) == _first_plans(seeded())
    plans = [_first_plans(st.make_sampler(name, 7, 50, worker=w)) for w in range(4)]
    assert all(plans[i] != plans[j] for i in range(4) for j in range(i))
    assert st.worker_seed(7, 0) == 7 and len({st.worker_seed(7, w) for w in range(1000)}) == 1000


# --- task: duplicate plans -----------------------------------------------------------------------

def _toy_objective(scored: list) -> st.Objective:
    def scorer(plan):
        scored.append(plan)
        return {"top1": 50.0, "loss": 1.0}
    return st.Objective(sw.toy_space(), "blocks", scorer, sw.latency, budget_ms=None)


def test_the_likelihood_metric_is_what_the_search_maximizes_and_top1_is_kept_beside_it(tmp_path):
    space = sw.toy_space()
    # top-1 and the cross-entropy disagree on which plan is better: the metric decides
    scores = {0: {"top1": 60.0, "loss": 1.5}, 1: {"top1": 50.0, "loss": 1.0}}
    values = {}
    for metric in METRICS:
        objective = st.Objective(space, "blocks", lambda plan: scores[len(plan) % 2], sw.latency, None, metric=metric)
        (tmp_path / metric).mkdir()
        study = st.open_study(st.open_storage(None, tmp_path / metric), "s", st.make_sampler("random", 0, 6))
        for plan in ([], space.names[:1]):
            study.enqueue_trial(_plan_params(space, plan))
        st.optimize(study, objective, target=2)
        values[metric] = [t.values[0] for t in study.trials]
        assert [t.user_attrs["top1"] for t in study.trials] == [60.0, 50.0]
    assert values["top1"] == [60.0, 50.0]
    assert values["likelihood"] == pytest.approx([100 * math.exp(-1.5), 100 * math.exp(-1.0)])
    with pytest.raises(ValueError, match="unknown search metric"):
        search_value({"top1": 1.0, "loss": 1.0}, "accuracy")


def _plan_params(space, plan) -> dict:
    return space.params(space.plan(plan), "blocks")


def test_a_plan_already_evaluated_is_pruned_without_scoring(tmp_path):
    scored = []
    objective = _toy_objective(scored)
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s", None)
    plan = objective.space.names[:2]
    for _ in range(2):
        study.enqueue_trial(_plan_params(objective.space, plan))
    study.optimize(objective, n_trials=2)
    first, second = study.trials
    assert first.state == TrialState.COMPLETE and first.user_attrs["plan"] == objective.space.plan(plan).to_str()
    assert second.state == TrialState.PRUNED and second.user_attrs["duplicate_of"] == first.number
    assert scored == [objective.space.plan(plan)]
    assert st.summary_counts(study)["duplicates_skipped"] == 1


def test_a_plan_another_worker_is_running_is_a_duplicate_but_a_failed_one_is_not(tmp_path):
    scored = []
    objective = _toy_objective(scored)
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s", None)
    plan = objective.space.names[3:5]
    running = study.ask()  # another worker's trial, running this plan
    running.set_user_attr("plan", objective.space.plan(plan).to_str())
    failed = study.ask()
    failed.set_user_attr("plan", objective.space.plan(objective.space.names[:1]).to_str())
    study.tell(failed, state=TrialState.FAIL)
    study.enqueue_trial(_plan_params(objective.space, plan))
    study.enqueue_trial(_plan_params(objective.space, objective.space.names[:1]))  # like a retry of the failed one
    study.optimize(objective, n_trials=2, catch=())
    dup, retry = study.trials[2:]
    assert dup.state == TrialState.PRUNED and dup.user_attrs["duplicate_of"] == running.number
    assert retry.state == TrialState.COMPLETE and scored == [objective.space.plan(objective.space.names[:1])]



def test_a_running_trial_that_has_not_recorded_its_plan_yet_is_no_duplicate_of_the_unpruned_plan(tmp_path):
    """Two workers starting together: the other's trial has no plan yet; the unpruned plan is still scored."""
    scored = []
    objective = _toy_objective(scored)
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s", None)
    starting = study.ask()  # another worker's trial, before its objective records the plan
    study.enqueue_trial(_plan_params(objective.space, []))
    study.optimize(objective, n_trials=1, catch=())
    unpruned = study.trials[1]
    assert starting.number == 0 and "duplicate_of" not in unpruned.user_attrs
    assert unpruned.state == TrialState.COMPLETE and scored == [objective.space.plan()]

# --- task: stale trials, retries, the end of the loop -------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _retries_of(study, number: int) -> list:
    return [t for t in study.trials if st.retried_trial(t) == number]


def test_stale_trial_of_a_dead_worker_is_failed_and_retried_once(tmp_path):
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s", None)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    trial.set_user_attr("plan", "a,b")
    live = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    live.set_user_attr("worker", st.worker_id())
    assert st.fail_stale_trials(study) == 1
    assert st.fail_stale_trials(study) == 0
    failed = study.trials[trial.number]
    st.RetryOnce()(study, failed)  # a second worker that failed it too: still one retry
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"].startswith("worker process")
    assert study.trials[live.number].state == TrialState.RUNNING
    [retry] = _retries_of(study, trial.number)
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    assert retry.system_attrs["failed_trial"] == trial.number and retry.system_attrs["retry_history"] == [0]
    assert "worker" not in retry.user_attrs and retry.user_attrs["plan"] == "a,b"


def test_a_killed_but_unreaped_worker_is_dead(tmp_path):
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s", None)
    zombie = subprocess.Popen(["sleep", "600"])
    zombie.send_signal(signal.SIGKILL)  # not waited for: a zombie until we reap it
    trial = study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{zombie.pid}")
    try:
        assert st.fail_stale_trials(study) == 1
    finally:
        zombie.wait()


def test_heartbeat_stale_trial_is_failed_with_a_reason_and_retried_once(tmp_path):
    storage = st.open_storage(None, tmp_path, heartbeat_s=1, grace_s=1)
    study = st.open_study(storage, "s", None)
    failed = sw.heartbeat_goes_stale(study)
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"].startswith("no heartbeat")
    assert len(_retries_of(study, failed.number)) == 1 and st.fail_stale_trials(study) == 0


def test_finish_study_drops_late_retries_only_once_the_target_is_reached(tmp_path):
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s", None)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    study.enqueue_trial({"x": 0.5})
    assert st.finish_study(study, target=3)["waiting"] == 1  # left for the workers still to come
    counts = st.finish_study(study, target=2)
    assert counts == {"complete": 2, "fail": 0, "pruned": 1, "running": 0, "waiting": 0, "duplicates_skipped": 0,
                      "started": 3, "distinct_plans": 0}
    assert study.trials[2].user_attrs["dropped"] == "target reached"


def test_optimize_stops_at_the_target_of_complete_trials_and_keeps_optuna_quiet(tmp_path, capfd):
    def latency(plan):
        if plan == objective.space.plan(objective.space.names[:2]):
            raise st.CandidateFailed("engine build failed")
        return sw.latency(plan)

    objective = st.Objective(sw.toy_space(), "blocks", lambda plan: {"top1": 1.0, "loss": 1.0}, latency, None)
    study = st.open_study(st.open_storage(None, tmp_path), "s", st.make_sampler("tpe", 0, 12))
    optuna.logging.set_verbosity(optuna.logging.INFO)
    for plan in ([], objective.space.names[:2], objective.space.names[:2]):
        study.enqueue_trial(_plan_params(objective.space, plan))
    counts = st.optimize(study, objective, target=12)
    assert optuna.logging.get_verbosity() == optuna.logging.INFO
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert counts["complete"] == 12 and counts["fail"] >= 2 and counts["running"] == counts["waiting"] == 0
    assert "Trial" not in capfd.readouterr().err  # no per-trial line, no traceback from Optuna
    assert st.optimize(study, objective, target=12) == counts  # already done: no trial more


def _interrupted_worker(url: str, work_dir: Path, dead_pid: int) -> None:
    study = st.open_study(st.open_storage(url, work_dir), "s", None)

    def scorer(plan):
        if len(study.trials) > 3:  # another worker dies meanwhile; then Ctrl-C reaches this one mid-trial
            other = study.ask()
            other.set_user_attr("worker", f"{socket.gethostname()}:{dead_pid}")
            (work_dir / "busy").touch()
            time.sleep(600)
        return {"top1": 1.0, "loss": 1.0}

    try:
        st.optimize(study, st.Objective(sw.toy_space(), "blocks", scorer, sw.latency, None), target=50)
    except KeyboardInterrupt:
        sys.exit(130)


def test_ctrl_c_leaves_the_study_finished_without_optuna_tracebacks(tmp_path, capfd):
    url = f"journal:{tmp_path}/s.journal"
    dead_pid = _dead_pid()
    p = FORK.Process(target=_interrupted_worker, args=(url, tmp_path, dead_pid))
    p.start()
    deadline = time.monotonic() + 120
    while not (tmp_path / "busy").exists() and p.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGINT)
    p.join(timeout=120)
    err = capfd.readouterr().err
    assert p.exitcode == 130 and "Traceback" not in err and "Trial" not in err, err
    trials = st.open_study(st.open_storage(url, tmp_path), "s", None).trials
    [orphan] = [t for t in trials if t.user_attrs.get("worker", "").endswith(f":{dead_pid}")]
    interrupted = trials[orphan.number - 1]
    assert interrupted.state == TrialState.FAIL  # by Optuna, as the interrupt went through the trial
    assert orphan.state == TrialState.FAIL and "died" in orphan.user_attrs["fail_reason"]  # by finish_study
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.state for t in trials if st.retried_trial(t) == orphan.number] == [TrialState.WAITING]


def test_failed_candidate_is_a_failed_trial_and_the_study_goes_on(tmp_path):
    from updp.pruner import create_model, find_blocks
    from updp.search.space import SearchSpace

    space = SearchSpace.build("test_convnext", find_blocks(create_model("test_convnext"), (3, 32, 32)).blocks)

    def latency(plan):
        if "stages.1.blocks.0" in plan:
            raise st.CandidateFailed("engine build failed: out of memory")
        return 1.0 - 0.1 * len(plan), "predicted", {}

    objective = st.Objective(space, "blocks", lambda plan: {"top1": 50.0, "loss": 1.0}, latency, budget_ms=0.8)
    study = st.open_study(st.open_storage(None, tmp_path), "s", st.make_sampler("nsga2", 0, 30))
    study.optimize(objective, n_trials=30, catch=(st.CandidateFailed,))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs["fail_reason"].startswith("engine build failed") for t in failed)
    assert len(study.trials) == 30 and any(t.state == TrialState.COMPLETE for t in study.trials)


def _frame(rows):
    base = {"state": "COMPLETE", "latency_source": "predicted", "n_pruned": 1}
    return pd.DataFrame([{**base, "trial": i, "pruned": f"p{i}", **r} for i, r in enumerate(rows)])


def test_pareto_front_keeps_only_undominated_plans():
    df = _frame([{"score": 80, "latency_ms": 10}, {"score": 70, "latency_ms": 5}, {"score": 75, "latency_ms": 8},
                 {"score": 60, "latency_ms": 9}, {"score": 70, "latency_ms": 6}, {"score": 90, "latency_ms": 20}])
    front = pareto_front(df)
    assert front.trial.tolist() == [1, 2, 0, 5]
    assert best_under_budget(front, 9.0).trial == 2 and best_under_budget(front, 4.0) is None
    assert pareto_front(df, 9.0).trial.tolist() == [1, 2]  # within a budget: the front of the feasible plans
    assert pareto_front(df, 4.0).empty and list(pareto_front(df, 4.0).columns) == list(df.columns)


def test_report_files(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i in range(6):
        t = study.ask()
        t.set_user_attr("plan", ",".join(f"b{j}" for j in range(i)))
        t.set_user_attr("n_pruned", i)
        t.set_user_attr("latency_source", "measured" if i == 5 else "predicted")
        if i == 5:  # verified in the trial: the measured figure is its value, the prediction kept aside
            t.set_user_attr("predicted_latency_ms", 5.0)
        t.set_user_attr("score_s", 0.1)
        t.set_user_attr("latency_s", 0.01)
        ms = 6.0 if i == 5 else 10.0 - i
        t.set_constraint("latency_budget", ms - 7.5)  # as the search's objective does under a budget
        study.tell(t, [90.0 - i * i, ms])
    summary = write_report(tmp_path, study, {"model": "m", "data": "d", "backend": "onnxruntime"}, 7.5)
    for name in ("trials.csv", "pareto.csv", "pareto.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    trials = pd.read_csv(tmp_path / "trials.csv").set_index("trial")
    assert tuple(trials.loc[5, ["latency_source", "latency_ms", "predicted_latency_ms"]]) == ("measured", 6.0, 5.0)
    assert trials.loc[4, "predicted_latency_ms"] == trials.loc[4, "latency_ms"] == 6.0
    assert trials.loc[3, "pruned"] == "b0,b1,b2"
    front = pd.read_csv(tmp_path / "pareto.csv")
    assert 5 not in set(front.trial)  # trial 4 is as fast (6.0 ms) and scores higher: one rule, trial values
    assert {t.number for t in study.best_trials} == set(front.trial) == {3, 4}  # feasible ones only (<= 7.5 ms)
    assert summary["best"]["trial"] == 3  # 7.0 ms is the best score under 7.5 ms
    text = (tmp_path / "report.md").read_text()
    assert "Best plan under the budget" in text and "own objective values" in text
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    summary = write_report(tmp_path, study, {"model": "m", "data": "d"}, 1.0)  # no plan within the budget
    assert summary["best"] is None and summary["front"] == 0 and pd.read_csv(tmp_path / "pareto.csv").empty
    assert "No completed plan meets the budget" in (tmp_path / "report.md").read_text()


# --- hybrid mode: a plan predicted onto the front is measured inside its trial ------------------------

def test_hybrid_measures_plans_joining_the_front_and_the_measured_figure_is_the_trial_value(tmp_path):
    """A deterministic in-process 'measurement' (search logic only): predicted x 1.2, so verified plans move."""
    measured = []

    def verify(plan):
        measured.append(plan)
        return sw.latency(plan)[0] * 1.2, "measured", {"toy": True}

    objective = st.Objective(sw.toy_space(), "blocks", sw.Scorer(tmp_path, 0.0), sw.latency, None,
                             verify=verify, verify_top=4)
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s",
                          st.make_sampler("random", 0, 30))
    st.seed_study(study, objective.space, "blocks")
    st.optimize(study, objective, 30)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    verified = [t for t in done if t.user_attrs["latency_source"] == "measured"]
    assert len(verified) == len(measured) == 4 and st.measured_count(study) == 4  # verify_top, no more
    assert all(t.user_attrs["n_pruned"] > 0 for t in verified)  # the unpruned plan is the reference, not verified
    for t in verified:
        assert t.values[1] == pytest.approx(1.2 * t.user_attrs["predicted_latency_ms"])
        assert t.values[1] == t.user_attrs["latency_ms"]
    for t in done:  # a plan measured only when no earlier trial dominated its predicted point
        if t in verified:
            earlier = [u for u in done if u.number < t.number]
            assert not any(u.values[0] >= t.values[0] and u.values[1] <= t.user_attrs["predicted_latency_ms"]
                           for u in earlier)
    summary = write_report(tmp_path, study, {"model": "toy", "data": "d"}, None)
    front = pd.read_csv(tmp_path / "pareto.csv")
    assert set(front.trial) == {t.number for t in study.best_trials}  # the report and the study agree
    assert summary["front"] == len(front)


def test_a_plan_whose_latency_cannot_be_had_is_a_failed_trial_and_the_search_goes_on(tmp_path):
    def latency(plan):
        if "stages.0.blocks.0" in plan:
            raise st.CandidateFailed("the latency table has no figure for stages.0.blocks.0 (timed out)")
        return sw.latency(plan)

    objective = st.Objective(sw.toy_space(), "blocks", sw.Scorer(tmp_path, 0.0), latency, None)
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s",
                          st.make_sampler("random", 0, 12))
    counts = st.optimize(study, objective, 12)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert counts["complete"] == 12 and counts["fail"] == len(failed) >= 1
    assert all("timed out" in t.user_attrs["fail_reason"] for t in failed)


@pytest.mark.parametrize("name", st.SAMPLERS)
def test_every_named_sampler_runs_a_study(tmp_path, name):
    objective = st.Objective(sw.toy_space(), "blocks", sw.Scorer(tmp_path, 0.0), sw.latency, None)
    sampler = st.make_sampler(name, 0, 12, 0, sw.toy_space(), "blocks", lambda plan: sw.latency(plan)[0])
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s", sampler)
    assert st.optimize(study, objective, 12)["complete"] == 12
    assert type(study.sampler).__name__.lower().startswith({"nsga2": "nsgaii", "gp": "gp"}.get(name, name))
