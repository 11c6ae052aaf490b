"""Progressive training: lambda follows the schedule, resume is exact, the final merge is verified."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from updp.core.config import from_dict
from updp.core.errors import UpdpError
from updp.pipeline.config import RunConfig, TrainPlanConfig
from updp.pipeline.final import finalize
from updp.pruner import PruningPlan, create_model, progressive_blocks
from updp.train.data import load_splits
from updp.train.progressive_training import schedule_for, train_plan

DEMO = Path(__file__).resolve().parents[1] / "data" / "cifar10_demo.npz"
PLAN = ["stages.1.blocks.0", "stages.2.blocks.2"]


@pytest.fixture(scope="module")
def splits():
    return splits_()


def _cfg(**train):
    return from_dict(RunConfig, {"model": "test_convnext", "data": {"root": str(DEMO), "batch_size": 64},
                                 "latency": {"backend": "onnxruntime", "threads": 2, "runs": 20},
                                 "train": {"epochs": 0.2, "lambda_end_frac": 0.5, **train}})


def _train(cfg: RunConfig, out: Path, baseline=None):
    baseline = _baseline() if baseline is None else baseline
    return train_plan(baseline, PruningPlan("test_convnext", PLAN), splits_(), cfg.train, out,
                      batch_size=cfg.data.batch_size, seed=cfg.search.seed)


_SPLITS = {}


def splits_():
    if "s" not in _SPLITS:
        _SPLITS["s"] = load_splits(DEMO, 32)
    return _SPLITS["s"]


def _baseline():
    torch.manual_seed(0)
    return create_model("test_convnext", 10)


def test_schedules_reach_zero_at_the_configured_fraction():
    s = schedule_for(TrainPlanConfig(lambda_end_frac=0.6), PLAN, 100)
    assert s(0) == 1.0 and s(30) == pytest.approx(0.5) and s(60) == 0.0 and s(99) == 0.0
    st = schedule_for(TrainPlanConfig(lambda_end_frac=0.6, stagger_frac=0.1), PLAN, 100)
    assert st(20, PLAN[0]) < st(20, PLAN[1]) and st(60, PLAN[1]) == 0.0


def test_training_fades_lambda_and_ends_pruned(tmp_path, splits):
    student = _train(_cfg(), tmp_path)
    assert all(b.lam == 0.0 for b in progressive_blocks(student).values())
    metrics = pd.read_csv(tmp_path / "train_metrics.csv")
    assert "lambda" in metrics and metrics["lambda"].iloc[-1] == 0.0 and "val_top1" in metrics


def test_interrupted_training_resumes_exactly(tmp_path, splits, monkeypatch):
    import updp.train.progressive_training as prog

    full = _train(_cfg(epochs=0.3), tmp_path / "a")
    real_kd, calls = prog.kd_loss, {"n": 0}

    def ctrl_c_in_step_6(*args, **kwargs):  # the user presses Ctrl-C in the middle of a step
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_kd(*args, **kwargs)

    monkeypatch.setattr(prog, "kd_loss", ctrl_c_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        _train(_cfg(epochs=0.3), tmp_path / "b")
    state = torch.load(tmp_path / "b" / "train.pt", weights_only=False)
    assert state["step"] == 5 and not state["complete"]
    monkeypatch.setattr(prog, "kd_loss", real_kd)
    resumed = _train(_cfg(epochs=0.3), tmp_path / "b")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_finalize_merges_exactly_on_real_images(tmp_path, splits):
    baseline = _baseline()
    student = _train(_cfg(), tmp_path, baseline)
    plan = PruningPlan("test_convnext", PLAN)
    result = finalize(baseline, student, plan, splits, _cfg(), tmp_path, "onnxruntime", 10, 32)
    assert result["max_abs_logit_diff_merged_vs_subnet"] < 1e-4
    assert abs(result["merged_top1"] - result["subnet_top1"]) <= 0.2  # at most one image flips at fp32 noise
    assert result["params_merged"] < result["params_baseline"] and result["macs_merged"] < result["macs_baseline"]
    assert result["latency_backend"] == "onnxruntime" and result["latency_input"] == "1x3x32x32"
    assert result["latency_runs"] >= 100 and 0 < result["latency_merged_ms"] < float("inf")
    for name in ("merged.pt", "merged.onnx", "pruned.pt", "final.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "final.json").read_text())["pruned"] == ",".join(PLAN)


def test_plan_with_unknown_blocks_is_refused_before_training(tmp_path):
    from updp.pipeline.run import train_and_merge

    with pytest.raises(UpdpError, match="not prunable"):
        train_and_merge(_cfg(), tmp_path, ["stages.7.blocks.7"])
    assert not (tmp_path / "baseline.pt").exists()


def test_same_seed_same_result(tmp_path, splits):
    a = _train(_cfg(epochs=0.1), tmp_path / "a")
    torch.randn(7)  # whatever happened to the global RNG before, the trainer seeds itself
    b = _train(_cfg(epochs=0.1), tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
