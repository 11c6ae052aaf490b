"""Workers of one study seed their samplers by their worker slot, through ``run_search`` itself."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import optuna

from updp.core.config import from_dict
from updp.latency.table import LatencyTable
from updp.pipeline.config import RunConfig
from updp.pipeline.search import run_search
from updp.pruner import create_model, find_blocks
from updp.search.space import SearchSpace

DEMO = Path(__file__).resolve().parents[1] / "data" / "cifar10_demo.npz"


def _cfg(trials: int) -> RunConfig:
    return from_dict(RunConfig, {
        "model": "test_convnext",
        "data": {"root": str(DEMO), "batch_size": 32, "calib_images": 32, "eval_images": 32},
        "baseline": {"epochs": 0.02}, "supernet": {"epochs": 0.02},
        "latency": {"backend": "onnxruntime", "img_size": 32, "threads": 1, "mode": "table", "fit_plans": 0,
                    "merge_forms": "default"},
        "search": {"trials": trials, "sampler": "random", "seeding": "simple"}})


def _plans(run_dir: Path) -> list[str]:
    study = optuna.load_study(study_name="updp", storage=f"sqlite:///{run_dir / 'study.db'}")
    return [t.user_attrs["plan"] for t in study.trials]


def test_run_search_seeds_each_workers_sampler_by_its_slot(tmp_path, monkeypatch, capsys, one_thread):
    """Two workers of one study at the same point (copies of one run after its seed plans) propose their
    first sampled plan: the worker in slot 0 and the one in slot 1 (slot 0 held elsewhere) differ."""
    monkeypatch.delenv("RANK", raising=False)
    seeded = tmp_path / "seeded"
    seeded.mkdir()
    space = SearchSpace.build("test_convnext", find_blocks(create_model("test_convnext", 10), (3, 32, 32)).blocks)
    # the table stage is done (as in a resumed run): equal savings, so no plan is favoured by its latency
    LatencyTable(1.0, {n: 0.05 for n in space.names}).save(seeded / "latency_table.json")
    run_search(_cfg(len(space.seed_plans())), seeded)  # baseline, supernet and the seed plans
    seeds = _plans(seeded)
    for name in ("slot0", "slot1"):
        shutil.copytree(seeded, tmp_path / name)
    held = os.open(tmp_path / "slot1" / ".worker-0.lock", os.O_RDWR)  # another worker holds slot 0 there
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        for name in ("slot0", "slot1"):
            run_search(_cfg(len(seeds) + 1), tmp_path / name)
    finally:
        os.close(held)
    assert "worker 1 joins the study" in capsys.readouterr().out
    first0, first1 = _plans(tmp_path / "slot0"), _plans(tmp_path / "slot1")
    assert first0[:-1] == first1[:-1] == seeds and len(first0) == len(seeds) + 1
    assert first0[-1] != first1[-1]  # one sampler seed for both workers would propose the same plan
