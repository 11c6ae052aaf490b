"""Ctrl-C at any step of any training stage, then the same command again: the same weights, bit for bit.

Real signals to a real ``python -m updp run`` process: the test reads the progress
bars on stderr and sends SIGINT once a stage has moved past a chosen step.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "cifar10_demo.npz"
CONFIG = f"""
model: test_convnext
data: {{root: {DEMO}, img_size: 32, batch_size: 64, calib_images: 64, eval_images: 64}}
baseline: {{epochs: 0.4}}
supernet: {{epochs: 0.3}}
latency: {{backend: onnxruntime, mode: table, img_size: 32, threads: 1, runs: 10}}
search: {{trials: 3}}
train: {{epochs: 0.4, plan: [stages.1.blocks.0, stages.2.blocks.1]}}
"""
PROGRESS = re.compile(r"^(baseline|supernet|progressive):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
CHECKPOINTS = ("baseline.pt", "supernet.pt", "train.pt")


def _run(cfg: Path, run: Path, stop_at: tuple[str, int] | None) -> tuple[int, str]:
    """``updp run``; with ``stop_at=(stage, step)`` SIGINT once that stage has advanced past ``step``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "updp", "run", "--config", str(cfg), "--run", str(run)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
    seen: list[str] = []
    first: dict[str, int] = {}
    sent: list[int] = []

    def watch():
        buf = b""
        while chunk := proc.stderr.read1(4096):
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for line in lines:
                text = line.decode(errors="replace")
                seen.append(text)
                m = PROGRESS.match(text)
                if not (m and stop_at and m.group(1) == stop_at[0]):
                    continue
                step = int(m.group(2))
                first.setdefault(m.group(1), step)  # a resumed bar starts at its checkpoint's step
                if step > first[m.group(1)] and step >= stop_at[1] and not sent:
                    sent.append(step)  # one Ctrl-C: a second one would stop at once, without a checkpoint
                    proc.send_signal(signal.SIGINT)

    watcher = threading.Thread(target=watch)
    watcher.start()
    code = proc.wait(timeout=600)
    watcher.join()
    return code, "\n".join(seen)


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(run / name, weights_only=True)["model"]


@pytest.mark.slow
def test_interrupted_at_several_steps_of_every_stage_resumes_exactly(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    code, log = _run(cfg, tmp_path / "ref", None)
    assert code == 0, log[-3000:]
    run = tmp_path / "cut"
    stops = [("baseline", 2), ("baseline", 9), ("supernet", 2), ("supernet", 6), ("progressive", 3),
             ("progressive", 10)]
    for stage, step in stops:
        code, log = _run(cfg, run, (stage, step))
        assert code == 130, f"{stage} {step}: exit {code}\n{log[-3000:]}"
        assert "interrupted" in log and "Traceback" not in log, log[-3000:]
        ckpt = torch.load(run / CHECKPOINTS[["baseline", "supernet", "progressive"].index(stage)],
                          weights_only=True)
        assert not ckpt["complete"] and ckpt["step"] >= step, (stage, step, ckpt["step"])
    code, log = _run(cfg, run, None)
    assert code == 0, log[-3000:]
    for name in CHECKPOINTS:
        ref, got = _weights(tmp_path / "ref", name), _weights(run, name)
        assert ref.keys() == got.keys()
        different = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not different, f"{name}: {different[:5]}"
