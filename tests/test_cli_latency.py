"""``updp latency``: measure, import, table, calibrate, and their errors."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from updp.cli import main
from updp.latency.cache import LatencyCache

FIXTURES = Path(__file__).parent / "fixtures" / "trtexec"
FAST = ["--img-size", "64", "--runs", "10", "--min-time", "0.05", "--threads", "2"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_measure_json_then_cached(capsys, tmp_path):
    argv = ["latency", "test_convnext", *FAST, "--cache", str(tmp_path / "c.sqlite"), "--format", "json"]
    code, out, err = run(capsys, *argv)
    first = json.loads(out)
    assert code == 0 and "picked onnxruntime" in err
    assert {"median_ms", "mean_ms", "p90_ms", "p99_ms", "count", "backend", "cached"} <= set(first)
    assert first["backend"] == "onnxruntime" and first["cached"] is False and first["count"] >= 10
    code, out, _ = run(capsys, *argv)
    assert json.loads(out)["cached"] is True and json.loads(out)["median_ms"] == first["median_ms"]


def test_measure_text_shows_context(capsys, tmp_path):
    code, out, _ = run(capsys, "latency", "measure", "test_convnext", *FAST, "--backend", "torch",
                       "--plan", "stages.2.blocks.1", "--no-cache")
    assert code == 0
    for word in ("median", "p99", "count", "backend torch", "batch 1", "input 3x64x64", "device:", "torch:"):
        assert word in out


def test_import_log_and_find_it_in_the_cache(capsys, tmp_path):
    cache = tmp_path / "c.sqlite"
    code, out, _ = run(capsys, "latency", "import", str(FIXTURES / "trt10.16_h100pcie_onnx_build_and_run.log"),
                       "--model", "convnext_atto", "--cache", str(cache), "--format", "json")
    record = json.loads(out)
    assert code == 0 and record["median_ms"] == 0.0361328  # GPU Compute Time median in the log
    found = LatencyCache(cache).find(backend="trtexec", model="convnext_atto", plan_key=record["plan_key"])
    assert found.median_ms == 0.0361328 and found.context["device"] == "NVIDIA H100 PCIe"


def test_import_export_times_needs_a_device(capsys, tmp_path):
    path = FIXTURES / "trt10_rtx3060laptop_resnet18_fp16.exportTimes.head300.json"
    code, _, err = run(capsys, "latency", "import", str(path), "--model", "resnet18", "--cache", str(tmp_path / "c"))
    assert code == 2 and "pass --device" in err
    code, out, _ = run(capsys, "latency", "import", str(path), "--model", "resnet18", "--device", "RTX 3060",
                       "--precision", "fp16", "--plan", "layer1.0", "--cache", str(tmp_path / "c"), "--format", "json")
    record = json.loads(out)
    assert code == 0 and record["count"] == 300 and record["precision"] == "fp16" and record["pruned"] == ["layer1.0"]
    assert record["input_shape"] == [3, 224, 224]


def test_import_garbage_is_a_one_line_error(capsys, tmp_path):
    bad = tmp_path / "bad.log"
    bad.write_text("hello\n")
    code, _, err = run(capsys, "latency", "import", str(bad), "--model", "resnet18", "--cache", str(tmp_path / "c"))
    assert code == 2 and err.startswith("updp: error:") and len(err.strip().splitlines()) == 1


def test_table_then_calibrate(capsys, tmp_path):
    table = tmp_path / "t.json"
    code, out, _ = run(capsys, "latency", "table", "test_convnext", *FAST, "--backend", "onnxruntime",
                       "--no-cache", "--out", str(table))
    assert code == 0 and "baseline" in out and table.is_file()
    saved = json.loads(table.read_text())["saved_frac"]
    assert len(saved) == 9  # every test_convnext block is worthwhile
    csv = tmp_path / "cal.csv"
    model = tmp_path / "m.json"
    code, out, _ = run(capsys, "latency", "calibrate", "test_convnext", *FAST, "--backend", "onnxruntime",
                       "--no-cache", "--table", str(table), "--plans", "3", "--fit", "6", "--out", str(csv),
                       "--model-out", str(model))
    assert code == 0 and "per-block table vs measurement on 3 held-out" in out and len(pd.read_csv(csv)) == 3
    assert "fitted latency model (15 plans fitted) on the same 3 held-out plans" in out
    fitted = json.loads(model.read_text())
    assert len(fitted["fit_plans"]) == 15 and fitted["held_out"]["plans"] == 3
    held = set(pd.read_csv(csv, keep_default_na=False).pruned)
    assert not held & {p["pruned"] for p in fitted["fit_plans"]}  # judged only on plans it was not fitted on


@pytest.mark.parametrize("argv,fragment", [
    (["latency", "test_convnext", "--backend", "tensorrt"], 'pip install "updp[trt]"'),
    (["latency", "no_such_model"], "unknown model"),
    (["latency", "test_convnext", "--plan", "stages.9.blocks.9"], "not in the model"),
])
def test_bad_input_is_one_line(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    errors = [line for line in err.strip().splitlines() if line.startswith("updp: error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and fragment in errors[0]


def test_bad_backend_name_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["latency", "test_convnext", "--backend", "openvino"])
    assert e.value.code == 2


def _one_line_error(code, out, err, fragment):
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("updp: error:"), err
    assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- --cache that is not ours


@pytest.mark.parametrize("command", [
    ["latency", "import", str(FIXTURES / "trt10.16_h100pcie_onnx_build_and_run.log"), "--model", "convnext_atto"],
    ["latency", "measure", "test_convnext", *FAST],
], ids=["import", "measure"])
@pytest.mark.parametrize("kind", ["csv", "directory"])
def test_a_cache_path_that_is_not_ours_is_refused_untouched(capsys, tmp_path, command, kind):
    path = tmp_path / ("results.csv" if kind == "csv" else "results")
    if kind == "csv":
        path.write_text("model,median_ms\nresnet18,1.25\n")
    else:
        path.mkdir()
    code, out, err = run(capsys, *command, "--cache", str(path))
    _one_line_error(code, out, err, "choose another --cache")
    assert str(path) in err and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    if kind == "csv":
        assert path.read_text() == "model,median_ms\nresnet18,1.25\n"  # the user's file, byte for byte
    else:
        assert path.is_dir()


# ---------------------------------------------------------------- import: nothing stored unless it is sound


def _import_file(tmp_path: Path, case: str) -> Path:
    """A fixture, or a copy doctored the way ``case`` says."""
    log = FIXTURES / "trt10.16_h100pcie_onnx_build_and_run.log"
    if case == "log":
        return log
    path = tmp_path / f"{case}{'.log' if case.endswith('log') else '.json'}"
    if case == "negative-median-log":
        text = log.read_text()
        assert text.count("median = 0.0361328 ms") == 1  # the GPU Compute Time line
        path.write_text(text.replace("median = 0.0361328 ms", "median = -0.0361328 ms"))
    elif case == "negative-run-export-times":
        records = json.loads((FIXTURES / "trt10_rtx3060laptop_resnet18_fp16.exportTimes.head300.json").read_text())
        records[5]["computeMs"] = -records[5]["computeMs"]
        path.write_text(json.dumps(records))
    elif case == "zero-median-metadata":
        data = json.loads((FIXTURES / "trt10_rtx3060laptop_resnet18_fp16.profile.metadata.json").read_text())
        data["performance_summary"]["GPU Compute Time"][3] = 0
        path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case, extra, fragment", [
    ("negative-median-log", [], "median = -0.0361328 ms is not a positive time"),
    ("negative-run-export-times", ["--device", "RTX 3060"], "record 6 has computeMs = -0.27"),
    ("zero-median-metadata", [], "median = 0 ms is not a positive time"),
    ("log", ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ("log", ["--batch-size", "-4"], "--batch-size must be a positive integer, got -4"),
    ("log", ["--img-size", "0"], "--img-size must be a positive integer, got 0"),
    ("log", ["--img-size", "-64"], "--img-size must be a positive integer, got -64"),
    ("log", ["--plan", "stages.1.blocks.0,stages.9.blocks.9,head.fc"],
     "convnext_atto has no block stages.9.blocks.9, head.fc"),
    ("log", ["--model", "no_such_model"], "unknown model 'no_such_model'"),
], ids=["negative-median", "negative-run", "zero-median", "batch-0", "batch-negative", "img-0", "img-negative",
        "unknown-plan", "unknown-model"])
def test_import_refuses_before_storing_anything(capsys, tmp_path, case, extra, fragment):
    cache = tmp_path / "c.sqlite"
    LatencyCache(cache)
    code, out, err = run(capsys, "latency", "import", str(_import_file(tmp_path, case)), "--model", "convnext_atto",
                         *extra, "--cache", str(cache))
    _one_line_error(code, out, err, fragment)
    assert len(LatencyCache(cache)) == 0


def test_import_unknown_plan_says_how_to_list_blocks(capsys, tmp_path):
    code, out, err = run(capsys, "latency", "import", str(_import_file(tmp_path, "log")), "--model", "convnext_atto",
                         "--plan", "stages.1.blocks.0,layer1.0", "--cache", str(tmp_path / "c.sqlite"))
    _one_line_error(code, out, err, "'updp blocks convnext_atto'")
    assert "layer1.0" in err and "stages.1.blocks.0" not in err


def test_import_known_plan_is_stored(capsys, tmp_path):
    cache = tmp_path / "c.sqlite"
    code, out, _ = run(capsys, "latency", "import", str(_import_file(tmp_path, "log")), "--model", "convnext_atto",
                       "--plan", "stages.1.blocks.0,stages.2.blocks.1", "--cache", str(cache), "--format", "json")
    assert code == 0 and json.loads(out)["pruned"] == ["stages.1.blocks.0", "stages.2.blocks.1"]
    assert len(LatencyCache(cache)) == 1


# ---------------------------------------------------------------- measure / table / calibrate: arguments first


BAD_MEASURE_ARGS = [("--batch-size", "0"), ("--batch-size", "-1"), ("--img-size", "0"), ("--img-size", "-32"),
                    ("--runs", "0"), ("--runs", "-5"), ("--threads", "0"), ("--threads", "-2"),
                    ("--num-classes", "0"), ("--min-time", "0"), ("--min-time", "-1"), ("--min-time", "nan"),
                    ("--timeout", "0"), ("--timeout", "-5"), ("--timeout", "inf")]


@pytest.mark.parametrize("command, flag, value", [
    *[(c, f, v) for c in ("measure", "table", "calibrate") for f, v in BAD_MEASURE_ARGS],
    ("calibrate", "--plans", "0"), ("calibrate", "--plans", "-3"),
])
def test_measure_arguments_are_checked_before_any_model_is_built(capsys, tmp_path, command, flag, value):
    # An unknown model and a missing table: had either been looked at first, the error would name them instead.
    cache = tmp_path / "c.sqlite"
    table = ["--table", str(tmp_path / "missing.json")] if command == "calibrate" else []
    code, out, err = run(capsys, "latency", command, "no_such_model", *table, flag, value, "--cache", str(cache))
    _one_line_error(code, out, err, f"{flag} must be a positive")
    assert f"got {value}" in err and not cache.exists()
