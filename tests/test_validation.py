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
    "sampler": ("search:\n  sampler: cmaes\n", "unknown sampler 'cmaes'"),
    "schedule": ("train:\n  schedule: exponential\n", "train.schedule must be one of linear, cosine"),
    "lambda end 0": ("train:\n  lambda_end_frac: 0\n", "train.lambda_end_frac must be in (0, 1]"),
    "lambda end 1.2": ("train:\n  lambda_end_frac: 1.2\n", "train.lambda_end_frac"),
    "kd alpha": ("train:\n  kd_alpha: 2\n", "train.kd_alpha must be in [0, 1]"),
    "latency mode": ("latency:\n  mode: guess\n", "latency.mode must be one of"),
    "precision": ("latency:\n  precision: fp8\n", "latency.precision must be one of"),
    "empty plan": ("train:\n  plan: []\n", "train.plan is empty"),
    "two budgets": ("search:\n  target_speedup: 1.2\n  budget_frac: 0.5\n", "give one latency budget"),
    "seeding": ("search:\n  seeding: smart\n", "search.seeding must be one of auto, greedy, simple"),
    "supernet sampling": ("supernet:\n  sampling: fair\n", "supernet.sampling must be one of sandwich, uniform"),
    "budget sampling, no budget": ("supernet:\n  sampling: budget\n", "draws subnets near the latency budget"),
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


# --- options are declared once: flags come from the config fields, --set reaches every key ------------

def _resolved(argv):
    from updp.cli.main import build_parser
    from updp.cli.search import resolve_config

    args = build_parser().parse_args([str(a) for a in argv])
    return resolve_config(args, allow_existing=True)[0]


def test_every_flag_sets_the_config_key_it_is_declared_on(tmp_path):
    import dataclasses
    import typing

    from updp.cli.search import _arg_type
    from updp.core.config import flags
    from updp.pipeline.config import RunConfig

    argv, want = ["run", "--run", tmp_path / "r"], {}
    for f in flags(RunConfig):
        tp = _arg_type(f.type)
        if f.key in ("runtime.sync_bn", "runtime.device"):
            continue  # CUDA only / a device name: below
        if tp is bool:
            argv.append(f.flag)
            want[f.key] = True
        elif typing.get_origin(tp) is list:
            continue  # --keep: below
        elif f.choices:
            value = f.choices[-1] if f.key != "latency.backend" else "torch"  # trtexec needs mode table: below
            argv += [f.flag, value]
            want[f.key] = value
        elif f.key in ("search.latency_budget_ms", "search.target_speedup"):
            continue  # one budget at a time: --budget-frac is set
        else:
            value = {"str": "x", "int": 3, "float": 0.25}[tp.__name__]
            argv += [f.flag, str(value)]
            want[f.key] = value
    argv += ["--keep", "b1", "--keep", "b2", "--sampler", "random", "--device", "cpu"]
    want.update({"search.keep": ["b1", "b2"], "search.sampler": "random", "runtime.device": "cpu"})
    cfg = dataclasses.asdict(_resolved(argv))
    for key, value in want.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    assert len(want) >= 28


def test_set_reaches_keys_without_a_flag_and_is_type_checked(capsys, tmp_path):
    cfg = _resolved(["search", "--model", "m", "--run", tmp_path / "r", "--set", "supernet.kd_temperature=3",
                     "--set", "search.study_name=s2", "--set", "train.stagger_frac=0.1", "--trials", "9",
                     "--set", "search.trials=12"])
    assert (cfg.supernet.kd_temperature, cfg.search.study_name, cfg.train.stagger_frac) == (3.0, "s2", 0.1)
    assert cfg.search.trials == 12  # --set comes after the flags
    run = tmp_path / "r2"
    for value, complaint in (("search.trials=abc", "search.trials' must be int"),
                             ("search.trails=5", "did you mean 'trials'"),
                             ("search=5", "must be a mapping"),
                             ("trials", "write KEY=VALUE")):
        assert complaint in _one_line_error(capsys, ["search", *BASE, "--run", run, "--set", value])
    _no_work_done(run)


def test_samplers_by_name_import_path_and_bad_ones(capsys, tmp_path):
    from optuna.samplers import QMCSampler, RandomSampler

    from updp.search import study as st

    assert type(st.make_sampler("optuna.samplers:QMCSampler", 0, 10)) is QMCSampler
    mine = RandomSampler(seed=3)
    assert st.make_sampler(mine, 0, 10) is mine  # an instance from Python is used as it is
    run = tmp_path / "r"
    for sampler, complaint in (("os:system", "is not an Optuna sampler class"),
                               ("no_such_module_x:Sampler", "cannot import sampler module 'no_such_module_x'"),
                               ("import os; os.system('x')", "unknown sampler")):
        assert complaint in _one_line_error(capsys, ["search", *BASE, "--run", run, "--sampler", sampler])
    _no_work_done(run)
