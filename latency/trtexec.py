"""Import latencies that trtexec measured: a text log, an ``--exportTimes`` JSON, or a profile-metadata JSON.

Each becomes a :class:`LatencyResult` with ``backend="trtexec"`` and ``source="trtexec"`` whose statistics are
trtexec's **GPU Compute Time** per query, in ms (one query runs one batch). The log's summary lines are read
tolerantly, because the format has drifted across releases (8.x prints only ``percentile(99%)`` and an
``End-to-End Host Latency`` line; 10.x prints 90/95/99 by default): ``name: stat = value unit, ...`` with the
stats in any order, any percentiles, units ns/us/ms/s, and unknown lines ignored.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from updp.core.errors import UpdpError
from updp.latency.result import LatencyResult, summarize

_TO_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "sec": 1e3}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan"
_PREFIX = re.compile(r"^\s*(?:\[\d[^\]]*\]\s*)?(?:\[[IVWEF]\]\s*)?")  # "[07/07/2026-02:11:29] [I] "
_STAT = re.compile(rf"\b(min|max|mean|median|percentile\(\s*([\d.]+)\s*%?\s*\)|p(\d+(?:\.\d+)?))\s*[=:]?\s*"
                   rf"({_NUM})\s*(ns|us|µs|ms|sec|s)?\b", re.IGNORECASE)
_QUANTITY = re.compile(rf"^({_NUM})\s*([a-zA-Zµ/%]*)\s*$")
_HEADER = re.compile(r"^=+\s*performance summary\s*=+$", re.IGNORECASE)
_RUNNING = re.compile(r"^&&&& RUNNING TensorRT\.trtexec\b.*?#\s*(.*)$", re.MULTILINE)
_BANNER = re.compile(r"\[TensorRT v(\d+)\]")
_TRACE = re.compile(r"Timing trace has (\d+) queries")
_BINDING = re.compile(r"\b(?:Created input binding|Input binding) for (\S+) with dimensions ([\dx]+)")
_GPU_COMPUTE = ("gpu compute time", "gpu compute", "gpu latency")
_HOST_LATENCY = ("latency", "host latency")


class TrtexecParseError(UpdpError):
    """A trtexec output that has no usable performance figures (empty, unreadable, no summary)."""


def parse_file(path: str | Path, **overrides: Any) -> LatencyResult:
    """A record from a trtexec text log, ``--exportTimes`` JSON or profile-metadata JSON, told apart by content.

    Args:
        path: The file trtexec (or trex) wrote.
        **overrides: ``precision``, ``batch_size``, ``input_shape``: what the file does not say, or says wrongly.

    Raises:
        TrtexecParseError: The file is empty, is broken JSON, has no performance summary, or has figures no real
            run prints (a GPU time that is not positive, no median, no timed query).
    """
    path = Path(path)
    try:
        return _parse_text(path.read_text(encoding="utf-8", errors="replace"), path.suffix.lower(), overrides)
    except TrtexecParseError as err:
        raise TrtexecParseError(f"{path}: {err}") from None
    except OSError as err:
        raise TrtexecParseError(f"{path}: cannot read it ({err.strerror or err})") from None


def _parse_text(text: str, suffix: str, overrides: Mapping[str, Any]) -> LatencyResult:
    stripped = text.strip()
    if not stripped:
        raise TrtexecParseError("the file is empty; rerun trtexec and save its full output")
    if suffix == ".json" or stripped.startswith("{") or re.match(r"\[\s*[{\]]", stripped):
        return _parse_json(stripped, overrides)
    return parse_log(text, **overrides)


def _parse_json(text: str, overrides: Mapping[str, Any]) -> LatencyResult:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TrtexecParseError(f"unreadable JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if isinstance(data, list):
        return parse_export_times(data, **overrides)
    if isinstance(data, dict) and "performance_summary" in data:
        return parse_profile_metadata(data, **overrides)
    raise TrtexecParseError("JSON is neither an --exportTimes array of records nor an object with "
                            "'performance_summary'")


# ---------------------------------------------------------------- text log


def parse_log(text: str, *, precision: str | None = None, batch_size: int | None = None,
              input_shape: Sequence[int] | None = None) -> LatencyResult:
    """A record from a trtexec text log's ``=== Performance summary ===``.

    The statistics come from the ``GPU Compute Time`` line. A percentile the log does not print (TensorRT 8.x
    prints no 90%) stays NaN. ``count`` is the number of timed queries.

    Args:
        text: The whole log (stdout and stderr of one trtexec run).
        precision: Overrides the one read from the ``Precision:`` option line. That line shows this run's build
            flags, so pass the engine's precision for ``--loadEngine`` runs and TensorRT 11 (strongly typed).
        batch_size: Overrides the first dimension of the first input's shape.
        input_shape: Overrides the first input's shape without its batch dimension.

    Raises:
        TrtexecParseError: No summary, or no GPU Compute Time in it.
    """
    lines = [_PREFIX.sub("", line).strip() for line in text.splitlines()]
    metrics, scalars = _parse_summary(_summary_lines(lines))
    gpu = _first(metrics, _GPU_COMPUTE)
    if gpu is None:
        raise TrtexecParseError("the performance summary has no 'GPU Compute Time: min = ..., median = ...' line")
    command = _command(text)
    shapes, shape_source = _log_shapes(lines, command)
    precision_line = _option(lines, "Precision")
    context = {**_log_context(lines, text, command, precision_line), **_summary_context(metrics, scalars),
               "input_shapes": {name: list(dims) for name, dims in shapes.items()}, "shape_source": shape_source}
    fields = _fields(precision, _precision_from(precision_line), batch_size, input_shape, shapes, context)
    return _record(gpu, _log_count(lines, scalars), fields)


def _summary_lines(lines: list[str]) -> list[str]:
    """The lines of the last performance summary, up to the next ``===`` section or ``&&&&`` line."""
    starts = [i for i, line in enumerate(lines) if _HEADER.match(line)]
    if not starts:
        raise TrtexecParseError("no '=== Performance summary ===' (did inference run? --skipInference and "
                                "failed runs print none)")
    block = []
    for line in lines[starts[-1] + 1:]:
        if line.startswith(("===", "&&&&")):
            break
        block.append(line)
    return block


def _parse_summary(block: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, tuple[float, str]]]:
    """``name: stats`` lines as {name: {stat: ms}}; ``name: value unit`` lines as {name: (value, unit)}."""
    metrics: dict[str, dict[str, float]] = {}
    scalars: dict[str, tuple[float, str]] = {}
    for line in block:
        name, sep, rest = line.partition(":")
        if not sep or not name.strip():
            continue
        key = " ".join(name.lower().split())
        stats = parse_stats(rest)
        quantity = _QUANTITY.match(rest.strip())
        if stats:
            metrics.setdefault(key, stats)
        elif quantity:
            scalars.setdefault(key, (float(quantity.group(1)), quantity.group(2)))
    return metrics, scalars


def parse_stats(text: str) -> dict[str, float]:
    """``min = 1 ms, median = 2 us, percentile(99%) = 3 ms`` as ``{"min": 1.0, "median": 0.002, "p99": 3.0}``.

    Values are converted to ms; a value without a unit is taken as ms.
    """
    stats: dict[str, float] = {}
    for m in _STAT.finditer(text):
        name, q_paren, q_short, value, unit = m.groups()
        q = q_paren or q_short
        key = f"p{float(q):g}" if q else name.lower()
        stats.setdefault(key, float(value) * _TO_MS[(unit or "ms").lower()])
    return stats


def _first(mapping: Mapping[str, Any], names: Sequence[str]) -> Any:
    return next((mapping[n] for n in names if n in mapping), None)


def _option(lines: list[str], name: str) -> str | None:
    """The value of the first ``name: value`` line (trtexec prints its options before anything else)."""
    pattern = re.compile(rf"^{re.escape(name)}\s*:\s*(.*)$", re.IGNORECASE)
    return next((m.group(1).strip() for m in map(pattern.match, lines) if m), None)


def _command(text: str) -> str | None:
    m = _RUNNING.search(text)
    return m.group(1).strip() if m else None


def _log_count(lines: list[str], scalars: Mapping[str, tuple[float, str]]) -> int:
    """Queries timed: the ``Timing trace has N queries`` line, else throughput x walltime."""
    for line in lines:
        m = _TRACE.search(line)
        if m:
            return int(m.group(1))
    qps, wall_s = scalars.get("throughput"), _seconds(scalars.get("total host walltime"))
    if qps is None or wall_s is None:
        raise TrtexecParseError("no query count: neither 'Timing trace has N queries' nor Throughput and "
                                "Total Host Walltime in the summary")
    return round(qps[0] * wall_s)


def _seconds(quantity: tuple[float, str] | None) -> float | None:
    if quantity is None:
        return None
    value, unit = quantity
    return value * _TO_MS.get(unit.lower(), 1e3) / 1e3  # trtexec prints walltimes in s


def _log_context(lines: list[str], text: str, command: str | None, precision_line: str | None) -> dict[str, Any]:
    version = _option(lines, "TensorRT version") or _banner_version(text)
    context = {"tensorrt_version": version, "device": _option(lines, "Selected Device"),
               "compute_capability": _option(lines, "Compute Capability"), "precision_line": precision_line,
               "command": command, "loaded_engine": None if command is None else "--loadEngine" in command,
               **_flags(lines, command)}
    return {k: v for k, v in context.items() if v is not None}


def _banner_version(text: str) -> str | None:
    """``[TensorRT v8203]`` is 8.2.3 (major*1000 + minor*100 + patch); ``v101601`` is 10.16.1 (major*10000 ...)."""
    m = _BANNER.search(text)
    if not m:
        return None
    n = int(m.group(1))
    major, rest = divmod(n, 10000) if n >= 100000 else divmod(n, 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _flags(lines: list[str], command: str | None) -> dict[str, bool | None]:
    """CUDA graph, spin-wait and data transfers: from the option lines, else from the command's flags."""
    argv = _argv(command)

    def flag(option: str, cli: str, enabled_when_present: bool) -> bool | None:
        value = _option(lines, option)
        if value is not None:
            return value.lower().startswith("enabled")
        return None if command is None else (cli in argv) == enabled_when_present

    return {"cuda_graph": flag("CUDA Graph", "--useCudaGraph", True),
            "spin_wait": flag("Spin-wait", "--useSpinWait", True),
            "data_transfers": flag("Data transfers", "--noDataTransfers", False)}


