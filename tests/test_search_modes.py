"""Latency modes through whole searches, workers that wait for the training, failed latencies as failed trials."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from updp.latency.result import failure, summarize
from updp.latency.table import LatencyTable
from updp.pipeline.search import PlanLatency
from updp.pruner import PruningPlan
from updp.search import study as st

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "data" / "cifar10_demo.npz"


def _updp(*args) -> list[str]:
    return [sys.executable, "-m", "updp", *map(str, args)]


def _study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="updp", storage=f"sqlite:///{run / 'study.db'}")


def test_a_block_the_table_could_not_time_fails_the_trial_with_the_reason():
    table = LatencyTable(1.0, {"a": 0.1}, failed={"b": "timed out after 60 s in round 3 of 20"})
    latency = PlanLatency("table", None, table)
    assert latency(PruningPlan("m", {"a"}))[:2] == (pytest.approx(0.9), "predicted")
    with pytest.raises(st.CandidateFailed, match="timed out after 60 s"):
        latency(PruningPlan("m", {"a", "b"}))


class _Timer:
    """measure_many as a pass where the plan's variant failed (search logic only; timing is tested elsewhere)."""

    def measure_many(self, plans):
        fields = dict(backend="onnxruntime", precision="fp32", batch_size=1, input_shape=(3, 32, 32))
        return [summarize([1.0, 1.0], context={"round_medians_ms": [1.0]}, **fields),
                failure("RuntimeError: engine build failed in round 1 of 20", **fields)]


def test_with_a_fitted_model_the_plans_are_predicted_by_it_not_by_the_table():
    from updp.latency.predictor import fit, sized_plans

    blocks = [f"b{i}" for i in range(6)]
    plans = [PruningPlan("m", {b}) for b in blocks] + sized_plans("m", blocks, 10, seed=0)
    model = fit("m", {b: "g" for b in blocks}, plans, [1 - 0.1 * len(p) + 0.01 * len(p) ** 2 for p in plans], 2.0)
    table = LatencyTable(2.0, {b: 0.1 for b in blocks})
    plan = PruningPlan("m", set(blocks[:4]))
    ms, source, context = PlanLatency("table", None, table, model)(plan)
    assert source == "predicted" and context == {"predictor": "latency_model.json"}
    assert ms == pytest.approx(2.0 * (1 - 0.4 + 0.16), rel=1e-3) and table.predict(plan) == pytest.approx(1.2)


def test_a_hybrid_verification_that_fails_fails_the_trial():
    latency = PlanLatency("hybrid", _Timer(), LatencyTable(1.0, {"a": 0.1}))
    with pytest.raises(st.CandidateFailed, match="engine build failed"):
        latency.verify(PruningPlan("m", {"a"}))


@pytest.mark.slow
def test_a_second_worker_waits_for_the_training_and_both_time_every_plan_in_measure_mode(tmp_path):
    """Two ``updp search`` processes on one new run in ``--latency-mode measure``: one trains, both search."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(_updp("search", "--config", TINY, "--data", DATA, "--run", run, "--trials", "8",
                                   "--baseline-epochs", "1.5", "--supernet-epochs", "0.1", "--latency-mode",
                                   "measure", "--set", "latency.runs=10"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not (run / "config.yaml").is_file():
        assert first.poll() is None and time.monotonic() < deadline, "the first worker never wrote its config"
        time.sleep(0.05)
    second = subprocess.Popen(_updp("search", "--resume", run), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env)
    time.sleep(1.0)
    assert not (run / "supernet.pt").exists()  # the second worker arrived while the first was training
    out1, err1 = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (err1[-1500:], err2[-1500:])
    assert "baseline" in err1 and "supernet" in err1  # the first trained both (progress bars)
    assert "baseline" not in err2 and "supernet" not in err2 and "timing the baseline" not in out2  # reused
    assert "joins the study" in out2
    study = _study(run)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) >= 8
    plans = [st.trial_plan(t, "test_convnext") for t in complete]
    assert len(set(plans)) == len(plans)
    # measure mode: every plan timed alone through the run's cache, and the front uses those figures
    assert {t.user_attrs["latency_source"] for t in complete} == {"measured"}
    assert all(t.user_attrs["latency_context"].get("threads") == 1 for t in complete)
    with sqlite3.connect(run / "latency_cache.sqlite") as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        rows = sum(db.execute(f"select count(*) from {t}").fetchone()[0] for t in tables)
    assert rows >= len(plans)
    front = pd.read_csv(run / "pareto.csv")
    trials = pd.read_csv(run / "trials.csv")
    # the budget comes from the table, trials are measured: the front (within the budget) may even be empty
    assert set(front.trial) == {t.number for t in study.best_trials} and set(front.latency_source) <= {"measured"}, (
        trials.to_string(), [(t.number, t.state.name, t.values) for t in study.trials], out1[-800:], out2[-800:])


def _done(study: optuna.Study, score: float, ms: float, pruned: set[str]) -> None:
    plan = PruningPlan("test_convnext", pruned)
    study.add_trial(optuna.trial.create_trial(values=[score, ms], user_attrs={
        "plan": plan.to_str(), "n_pruned": len(plan), "latency_source": "measured"}))


def test_reports_of_workers_finishing_together_are_written_one_at_a_time_from_the_newest_study(tmp_path):
    """The report reads the study under the run's report lock: a worker that waited writes what it finds then."""
    import threading

    from updp.pipeline.rundir import report_lock
    from updp.pipeline.search import report

    run = tmp_path / "run"
    run.mkdir()
    study = optuna.create_study(directions=["maximize", "minimize"], storage=f"sqlite:///{run / 'study.db'}")
    _done(study, 50.0, 2.0, set())
    writer = threading.Thread(target=report, args=(run, study, {"model": "test_convnext", "data": "d"}))
    with report_lock(run):  # another worker is writing its report
        writer.start()
        writer.join(timeout=1.0)
        assert writer.is_alive() and not (run / "pareto.csv").exists()  # waits its turn
        _done(study, 60.0, 1.0, {"stages.0.blocks.0"})  # the other worker's last trial lands meanwhile
    writer.join(timeout=60)
    front = pd.read_csv(run / "pareto.csv")
    assert list(front.trial) == [1] == [t.number for t in study.best_trials]
