"""A target that only runs trtexec drives a search: export -> run_trtexec.sh -> import -> search.

trtexec itself is ``tests/fake_trtexec.py`` (no TensorRT here): it writes real-format logs with figures
the test chose. Everything else is the real thing: the exported ONNX, the shell script run by ``sh``,
the importer, the cache, and a whole ``updp search`` in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest

from updp.cli import main
from updp.latency.cache import LatencyCache
from updp.pruner import PruningPlan
from updp.search.remote import Manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "data" / "cifar10_demo.npz"
FAKE = Path(__file__).parent / "fake_trtexec.py"
MODEL = "test_convnext"
FAST_BLOCK = "stages.0.blocks.0"  # the one block the figures make worth pruning (alone in its shape group)
DEVICE = "NVIDIA H100 80GB HBM3 (fake trtexec)"


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def fake_trtexec(tmp_path: Path, figures: dict[str, float], version: str = "101601") -> dict[str, str]:
    """Environment for run_trtexec.sh that runs the fake trtexec with ``figures`` (ONNX stem -> ms)."""
    exe = tmp_path / "bin" / "trtexec"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    exe.chmod(0o755)
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    return {**os.environ, "TRTEXEC": str(exe), "FAKE_TRT_VERSION": version, "FAKE_TRT_DEVICE": DEVICE,
            "FAKE_TRT_FIGURES": str(tmp_path / "figures.json"), "FAKE_TRT_CALLS": str(tmp_path / "calls.jsonl")}


def script(out: Path, env: dict, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(out / "run_trtexec.sh")], env={**env, **extra}, capture_output=True,
                          text=True, timeout=300)


def calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def figures_for(manifest: Manifest, fast_ms: float = 6.0, slow_ms: float = 10.0) -> dict[str, float]:
    """Only FAST_BLOCK saves time: a plan is fast_ms with it, slow_ms without."""
    return {e["key"]: fast_ms if FAST_BLOCK in e["pruned"] else slow_ms for e in manifest.plans}


def test_export_writes_one_onnx_per_plan_the_predictor_needs(capsys, tmp_path):
    out = tmp_path / "export"
    code, stdout, _ = run(capsys, "latency", "export", MODEL, "--plans", "table", "--img-size", 32, "--out", out)
    assert code == 0 and "wrote 10 ONNX files (1 baseline, 9 single" in stdout
    m = Manifest.load(out)
    assert (m.model, m.input_shape, m.batch_size, m.precision) == (MODEL, (3, 32, 32), 1, "fp32")
    assert [e["role"] for e in m.plans] == ["baseline"] + ["single"] * 9
    assert m.plans[0]["pruned"] == [] and all(len(e["pruned"]) == 1 for e in m.plans[1:])
    for e in m.plans:
        assert e["key"] == PruningPlan(MODEL, frozenset(e["pruned"])).key
        sess = ort.InferenceSession(str(out / e["onnx"]))
        y = sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0]
        assert y.shape == (1, 1000)
    text = (out / "run_trtexec.sh").read_text()
    assert text.startswith("#!/bin/sh") and text.count("\nrun ") == 10 and "--exportTimes=" in text


def test_calibration_export_has_the_plans_the_search_fits_and_checks(capsys, tmp_path):
    out = tmp_path / "export"
    code, _, _ = run(capsys, "latency", "export", MODEL, "--img-size", 32, "--fit-plans", 3, "--held-out-plans", 2,
                     "--seed", 5, "--keep", "stages.0.blocks.0", "--out", out)
    roles = [e["role"] for e in Manifest.load(out).plans]
    assert code == 0 and roles.count("single") == 8 and roles.count("held_out") == 2 and roles.count("fit") >= 3
    assert not any(e["pruned"] == ["stages.0.blocks.0"] for e in Manifest.load(out).plans)


def test_fp16_export_is_a_float16_graph(capsys, tmp_path):
    out = tmp_path / "export"
    code, _, _ = run(capsys, "latency", "export", MODEL, "--plans", "table", "--img-size", 32, "--precision", "fp16",
                     "--out", out)
    m = Manifest.load(out)
    graph = onnx.load(str(out / m.plans[1]["onnx"])).graph
    assert code == 0 and graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("version, precision, want, refused", [
    ("101601", "fp16", ["--stronglyTyped"], []),  # TensorRT 10: a float16 ONNX built strongly typed
    ("110400", "fp16", [], ["--fp16", "--stronglyTyped"]),  # 11: always strongly typed, no precision flags
    ("101601", "fp32", [], ["--fp16", "--stronglyTyped"]),
    ("101601", "int8", ["--int8", "--fp16"], []),
])
def test_script_sets_precision_per_tensorrt_version_and_resumes(capsys, tmp_path, version, precision, want, refused):
    out = tmp_path / "export"
    plans = tmp_path / "plans.txt"
    plans.write_text("stages.1.blocks.0\n")
    assert run(capsys, "latency", "export", MODEL, "--plans", plans, "--img-size", 32, "--precision", precision,
               "--out", out)[0] == 0
    env = fake_trtexec(tmp_path, figures_for(Manifest.load(out)), version)
    done = script(out, env)
    assert done.returncode == 0, done.stderr
    made = calls(tmp_path)
    assert len(made) == 2 and all(set(want) <= set(c) and not set(refused) & set(c) for c in made)
    assert all(any(a.startswith("--exportTimes=outputs/") for a in c) for c in made)
    again = script(out, env)  # every log has its summary: nothing runs again
    assert again.returncode == 0 and len(calls(tmp_path)) == 2 and "0 timed, 2 already done" in again.stdout


def test_script_refuses_int8_on_tensorrt_11_and_an_unknown_version(capsys, tmp_path):
    out = tmp_path / "export"
    assert run(capsys, "latency", "export", MODEL, "--plans", "table", "--img-size", 32, "--precision", "int8",
               "--out", out)[0] == 0
    env = fake_trtexec(tmp_path, figures_for(Manifest.load(out)), "110400")
    done = script(out, env)
    assert done.returncode == 2 and "ModelOpt" in done.stderr and not calls(tmp_path)
    done = script(out, env, FAKE_TRT_VERSION="garbage")
    assert done.returncode == 2 and "set TRT_MAJOR" in done.stderr


def test_import_matches_outputs_to_plans_and_reports_the_rest(capsys, tmp_path):
    out, cache = tmp_path / "export", tmp_path / "cache.sqlite"
    assert run(capsys, "latency", "export", MODEL, "--plans", "table", "--img-size", 32, "--out", out)[0] == 0
    m = Manifest.load(out)
    figures = figures_for(m)
    del figures[m.plans[3]["key"]]  # its build fails: a .failed.log, no figure
    assert script(out, fake_trtexec(tmp_path, figures)).returncode == 1
    os.remove(out / "outputs" / f"{m.plans[4]['key']}.log")  # only its --exportTimes JSON is left
    (out / "outputs" / "notes.txt").write_text("mine")
    code, stdout, err = run(capsys, "latency", "import", out, "--cache", cache)
    assert code == 0 and f"imported 9 of 10 plans of {MODEL} (device: {DEVICE})" in stdout
    assert "1 plans have no output yet" in stdout and "notes.txt" in err
    # the figures the fake trtexec wrote into its logs, read back (nothing is timed here)
    found = LatencyCache(cache).find(backend="trtexec", model=MODEL, plan_key=m.plans[1]["key"], device=DEVICE)
    assert found.median_ms == pytest.approx(figures[m.plans[1]["key"]], rel=1e-5)
    assert found.input_shape == (3, 32, 32) and found.precision == "fp32"
    from_json = LatencyCache(cache).find(backend="trtexec", plan_key=m.plans[4]["key"], device=DEVICE)
    assert from_json.count == 50 and from_json.median_ms == pytest.approx(figures[m.plans[4]["key"]])


def test_a_log_of_another_plan_is_refused(capsys, tmp_path):
    out = tmp_path / "export"
    assert run(capsys, "latency", "export", MODEL, "--plans", "table", "--img-size", 32, "--out", out)[0] == 0
    m = Manifest.load(out)
    assert script(out, fake_trtexec(tmp_path, figures_for(m))).returncode == 0
    a, b = (out / "outputs" / f"{m.plans[i]['key']}.log" for i in (1, 2))
    a.write_text(b.read_text())  # plan 1's log now holds plan 2's run
    code, _, err = run(capsys, "latency", "import", out, "--cache", tmp_path / "c.sqlite")
    assert code == 1 and f"not this plan's onnx/{m.plans[1]['key']}.onnx" in err


def _search(run_dir: Path, cache: Path, *extra) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "updp", "search", "--config", str(TINY), "--data", str(DATA), "--run", str(run_dir),
            "--backend", "trtexec", "--latency-mode", "table", "--latency-device", DEVICE, "--latency-cache",
            str(cache), "--fit-plans", "2", "--trials", "6", *map(str, extra)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_search_with_missing_figures_stops_before_training_and_says_how_to_get_them(tmp_path):
    cache = tmp_path / "cache.sqlite"
    done = _search(tmp_path / "run", cache)
    assert done.returncode == 2 and "no trtexec figure" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "updp", "latency", "import", str(FAKE.parent / "fixtures" / "trtexec"
                           / "trt10.16_h100pcie_onnx_build_and_run.log"), "--model", MODEL, "--img-size", "32",
                           "--device", DEVICE, "--cache", str(cache)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = _search(tmp_path / "run2", cache)  # the baseline alone: every other plan is missing
    assert done.returncode == 2 and "have no trtexec figure" in done.stderr
    assert "updp latency export test_convnext --plans calibration --fit-plans 2" in done.stderr
    assert not (tmp_path / "run2" / "baseline.pt").exists()


def test_search_on_imported_figures_picks_the_plan_they_favour(capsys, tmp_path):
    out, cache, run_dir = tmp_path / "export", tmp_path / "cache.sqlite", tmp_path / "run"
    specs_cmd = ["latency", "export", MODEL, "--img-size", 32, "--fit-plans", 2, "--num-classes", 10, "--out", out]
    assert run(capsys, *specs_cmd)[0] == 0
    m = Manifest.load(out)
    assert script(out, fake_trtexec(tmp_path, figures_for(m))).returncode == 0
    assert run(capsys, "latency", "import", out, "--cache", cache)[0] == 0
    done = _search(run_dir, cache)  # budget_frac 0.5 of tiny.yaml: 10 - 0.5 x (10 - 6) = 8 ms
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((run_dir / "latency_table.json").read_text())
    assert table["baseline_ms"] == pytest.approx(10.0, rel=1e-5)
    assert table["saved_frac"][FAST_BLOCK] == pytest.approx(0.4, rel=1e-4)
    assert all(abs(f) < 1e-6 for b, f in table["saved_frac"].items() if b != FAST_BLOCK)
    fitted = json.loads((run_dir / "latency_model.json").read_text())
    assert fitted["held_out"]["fitted"]["plans"] == 8 and fitted["held_out"]["fitted"]["median_ape_pct"] < 1
    trials = pd.read_csv(run_dir / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert set(done["latency_source"]) == {"predicted"}
    for row in done.itertuples():  # the fitted model reproduces the figures: 6 ms with the block, 10 without
        plan = PruningPlan.from_str(MODEL, row.pruned if isinstance(row.pruned, str) else "")
        assert row.latency_ms == pytest.approx(6.0 if FAST_BLOCK in plan else 10.0, rel=0.03)  # ridge shrinkage
    summary = json.loads((run_dir / "search_summary.json").read_text())
    assert summary["context"]["backend"] == "trtexec" and summary["context"]["device"] == DEVICE
    assert FAST_BLOCK in PruningPlan.from_str(MODEL, summary["best"]["pruned"])  # the only way under 8 ms
    # every figure came from the import: the search timed nothing, so the run keeps no latency cache
    assert not (run_dir / "latency_cache.sqlite").exists()


def test_final_latency_of_a_trtexec_run_is_the_imported_figure_or_says_how_to_get_it(capsys, tmp_path):
    from updp.core.config import override
    from updp.pipeline.config import RunConfig
    from updp.pipeline.final import _imported_latency

    out, cache = tmp_path / "export", tmp_path / "cache.sqlite"
    plans = tmp_path / "plans.txt"
    plans.write_text("stages.0.blocks.0,stages.2.blocks.1\n")
    assert run(capsys, "latency", "export", MODEL, "--plans", plans, "--img-size", 32, "--out", out)[0] == 0
    m = Manifest.load(out)
    assert script(out, fake_trtexec(tmp_path, {m.plans[0]["key"]: 10.0, m.plans[1]["key"]: 5.0})).returncode == 0
    assert run(capsys, "latency", "import", out, "--cache", cache)[0] == 0
    cfg = override(RunConfig(model=MODEL), {"latency.backend": "trtexec", "latency.device": DEVICE,
                                            "latency.cache": str(cache), "latency.mode": "table"})
    got = _imported_latency(PruningPlan.from_str(MODEL, "stages.0.blocks.0,stages.2.blocks.1"), cfg, 32)
    assert got["speedup"] == pytest.approx(2.0, rel=1e-5) and got["latency_device"] == DEVICE
    other = _imported_latency(PruningPlan(MODEL, {"stages.1.blocks.0"}), cfg, 32)
    assert "no trtexec figure of the final plan" in other["latency_error"]


@pytest.mark.parametrize("extra, message", [
    (["--latency-device", DEVICE, "--latency-mode", "hybrid"], "use --latency-mode table (not hybrid)"),
    (["--latency-mode", "table"], "--backend trtexec needs --latency-device NAME"),
])
def test_a_trtexec_search_needs_table_mode_and_a_device(capsys, tmp_path, extra, message):
    code, _, err = run(capsys, "search", "--config", TINY, "--data", DATA, "--run", tmp_path / "r", "--backend",
                       "trtexec", "--latency-cache", tmp_path / "c.sqlite", *extra)
    assert code == 2 and message in err and not (tmp_path / "r").exists()