def _argv(command: str | None) -> list[str]:
    if not command:
        return []
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote in a path
        return command.split()


def _summary_context(metrics: Mapping[str, Mapping[str, float]],
                     scalars: Mapping[str, tuple[float, str]]) -> dict[str, Any]:
    host = _first(metrics, _HOST_LATENCY) or {}
    picks = {"host_latency_median_ms": host.get("median"), "host_latency_mean_ms": host.get("mean"),
             "host_latency_p99_ms": host.get("p99"),
             "enqueue_median_ms": metrics.get("enqueue time", {}).get("median"),
             "h2d_median_ms": metrics.get("h2d latency", {}).get("median"),
             "d2h_median_ms": metrics.get("d2h latency", {}).get("median"),
             "throughput_qps": (scalars.get("throughput") or (None,))[0],
             "total_host_walltime_s": _seconds(scalars.get("total host walltime")),
             "total_gpu_compute_time_s": _seconds(scalars.get("total gpu compute time"))}
    context = {k: v for k, v in picks.items() if v is not None}
    context["summary_ms"] = {name: dict(stats) for name, stats in metrics.items()}
    return context


def _log_shapes(lines: list[str], command: str | None) -> tuple[dict[str, tuple[int, ...]], str]:
    """Input shapes by name, and where they came from: --shapes, the inference-shape option line, or bindings."""
    for arg in _argv(command):
        if arg.startswith("--shapes="):
            return _shape_spec(arg[len("--shapes="):], ":"), "--shapes"
    option = _option(lines, "Input inference shapes") or _option(lines, "Input inference shape")
    if option and "=" in option:
        return _shape_spec(option, "="), "Input inference shape option"
    bindings = [m.groups() for m in map(_BINDING.search, lines) if m]
    if bindings:
        return {name: _dims(dims) for name, dims in bindings}, "input binding"
    return {}, "default"


