"""``updp search`` / ``updp report`` end to end on real images, and their input errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from updp.cli import main

DEMO = Path(__file__).resolve().parents[1] / "data" / "cifar10_demo.npz"
FAST = ["--model", "test_convnext", "--baseline-epochs", "0.15", "--supernet-epochs", "0.15",
        "--latency-img-size", "32", "--threads", "2", "--backend", "onnxruntime"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An ImageFolder tree (PNG files) of 30 train and 10 val images per class, from the shipped demo data."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar")
    with np.load(DEMO) as arrays:
        classes = [str(c) for c in arrays["classes"]]
        for split, n in (("train", 30), ("val", 10)):
            images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
            for c, name in enumerate(classes):
                (root / split / name).mkdir(parents=True)
                for i in np.flatnonzero(labels == c)[:n]:
                    Image.fromarray(images[i]).save(root / split / name / f"{i:05d}.png")
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_search_end_to_end_then_resume_is_a_no_op(capsys, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "search", *FAST, "--data", data_dir, "--run", run_dir, "--trials", "8",
                         "--budget-frac", "0.5")
    assert code == 0, err
    for name in ("config.yaml", "study.db", "supernet.pt", "baseline.pt", "latency_cache.sqlite",
                 "latency_table.json", "trials.csv", "pareto.csv", "pareto.png", "report.md"):
        assert (run_dir / name).is_file(), name
    trials = pd.read_csv(run_dir / "trials.csv", keep_default_na=False)
    assert (trials.state == "COMPLETE").sum() == 8
    measured = trials[(trials.state == "COMPLETE") & (trials.latency_source == "measured")]
    assert 1 <= len(measured) <= 8 and measured.predicted_latency_ms.astype(float).gt(0).all()  # hybrid: verified
    assert set(trials.latency_source) == {"predicted", "measured"}
    assert trials.pruned.iloc[0] == ""  # the unpruned seed plan comes first
    fitted = json.loads((run_dir / "latency_model.json").read_text())  # the run's predictor, with its evidence
    assert fitted["held_out"]["fitted"]["plans"] == fitted["held_out"]["table"]["plans"] == 8
    held_out_error = f"median APE {fitted['held_out']['fitted']['median_ape_pct']:.2f} %"
    assert held_out_error in (run_dir / "report.md").read_text()  # the report states the predictor's error
    budget = json.loads((run_dir / "search_summary.json").read_text())["context"]["budget_ms"]
    done = trials[trials.state == "COMPLETE"]
    inside = done[done.latency_ms.astype(float) <= budget]
    if inside.empty:  # timing decides whether any plan halves the latency: the message must say which way it went
        assert "no completed plan meets the budget" in out
    else:
        chosen = int(re.search(r"best plan under the budget: trial (\d+),", out).group(1))
        assert chosen in set(inside.trial[inside.score == inside.score.max()])
    # the default metric: the score is the held-out likelihood, top-1 and loss from the same pass kept beside it
    assert (done.score - 100 * np.exp(-done.loss)).abs().max() < 1e-9 and done.top1.between(0, 100).all()
    assert "supernet likelihood" in (run_dir / "report.md").read_text()
    msg = _error(capsys, "search", "--resume", run_dir, "--metric", "top1", "--trials", "12")
    assert "maximizes likelihood, not top1" in msg  # one study, one metric: refused before any work
    # scored on the training images by default (all 270 of this tiny set), and a resume cannot switch
    assert "on 270 training images" in (run_dir / "report.md").read_text()
    msg = _error(capsys, "search", "--resume", run_dir, "--score-on", "held_out", "--trials", "12")
    assert "scores candidates on train, not held_out" in msg and "--score-on train" in msg
    _check_scored_on_training_images(run_dir, done)
    code, out, _ = run(capsys, "search", "--resume", run_dir)
    assert code == 0 and "nothing to do" in out
    code, out, _ = run(capsys, "search", "--resume", run_dir, "--trials", "10")
    assert code == 0 and (pd.read_csv(run_dir / "trials.csv").state == "COMPLETE").sum() == 10
    code, out, _ = run(capsys, "report", run_dir)
    assert code == 0 and "Pareto front" in out


def _check_scored_on_training_images(run_dir: Path, done: pd.DataFrame) -> None:
    """The unpruned plan's trial loss is the supernet's on the training images, not on the held-out ones."""
    from updp.pipeline import rundir
    from updp.pipeline.search import train_supernet
    from updp.pruner import PruningPlan
    from updp.search.scoring import score_plan
    from updp.train.data import fixed_batches

    inp = rundir.check_inputs(rundir.load_run_config(run_dir), run_dir)
    supernet = train_supernet(inp, rundir.baseline_model(inp))  # finished: loaded, not trained
    cfg = inp.cfg
    calib = fixed_batches(inp.splits.train_eval, cfg.data.calib_images, cfg.search.seed)
    loss = {split: score_plan(supernet, PruningPlan(cfg.model), calib,
                              fixed_batches(getattr(inp.splits, split), cfg.data.eval_images, cfg.search.seed))["loss"]
            for split in ("train_eval", "held_out")}
    trial = float(done[done.pruned == ""].loss.iloc[0])
    assert abs(trial - loss["train_eval"]) < 1e-6 < abs(trial - loss["held_out"]), (trial, loss)


def test_budget_sampling_whose_budget_fell_away_trains_uniformly_with_a_warning(capsys, tmp_path, data_dir):
    from updp.core.config import from_dict
    from updp.pipeline import rundir
    from updp.pipeline.config import RunConfig
    from updp.pipeline.search import train_supernet
    from updp.pruner import create_model

    cfg = from_dict(RunConfig, {"model": "test_convnext", "data": {"root": str(data_dir), "img_size": 32},
                                "supernet": {"epochs": 0.15, "sampling": "budget"}, "search": {"budget_frac": 0.5}})
    inp = rundir.check_inputs(cfg, tmp_path)
    # the table measured no saving (a noisy machine): the search runs without a budget, the supernet still trains
    train_supernet(inp, create_model("test_convnext", num_classes=inp.num_classes), predict=None, budget_ms=None)
    assert "samples subnets uniformly" in capsys.readouterr().err
    assert (tmp_path / "supernet.pt").is_file()


def _error(capsys, *argv):
    code, _, err = run(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("updp: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_missing_and_empty_datasets(capsys, tmp_path):
    assert "does not exist" in _error(capsys, "search", *FAST, "--data", tmp_path / "nope", "--run", tmp_path / "r")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
    assert "holds no images" in _error(capsys, "search", *FAST, "--data", tmp_path / "empty", "--run", tmp_path / "r")


def test_impossible_budget_before_training(capsys, tmp_path, data_dir):
    msg = _error(capsys, "search", *FAST, "--data", data_dir, "--run", tmp_path / "r", "--latency-budget-ms", "1e-6")
    assert "impossible budget" in msg
    assert not (tmp_path / "r" / "baseline.pt").exists()
    assert not (tmp_path / "r" / "latency_model.json").exists()  # nor the latency model's timing pass


def test_image_size_the_model_cannot_take(capsys, tmp_path, data_dir):
    msg = _error(capsys, "search", "--model", "deit_tiny_patch16_224", "--data", data_dir, "--run", tmp_path / "r")
    assert "cannot take 32px images" in msg


def test_bad_storage_and_existing_run(capsys, tmp_path, data_dir):
    msg = _error(capsys, "search", *FAST, "--data", data_dir, "--run", tmp_path / "r",
                 "--storage", "postgresql://nobody@127.0.0.1:1/x")
    assert "cannot open study storage" in msg
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "config.yaml").write_text("model: test_convnext\n")
    assert "--resume" in _error(capsys, "search", *FAST, "--data", data_dir, "--run", tmp_path / "r2")


def test_config_file_errors(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: test_convnext\nsearch:\n  trails: 3\n")
    assert "unknown config key 'search.trails'" in _error(capsys, "search", "--config", cfg)
    assert "no dataset given" in _error(capsys, "search", "--model", "test_convnext", "--run", tmp_path / "r")
    assert "not an updp run directory" in _error(capsys, "search", "--resume", tmp_path)


@pytest.mark.slow
def test_greedy_seeding_and_budget_weighted_supernet_through_a_whole_search(capsys, tmp_path, data_dir):
    import optuna

    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "search", *FAST, "--data", data_dir, "--run", run_dir, "--trials", "45",
                         "--seeding", "auto", "--supernet-sampling", "budget", "--budget-frac", "0.5",
                         "--latency-mode", "table", "--fit-plans", "0", "--merge-forms", "default")
    assert code == 0, err
    study = optuna.load_study(study_name="updp", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert study.user_attrs["greedy_chain"] == "enqueued"  # 45 trials >= 5 x 9 blocks: auto is greedy
    tags = [t.user_attrs.get("seed_plan") for t in study.trials]
    singles = [t for t, tag in zip(study.trials, tags) if tag == "single"]
    chain = [t for t, tag in zip(study.trials, tags) if tag == "greedy"]
    assert len(singles) == 9 + 9 and all(t.state.name == "COMPLETE" for t in singles)
    assert chain and min(t.number for t in chain) > max(t.number for t in singles)
    plans = [t.user_attrs["plan"] for t in study.trials if t.state.name == "COMPLETE"]
    assert len(plans) == len(set(plans)) == 45
    report = (run_dir / "report.md").read_text()
    assert "budget" in report and "seeding" in report
    metrics = pd.read_csv(run_dir / "supernet_metrics.csv")
    assert metrics.train_sub_loss.gt(0).all()
