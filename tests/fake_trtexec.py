"""A stand-in for the ``trtexec`` binary in the trtexec workflow tests (no TensorRT here).

It writes what a real trtexec run writes, in its format: the text log is the real TensorRT 10.16.1
log of ``tests/fixtures/trtexec/`` with its command, device name and GPU Compute Time line replaced
by the figures the test chose, and an ``--exportTimes`` JSON with one record per query. It checks
nothing about the ONNX beyond that it exists.

Environment: ``FAKE_TRT_VERSION`` (banner number, e.g. 101601 or 110400), ``FAKE_TRT_FIGURES`` (a JSON
file: ONNX file stem -> GPU compute median in ms; a stem not in it fails like a failed build),
``FAKE_TRT_DEVICE``, ``FAKE_TRT_CALLS`` (each call's arguments are appended to it, one JSON line).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

LOG = Path(__file__).parent / "fixtures" / "trtexec" / "trt10.16_h100pcie_onnx_build_and_run.log"
REAL_MEDIAN = 0.0361328  # the fixture's GPU Compute Time median, ms


def main(argv: list[str]) -> int:
    version = os.environ.get("FAKE_TRT_VERSION", "101601")
    banner = f"&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] [b11] # trtexec {' '.join(argv)}"
    if "--help" in argv:
        print(banner)
        print("=== Model Options ===\n  --onnx=<file>  ONNX model")
        return 0
    with open(os.environ["FAKE_TRT_CALLS"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    figures = json.loads(Path(os.environ["FAKE_TRT_FIGURES"]).read_text())
    stem = Path(opts["onnx"]).stem
    if int(version) >= 110000 and any(a in argv for a in ("--fp16", "--int8", "--best")):
        print(f"{banner}\n[E] Unknown option: --fp16\n&&&& FAILED TensorRT.trtexec")
        return 1
    if not Path(opts["onnx"]).is_file() or stem not in figures:
        print(f"{banner}\n[E] Error[4]: engine build failed\n&&&& FAILED TensorRT.trtexec")
        return 1
    scale = figures[stem] / REAL_MEDIAN
    text = LOG.read_text()
    text = re.sub(r"^&&&& (RUNNING|PASSED) TensorRT\.trtexec .*$",
                  lambda m: banner.replace("RUNNING", m.group(1)), text, flags=re.MULTILINE)
    text = text.replace("Selected Device: NVIDIA H100 PCIe", f"Selected Device: {os.environ['FAKE_TRT_DEVICE']}")
    text = re.sub(r"(GPU Compute Time: .*)$", lambda m: re.sub(
        r"= ([\d.]+) ms", lambda v: f"= {float(v.group(1)) * scale:.6g} ms", m.group(1)), text, flags=re.MULTILINE)
    print(text, end="")
    if "exportTimes" in opts:
        ms = figures[stem]
        Path(opts["exportTimes"]).write_text(json.dumps(
            [{"startH2dMs": i * ms, "endD2hMs": (i + 1) * ms, "computeMs": ms, "latencyMs": ms} for i in range(50)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