def _shape_spec(spec: str, sep: str) -> dict[str, tuple[int, ...]]:
    """``x:0:4x1x28x28,y:1x10`` (sep ':') or ``x:0=4x1x28x28`` (sep '='): names may hold the separator."""
    shapes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, dims = item.rpartition(sep)
        shapes[name] = _dims(dims)
    return shapes


def _dims(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.strip().split("x") if d)
    except ValueError:
        raise TrtexecParseError(f"cannot read the shape '{text}' (expected e.g. 4x3x224x224)") from None


def _precision_from(line: str | None) -> str:
    """``FP32+FP16`` is fp16; INT8 (and FP8) win over FP16, which wins over BF16; no line means fp32."""
    text = (line or "").upper()
    return next((name.lower() for name in ("INT8", "FP8", "FP16", "BF16") if name in text), "fp32")


# ---------------------------------------------------------------- shared record building


def _fields(precision: str | None, found_precision: str, batch_size: int | None,
            input_shape: Sequence[int] | None, shapes: Mapping[str, tuple[int, ...]],
            context: dict[str, Any]) -> dict[str, Any]:
    """precision, batch_size, input_shape and context: overrides first, then the file, then batch 1 and ()."""
    first = next(iter(shapes.values()), ())
    context["precision_source"] = "override" if precision else ("log" if context.get("precision_line") else "default")
    if batch_size is not None or input_shape is not None:
        context["shape_source"] = "override"
    context.setdefault("shape_source", "default")
    return {"precision": precision or found_precision,
            "batch_size": int(batch_size if batch_size is not None else (first[0] if first else 1)),
            "input_shape": tuple(input_shape if input_shape is not None else first[1:]), "context": context}


