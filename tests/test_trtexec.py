"""trtexec import: exact figures from real logs and JSON, tolerance to format drift, clear errors.

Expected numbers are copied from the fixtures' own lines (see tests/fixtures/trtexec/*.source.txt).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from updp.core.errors import UpdpError
from updp.latency.trtexec import (
    TrtexecParseError,
    parse_export_times,
    parse_file,
    parse_log,
    parse_profile_metadata,
    parse_stats,
)

FIXTURES = Path(__file__).parent / "fixtures" / "trtexec"
ONNX_RUN = FIXTURES / "trt10.16_h100pcie_onnx_build_and_run.log"
CUDA_GRAPH = FIXTURES / "trt10.16_h100pcie_loadengine_cudagraph_nodatatransfers_verbose.log"
TRT82 = FIXTURES / "trt8.2_gtx1070_loadengine_verbose.trimmed.log"
EXPORT_TIMES = FIXTURES / "trt10_rtx3060laptop_resnet18_fp16.exportTimes.head300.json"
METADATA = FIXTURES / "trt10_rtx3060laptop_resnet18_fp16.profile.metadata.json"
# SYNTHETIC, not real trtexec output: a TensorRT 11.x-style variant of CUDA_GRAPH written for these tests
# (reordered statistics, an extra 99.9% percentile, values in us, walltime in ms, unknown extra lines).
SYNTHETIC_TRT11 = FIXTURES / "synthetic_trt11_style_loadengine.log"

STATS = ("min_ms", "max_ms", "mean_ms", "median_ms", "p90_ms", "p99_ms")


def _stats(record) -> tuple[float, ...]:
    return tuple(getattr(record, name) for name in STATS)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- real logs


def test_trt10_onnx_build_and_run():
    r = parse_file(ONNX_RUN)
    # GPU Compute Time: min = 0.0331421 ms, max = 0.140381 ms, mean = 0.0359588 ms, median = 0.0361328 ms,
    # percentile(90%) = 0.0368652 ms, percentile(95%) = 0.0371094 ms, percentile(99%) = 0.041748 ms
    assert _stats(r) == (0.0331421, 0.140381, 0.0359588, 0.0361328, 0.0368652, 0.041748)
    assert r.count == 46125  # "Timing trace has 46125 queries over 3.00013 s"
    assert (r.backend, r.source, r.precision, r.ok) == ("trtexec", "trtexec", "fp32", True)
    # No --shapes: trtexec overrode the dynamic input to 1x1x28x28 ("Input binding for x with dimensions 1x1x28x28")
    assert (r.batch_size, r.input_shape) == (1, (1, 28, 28))
    assert r.context["shape_source"] == "input binding"
    assert r.context["command"] == ("trtexec --onnx=/work/trt-samples-for-hackathon-cn/cookbook/00-Data/model/"
                                    "model-trained.onnx")


def test_trt10_onnx_build_and_run_context():
    c = parse_file(ONNX_RUN).context
    assert {k: c[k] for k in ("tensorrt_version", "device", "compute_capability", "precision_line")} == {
        "tensorrt_version": "10.16.1", "device": "NVIDIA H100 PCIe", "compute_capability": "9.0",
        "precision_line": "FP32"}
    assert (c["cuda_graph"], c["spin_wait"], c["data_transfers"], c["loaded_engine"]) == (False, False, True, False)
    assert c["throughput_qps"] == 15374.3
    assert (c["host_latency_median_ms"], c["host_latency_mean_ms"], c["host_latency_p99_ms"]) == (
        0.0440674, 0.0441053, 0.0512695)
    assert (c["enqueue_median_ms"], c["h2d_median_ms"], c["d2h_median_ms"]) == (0.0267334, 0.00378418, 0.00415039)
    assert (c["total_host_walltime_s"], c["total_gpu_compute_time_s"]) == (3.00013, 1.6586)
    assert c["summary_ms"]["d2h latency"]["p95"] == 0.00427246


def test_trt10_load_engine_cuda_graph_no_data_transfers():
    r = parse_file(CUDA_GRAPH)
    assert _stats(r) == (0.0383301, 0.0651855, 0.0387646, 0.0388184, 0.0388489, 0.0390625)
    assert r.count == 74692  # "Timing trace has 74692 queries over 3.00005 s"
    assert (r.batch_size, r.input_shape) == (4, (1, 28, 28))  # --shapes=x:4x1x28x28
    c = r.context
    assert (c["cuda_graph"], c["spin_wait"], c["data_transfers"], c["loaded_engine"]) == (True, True, False, True)
    assert (c["h2d_median_ms"], c["d2h_median_ms"]) == (0.0, 0.0)
    assert c["host_latency_median_ms"] == r.median_ms  # no transfers: Latency == GPU Compute Time
    # --loadEngine prints no build options, so no Precision line: fp32 is a default, and the record says so.
    assert (r.precision, c["precision_source"]) == ("fp32", "default")
    assert "precision_line" not in c
    assert c["input_shapes"] == {"x": [4, 1, 28, 28]}


def test_trt82_old_summary_format():
    r = parse_file(TRT82)
    # GPU Compute Time: min = 0.150391 ms, max = 0.421875 ms, mean = 0.153115 ms, median = 0.152588 ms,
    # percentile(99%) = 0.156616 ms
    assert (r.min_ms, r.max_ms, r.mean_ms, r.median_ms, r.p99_ms) == (0.150391, 0.421875, 0.153115, 0.152588,
                                                                      0.156616)
    assert math.isnan(r.p90_ms)  # TensorRT 8.2 prints no 90% percentile; it is not invented
    assert r.count == 18603  # "Timing trace has 18603 queries over 3.00049 s"
    c = r.context
    assert (c["tensorrt_version"], c["device"], c["compute_capability"]) == ("8.2.3", "NVIDIA GeForce GTX 1070",
                                                                            "6.1")
    assert (r.batch_size, r.input_shape, c["input_shapes"]) == (4, (1, 28, 28), {"x:0": [4, 1, 28, 28]})
    assert c["summary_ms"]["end-to-end host latency"]["median"] == 0.289062
    assert (c["throughput_qps"], c["total_host_walltime_s"], c["total_gpu_compute_time_s"]) == (6199.99, 3.00049,
                                                                                               2.8484)
    assert c["host_latency_p99_ms"] == 0.164795


@pytest.mark.parametrize("path, version", [(TRT82, "8.2.3"), (ONNX_RUN, "10.16.1")])
def test_version_from_banner_when_no_version_line(path, version):
    text = "\n".join(line for line in _text(path).splitlines() if "TensorRT version:" not in line)
    assert parse_log(text).context["tensorrt_version"] == version  # [TensorRT v8203] / [TensorRT v101601]


def test_count_from_throughput_and_walltime_without_trace_line():
    text = "\n".join(line for line in _text(ONNX_RUN).splitlines() if "Timing trace has" not in line)
    assert parse_log(text).count == round(15374.3 * 3.00013) == 46125


@pytest.mark.parametrize("line, precision", [("FP32+FP16", "fp16"), ("FP32+INT8", "int8"),
                                             ("FP32+FP16+INT8", "int8"), ("FP32", "fp32")])
def test_precision_from_precision_line(line, precision):
    text = _text(ONNX_RUN).replace("[I] Precision: FP32", f"[I] Precision: {line}")
    assert parse_log(text).precision == precision


def test_overrides_win():
    r = parse_file(CUDA_GRAPH, precision="fp16", batch_size=8, input_shape=(3, 32, 32))
    assert (r.precision, r.batch_size, r.input_shape) == ("fp16", 8, (3, 32, 32))
    assert (r.context["precision_source"], r.context["shape_source"]) == ("override", "override")


def test_records_serialize_to_json():
    for path in (ONNX_RUN, CUDA_GRAPH, TRT82, EXPORT_TIMES, METADATA, SYNTHETIC_TRT11):
        d = json.loads(json.dumps(parse_file(path).as_dict()))
        assert d["backend"] == "trtexec" and d["context"]


# ---------------------------------------------------------------- tolerance (TensorRT 11.x style, units)


def test_synthetic_trt11_style_log_parses_like_its_trt10_origin():
    r, origin = parse_file(SYNTHETIC_TRT11), parse_file(CUDA_GRAPH)
    assert _stats(r) == pytest.approx(_stats(origin), rel=1e-12)  # GPU Compute Time given in us, reordered
    assert r.count == origin.count == 74692
    assert r.context["tensorrt_version"] == "11.4.0"
    assert r.context["summary_ms"]["gpu compute time"]["p99.9"] == pytest.approx(0.0412598, rel=1e-12)
    assert r.context["enqueue_median_ms"] == pytest.approx(0.00195312, rel=1e-12)
    assert r.context["total_host_walltime_s"] == pytest.approx(3.00005, rel=1e-12)  # "3000.05 ms"
    assert "gpu compute time coefficient of variation" not in r.context["summary_ms"]
    assert (r.precision, r.context["precision_source"]) == ("fp32", "default")


def test_stats_any_order_any_percentiles_and_units():
    stats = parse_stats("percentile(99.9%) = 3 ms, median = 1500 us, p95 = 0.002 s, max = 4000000 ns, mean=1.25")
    assert stats == pytest.approx({"p99.9": 3.0, "median": 1.5, "p95": 2.0, "max": 4.0, "mean": 1.25}, rel=1e-12)


def test_log_line_in_microseconds():
    log = ("[I] === Performance summary ===\n"
           "[I] Throughput: 1000 qps\n"
           "[I] GPU Compute Time: min = 900 us, max = 1500 us, mean = 1000 us, median = 990 us, "
           "percentile(90%) = 1100 us, percentile(99%) = 1400 us\n"
           "[I] Total Host Walltime: 2 s\n")
    r = parse_log(log)
    assert _stats(r) == pytest.approx((0.9, 1.5, 1.0, 0.99, 1.1, 1.4), rel=1e-12)
    assert r.count == 2000  # no trace line: Throughput x Total Host Walltime
    assert (r.batch_size, r.input_shape, r.context["shape_source"]) == (1, (), "default")


# ---------------------------------------------------------------- JSON


def _nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(1, math.ceil(q / 100 * len(sorted_values))) - 1]


def test_export_times_statistics_match_an_independent_computation():
    records = json.loads(_text(EXPORT_TIMES))
    compute = sorted(r["computeMs"] for r in records)
    r = parse_file(EXPORT_TIMES)
    assert len(records) == r.count == 300
    assert (r.min_ms, r.max_ms) == (compute[0], compute[-1])
    assert (r.median_ms, r.mean_ms) == (statistics.median(compute), statistics.fmean(compute))
    assert (r.p90_ms, r.p99_ms) == (_nearest_rank(compute, 90), _nearest_rank(compute, 99))
    assert parse_export_times(records) == r


def test_export_times_context_and_overrides():
    records = json.loads(_text(EXPORT_TIMES))
    r = parse_file(EXPORT_TIMES, precision="fp16", batch_size=1, input_shape=(3, 224, 224))
    assert (r.precision, r.batch_size, r.input_shape) == ("fp16", 1, (3, 224, 224))
    c = r.context
    assert c["mean_latency_ms"] == statistics.fmean(rec["latencyMs"] for rec in records)
    assert (c["mean_h2d_ms"], c["mean_d2h_ms"]) == (0.0, 0.0)  # --noDataTransfers
    assert c["span_ms"] == records[-1]["endD2hMs"] - records[0]["startH2dMs"]
    assert c["throughput_qps"] == pytest.approx(300 / c["span_ms"] * 1e3)


def test_profile_metadata_parses_to_the_summary():
    r = parse_file(METADATA)
    # "GPU Compute Time": [0.273438, 0.287109, 0.276981, 0.276855, 0.278809, 0.279785, 0.280762]
    assert _stats(r) == (0.273438, 0.287109, 0.276981, 0.276855, 0.278809, 0.280762)
    assert r.count == 10742  # round(3580.05 qps x 3.00052 s)
    c = r.context
    assert (c["device"], c["compute_capability"]) == ("NVIDIA GeForce RTX 3060 Laptop GPU", "8.6")
    assert (c["cuda_graph"], c["spin_wait"], c["data_transfers"]) == (True, True, False)
    assert (c["throughput_qps"], c["total_host_walltime_s"], c["total_gpu_compute_time_s"]) == (3580.05, 3.00052,
                                                                                               2.97533)
    assert c["summary_ms"]["enqueue time"]["p99"] == 0.00537109
    assert parse_profile_metadata(json.loads(_text(METADATA))) == r


# ---------------------------------------------------------------- errors


def _raises(path: Path, fragment: str) -> None:
    with pytest.raises(TrtexecParseError) as info:
        parse_file(path)
    message = str(info.value)
    assert isinstance(info.value, UpdpError)
    assert str(path) in message and fragment in message and "\n" not in message


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.log", "", "empty"),
    ("blank.log", " \n\n\t\n", "empty"),
    ("garbage.log", "\x00\x01 not a trtexec log \xff at all", "Performance summary"),
    ("garbage.json", "this is not json", "unreadable JSON"),
    ("truncated.json", '[\n  { "startEnqMs" : 1.0, "computeMs" : ', "unreadable JSON"),
    ("empty_array.json", "[]", "no records"),
    ("no_compute.json", '[{"latencyMs": 1.0}]', "computeMs"),
    ("other.json", '{"layers": []}', "performance_summary"),
    ("bad_metadata.json", '{"performance_summary": {"GPU Compute Time": [1, 2]}}', "GPU Compute Time"),
    ("list_summary.json", '{"performance_summary": [1, 2]}', "GPU Compute Time"),
])
def test_unusable_files_raise(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    _raises(path, fragment)


def test_log_without_summary_raises(tmp_path):
    text = _text(ONNX_RUN)
    path = tmp_path / "no_summary.log"
    path.write_text(text[:text.index("=== Performance summary ===")], encoding="utf-8")
    _raises(path, "Performance summary")


def test_summary_without_gpu_compute_time_raises(tmp_path):
    path = tmp_path / "no_gpu_line.log"
    path.write_text("\n".join(line for line in _text(ONNX_RUN).splitlines() if "] GPU Compute Time:" not in line),
                    encoding="utf-8")
    _raises(path, "GPU Compute Time")


def test_missing_file_raises(tmp_path):
    _raises(tmp_path / "missing.log", "cannot read")


# ---------------------------------------------------------------- impossible figures (a doctored or damaged file)


def _gpu_line_edited(old: str, new: str) -> str:
    """ONNX_RUN with ``old`` replaced by ``new`` in its GPU Compute Time line only."""
    lines = _text(ONNX_RUN).splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if "] GPU Compute Time:" in line)
    assert old in lines[i]
    lines[i] = lines[i].replace(old, new)
    return "".join(lines)


@pytest.mark.parametrize("old, new, fragment", [
    ("median = 0.0361328 ms", "median = -0.0361328 ms", "median = -0.0361328 ms"),
    ("median = 0.0361328 ms", "median = 0 ms", "median = 0 ms"),
    ("min = 0.0331421 ms", "min = -1 us", "min = -0.001 ms"),
    ("percentile(99%) = 0.041748 ms", "percentile(99%) = inf ms", "p99 = inf ms"),
    ("median = 0.0361328 ms, ", "", "no median"),
], ids=["negative-median", "zero-median", "negative-min", "infinite-p99", "no-median"])
def test_log_with_impossible_gpu_compute_times_raises(tmp_path, old, new, fragment):
    path = tmp_path / "doctored.log"
    path.write_text(_gpu_line_edited(old, new), encoding="utf-8")
    _raises(path, fragment)


def test_log_with_zero_throughput_raises(tmp_path):
    path = tmp_path / "zero.log"
    path.write_text("[I] === Performance summary ===\n[I] Throughput: 0 qps\n"
                    "[I] GPU Compute Time: min = 0.9 ms, max = 1.5 ms, mean = 1 ms, median = 0.99 ms\n"
                    "[I] Total Host Walltime: 2 s\n", encoding="utf-8")
    _raises(path, "no timed queries")


@pytest.mark.parametrize("value", [-0.27832, 0.0, "NaN"])
def test_export_times_with_impossible_per_run_times_raise(tmp_path, value):
    records = json.loads(_text(EXPORT_TIMES))
    records[5]["computeMs"] = value
    path = tmp_path / "doctored.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    _raises(path, "record 6 has computeMs")


def test_profile_metadata_with_a_negative_median_raises(tmp_path):
    data = json.loads(_text(METADATA))
    data["performance_summary"]["GPU Compute Time"][3] = -0.276855
    path = tmp_path / "doctored.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    _raises(path, "median = -0.276855 ms")
