"""Optuna storage, workers sharing a study, stale and failed trials, the report."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from updp.errors import UpdpError
from updp.search import study as st
from updp.search.report import best_under_budget, pareto_front, write_report


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


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    from updp.search import study as st
    storage = st.open_storage(sys.argv[1], Path("."))
    study = st.open_study(storage, "shared", st.make_sampler("nsga2", int(sys.argv[2]), 20))
    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        trial.set_user_attr("worker", st.WORKER)
        time.sleep(0.05)
        return x, 1 - x
    study.optimize(objective, callbacks=[MaxTrialsCallback(20, states=(TrialState.COMPLETE,))])
""")


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_workers_share_one_study_without_losing_trials(tmp_path, kind):
    url = f"journal:{tmp_path}/s.journal" if kind == "journal" else f"sqlite:///{tmp_path}/s.db"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), url, str(seed)], cwd=tmp_path) for seed in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    trials = st.open_study(st.open_storage(url, tmp_path), "shared", None).trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # none duplicated, none lost
    assert all(t.state == TrialState.COMPLETE for t in trials) and 20 <= len(trials) <= 22
    assert len({t.user_attrs["worker"] for t in trials}) == 3


def test_stale_trial_of_a_dead_worker_is_failed_and_retried(tmp_path):
    study = st.open_study(st.open_storage(f"journal:{tmp_path}/s.journal", tmp_path), "s", None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    live = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    live.set_user_attr("worker", st.WORKER)
    assert st.fail_stale_trials(study) == 1
    states = {t.number: t.state for t in study.trials}
    assert states[trial.number] == TrialState.FAIL and states[live.number] == TrialState.RUNNING
    retry = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].system_attrs["fixed_params"] == {"x": trial.params["x"]}
    assert retry[0].user_attrs["retry_of"] == trial.number


def test_failed_candidate_is_a_failed_trial_and_the_study_goes_on(tmp_path):
    from updp.pruner import create_model, find_blocks
    from updp.search.space import SearchSpace

    space = SearchSpace.build(find_blocks(create_model("test_convnext"), (3, 32, 32)).blocks)

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


def test_report_files(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i in range(6):
        t = study.ask()
        t.set_user_attr("pruned", [f"b{j}" for j in range(i)])
        t.set_user_attr("n_pruned", i)
        t.set_user_attr("latency_ms", 10.0 - i)
        t.set_user_attr("latency_source", "predicted")
        t.set_user_attr("score_s", 0.1)
        t.set_user_attr("latency_s", 0.01)
        study.tell(t, [90.0 - i * i, 10.0 - i])
    study.set_user_attr("verified_latency_ms", {"5": 6.0})
    summary = write_report(tmp_path, study, {"model": "m", "data": "d", "backend": "onnxruntime"}, 7.5)
    for name in ("trials.csv", "pareto.csv", "pareto.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert {"trial", "score", "latency_ms", "latency_source", "pruned"} <= set(trials.columns)
    assert trials.set_index("trial").loc[5, "latency_source"] == "measured"
    assert summary["best"]["trial"] == 3  # 7.0 ms is the best score under 7.5 ms
    assert "Best plan under the budget" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
