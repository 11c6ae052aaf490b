"""Every bad value is a one-line error (exit 2) before the latency table or any training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from updp.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "cifar10_demo.npz"
BASE = ["--model", "test_convnext", "--data", str(DEMO), "--latency-img-size", "32", "--backend", "onnxruntime"]


def _one_line_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("updp: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _no_work_done(run: Path) -> None:
    done = {"latency_table.json", "baseline.pt", "supernet.pt", "train.pt", "study.db"}
    assert not run.exists() or not done & {p.name for p in run.iterdir()}


FLAGS = {
    "trials 0": (["--trials", "0"], "search.trials must be a positive number"),
    "trials -3": (["--trials", "-3"], "search.trials"),
    "batch 0": (["--batch-size", "0"], "data.batch_size"),
    "batch -1": (["--batch-size", "-1"], "data.batch_size"),
    "max per stage 0": (["--max-per-stage", "0"], "search.max_per_stage"),
    "target speedup 0": (["--target-speedup", "0"], "search.target_speedup"),
    "budget frac 0": (["--budget-frac", "0"], "search.budget_frac"),
    "budget frac 1.5": (["--budget-frac", "1.5"], "search.budget_frac"),
    "img size 0": (["--img-size", "0"], "data.img_size"),
    "latency img size -1": (["--latency-img-size", "-1"], "latency.img_size"),
    "threads 0": (["--threads", "0"], "latency.threads"),
    "threads -2": (["--threads", "-2"], "latency.threads"),
    "budget ms 0": (["--latency-budget-ms", "0"], "search.latency_budget_ms"),
    "num classes 3": (["--num-classes", "3"], "smaller than the 10 classes"),
    "epochs -1": (["--baseline-epochs", "-1"], "baseline.epochs"),
    "batch over images": (["--batch-size", "4096"], "fewer than the batch size"),
}


@pytest.mark.parametrize("case", FLAGS, ids=list(FLAGS))
def test_bad_flags_fail_before_any_work(capsys, tmp_path, case):
    flags, expected = FLAGS[case]
    msg = _one_line_error(capsys, ["search", *BASE, "--run", tmp_path / "r", *flags])
    assert expected in msg
    _no_work_done(tmp_path / "r")


CONFIGS = {
    "space": ("search:\n  space: rows\n", "search.space must be one of blocks, stages"),
    "sampler": ("search:\n  sampler: cmaes\n", "search.sampler must be one of"),
    "schedule": ("train:\n  schedule: exponential\n", "train.schedule must be one of linear, cosine"),
    "lambda end 0": ("train:\n  lambda_end_frac: 0\n", "train.lambda_end_frac must be in (0, 1]"),
    "lambda end 1.2": ("train:\n  lambda_end_frac: 1.2\n", "train.lambda_end_frac"),
    "kd alpha": ("train:\n  kd_alpha: 2\n", "train.kd_alpha must be in [0, 1]"),
    "latency mode": ("latency:\n  mode: guess\n", "latency.mode must be one of"),
    "precision": ("latency:\n  precision: fp8\n", "latency.precision must be one of"),
    "empty plan": ("train:\n  plan: []\n", "train.plan is empty"),
    "two budgets": ("search:\n  target_speedup: 1.2\n  budget_frac: 0.5\n", "give one latency budget"),
}


@pytest.mark.parametrize("command", ["search", "run"])
@pytest.mark.parametrize("case", CONFIGS, ids=list(CONFIGS))
def test_bad_config_values_fail_before_any_work(capsys, tmp_path, case, command):
    text, expected = CONFIGS[case]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    msg = _one_line_error(capsys, [command, "--config", cfg, *BASE, "--run", tmp_path / "r"])
    assert expected in msg
    _no_work_done(tmp_path / "r")


def test_empty_plan_for_train_is_an_error(capsys, tmp_path):
    msg = _one_line_error(capsys, ["train", *BASE, "--run", tmp_path / "r", "--plan", " , "])
    assert "empty" in msg
    _no_work_done(tmp_path / "r")


def _npz(path: Path, **changes) -> Path:
    with np.load(DEMO) as f:
        arrays = {k: f[k] for k in f.files}
    arrays = {k: v[:200] if k != "classes" else v for k, v in arrays.items()}
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


NPZ = {
    "lengths differ": (lambda a: {"train_y": a["train_y"][:150]}, "one label per image"),
    "float images": (lambda a: {"train_x": a["train_x"].astype("float32") / 255}, "must be uint8"),
    "NCHW images": (lambda a: {"val_x": a["val_x"].transpose(0, 3, 1, 2).copy()}, "transpose NCHW"),
    "label out of range": (lambda a: {"train_y": a["train_y"] + 10}, "labels outside 0..9"),
    "negative label": (lambda a: {"val_y": a["val_y"] - 1}, "labels outside"),
    "float labels": (lambda a: {"train_y": a["train_y"].astype("float32")}, "integer class indices"),
}


@pytest.mark.parametrize("case", NPZ, ids=list(NPZ))
def test_malformed_npz_is_refused_before_any_work(capsys, tmp_path, case):
    change, expected = NPZ[case]
    with np.load(DEMO) as f:
        arrays = {k: f[k][:200] if k != "classes" else f[k] for k in f.files}
    data = _npz(tmp_path / "bad.npz", **change(arrays))
    msg = _one_line_error(capsys, ["search", *BASE, "--data", data, "--run", tmp_path / "r"])
    assert expected in msg, msg
    _no_work_done(tmp_path / "r")


def test_corrupt_image_is_named(capsys, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        folder = tmp_path / "data" / split / "cat"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    bad = tmp_path / "data" / "train" / "cat" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    msg = _one_line_error(capsys, ["search", *BASE, "--data", tmp_path / "data", "--run", tmp_path / "r"])
    assert str(bad) in msg and "cannot decode image" in msg
