"""A run directory handed to us cannot run code, clobber files through links or hide secrets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from updp.cli import main
from updp.core.config import from_dict
from updp.core.errors import CheckpointError
from updp.pipeline.config import RunConfig
from updp.pipeline.search import save_config
from updp.train.loop import TrainConfig, Trainer, ce_step

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "cifar10_demo.npz"


class Planted:
    """Unpickling this object runs a shell command (what a crafted checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> None:
    torch.save({"model": Planted(marker), "opt": {}, "sched": {}, "step": 1, "metrics": [], "complete": True}, path)


def _cfg(**extra) -> RunConfig:
    return from_dict(RunConfig, {"model": "test_convnext", "data": {"root": str(DEMO), "batch_size": 64},
                                 "latency": {"backend": "onnxruntime", "img_size": 32, "threads": 1},
                                 **extra})


def test_a_planted_training_checkpoint_is_refused_without_running_it(tmp_path):
    from updp.pruner import create_model

    marker = tmp_path / "pwned"
    _plant(tmp_path / "baseline.pt", marker)
    model = create_model("test_convnext", 10)
    trainer = Trainer(model, TrainConfig(batch_size=4), list(zip(torch.zeros(8, 3, 8, 8), torch.zeros(8).long())),
                      ce_step(), tmp_path / "baseline.pt")
    with pytest.raises(CheckpointError, match="unreadable, unsafe"):
        trainer.resume()
    assert not marker.exists()


def test_updp_train_on_a_planted_run_directory_is_a_clean_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(run, _cfg())
    marker = tmp_path / "pwned"
    _plant(run / "baseline.pt", marker)
    code = main(["train", "--run", str(run), "--plan", "stages.1.blocks.0"])
    err = capsys.readouterr().err
    assert code == 2 and "unreadable, unsafe" in err and "Traceback" not in err, err
    assert not marker.exists()


def test_the_lock_file_never_truncates_a_link_target(tmp_path, capsys):
    from updp.pipeline.rundir import training_lock

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".train.lock").symlink_to(victim)
    with pytest.raises(Exception, match="lock file"):
        with training_lock(run):
            pass
    assert victim.read_text() == "keep me"
    (run / ".train.lock").unlink()
    (run / ".train.lock").write_text("old content")
    with training_lock(run):
        pass
    assert (run / ".train.lock").read_text() == "old content"  # opened without truncation


def test_storage_password_stays_out_of_the_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(run, _cfg(search={"storage": "postgresql://alice:s3cret@127.0.0.1:1/db"}))
    text = (run / "config.yaml").read_text()
    assert "s3cret" not in text and "alice" in text
    assert "not saved in config.yaml" in capsys.readouterr().err
    save_config(run, _cfg(search={"storage": "postgresql://alice:${PGPASS}@127.0.0.1:1/db"}))
    saved = yaml.safe_load((run / "config.yaml").read_text())["search"]["storage"]
    assert saved == "postgresql://alice:${PGPASS}@127.0.0.1:1/db"  # a reference, expanded only when opened


def test_resuming_a_run_saved_without_its_password_says_what_to_do(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(run, _cfg(search={"storage": "postgresql://alice:s3cret@127.0.0.1:1/db"}))
    capsys.readouterr()
    code = main(["search", "--resume", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "without its password" in err and "s3cret" not in err, err


def test_a_wrong_storage_password_is_masked_in_the_error(tmp_path, capsys):
    code = main(["search", "--model", "test_convnext", "--data", str(DEMO), "--run", str(tmp_path / "r"),
                 "--storage", "postgresql://alice:s3cret@127.0.0.1:1/db", "--latency-img-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot open study storage" in err and "s3cret" not in err, err