_EDITED = "the file looks edited or damaged: import trtexec's unedited output"


def _check_figures(gpu: Mapping[str, float], count: int) -> None:
    """Refuse what no real run prints: no median, a time that is not a positive number, no timed query."""
    if "median" not in gpu:
        raise TrtexecParseError(f"GPU Compute Time has no median; {_EDITED}")
    for name, value in gpu.items():
        if not (math.isfinite(value) and value > 0):
            raise TrtexecParseError(f"GPU Compute Time {name} = {value:g} ms is not a positive time; {_EDITED}")
    if count <= 0:
        raise TrtexecParseError(f"no timed queries (count {count}); {_EDITED}")


def _record(gpu: Mapping[str, float], count: int, fields: Mapping[str, Any]) -> LatencyResult:
    _check_figures(gpu, count)
    nan = math.nan
    return LatencyResult(backend="trtexec", source="trtexec", median_ms=gpu.get("median", nan),
                         mean_ms=gpu.get("mean", nan), p90_ms=gpu.get("p90", nan), p99_ms=gpu.get("p99", nan),
                         min_ms=gpu.get("min", nan), max_ms=gpu.get("max", nan), count=count, **fields)


# ---------------------------------------------------------------- JSON


def parse_export_times(records: Sequence[Mapping[str, Any]], *, precision: str | None = None,
                       batch_size: int | None = None, input_shape: Sequence[int] | None = None) -> LatencyResult:
    """A record from ``trtexec --exportTimes`` records: statistics of ``computeMs``, one record per query.

    Median and mean as :func:`summarize` computes them; p90/p99 are nearest-rank. The JSON holds no device,
    precision or shape, so pass them (precision defaults to fp32, batch to 1, shape to ()).

    Raises:
        TrtexecParseError: No records, or records without a numeric ``computeMs``.
    """
    compute = _column(records, "computeMs")
    context: dict[str, Any] = {"percentile_rule": "nearest-rank"}
    for key in ("latencyMs", "h2dMs", "d2hMs"):
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if values:
            context[f"mean_{key[:-2]}_ms"] = statistics.fmean(values)
    context.update(_span(records))
    fields = _fields(precision, "fp32", batch_size, input_shape, {}, context)
    return summarize(compute, backend="trtexec", source="trtexec", **fields)


