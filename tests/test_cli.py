"""The ``updp`` command line, in-process through ``main`` and as the installed console script."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from helpers import randomize_layer_scale

from updp import __version__
from updp.cli import main
from updp.core.errors import UnknownModelError
from updp.pruner import PruningPlan, create_model, load_checkpoint, merge_model

MODEL = "convnext_atto"
PLAN = ["stages.0.blocks.1", "stages.2.blocks.0"]
MERGE = ["merge", MODEL, "--img-size", "64"]
ATTO_BLOCKS = [f"stages.{s}.blocks.{i}" for s, n in enumerate((2, 2, 6, 2)) for i in range(n)]
BLOCK_KEYS = {"name", "stage", "family", "stride", "macs", "merged_macs", "worthwhile"}
REPORT_KEYS = {"params_before", "params_after", "macs_before", "macs_after", "max_abs_diff_fp32",
               "max_abs_diff_fp64"}


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def console(*argv: str) -> subprocess.CompletedProcess:
    exe = shutil.which("updp")
    assert exe, "the 'updp' console script is not installed (pip install -e .)"
    return subprocess.run([exe, *argv], capture_output=True, text=True, timeout=300)


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("updp: error:"), err
    for fragment in fragments:
        assert fragment in lines[0]


def run_merge(*argv: str) -> dict:
    """``updp merge ... --format json`` in-process; returns the printed report."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*argv, "--format", "json"]) == 0
    return json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One merge of PLAN on random weights, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("merged")
    torch.manual_seed(0)
    return out, run_merge(*MERGE, "--plan", ",".join(PLAN), "--out", str(out))


# --- help ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--help"], ["blocks", "merge", "--debug", "--version"]),
    (["blocks", "--help"], ["MODEL", "--checkpoint", "--img-size", "--format", "json", "csv"]),
    (["merge", "--help"], ["MODEL", "--plan", "--out", "--allow-costlier", "--checkpoint", "--img-size"]),
])
def test_help_exits_zero_and_names_options(capsys, argv: list[str], words: list[str]):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"]])
def test_console_script_help(argv: list[str]):
    proc = console(*argv)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "usage: updp" in proc.stdout and "--" in proc.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _ = cli(capsys)
    assert code == 2 and "usage: updp" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"updp {__version__}"


# --- updp blocks -----------------------------------------------------------------------------------

def test_blocks_json(capsys):
    code, out, err = cli(capsys, "blocks", MODEL, "--img-size", "64", "--format", "json")
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert isinstance(rows, list) and all(BLOCK_KEYS <= row.keys() for row in rows)
    assert [r["name"] for r in rows] == ATTO_BLOCKS
    assert all(r["family"] == "convnext" and r["stride"] == 1 and r["worthwhile"] is True for r in rows)
    assert all(r["merged_macs"] < r["macs"] for r in rows)


def test_blocks_csv(capsys):
    code, out, _ = cli(capsys, "blocks", MODEL, "--img-size", "64", "--format", "csv")
    assert code == 0
    table = pd.read_csv(io.StringIO(out))
    assert BLOCK_KEYS <= set(table.columns)
    assert table["name"].tolist() == ATTO_BLOCKS
    assert table["stage"].tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]
    assert table["worthwhile"].all()


def test_blocks_table_lists_every_block(capsys):
    code, out, _ = cli(capsys, "blocks", MODEL, "--img-size", "64")
    assert code == 0
    assert out.startswith(f"{MODEL}: 12 blocks at input 3x64x64, 12 worth pruning")
    listed = [line.split()[0] for line in out.splitlines()[2:]]
    assert listed == ATTO_BLOCKS


def test_blocks_table_explains_unsupported_blocks(capsys):
    code, out, _ = cli(capsys, "blocks", "efficientnet_b0", "--img-size", "64")
    assert code == 0
    assert "0 worth pruning" in out
    assert "unsupported (16): squeeze-excitation" in out


def test_blocks_with_a_timm_style_checkpoint(capsys, tmp_path: Path):
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": create_model("test_convnext").state_dict(), "epoch": 3}, path)
    code, out, err = cli(capsys, "blocks", "test_convnext", "--checkpoint", str(path), "--format", "json")
    assert code == 0 and err == ""
    assert len(json.loads(out)) == 9


def test_blocks_of_a_model_without_supported_blocks(capsys):
    code, _, err = cli(capsys, "blocks", "test_byobnet")
    assert_user_error(code, err, "no block of a supported family")


# --- updp merge ------------------------------------------------------------------------------------

