"""Stock timm models the fuzzer tripped on: each works or is refused in one line, never a crash.

``updp blocks`` and ``updp merge`` run in-process on random weights at small
input sizes; a refusal is exit 2 with exactly one ``updp: error:`` line, and a
failed merge leaves no file behind.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import randomize_layer_scale
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.testing import assert_close

from updp.cli import main
from updp.core.errors import UpdpError
from updp.core.onnx_export import ExportError, export_onnx
from updp.pruner import apply_plan, create_model, find_blocks, load_checkpoint, merge_model
from updp.pruner.verify import randomize_bn_stats

MERGED_FILES = ["merge.json", "merged.onnx", "merged.pt"]

# model, --img-size (None: the model's own), outcome, a fragment of the reasons or of the error
BLOCKS = [
    ("resnet50_gn", 32, "ok", "GroupNorm"),
    ("mixnet_s", 32, "ok", "MixedConv2d"),
    ("regnetx_002", 32, "refused", "regnet.Bottleneck"),
    ("test_vit3", None, "ok", None),
    ("test_vit4", None, "ok", None),
    ("test_convnext", 32, "ok", None),
    ("mobilenetv2_050", 32, "ok", None),
    ("resnet18", 32, "ok", None),
    ("test_vit", None, "ok", None),
]


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, out: str, err: str) -> str:
    """The single ``updp: error:`` line of a refusal."""
    assert code == 2 and "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("updp: error:"), err
    return lines[0]


@pytest.mark.parametrize("model, size, outcome, fragment", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_blocks_works_or_refuses_in_one_line(capsys, model, size, outcome, fragment):
    torch.manual_seed(0)
    code, out, err = cli(capsys, "blocks", model, "--format", "json", *(["--img-size", size] if size else []))
    assert "Traceback" not in out + err
    if outcome == "refused":
        assert fragment in one_error_line(code, out, err)
        return
    assert code == 0, err
    rows = json.loads(out)
    assert rows and all(r["macs"] > 0 for r in rows)
    if fragment:
        unsupported = [r for r in rows if fragment in (r["reason"] or "")]
        assert unsupported and all(not r["supported"] and r["merged_macs"] is None for r in unsupported)


@pytest.mark.parametrize("size", ["-5", "0", "1"])
@pytest.mark.parametrize("command", ["blocks", "merge"])
def test_img_size_too_small_or_not_positive(capsys, tmp_path: Path, command: str, size: str):
    out_args = ["--plan", "stages.1.blocks.0", "--out", tmp_path / "out"] if command == "merge" else []
    line = one_error_line(*cli(capsys, command, "test_convnext", "--img-size", size, *out_args))
    assert "--img-size" in line
    assert not (tmp_path / "out").exists()


def test_img_size_the_vit_cannot_take(capsys):
    line = one_error_line(*cli(capsys, "blocks", "test_vit", "--img-size", "1"))
    assert "--img-size" in line and "3x160x160" in line


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_merge_out_that_is_a_file_fails_before_work(capsys, tmp_path: Path, out: str):
    existing = tmp_path / "file"
    existing.write_text("keep me\n")
    line = one_error_line(*cli(capsys, "merge", "test_convnext", "--img-size", "32",
                               "--plan", "stages.1.blocks.0", "--out", tmp_path / out))
    assert str(existing) in line and "--out" in line
    assert existing.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture
def vit_weights(tmp_path: Path):
    """Random weights for a timm ViT, saved as a plain state_dict (LayerScale and norms randomized)."""

    def save(model_name: str) -> Path:
        torch.manual_seed(0)
        model = randomize_layer_scale(create_model(model_name))
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) and m.weight.ndim == 1:
                    m.weight.mul_(torch.rand_like(m.weight) + 0.5)
        path = tmp_path / f"{model_name}.pt"
        torch.save(model.state_dict(), path)
        return path

    return save


@pytest.mark.parametrize("model_name", ["test_vit3", "test_vit4"])
def test_merge_vit_variants_writes_all_three_files(capsys, tmp_path: Path, vit_weights, model_name: str):
    """test_vit3 has an attention-pool head (MACs), test_vit4 RmsNorms (ONNX export)."""
    weights, out_dir = vit_weights(model_name), tmp_path / "out"
    code, out, err = cli(capsys, "merge", model_name, "--plan", "blocks.0", "--checkpoint", weights,
                         "--out", out_dir, "--format", "json")
    assert code == 0 and "Traceback" not in err and err.count("\n") <= 1, err
    assert sorted(p.name for p in out_dir.iterdir()) == MERGED_FILES
    report = json.loads(out)
    assert report["macs_after"] < report["macs_before"] and report["max_abs_diff_fp64"] < 1e-9

    subnet = create_model(model_name)
    subnet.load_state_dict(torch.load(weights, weights_only=True))
    subnet = apply_plan(subnet, ["blocks.0"], lam=0.0).eval()
    merged = load_checkpoint(out_dir / "merged.pt").model
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = subnet(x), merged(x)
    assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    sess = ort.InferenceSession(str(out_dir / "merged.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    np.testing.assert_allclose(onnx_out, got[:1].numpy(), rtol=1e-3, atol=1e-4 * want.abs().max().item())


def test_failed_merge_leaves_no_file(capsys, tmp_path: Path, monkeypatch):
    """A failure after the exports (here: ONNX Runtime disagrees) removes what was written."""
    import updp.core.onnx_export as export

    monkeypatch.setattr(export, "run_onnx", lambda path, x: np.full((1, 1000), np.nan, dtype=np.float32))
    out_dir = tmp_path / "out"
    line = one_error_line(*cli(capsys, "merge", "test_convnext", "--img-size", "32",
                               "--plan", "stages.1.blocks.0", "--out", out_dir))
    assert "ONNX Runtime" in line
    assert not out_dir.exists()


def test_failed_merge_keeps_an_existing_out_dir_as_it_was(capsys, tmp_path: Path, monkeypatch):
    import updp.core.onnx_export as export

    monkeypatch.setattr(export, "run_onnx", lambda path, x: np.full((1, 1000), np.nan, dtype=np.float32))
    (tmp_path / "notes.txt").write_text("mine\n")
    one_error_line(*cli(capsys, "merge", "test_convnext", "--img-size", "32",
                        "--plan", "stages.1.blocks.0", "--out", tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


class _Cummax(nn.Module):
    """A layer the TorchScript ONNX exporter has no symbolic for (at any opset)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=-1)[0]


