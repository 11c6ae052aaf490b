"""ViT / DeiT ``Block`` (timm ``vision_transformer.Block``).

Pruned: both pre-norms become BN over channels, the MLP's GELU becomes
identity, and BN + GELU are appended after the second residual add. Merged:
the attention branch stays (BN folded into qkv, LayerScale into proj); the MLP
branch with its residual and the block-end BN become one Linear C->C
(8 C^2 -> C^2 MACs per token), followed by the GELU.
"""
from __future__ import annotations

import copy

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from updp.pruner import reparam
from updp.pruner.families.base import BlockFamily, is_identity
from updp.pruner.norms import NormError
from updp.pruner.progressive import BlockEnd, ProgressiveBlock, TokenBatchNorm, act_mix, non_inplace, norm_mix
from updp.pruner.registry import register_family


def _layer_scale(ls: nn.Module, ref: torch.Tensor) -> torch.Tensor:
    gamma = getattr(ls, "gamma", None)
    return gamma.detach() if gamma is not None else torch.ones_like(ref)


class ViTProgressive(ProgressiveBlock):
    def __init__(self, block: Block, family: BlockFamily):
        super().__init__(block, family)
        ref = block.mlp.fc2.weight
        dim = ref.shape[0]
        kw = dict(device=ref.device, dtype=ref.dtype)
        self.bn1 = TokenBatchNorm(dim, **kw)
        self.bn2 = TokenBatchNorm(dim, **kw)
        self.act = non_inplace(block.mlp.act)
        self.end = BlockEnd(TokenBatchNorm(dim, **kw), block.mlp.act)

    def forward_pruned(self, x: torch.Tensor, lam: float, **attn_kwargs) -> torch.Tensor:
        b, mlp = self.block, self.block.mlp
        x = x + b.drop_path1(b.ls1(b.attn(norm_mix(b.norm1, self.bn1, x, lam), **attn_kwargs)))
        h = mlp.drop1(act_mix(self.act, mlp.fc1(norm_mix(b.norm2, self.bn2, x, lam)), lam))
        h = mlp.drop2(mlp.fc2(mlp.norm(h)))
        return self.end(x + b.drop_path2(b.ls2(h)), lam)


class MergedViTBlock(nn.Module):
    """``y = act(linear(x + attn(x)))``: attention kept, the MLP folded into ``linear``."""

    def __init__(self, attn: nn.Module, linear: nn.Linear, act: nn.Module):
        super().__init__()
        self.attn = attn
        self.linear = linear
        self.act = act

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        # attn_kwargs: an attention mask (NaFlexViT), passed on as the original block does.
        return self.act(self.linear(x + self.attn(x, **attn_kwargs)))


def _weight_and_bias(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear's weight and bias, a zero bias where it has none (``bias=False``)."""
    w = layer.weight.detach()
    return w, layer.bias.detach() if layer.bias is not None else w.new_zeros(w.shape[0])


def _linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


def _check_token_norms(pblock: ViTProgressive) -> None:
    for attr, bn in (("bn1", pblock.bn1), ("bn2", pblock.bn2), ("end.bn", pblock.end.bn)):
        if not isinstance(bn, TokenBatchNorm):
            raise NormError(f"{attr} is no longer updp's TokenBatchNorm: a BatchNorm conversion after apply_plan "
                            "(e.g. convert_sync_batchnorm) replaced it with a layer that normalizes the token axis, "
                            "not the channels; convert the model before apply_plan")


@register_family(Block)
class ViTFamily(BlockFamily):
    name = "vit"

    def check(self, block: nn.Module) -> str | None:
        if type(block.mlp) is not Mlp or not is_identity(block.mlp.norm):
            return f"MLP type {type(block.mlp).__name__} (gated or normed) is not supported"
        attn = block.attn
        if not (hasattr(attn, "qkv") and hasattr(attn, "proj")) or getattr(attn, "gate", None) is not None:
            return f"attention type {type(attn).__name__} without a fused qkv/proj is not supported"
        return None

    def channels(self, block: nn.Module) -> tuple[int, int, int]:
        # The first Linear reads the block's input (qkv or q); gated MLPs name their layers otherwise.
        dim = next((m.in_features for m in block.modules() if isinstance(m, nn.Linear)), 0)
        return dim, dim, 1

    def progressive(self, block: nn.Module) -> ViTProgressive:
        return ViTProgressive(block, self)

    def merge(self, pblock: ViTProgressive, form: str | None = None) -> MergedViTBlock:
        self.form(form)
        _check_token_norms(pblock)
        b = pblock.block
        attn = copy.deepcopy(b.attn)
        attn.qkv = _linear(*reparam.fold_linear_bn(b.attn.qkv, pblock.bn1))
        proj_w, proj_b = _weight_and_bias(b.attn.proj)
        g1 = _layer_scale(b.ls1, proj_b)
        attn.proj = _linear(g1[:, None] * proj_w, g1 * proj_b)
        w1, b1 = reparam.fold_linear_bn(b.mlp.fc1, pblock.bn2)
        w2, b2 = _weight_and_bias(b.mlp.fc2)
        g2 = _layer_scale(b.ls2, b2)
        eye = torch.eye(w2.shape[0], dtype=w2.dtype, device=w2.device)
        w, bias = eye + g2[:, None] * (w2 @ w1), g2 * (w2 @ b1 + b2)
        w, bias = reparam.fold_bn_after_linear(w, bias, pblock.end.bn)
        return MergedViTBlock(attn, _linear(w, bias), copy.deepcopy(pblock.end.act))