def _column(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    if not records:
        raise TrtexecParseError("the --exportTimes array has no records; was the run shorter than the warm-up?")
    try:
        values = [float(r[key]) for r in records]
    except (KeyError, TypeError, ValueError):
        raise TrtexecParseError(f"an --exportTimes record has no numeric '{key}'; expected trtexec's "
                                "--exportTimes output") from None
    for i, value in enumerate(values, 1):
        if not (math.isfinite(value) and value > 0):
            raise TrtexecParseError(f"--exportTimes record {i} has {key} = {value:g}, not a positive time; "
                                    f"{_EDITED}")
    return values


def _span(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The host walltime trtexec reports: first query's H2D start to last query's D2H end."""
    try:
        span_ms = float(records[-1]["endD2hMs"]) - float(records[0]["startH2dMs"])
    except (KeyError, TypeError, ValueError):
        return {}
    span = {"span_ms": span_ms, "total_host_walltime_s": span_ms / 1e3}
    if span_ms > 0:
        span["throughput_qps"] = len(records) / span_ms * 1e3
    return span


def parse_profile_metadata(data: Mapping[str, Any], *, precision: str | None = None,
                           batch_size: int | None = None, input_shape: Sequence[int] | None = None) -> LatencyResult:
    """A record from a profile-metadata JSON (trex's parse of the performance summary).

    Each metric is ``[min, max, mean, median, p90, p95, p99]``: the file does not name its percentiles, so a run
    with non-default ``--percentile`` values would be misread.
    ``count`` is Throughput x Total Host Walltime, rounded.

    Raises:
        TrtexecParseError: No ``GPU Compute Time`` list of seven numbers, or no Throughput and walltime.
    """
    summary = data.get("performance_summary")
    summary = summary if isinstance(summary, Mapping) else {}
    gpu = _metadata_stats(summary.get("GPU Compute Time"))
    if gpu is None:
        raise TrtexecParseError("performance_summary has no 'GPU Compute Time' as [min, max, mean, median, p90, "
                                "p95, p99]")
    qps, wall_s = summary.get("Throughput"), summary.get("Total Host Walltime")
    if not isinstance(qps, (int, float)) or not isinstance(wall_s, (int, float)):
        raise TrtexecParseError("performance_summary has no numeric 'Throughput' and 'Total Host Walltime'")
    context = {**_metadata_context(data), "throughput_qps": float(qps), "total_host_walltime_s": float(wall_s)}
    if isinstance(summary.get("Total GPU Compute Time"), (int, float)):
        context["total_gpu_compute_time_s"] = float(summary["Total GPU Compute Time"])
    lists = {k.lower(): _metadata_stats(v) for k, v in summary.items() if isinstance(v, list)}
    context["summary_ms"] = {k: v for k, v in lists.items() if v is not None}
    fields = _fields(precision, "fp32", batch_size, input_shape, {}, context)
    return _record(gpu, round(qps * wall_s), fields)


_METADATA_ORDER = ("min", "max", "mean", "median", "p90", "p95", "p99")


def _metadata_stats(values: Any) -> dict[str, float] | None:
    """``[min, max, mean, median, p90, p95, p99]`` as a dict; None for anything else."""
    if not (isinstance(values, list) and len(values) == len(_METADATA_ORDER)
            and all(isinstance(v, (int, float)) for v in values)):
        return None
    return dict(zip(_METADATA_ORDER, map(float, values)))


def _metadata_context(data: Mapping[str, Any]) -> dict[str, Any]:
    device = data.get("device_information") or {}
    options = data.get("inference_options") or {}
    cc = device.get("Compute Capability")

    def enabled(key: str) -> bool | None:
        return None if key not in options else str(options[key]).lower().startswith("enabled")

    context = {"device": device.get("Selected Device"), "compute_capability": None if cc is None else str(cc),
               "cuda_graph": enabled("CUDA Graph"), "spin_wait": enabled("Spin-wait"),
               "data_transfers": enabled("Data transfers")}
    return {k: v for k, v in context.items() if v is not None}
