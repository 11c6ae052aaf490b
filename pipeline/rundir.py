"""The resumable run directory: inputs checked up front, the training lock, stage timings, config.

Every stage of ``updp search`` / ``train`` / ``run`` starts from ``check_inputs``,
so a bad value is one line before any long work.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from updp.core.config import ConfigError, load_yaml, override, write_yaml
from updp.core.errors import UpdpError, warn
from updp.core.fileio import remove_stale_tmp, write_json
from updp.pipeline.config import RunConfig, validate
from updp.pruner import create_model, find_blocks
from updp.pruner.checkpoint import load_state, raw_state_dict, read_file
from updp.search import study as st
from updp.search.space import SearchSpace
from updp.train.data import check_dataset, fixed_batches, load_splits, normalization
from updp.train.loop import TrainConfig, Trainer, ce_step
from updp.train.runtime import Runtime, distributed_env, init_distributed, resolve


@dataclass
class Inputs:
    """Everything checked up front."""

    cfg: RunConfig
    run_dir: Path
    splits: object
    space: SearchSpace
    storage: object
    num_classes: int
    latency_img_size: int  # the one input size of every latency figure of the run (search and final)
    rt: Runtime  # this process's device, precision, rank


def is_main() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that writes the run directory."""
    return distributed_env()[0] == 0


def check_inputs(cfg: RunConfig, run_dir: Path) -> Inputs:
    if not cfg.model:
        raise ConfigError("no model given: pass --model NAME or set 'model' in the config")
    if not cfg.data.root:
        raise ConfigError("no dataset given: pass --data DIR or set 'data.root' in the config")
    validate(cfg)
    classes = check_dataset(cfg.data.root)
    num_classes = cfg.num_classes or len(classes)
    if num_classes < len(classes):
        raise ConfigError(f"num_classes {num_classes} is smaller than the {len(classes)} classes of "
                          f"'{cfg.data.root}'; drop --num-classes or pass at least {len(classes)}")
    model = create_model(cfg.model, num_classes)
    splits = load_splits(cfg.data.root, cfg.data.img_size, cache_mb=cfg.data.cache_mb, **normalization(model))
    if len(splits.train) < cfg.data.batch_size:
        raise ConfigError(f"'{cfg.data.root}' has {len(splits.train)} training images (after holding out every "
                          f"10th for scoring), fewer than the batch size {cfg.data.batch_size}; pass "
                          f"--batch-size {max(1, len(splits.train))} or smaller")
    if cfg.checkpoint and not cfg.pretrained:
        load_state(model, raw_state_dict(read_file(cfg.checkpoint)), cfg.checkpoint)
    latency_img_size = cfg.latency.img_size or cfg.data.img_size
    for size in dict.fromkeys((cfg.data.img_size, latency_img_size)):
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, size, size))
        except Exception as e:  # noqa: BLE001 - the model's own complaint, in one line
            raise UpdpError(f"{cfg.model} cannot take {size}px images: {str(e).splitlines()[0][:200]}") from None
    blocks = find_blocks(model, (3, cfg.data.img_size, cfg.data.img_size)).blocks
    if not blocks:
        raise UpdpError(f"{cfg.model} has no prunable block (see 'updp blocks {cfg.model}')")
    # with the merge planner every supported block is a candidate until its forms are timed on the target
    timed = cfg.latency.merge_forms == "auto" and cfg.latency.backend != "trtexec"
    space = SearchSpace.build(cfg.model, blocks, cfg.search.keep, cfg.search.max_per_stage, cheaper_only=not timed)
    url = st.storage_url(cfg.search.storage)
    if url and ":***@" in url:
        raise ConfigError("the run's storage URL was saved without its password; pass --storage URL again, or "
                          "set UPDP_STORAGE, or write the password as ${VAR} in the URL")
    storage = st.open_storage(url, run_dir)
    scoring = st.study_scoring(storage, cfg.search.study_name)
    for key, verb, flag in (("metric", "maximizes", "--metric"), ("score_on", "scores candidates on", "--score-on")):
        was, now = scoring.get(key), getattr(cfg.search, key)
        if was not in (None, now):
            raise ConfigError(f"the study '{cfg.search.study_name}' of this run {verb} {was}, not {now}: its "
                              f"trials' scores cannot be mixed; pass {flag} {was} to go on, or start a new run "
                              "directory")
    rt = resolve(cfg.runtime)
    init_distributed(rt)
    return Inputs(cfg, run_dir, splits, space, storage, num_classes, latency_img_size, rt)


