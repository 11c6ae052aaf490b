"""``updp run`` on the shipped demo data (shortened), re-run as a no-op, and its input errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from updp.cli import main
from updp.pruner import create_model, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = ROOT / "data" / "cifar10_demo.npz"
SHORT = ["--config", DEMO_CFG, "--data", DEMO_DATA, "--model", "test_convnext", "--baseline-epochs", "0.3",
         "--supernet-epochs", "0.2", "--trials", "6", "--train-epochs", "0.3", "--latency-img-size", "32"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, *argv):
    code, _, err = run(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("updp: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.slow
def test_run_whole_pipeline_then_rerun_is_a_no_op(capsys, tmp_path):
    run_dir = tmp_path / "demo"
    cfg = yaml.safe_load(DEMO_CFG.read_text())
    del cfg["latency"]["img_size"]  # unset: search and final stage time at the training size alike
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg))
    short = [a if a != DEMO_CFG else tmp_path / "demo.yaml" for a in SHORT[:-2]]
    code, out, err = run(capsys, "run", *short, "--run", run_dir)
    assert code == 0, err
    final = json.loads((run_dir / "final.json").read_text())
    search = json.loads((run_dir / "search_summary.json").read_text())
    assert search["context"]["latency_input"] == "3x32x32" and final["latency_input"] == "1x3x32x32"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["latency"]["img_size"] == 32  # recorded
    assert final["max_abs_logit_diff_merged_vs_subnet"] < 1e-4 and final["n_pruned"] >= 1
    pruned = final["pruned"].split(",")
    assert set(final["merge_forms"]) == set(pruned)  # each block's form, as the planner chose it at 32 px
    if set(final["merge_forms"].values()) == {"dw_pw"}:  # a dense 7x7 may be faster here, but is not smaller
        assert final["params_merged"] < final["params_baseline"]
    assert "## Final model" in (run_dir / "report.md").read_text() and (run_dir / "pareto.png").is_file()
    ckpt = load_checkpoint(run_dir / "merged.pt")
    assert ckpt.meta["merge_forms"] == final["merge_forms"]
    merged = ckpt.model
    x = torch.randn(1, 3, 32, 32)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(run_dir / "merged.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, merged(x).numpy(), rtol=1e-3, atol=1e-4)
    code, out, _ = run(capsys, "run", *short, "--run", run_dir)
    assert code == 0 and "nothing to do" in out
    code, out, err = run(capsys, "train", "--run", run_dir)  # the README's form: the run's own config
    assert code == 0 and "nothing to do" in out, err
    code, out, _ = run(capsys, "report", run_dir)
    assert code == 0 and "## Final model" in (run_dir / "report.md").read_text()


def test_checkpoint_for_another_model_fails_before_work(capsys, tmp_path):
    ckpt = tmp_path / "wrong.pt"
    torch.save(create_model("resnet18", 10).state_dict(), ckpt)
    msg = _error(capsys, "run", *SHORT, "--run", tmp_path / "r", "--checkpoint", ckpt)
    assert "does not match the model" in msg
    assert not (tmp_path / "r" / "supernet.pt").exists()


def test_dataset_with_mismatched_classes(capsys, tmp_path):
    for split, cls in (("train", "cat"), ("val", "dog")):
        (tmp_path / "d" / split / cls).mkdir(parents=True)
        (tmp_path / "d" / split / cls / "x.png").write_bytes(b"")
    assert "different classes" in _error(capsys, "run", *SHORT, "--data", tmp_path / "d", "--run", tmp_path / "r")


def test_corrupted_npz_and_unknown_config_key(capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert "not a readable .npz" in _error(capsys, "run", *SHORT, "--data", bad, "--run", tmp_path / "r")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DEMO_CFG.read_text().replace("lambda_end_frac", "lambda_end_fraction"))
    assert "unknown config key 'train.lambda_end_fraction'" in _error(capsys, "run", "--config", cfg)


def test_train_needs_a_plan_or_a_search(capsys, tmp_path):
    msg = _error(capsys, "train", *SHORT, "--run", tmp_path / "r")
    assert "no plan to train" in msg
