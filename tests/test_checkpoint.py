"""updp checkpoints: exact round trips, clear errors on bad files, atomic writes."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from helpers import randomize_layer_scale
from torch import nn

import updp.pruner.checkpoint as checkpoint_module
from updp.core.errors import CheckpointError
from updp.pruner import (
    Checkpoint,
    PruningPlan,
    apply_plan,
    create_model,
    load_checkpoint,
    merge_model,
    progressive_blocks,
    save_checkpoint,
)
from updp.pruner.checkpoint import load_state
from updp.pruner.families.convnext import MergedConvNeXt
from updp.pruner.verify import randomize_bn_stats

MODEL = "test_convnext"
NUM_CLASSES = 10
PLAN = ["stages.0.blocks.0", "stages.2.blocks.1"]


def _original() -> nn.Module:
    torch.manual_seed(0)
    return randomize_layer_scale(create_model(MODEL, NUM_CLASSES)).eval()


def _pruned() -> nn.Module:
    # Fresh BNs would fold to identities: random statistics make the pruned weights matter.
    return randomize_bn_stats(apply_plan(_original(), PLAN, lam=0.0), seed=3).eval()


def build(form: str) -> Checkpoint:
    """A checkpoint of each form, with non-trivial weights everywhere."""
    model = {"original": _original, "pruned": _pruned, "merged": lambda: merge_model(_pruned())}[form]()
    pruned = [] if form == "original" else list(PLAN)
    return Checkpoint(model, PruningPlan(MODEL, pruned), NUM_CLASSES, form, {"input_size": [3, 32, 32], "note": form})


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


@pytest.mark.parametrize("form", ["original", "pruned", "merged"])
def test_round_trip_is_exact(tmp_path: Path, x: torch.Tensor, form: str):
    ckpt = build(form)
    save_checkpoint(tmp_path / "model.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert (loaded.model_name, loaded.num_classes, loaded.plan, loaded.form, loaded.meta) == (
        MODEL, NUM_CLASSES, ckpt.plan, form, ckpt.meta)
    assert loaded.model.state_dict().keys() == ckpt.model.state_dict().keys()
    assert torch.equal(outputs(loaded.model, x), outputs(ckpt.model, x))


def test_forms_rebuild_their_own_modules(tmp_path: Path):
    for form in ("pruned", "merged"):
        save_checkpoint(tmp_path / f"{form}.pt", build(form))
    pruned = load_checkpoint(tmp_path / "pruned.pt").model
    merged = load_checkpoint(tmp_path / "merged.pt").model
    assert sorted(progressive_blocks(pruned)) == sorted(PLAN)
    assert all(pb.lam == 0.0 for pb in progressive_blocks(pruned).values())
    assert all(isinstance(merged.get_submodule(n), MergedConvNeXt) for n in PLAN)
    assert not progressive_blocks(merged)


def test_round_trip_differs_from_fresh_weights(tmp_path: Path, x: torch.Tensor):
    """The reloaded weights are the saved ones, not a new random init."""
    save_checkpoint(tmp_path / "model.pt", build("merged"))
    fresh = merge_model(randomize_bn_stats(apply_plan(create_model(MODEL, NUM_CLASSES), PLAN, lam=0.0)))
    loaded = load_checkpoint(tmp_path / "model.pt").model
    assert not torch.allclose(outputs(loaded, x), outputs(fresh, x))


def test_merged_checkpoint_matches_the_pruned_subnet(tmp_path: Path, x: torch.Tensor):
    save_checkpoint(tmp_path / "pruned.pt", build("pruned"))
    subnet = load_checkpoint(tmp_path / "pruned.pt").model
    merged = Checkpoint(merge_model(subnet), PruningPlan(MODEL, PLAN), NUM_CLASSES, "merged")
    save_checkpoint(tmp_path / "merged.pt", merged)
    merged = load_checkpoint(tmp_path / "merged.pt").model
    torch.testing.assert_close(outputs(merged, x), outputs(subnet, x), rtol=1e-4, atol=1e-5)


def test_pruned_checkpoint_keeps_its_lambda(tmp_path: Path, x: torch.Tensor):
    model = apply_plan(_original(), PLAN, lam=0.5)
    save_checkpoint(tmp_path / "model.pt", Checkpoint(model, PruningPlan(MODEL, PLAN), NUM_CLASSES, "pruned"))
    loaded = load_checkpoint(tmp_path / "model.pt").model
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_unknown_form_is_refused(tmp_path: Path):
    ckpt = build("original")
    ckpt.form = "quantized"
    with pytest.raises(CheckpointError) as excinfo:
        save_checkpoint(tmp_path / "model.pt", ckpt)
    one_line_error(excinfo, "quantized")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    save_checkpoint(path, build("original"))
    return path


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0], ids=["half", "head", "empty"])
def test_truncated_file_raises(tmp_path: Path, saved: Path, keep: float):
    data = saved.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(bad)
    one_line_error(excinfo, str(bad), "corrupted")


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_random_bytes_file_raises(tmp_path: Path, seed: int):
    bad = tmp_path / "noise.pt"
    bad.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(bad)
    one_line_error(excinfo, str(bad), "corrupted")


@pytest.mark.parametrize("blob", [b"e", b"j", random.Random(2).randbytes(4096)], ids=["e", "j", "seed2"])
def test_pickle_opcode_garbage_raises(tmp_path: Path, blob: bytes):
    bad = tmp_path / "noise.pt"
    bad.write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)


def test_missing_file_raises(tmp_path: Path):
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path / "absent.pt")
    one_line_error(excinfo, "absent.pt", "does not exist")


def test_directory_is_not_a_checkpoint(tmp_path: Path):
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path)
    one_line_error(excinfo, "does not exist")


def test_plain_state_dict_is_not_an_updp_checkpoint(tmp_path: Path):
    path = tmp_path / "plain.pt"
    torch.save(_original().state_dict(), path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "not an updp checkpoint", "--checkpoint")


def test_file_holding_a_tensor_raises(tmp_path: Path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "Tensor")


def test_load_state_names_missing_and_unexpected_keys():
    other = create_model("test_vit").state_dict()
    with pytest.raises(CheckpointError) as excinfo:
        load_state(_original(), other, "vit.pt")
    message = one_line_error(excinfo, "vit.pt", "missing", "unexpected")
    assert "stem.0.weight" in message  # a test_convnext key the ViT lacks
    assert "cls_token" in message  # a ViT key test_convnext does not have


def test_load_state_names_shape_mismatches():
    with pytest.raises(CheckpointError) as excinfo:
        load_state(_original(), create_model(MODEL, 1000).state_dict(), "imagenet.pt")
    message = one_line_error(excinfo, "shape mismatch", "head.fc.weight")
    assert "missing" not in message and "unexpected" not in message


def test_load_state_loads_a_matching_state(x: torch.Tensor):
    source = _original()
    target = create_model(MODEL, NUM_CLASSES)
    load_state(target, source.state_dict(), "same.pt")
    assert torch.equal(outputs(target, x), outputs(source, x))


def test_interrupted_save_keeps_the_old_file(tmp_path: Path, saved: Path, x: torch.Tensor, monkeypatch):
    before = saved.read_bytes()
    written: list[Path] = []

    def save_half_then_interrupt(obj, f, *args, **kwargs):
        written.append(Path(f))
        Path(f).write_bytes(before[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", save_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, build("merged"))
    monkeypatch.undo()
    assert written and written[0] != saved and written[0].parent == saved.parent
    assert saved.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [saved.name]
    assert torch.equal(outputs(load_checkpoint(saved).model, x), outputs(build("original").model, x))


def test_save_replaces_and_leaves_no_temp_file(tmp_path: Path, saved: Path):
    save_checkpoint(saved, build("merged"))
    assert sorted(os.listdir(tmp_path)) == [saved.name]
    assert load_checkpoint(saved).form == "merged"


def test_save_creates_missing_directories(tmp_path: Path):
    path = tmp_path / "run" / "ckpt" / "model.pt"
    save_checkpoint(path, build("original"))
    assert load_checkpoint(path).form == "original"


def test_saved_weights_are_on_cpu_and_load_with_weights_only(saved: Path):
    data = torch.load(saved, map_location="cpu", weights_only=True)
    assert data["updp_checkpoint"] == 1 and data["form"] == "original"
    assert all(v.device.type == "cpu" for v in data["state_dict"].values())
    assert data["meta"] == {"input_size": [3, 32, 32], "note": "original"}