def test_export_failure_is_one_line_and_prints_no_graph(capfd, tmp_path: Path):
    model = nn.Sequential(nn.Linear(4, 4), _Cummax())
    with pytest.raises(ExportError) as info:
        export_onnx(model, (1, 4), tmp_path / "m.onnx")
    assert isinstance(info.value, UpdpError) and "\n" not in str(info.value).strip()
    assert "cummax" in str(info.value)
    out, err = capfd.readouterr()
    assert "graph(" not in out + err and len((out + err).splitlines()) < 5, out + err
    assert list(tmp_path.iterdir()) == []


def test_operator_of_a_newer_opset_exports_at_that_opset(tmp_path: Path):
    """``nn.Fold`` (ONNX Col2Im) exists from opset 18: 17 fails, the newer opset is used."""
    import onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Unfold(2, stride=2), nn.Fold((8, 8), 2, stride=2)).eval()
    path = export_onnx(model, (1, 3, 8, 8), tmp_path / "m.onnx")
    assert onnx.load(str(path)).opset_import[0].version > 17
    x = torch.randn(1, 3, 8, 8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_rms_norm_exports_and_matches_onnx_runtime(tmp_path: Path):
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8, eps=1e-5), nn.RMSNorm(8)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    path = export_onnx(model, (2, 8), tmp_path / "m.onnx")
    x = torch.randn(2, 8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)


