"""Max abs difference merged vs lambda-0 subnet, per family, fp64 and fp32.

Every supported block of each model is pruned; BN statistics randomized;
random inputs of an odd size (borders). Run: python benchmarks/merge_exactness.py
"""
from __future__ import annotations

import pandas as pd
import torch
from common import write_results

from updp.pruner import apply_plan, create_model, find_blocks
from updp.pruner.verify import merge_error

MODELS = [("convnext_atto", "convnext", 65), ("test_convnext", "convnext", 65),
          ("mobilenetv2_100", "inverted_residual", 65), ("resnet18", "resnet_basic", 65),
          ("resnet50", "resnet_bottleneck", 65), ("deit_tiny_patch16_224", "vit", 224)]


def main() -> None:
    rows = []
    for name, family, size in MODELS:
        torch.manual_seed(0)
        model = create_model(name).eval()
        blocks = [b.name for b in find_blocks(model, (3, size, size), costed=False).prunable if b.family == family]
        subnet = apply_plan(model, blocks, lam=0.0).eval()
        row = {"family": family, "model": name, "blocks merged": len(blocks), "input": f"2x3x{size}x{size}"}
        for tag, dtype in (("fp64", torch.float64), ("fp32", torch.float32)):
            err = merge_error(subnet, (3, size, size), dtype)
            row[f"max_abs_diff_{tag}"], row[f"relative_{tag}"] = err.max_abs_diff, err.relative
        rows.append(row)
    write_results("merge_exactness", pd.DataFrame(rows), "Merge exactness per family",
                  "Merged vs lambda-0 subnet, eval mode, BN running statistics randomized, random normal inputs. "
                  "relative = max abs diff / max abs subnet output on the same inputs.")


if __name__ == "__main__":
    main()
