"""The training loop's own guarantees: drop-path that depends on the step alone, and a set too small to batch."""
from __future__ import annotations

import threading

import pytest
import timm
import torch
from timm.layers import DropPath
from torch.utils.data import TensorDataset

from updp.core.errors import UpdpError
from updp.train.loop import TrainConfig, Trainer, ce_step
from updp.train.runtime import Runtime


class Crash(Exception):
    pass


def _data(n: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def _dropping_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_convnext", num_classes=10, drop_path_rate=0.5)


def test_drop_path_depends_on_the_step_alone_whatever_ran_before_and_across_a_resume(tmp_path, one_thread):
    """Two runs of one seed, each after other work that drew from the global RNG (a latency table, model
    init), the second crashing at step 3 and resumed after yet other draws: the same weights bit for bit.
    A DataLoader worker augments the images, so only drop-path draws from the training process's RNG."""
    cfg = TrainConfig(epochs=1, batch_size=8, seed=3)  # 6 steps
    rt = Runtime(workers=1, checkpoint_minutes=1e-9)  # a checkpoint after every step
    ref = _dropping_model()
    assert sum(isinstance(m, DropPath) and m.drop_prob > 0 for m in ref.modules()) >= 4
    torch.manual_seed(1)  # what ran before this stage
    Trainer(ref, cfg, _data(48), ce_step(), tmp_path / "ref.pt", rt=rt).fit()

    def crashing(ctx, x, y, i):
        if i == 3:
            raise Crash
        return ce_step()(ctx, x, y, i)

    torch.manual_seed(2)
    with pytest.raises(Crash):
        Trainer(_dropping_model(), cfg, _data(48), crashing, tmp_path / "run.pt", rt=rt).fit()
    assert torch.load(tmp_path / "run.pt", weights_only=True)["step"] == 3
    again = _dropping_model()
    torch.manual_seed(4)
    Trainer(again, cfg, _data(48), ce_step(), tmp_path / "run.pt", rt=rt).fit()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("images, batch", [(1, 2), (7, 8), (180, 256)])
def test_fewer_images_than_the_batch_size_is_a_one_line_error_before_any_step(tmp_path, images, batch):
    steps = []

    def step(ctx, x, y, i):
        steps.append(i)
        return ce_step()(ctx, x, y, i)

    outcome = {}

    def fit():  # in a thread: a loop that never ends fails the test instead of hanging it
        try:
            Trainer(timm.create_model("test_convnext", num_classes=10), TrainConfig(epochs=1, batch_size=batch),
                    _data(images), step, tmp_path / "t.pt", desc="baseline").fit()
        except Exception as e:  # noqa: BLE001 - the test looks at what it was
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "training never ended"
    error = outcome.get("error")
    assert isinstance(error, UpdpError), error
    assert str(error) == (f"baseline: {images} training images are fewer than the batch size {batch}; "
                          f"pass --batch-size {images} or smaller, or add images")
    assert not steps and not (tmp_path / "t.pt").exists()


def test_as_many_images_as_the_batch_size_train_one_step_an_epoch(tmp_path, one_thread):
    trainer = Trainer(timm.create_model("test_convnext", num_classes=10), TrainConfig(epochs=2, batch_size=8),
                      _data(8), ce_step(), tmp_path / "t.pt")
    trainer.fit()
    assert trainer.step == 2 and [m["step"] for m in trainer.metrics] == [1, 2]


def test_the_loop_reads_a_steps_figures_only_now_and_then_and_at_each_epochs_end(tmp_path, one_thread):
    """Reading a loss on the device waits for the GPU to finish the step: the loop reads the step's figures
    every SHOW_EVERY steps and at the last step of each epoch, and the epoch's metrics hold that last step's."""
    reads = []

    class Figure:  # a loss that records when the loop reads it
        def __init__(self, step: int, value: float):
            self.step, self.value = step, value

        def __float__(self) -> float:
            reads.append(self.step)
            return self.value

    def step(ctx, x, y, i):
        info = ce_step()(ctx, x, y, i)
        return {"loss": Figure(i, float(info["loss"].item()) + 100 * i)}

    cfg = TrainConfig(epochs=2, batch_size=1, seed=0)  # 2 epochs of 30 steps
    trainer = Trainer(_dropping_model(), cfg, _data(30), step, tmp_path / "t.pt", rt=Runtime())
    metrics = trainer.fit()
    assert reads == [24, 29, 49, 59]  # after steps 25, 30 (epoch end), 50 and 60 (epoch end)
    assert [round(m["train_loss"]) // 100 for m in metrics] == [29, 59]
