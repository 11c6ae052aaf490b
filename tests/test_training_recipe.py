"""The training recipe follows timm's: no weight decay on 1-D parameters, the model's own normalization."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from updp.core.errors import CheckpointError
from updp.pruner import apply_plan, create_model
from updp.train.data import load_splits, normalization
from updp.train.loop import TrainConfig, Trainer, ce_step

DEMO = Path(__file__).resolve().parents[1] / "data" / "cifar10_demo.npz"


def _trainer(model, tmp_path, epochs=0.05):
    splits = load_splits(DEMO, 32)
    return Trainer(model, TrainConfig(epochs=epochs, batch_size=32, lr=1e-3), splits.train, ce_step(),
                   tmp_path / "t.pt")


def test_norms_biases_gamma_and_the_pruning_bns_get_no_weight_decay(tmp_path):
    model = apply_plan(create_model("test_convnext", 10), ["stages.1.blocks.0"], lam=0.5)  # adds BNs
    trainer = _trainer(model, tmp_path)
    decay = {id(p) for g in trainer.opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[i] for i in {id(p) for p in model.parameters()} - decay]
    assert all(p.ndim <= 1 for n, p in model.named_parameters() if id(p) not in decay)
    assert all(p.ndim > 1 for n, p in model.named_parameters() if id(p) in decay)
    assert any(n.endswith(".gamma") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert any("stages.1.blocks.0" in n and "bn" in n.lower() for n in no_decay), no_decay


def test_images_are_normalized_with_the_models_own_mean_and_std():
    vit = create_model("test_vit", 10)  # timm: mean = std = 0.5
    norm = normalization(vit)
    assert norm == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "crop_pct": 0.95}
    x, _ = load_splits(DEMO, 32, **norm).val[0]
    x_imagenet, _ = load_splits(DEMO, 32).val[0]
    assert not torch.allclose(x, x_imagenet)
    assert x.min() >= -1.1 and x.max() <= 1.1  # (v - 0.5) / 0.5 for v in [0, 1], give or take bicubic overshoot
    assert normalization(create_model("convnext_atto", 10))["mean"] == pytest.approx((0.485, 0.456, 0.406))


def _old_release_checkpoint(model, tmp_path, complete: bool) -> None:
    """What release 0.1.0's trainer saved: one AdamW group over every parameter."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": 3,
                "metrics": [], "complete": complete, "config": {}}, tmp_path / "t.pt")


def test_a_finished_stage_of_an_older_release_resumes_and_an_unfinished_one_says_what_to_do(tmp_path):
    model = create_model("test_convnext", 10)
    _old_release_checkpoint(model, tmp_path, complete=True)
    assert _trainer(create_model("test_convnext", 10), tmp_path).resume() is True
    _old_release_checkpoint(model, tmp_path, complete=False)
    with pytest.raises(CheckpointError, match="older updp .*delete it to restart this stage"):
        _trainer(create_model("test_convnext", 10), tmp_path).resume()


def test_a_set_larger_than_the_cache_streams_the_same_images_and_timms_validation_folder_works(tmp_path):
    import numpy as np
    from PIL import Image

    from updp.train.data import ImageFolderImages, check_dataset, transforms

    rng = np.random.default_rng(0)
    for split in ("train", "validation"):  # timm's / ImageNet's name for the val split
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / split / c / f"{i}.png")
    assert check_dataset(tmp_path) == ["cat", "dog"]
    tf = transforms(16, False, crop_pct=0.9)
    cached = ImageFolderImages(tmp_path / "train", tf)
    streamed = ImageFolderImages(tmp_path / "train", tf, cache_mb=0.001)  # 6 images of 1.4 kB do not fit
    assert not cached.streaming and streamed.streaming and len(streamed) == 6
    for i in range(6):
        assert torch.equal(cached[i][0], streamed[i][0]) and cached[i][1] == streamed[i][1]
    assert cached[0][0].shape == (3, 16, 16)
    splits = load_splits(tmp_path, 16, held_out_every=3)
    assert len(splits.val) == 6 and len(splits.held_out) == 2
