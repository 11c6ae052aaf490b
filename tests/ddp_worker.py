"""One training process for the DDP tests: started by ``torchrun`` (N processes) or plainly (one).

It trains timm's ``test_convnext`` with updp's ``Trainer`` (the real loop:
EpochOrder sharding, SeededAugment, DistributedDataParallel under torchrun)
on seeded random 32 px images, then writes this rank's per-step losses and,
its final weights, so the harness can compare a 2-process run with
a 1-process run of the same global batch step by step.

Usage: python ddp_worker.py OUT_DIR STEPS [sandwich] [syncbn]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out: Path, steps: int, sandwich: bool, sync_bn: bool) -> None:
    from torch.utils.data import TensorDataset

    from updp.pruner import create_model, find_blocks
    from updp.search.space import SearchSpace
    from updp.search.supernet import Supernet
    from updp.train.loop import TrainConfig, Trainer, ce_step
    from updp.train.runtime import Runtime, distributed_env, init_distributed, leave_distributed

    torch.set_num_threads(1)
    rank, world, _ = distributed_env()
    rt = Runtime(rank=rank, world_size=world, sync_bn=sync_bn)
    init_distributed(rt)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 3, 32, 32, generator=gen), torch.randint(0, 10, (256,), generator=gen))
    torch.manual_seed(0)
    model = create_model("test_convnext", 10)
    step_fn, unused = ce_step(), False
    if sandwich:
        blocks = find_blocks(model, (3, 32, 32)).blocks
        supernet = Supernet(model, SearchSpace.build("test_convnext", blocks))
        model, step_fn, unused = supernet.model, supernet.sandwich_step(random_plans=1), True
    losses = []

    def step(ctx, x, y, i):
        info = step_fn(ctx, x, y, i)
        losses.append(float(info["loss"]))
        return info

    cfg = TrainConfig(epochs=steps / (256 // 32), batch_size=32, lr=1e-3, warmup_frac=0.1)
    Trainer(model, cfg, data, step, out / f"ckpt_{world}.pt", desc="ddp", rt=rt, find_unused_parameters=unused).fit()
    (out / f"losses_{world}_{rank}.json").write_text(json.dumps(losses))
    torch.save(model.state_dict(), out / f"weights_{world}_{rank}.pt")
    leave_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), "sandwich" in sys.argv[3:], "syncbn" in sys.argv[3:])