@contextlib.contextmanager
def run_lock(run_dir: Path, name: str):
    """An exclusive lock on ``run_dir/.{name}.lock`` held by one process at a time; others wait here.

    The lock file is never truncated and never followed through a symbolic link.
    """
    path = run_dir / f".{name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UpdpError(f"cannot open the run's lock file '{path}' ({e.strerror}); it must be a plain file, "
                        "not a link: remove it and retry") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def training_lock(run_dir: Path):
    """One process at a time trains the baseline and supernet; other workers wait here.

    Under torchrun rank 0 holds it for the whole job (its other ranks train with it).
    """
    return run_lock(run_dir, "train") if is_main() else contextlib.nullcontext()


def report_lock(run_dir: Path):
    """One process at a time reads the study and writes the report, so the last report written is the newest."""
    return run_lock(run_dir, "report")


def baseline_model(inp: Inputs) -> torch.nn.Module:
    """The model with baseline weights: from --checkpoint, or trained here on the data."""
    cfg = inp.cfg
    if cfg.pretrained and not cfg.checkpoint:
        return _pretrained(cfg.model, inp.num_classes)
    model = seeded_model(cfg.model, inp.num_classes, cfg.search.seed)
    if cfg.checkpoint:
        load_state(model, raw_state_dict(read_file(cfg.checkpoint)), cfg.checkpoint)
        return model
    tc = TrainConfig(epochs=cfg.baseline.epochs, batch_size=cfg.data.batch_size, lr=cfg.baseline.lr)
    Trainer(model, tc, inp.splits.train, ce_step(), inp.run_dir / "baseline.pt",
            val_batches=fixed_batches(inp.splits.val, 1000, cfg.search.seed),
            metrics_csv=inp.run_dir / "baseline_metrics.csv", desc="baseline", rt=inp.rt).fit()
    return model


def seeded_model(name: str, num_classes: int, seed: int) -> torch.nn.Module:
    """The model's initial weights depend on the seed alone, not on what ran before in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, num_classes)


def _pretrained(name: str, num_classes: int) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - no network, no weights for this name, ...
        raise UpdpError(f"cannot load timm pretrained weights for {name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); pass --checkpoint FILE instead") from None


@contextlib.contextmanager
def stage(run_dir: Path, name: str):
    """Record a stage's wall time in ``timings.json`` (seconds; a resumed stage adds up; rank 0 writes)."""
    path = run_dir / "timings.json"
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if is_main():
            timings = json.loads(path.read_text()) if path.is_file() else {}
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            write_json(path, timings)


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    """``config.yaml`` of the run, with any literal password of the storage URL masked (rank 0 writes)."""
    if not is_main():
        return
    storage = cfg.search.storage
    if storage and st.redact_url(storage) != storage:
        warn("the storage URL's password is not saved in config.yaml; to resume, pass --storage again "
             "or use ${VAR} / UPDP_STORAGE")
        cfg = override(cfg, {"search.storage": st.redact_url(storage)})
    write_yaml(run_dir / "config.yaml", cfg)


def prepare_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_main():
        return
    for path in remove_stale_tmp(run_dir):
        print(f"updp: removed '{path}', left by a process killed while writing", flush=True)


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UpdpError(f"'{run_dir}' is not an updp run directory (no config.yaml)")
    cfg = load_yaml(RunConfig, path)
    saved = yaml.safe_load(path.read_text()) or {}
    # saved before --metric / --score-on: that run's search scored top-1 / on the held-out images
    missing = {f"search.{k}": v for k, v in st.LEGACY_SCORING.items() if k not in (saved.get("search") or {})}
    if missing:
        cfg = override(cfg, missing)
    return cfg
