"""A run directory written by release 0.1.0 still loads: report, plan choice, checkpoints, study, table.

``tests/fixtures/run_v0_1`` is a tiny ``updp run`` (configs/tiny.yaml) as
release 0.1.0 wrote it: plans as sorted lists in trial attributes, ';'-joined
in CSVs and search_summary.json, a list in final.json and checkpoints. Its
training checkpoints are left out (size); the tests that need them retrain.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest

from updp.cli import main
from updp.core.config import load_yaml
from updp.latency.table import LatencyTable
from updp.pipeline.config import RunConfig
from updp.pipeline.run import choose_plan
from updp.pruner import PruningPlan, load_checkpoint
from updp.search import study as st

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "fixtures" / "run_v0_1"
DEMO = ROOT / "data" / "cifar10_demo.npz"
MODEL = "test_convnext"


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    return run


def _cfg(run: Path) -> RunConfig:
    return load_yaml(RunConfig, run / "config.yaml")


def test_the_plan_a_legacy_search_chose_is_read_back(run_dir):
    best = json.loads((run_dir / "search_summary.json").read_text())["best"]["pruned"]
    assert ";" in best  # the 0.1.0 form
    plan = choose_plan(_cfg(run_dir), run_dir)
    assert plan == PruningPlan(MODEL, best.split(";")) and len(plan) == 9


def test_choose_plan_falls_back_to_the_best_pruned_front_plan(run_dir):
    summary = json.loads((run_dir / "search_summary.json").read_text())
    summary["best"] = None  # no plan met the budget
    (run_dir / "search_summary.json").write_text(json.dumps(summary))
    front = pd.read_csv(run_dir / "pareto.csv", keep_default_na=False)
    extra = front.iloc[0].copy()
    extra["trial"], extra["score"], extra["n_pruned"], extra["pruned"] = 99, 99.0, 1, "stages.3.blocks.1"
    unpruned = extra.copy()
    unpruned["trial"], unpruned["score"], unpruned["n_pruned"], unpruned["pruned"] = 0, 100.0, 0, ""
    pd.DataFrame([*front.to_dict("records"), extra, unpruned]).to_csv(run_dir / "pareto.csv", index=False)
    # the best-scoring front plan that prunes something, never the unpruned one
    assert choose_plan(_cfg(run_dir), run_dir) == PruningPlan(MODEL, ["stages.3.blocks.1"])


def test_legacy_trials_give_their_plans(run_dir):
    study = optuna.load_study(study_name="updp", storage=f"sqlite:///{run_dir / 'study.db'}")
    plans = [st.trial_plan(t, MODEL) for t in study.trials]
    assert "plan" not in study.trials[1].user_attrs and isinstance(study.trials[1].user_attrs["pruned"], list)
    assert len(plans[1]) == 9 and plans[0] == PruningPlan(MODEL)
    assert [len(p) for p in plans] == [t.user_attrs["n_pruned"] for t in study.trials]


def test_legacy_checkpoints_load_as_plans(run_dir):
    pruned, merged = load_checkpoint(run_dir / "pruned.pt"), load_checkpoint(run_dir / "merged.pt")
    final = json.loads((run_dir / "final.json").read_text())
    assert isinstance(final["pruned"], list)  # the 0.1.0 form
    assert pruned.plan == merged.plan == PruningPlan(MODEL, final["pruned"])
    assert pruned.form == "pruned" and merged.form == "merged"


def test_legacy_latency_table_loads_without_the_newer_fields(run_dir):
    table = LatencyTable.load(run_dir / "latency_table.json")
    plan = PruningPlan(MODEL, ["stages.0.blocks.0", "stages.1.blocks.0"])
    assert 0 < table.predict(plan) < table.baseline_ms


def test_report_of_a_legacy_run_is_rebuilt_in_the_new_forms(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    trials = pd.read_csv(run_dir / "trials.csv", keep_default_na=False)
    assert len(trials) == 6 and trials.pruned.str.contains(";").sum() == 0
    assert PruningPlan.from_str(MODEL, trials.pruned.iloc[1]) == choose_plan(_cfg(run_dir), run_dir)
    report = (run_dir / "report.md").read_text()
    assert "## Final model" in report and "stages.0.blocks.0, stages.1.blocks.0" in report


@pytest.mark.slow
def test_a_legacy_search_continues_with_more_trials(run_dir, capsys):
    """The study of 0.1.0 goes on: old trials are seen as plans (no duplicate scored), new ones added."""
    code = main(["search", "--resume", str(run_dir), "--data", str(DEMO), "--trials", "9"])
    out, err = capsys.readouterr()
    assert code == 0, err
    study = optuna.load_study(study_name="updp", storage=f"sqlite:///{run_dir / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 9
    plans = [st.trial_plan(t, MODEL) for t in done]
    assert len(set(plans)) == len(plans)  # no plan of the old trials evaluated again


def test_with_no_plan_in_the_budget_the_best_pruned_plan_of_the_whole_trade_off_is_trained(run_dir, capsys):
    summary = json.loads((run_dir / "search_summary.json").read_text())
    summary["best"] = None
    (run_dir / "search_summary.json").write_text(json.dumps(summary))
    front = pd.read_csv(run_dir / "pareto.csv", keep_default_na=False)
    front.iloc[0:0].to_csv(run_dir / "pareto.csv", index=False)  # the front within the budget is empty
    trials = pd.read_csv(run_dir / "trials.csv", keep_default_na=False)
    done = trials[(trials.state == "COMPLETE") & (trials.n_pruned > 0)]
    best = done.sort_values("score", ascending=False).iloc[0]  # the top scorer is on the unconstrained front
    plan = choose_plan(_cfg(run_dir), run_dir)
    assert plan == PruningPlan.from_str(MODEL, best.pruned)
    assert "no plan met the latency budget" in capsys.readouterr().err