def test_merge_writes_its_three_files(merged):
    out, report = merged
    assert sorted(p.name for p in out.iterdir()) == ["merge.json", "merged.onnx", "merged.pt"]
    assert json.loads((out / "merge.json").read_text()) == report


def test_merge_report_shows_a_smaller_exact_model(merged):
    _, report = merged
    assert REPORT_KEYS <= report.keys()
    assert report["model"] == MODEL and report["pruned"] == ",".join(PLAN) and report["input_size"] == [3, 64, 64]
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert report["max_abs_diff_fp64"] < 1e-10
    assert report["max_abs_diff_fp32"] < 1e-3


def test_merge_savings_are_the_blocks_savings(capsys, merged):
    """The whole-model saving equals the per-block savings that 'updp blocks' reports."""
    _, report = merged
    _, out, _ = cli(capsys, "blocks", MODEL, "--img-size", "64", "--format", "json")
    rows = [r for r in json.loads(out) if r["name"] in PLAN]
    assert report["macs_before"] - report["macs_after"] == sum(r["macs"] - r["merged_macs"] for r in rows)
    assert report["params_before"] - report["params_after"] == sum(r["params"] - r["merged_params"] for r in rows)


def test_merged_checkpoint_loads_and_matches_onnx(merged):
    out, _ = merged
    ckpt = load_checkpoint(out / "merged.pt")
    assert (ckpt.form, ckpt.plan, ckpt.model_name) == ("merged", PruningPlan(MODEL, PLAN), MODEL)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ckpt.model.eval()(x).numpy()
    sess = ort.InferenceSession(str(out / "merged.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("content", [PLAN[:1], {"pruned": PLAN[:1]}], ids=["list", "dict"])
def test_merge_plan_from_a_json_file(capsys, tmp_path: Path, content):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(content))
    code, out, err = cli(capsys, *MERGE, "--plan", str(plan), "--out", str(tmp_path / "out"))
    assert code == 0 and err == ""
    assert out.startswith(f"merged 1 blocks of {MODEL} into ")
    report = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert report["pruned"] == PLAN[0] and report["macs_after"] < report["macs_before"]


def test_merge_uses_checkpoint_weights(tmp_path: Path, merged):
    torch.manual_seed(1)
    model = randomize_layer_scale(create_model(MODEL)).eval()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    run_merge(*MERGE, "--plan", ",".join(PLAN), "--checkpoint", str(weights), "--out", str(tmp_path / "out"))
    got = load_checkpoint(tmp_path / "out" / "merged.pt").model
    random_weights = load_checkpoint(merged[0] / "merged.pt").model
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(got(x), merge_model(model, PLAN)(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got(x), random_weights(x), atol=1e-3)


def test_merge_costlier_block_when_allowed(tmp_path: Path):
    report = run_merge("merge", "resnet18", "--img-size", "32", "--plan", "layer1.0", "--allow-costlier",
                       "--out", str(tmp_path))
    assert report["macs_after"] > report["macs_before"]
    assert report["max_abs_diff_fp64"] < 1e-10


# --- user errors -----------------------------------------------------------------------------------

@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    truncated = tmp_path / "truncated.pt"
    torch.save(create_model("test_convnext").state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    return {"truncated": truncated, "missing": tmp_path / "missing.pt"}


ERRORS = {
    "unknown model": (["merge", "convnext_atoo", "--plan", "x"], ["unknown model 'convnext_atoo'", "convnext_atto"]),
    "unknown block": ([*MERGE, "--plan", "stages.0.blocks.9"], ["'stages.0.blocks.9'"]),
    "not worthwhile": (["merge", "resnet18", "--img-size", "32", "--plan", "layer1.0"],
                       ["layer1.0", "--allow-costlier"]),
    "corrupted checkpoint": ([*MERGE, "--plan", PLAN[0], "--checkpoint", "{truncated}"], ["corrupted"]),
    "missing checkpoint": ([*MERGE, "--plan", PLAN[0], "--checkpoint", "{missing}"], ["does not exist"]),
    "unsupported block": (["merge", "efficientnet_b0", "--img-size", "32", "--plan", "blocks.1.0"],
                          ["blocks.1.0", "squeeze-excitation"]),
    "empty plan": ([*MERGE, "--plan", ""], ["plan is empty"]),
    "only commas": ([*MERGE, "--plan", " , ,"], ["plan is empty"]),
    "no plan": (MERGE, ["plan is empty"]),
    "missing plan file": ([*MERGE, "--plan", "{missing}.json"], ["does not exist"]),
    "blocks, unknown model": (["blocks", "nosuchmodel"], ["unknown model 'nosuchmodel'"]),
    "blocks, corrupted checkpoint": (["blocks", MODEL, "--checkpoint", "{truncated}"], ["corrupted"]),
    "blocks, wrong weights": (["blocks", MODEL, "--checkpoint", "{wrong}"], ["does not match", "missing"]),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_user_errors_are_one_line(capsys, tmp_path: Path, bad_files: dict[str, Path], case: str):
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("test_vit").state_dict(), wrong)
    argv, fragments = ERRORS[case]
    argv = [a.format(wrong=wrong, **bad_files) for a in argv]
    out_dir = tmp_path / "out"
    if argv[0] == "merge":
        argv += ["--out", str(out_dir)]
    code, out, err = cli(capsys, *argv)
    assert_user_error(code, err, *fragments)
    assert out == ""
    assert not out_dir.exists()  # nothing is written before the plan is validated


def test_merged_checkpoint_cannot_be_merged_again(capsys, tmp_path: Path, merged):
    code, _, err = cli(capsys, "merge", str(merged[0] / "merged.pt"), "--out", str(tmp_path / "again"))
    assert_user_error(code, err, "merged model with no prunable blocks left")


def test_console_script_user_error(tmp_path: Path):
    proc = console("merge", "convnext_atoo", "--plan", "x", "--out", str(tmp_path / "out"))
    assert_user_error(proc.returncode, proc.stderr, "unknown model 'convnext_atoo'")
    assert proc.stdout == ""


def test_console_script_corrupted_checkpoint(tmp_path: Path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file at all, just text\n" * 20)
    proc = console("blocks", "test_convnext", "--checkpoint", str(bad))
    assert_user_error(proc.returncode, proc.stderr, "corrupted")


def test_debug_raises_instead_of_printing(capsys):
    with pytest.raises(UnknownModelError, match="nosuchmodel"):
        main(["--debug", "blocks", "nosuchmodel"])


def test_garbage_checkpoint_is_a_user_error(capsys, tmp_path: Path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"e")
    code, _, err = cli(capsys, "blocks", "test_convnext", "--checkpoint", str(bad))
    assert_user_error(code, err, "corrupted")


def test_fine_tuned_state_dict_loads_without_num_classes(capsys, tmp_path: Path):
    ckpt = tmp_path / "ten.pt"
    torch.save(create_model(MODEL, 10).state_dict(), ckpt)
    code, out, err = cli(capsys, "blocks", MODEL, "--img-size", "64", "--checkpoint", str(ckpt), "--format", "json")
    assert code == 0, err
    report = run_merge(*MERGE, "--plan", PLAN[0], "--checkpoint", str(ckpt), "--out", str(tmp_path / "m"))
    assert load_checkpoint(tmp_path / "m" / "merged.pt").num_classes == 10 and report["pruned"] == PLAN[0]


def test_blocks_of_a_pruned_checkpoint_marks_the_pruned_blocks(capsys, tmp_path: Path):
    from updp.pruner import Checkpoint, apply_plan, save_checkpoint

    model = apply_plan(create_model(MODEL), PLAN, lam=0.0)
    save_checkpoint(tmp_path / "p.pt", Checkpoint(model, PruningPlan(MODEL, PLAN), 1000, "pruned"))
    code, out, _ = cli(capsys, "blocks", str(tmp_path / "p.pt"), "--img-size", "64", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == ATTO_BLOCKS
    assert sorted(r["name"] for r in rows if r["pruned"]) == sorted(PLAN)


def test_merge_refuses_a_checkpoint_mid_fade(capsys, tmp_path: Path):
    from updp.pruner import Checkpoint, apply_plan, save_checkpoint

    model = apply_plan(create_model(MODEL), PLAN, lam=0.5)
    save_checkpoint(tmp_path / "p.pt", Checkpoint(model, PruningPlan(MODEL, PLAN), 1000, "pruned"))
    code, _, err = cli(capsys, "merge", str(tmp_path / "p.pt"), "--img-size", "64", "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "lambda 0.5")


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_no_supported_block_is_an_error_in_every_format(capsys, fmt: str):
    code, _, err = cli(capsys, "blocks", "test_byobnet", "--format", fmt)
    assert_user_error(code, err, "no block of a supported family", "byobnet.BasicBlock", "resnet.BasicBlock")


def test_output_files_get_the_usual_mode(merged):
    import os
    umask = os.umask(0)
    os.umask(umask)
    for name in ("merged.pt", "merged.onnx", "merge.json"):
        assert (merged[0] / name).stat().st_mode & 0o777 == 0o666 & ~umask