# --- ViTs whose MLP (or projections) have no bias ----------------------------------------------------

def _bias_free_vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10,
                             proj_bias=False, init_values=0.1)


def _mlp_without_bias_vit() -> VisionTransformer:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    for block in model.blocks:
        block.mlp = Mlp(32, 64, bias=False)
    return model


def test_vit_with_a_gated_mlp_is_reported_unsupported():
    """timm's vitamin models put a GeGluMlp (no fc2) in a vision_transformer.Block."""
    from timm.models.vitamin import GeGluMlp

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    for block in model.blocks:
        block.mlp = GeGluMlp(32, 64)
    blocks = find_blocks(model, (3, 32, 32)).blocks
    assert [(b.name, b.in_chs, b.out_chs) for b in blocks] == [("blocks.0", 32, 32), ("blocks.1", 32, 32)]
    assert all(not b.supported and "GeGluMlp" in b.reason for b in blocks)


@pytest.mark.parametrize("build", [_bias_free_vit, _mlp_without_bias_vit], ids=["proj_bias", "mlp_bias"])
def test_vit_without_biases_is_found_and_merges_exactly(build):
    torch.manual_seed(0)
    model = build().double()
    assert any(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    found = find_blocks(model, (3, 32, 32))
    assert [b.name for b in found.prunable] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(b.worthwhile for b in found.blocks)
    subnet = apply_plan(model, ["blocks.0", "blocks.2"], lam=0.0)
    randomize_bn_stats(subnet, seed=3)
    randomize_layer_scale(subnet)
    subnet.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        want, got = subnet(x), merge_model(subnet)(x)
    assert_close(got, want, atol=1e-10, rtol=0)
    assert want.abs().max() > 1e-3  # not a trivially small output


def test_vit_blocks_given_an_attention_mask_merge_exactly():
    """NaFlexViT calls its blocks with ``attn_mask=``; pruned and merged blocks pass it on."""
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    torch.manual_seed(0)
    model = NaFlexVit(NaFlexVitCfg(embed_dim=32, depth=3, num_heads=2, patch_size=8, init_values=0.1),
                      img_size=32, num_classes=10).double()
    subnet = apply_plan(model, [b.name for b in find_blocks(model, (3, 32, 32)).prunable], lam=0.0)
    randomize_bn_stats(subnet, seed=4)
    randomize_layer_scale(subnet)
    subnet.eval()
    merged = merge_model(subnet)
    batch, n = 2, 16
    gen = torch.Generator().manual_seed(5)
    coord = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(1, n, 2)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, 10:] = False  # padded patches: the model builds an attention mask
    patches = {"patches": torch.randn(batch, n, 8 * 8 * 3, generator=gen, dtype=torch.float64),
               "patch_coord": coord.expand(batch, -1, -1), "patch_valid": valid}
    image = torch.randn(batch, 3, 32, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for x in (image, patches):
            assert_close(_features(merged, x), _features(subnet, x), atol=1e-10, rtol=0)
        masked = _features(subnet, patches)
        patches["patch_valid"] = torch.ones(batch, n, dtype=torch.bool)
        assert (_features(subnet, patches)[1, :10] - masked[1, :10]).abs().max() > 1e-3  # the mask matters


def _features(model: nn.Module, x: torch.Tensor | dict) -> torch.Tensor:
    out = model.forward_features(**x) if isinstance(x, dict) else model.forward_features(x)
    return out["patches"] if isinstance(out, dict) else out


def test_merge_that_cannot_export_at_this_size_leaves_no_file(capsys, tmp_path: Path):
    """test_vit off its own size resamples position embeddings with an op ONNX lacks."""
    out_dir = tmp_path / "a" / "out"
    line = one_error_line(*cli(capsys, "merge", "test_vit", "--img-size", "64", "--plan", "blocks.0",
                               "--out", out_dir))
    assert "ONNX export failed" in line and "omit --img-size" in line
    assert list(tmp_path.iterdir()) == []
