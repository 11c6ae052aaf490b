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
    code, out, _ = run(capsys, "latency", "calibrate", "test_convnext", *FAST, "--backend", "onnxruntime",
                       "--no-cache", "--table", str(table), "--plans", "3", "--out", str(csv))
    assert code == 0 and "median APE" in out and len(pd.read_csv(csv)) == 3


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
