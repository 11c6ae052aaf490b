"""Training at scale, checked on the CPU: device and precision paths, data order and augmentation that
do not depend on processes or workers, mid-epoch checkpoints, and DDP (gloo) against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from updp.core.config import ConfigError
from updp.pruner import create_model
from updp.train.loop import EpochOrder, SeededAugment, TrainConfig, Trainer, ce_step
from updp.train.runtime import Runtime, RuntimeConfig, resolve

HERE = Path(__file__).resolve().parent


def _data(n=96, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def _model():
    torch.manual_seed(0)
    return create_model("test_convnext", 10)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_every_precision_trains_on_the_cpu_and_checkpoints_its_scaler(tmp_path, amp):
    model = _model()
    before = _state(model)
    rt = Runtime(amp=amp)
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=16), _data(), ce_step(), tmp_path / "t.pt", rt=rt)
    trainer.fit()
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it learned
    saved = torch.load(tmp_path / "t.pt", weights_only=True)
    assert saved["complete"] and ("scale" in saved["scaler"]) == (amp == "fp16")  # loss scaling for fp16 only


def test_autocast_runs_the_forward_in_the_chosen_precision_and_losses_in_fp32():
    from updp.train.loop import StepContext

    model = torch.nn.Linear(4, 3)
    for amp, dtype in (("off", torch.float32), ("bf16", torch.bfloat16)):
        rt = Runtime(amp=amp)
        with rt.autocast():
            inner = model(torch.randn(2, 4)).dtype
        ctx = StepContext(model, rt, rt.grad_scaler())
        assert inner == dtype and ctx.forward(torch.randn(2, 4)).dtype == torch.float32


def test_runtime_resolution_and_one_line_errors(monkeypatch):
    rt = resolve(RuntimeConfig())
    assert (rt.device.type, rt.amp, rt.world_size) == ("cpu", "off", 1)  # auto on a machine without CUDA
    assert resolve(RuntimeConfig(amp="bf16", workers=3)).workers == 3
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            resolve(RuntimeConfig(device="cuda"))
    for bad, match in ((RuntimeConfig(device="tpu"), "auto, cpu, cuda or cuda:N"),
                       (RuntimeConfig(amp="fp8"), "amp must be"), (RuntimeConfig(workers=-1), "zero or more"),
                       (RuntimeConfig(checkpoint_minutes=0), "positive")):
        with pytest.raises(ConfigError, match=match):
            resolve(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rt = resolve(RuntimeConfig())
    assert (rt.rank, rt.world_size, rt.is_main, rt.distributed) == (1, 2, False, True)


def test_a_device_this_machine_lacks_is_one_line_before_any_work(tmp_path, capsys):
    from updp.cli import main

    # without CUDA any GPU is missing; with it, one past the machine's count is
    device, says = ("cuda:99", "GPU(s)") if torch.cuda.is_available() else ("cuda", "sees no CUDA GPU")
    code = main(["search", "--model", "test_convnext", "--data", str(HERE.parent / "data" / "cifar10_demo.npz"),
                 "--run", str(tmp_path / "r"), "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "baseline.pt").exists()


def test_every_step_sees_the_same_global_batch_on_any_number_of_processes():
    def global_batches(world, skip=0):
        shares = []
        for rank in range(world):
            order = EpochOrder(100, 12, seed=3, rank=rank, world=world)
            order.set_epoch(2, skip)
            keys = list(order)
            assert len(keys) == len(order)
            shares.append([keys[i:i + 12 // world] for i in range(0, len(keys), 12 // world)])
        return [sorted(i for share in step for _, i in share) for step in zip(*shares)]

    one = global_batches(1)
    assert len(one) == 100 // 12 and len({i for b in one for i in b}) == 96  # no image twice in an epoch
    assert global_batches(2) == global_batches(3) == global_batches(4) == one
    assert global_batches(2, skip=5) == one[5:]  # resumed mid-epoch: the rest of the same epoch
    other = EpochOrder(100, 12, seed=3)
    other.set_epoch(3)
    assert [i for _, i in other][:12] != [i for _, i in EpochOrder(100, 12, seed=3)][:12]


def test_an_images_augmentation_depends_on_the_image_and_epoch_not_on_what_ran_before():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3), i

    ds = SeededAugment(Noisy(), seed=1, stage="s")
    a = ds[(0, 2)][0]
    torch.rand(100)  # anything else drawing from the RNG meanwhile
    assert torch.equal(ds[(0, 2)][0], a)
    assert not torch.equal(ds[(1, 2)][0], a) and not torch.equal(ds[(0, 3)][0], a)
    assert not torch.equal(SeededAugment(Noisy(), seed=2, stage="s")[(0, 2)][0], a)


class Crash(Exception):
    pass


def test_a_crash_mid_epoch_resumes_from_the_timed_checkpoint_bitwise_even_with_data_workers(tmp_path):
    """Checkpoints after every step here (a tiny ``checkpoint_minutes``); a crash (not Ctrl-C: nothing is
    saved on the way out) at step 8, inside the second 6-step epoch; the rerun, with 2 DataLoader workers
    augmenting, ends with the uninterrupted run's weights bit for bit."""
    from torchvision.transforms import v2

    class Augmented(torch.utils.data.Dataset):  # random crops and flips, as training data has
        def __init__(self):
            self.data = _data()
            self.aug = v2.Compose([v2.RandomResizedCrop(32, scale=(0.5, 1.0), antialias=True),
                                   v2.RandomHorizontalFlip()])

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            x, y = self.data[i]
            return self.aug(x), y

    cfg = TrainConfig(epochs=1.75, batch_size=16)  # 6 steps an epoch, 11 in all
    ref = _model()
    Trainer(ref, cfg, Augmented(), ce_step(), tmp_path / "ref.pt", rt=Runtime(checkpoint_minutes=1e-9)).fit()

    model, crash_at = _model(), 8
    inner = ce_step()

    def crashing(ctx, x, y, i):
        if i == crash_at:
            raise Crash
        return inner(ctx, x, y, i)

    with pytest.raises(Crash):
        Trainer(model, cfg, Augmented(), crashing, tmp_path / "run.pt", rt=Runtime(checkpoint_minutes=1e-9)).fit()
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert saved["step"] == crash_at and not saved["complete"]  # written inside the epoch, after step 8
    again = _model()
    Trainer(again, cfg, Augmented(), ce_step(), tmp_path / "run.pt", rt=Runtime(workers=2)).fit()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_without_the_period_no_checkpoint_is_written_inside_an_epoch(tmp_path):
    class Stop(Exception):
        pass

    def stop(ctx, x, y, i):
        if i == 3:
            raise Stop
        return ce_step()(ctx, x, y, i)

    with pytest.raises(Stop):
        Trainer(_model(), TrainConfig(epochs=1, batch_size=16), _data(), stop, tmp_path / "t.pt").fit()
    assert not (tmp_path / "t.pt").exists()  # default period (10 min) not reached: the cost of a crash


def _torchrun(out: Path, nproc: int, steps: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "ddp_worker.py"), str(out), str(steps), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_with_gloo_follow_the_one_process_loss_curve(tmp_path):
    """The same global batch of 32 on 1 and 2 processes: per-step losses (the mean over ranks) and the
    final weights agree (the model has no BatchNorm, so the split changes nothing but summation order)."""
    _torchrun(tmp_path, 1, 50)
    _torchrun(tmp_path, 2, 50)
    one = json.loads((tmp_path / "losses_1_0.json").read_text())
    r0, r1 = (json.loads((tmp_path / f"losses_2_{r}.json").read_text()) for r in (0, 1))
    assert len(one) == len(r0) == len(r1) == 50 and r0 != r1  # each rank saw its own half of every batch
    assert [(a + b) / 2 for a, b in zip(r0, r1)] == pytest.approx(one, rel=1e-4, abs=1e-5)
    w1 = torch.load(tmp_path / "weights_1_0.pt", weights_only=True)
    for r in (0, 1):
        w2 = torch.load(tmp_path / f"weights_2_{r}.pt", weights_only=True)
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-5), (r, k)


@pytest.mark.slow
def test_the_supernet_sandwich_step_keeps_replicas_identical_under_ddp(tmp_path):
    """Four forward/backward passes a step, different subnets (unused parameters), gradients reduced once:
    both ranks end with the same weights. The pruned forms' BatchNorms see half the batch on each rank
    (SyncBatchNorm is CUDA-only), so the curve only follows the one-process one closely."""
    _torchrun(tmp_path, 1, 20, "sandwich")
    _torchrun(tmp_path, 2, 20, "sandwich")
    w0, w1 = (torch.load(tmp_path / f"weights_2_{r}.pt", weights_only=True) for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]) or "running" in k or "num_batches" in k, k  # BN buffers are per rank
    one = json.loads((tmp_path / "losses_1_0.json").read_text())
    r0, r1 = (json.loads((tmp_path / f"losses_2_{r}.json").read_text()) for r in (0, 1))
    assert [(a + b) / 2 for a, b in zip(r0, r1)] == pytest.approx(one, rel=0.03)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_in_mixed_precision_and_channels_last_checkpoints_for_the_cpu(tmp_path, amp):
    model = _model()
    rt = resolve(RuntimeConfig(device="cuda", amp=amp))
    Trainer(model, TrainConfig(epochs=1, batch_size=16), _data(), ce_step(), tmp_path / "t.pt", rt=rt).fit()
    assert next(model.parameters()).is_cuda
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    saved = torch.load(tmp_path / "t.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v.cpu()) for k, v in model.state_dict().items())  # the very weights, on the CPU
    cpu = _model()
    cpu.load_state_dict(saved)
    x = torch.randn(2, 3, 32, 32)
    # cuDNN runs fp32 convolutions in TF32 by default on Ampere and later (~1e-3 off): compare in full fp32
    matmul_tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            assert torch.allclose(cpu.eval()(x), model.eval().float()(x.cuda()).cpu(), atol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


@pytest.mark.cuda
@cuda
def test_scoring_on_the_gpu_matches_the_cpu():
    from updp.pruner import find_blocks
    from updp.search.scoring import resident, score_plan
    from updp.search.space import SearchSpace
    from updp.search.supernet import Supernet

    def score(rt):
        model = rt.prepare(_model())
        space = SearchSpace.build("test_convnext", find_blocks(model.cpu(), (3, 32, 32)).blocks)
        sn = Supernet(rt.prepare(model), space)
        data = _data(64)
        batches = [(data.tensors[0][i:i + 16], data.tensors[1][i:i + 16]) for i in range(0, 64, 16)]
        return score_plan(sn, space.names[:2], resident(batches[:2], rt), resident(batches[2:], rt), rt=rt)

    gpu, cpu = score(Runtime(device=torch.device("cuda"))), score(Runtime())
    assert gpu["images"] == cpu["images"] == 32 and gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)


ROOT = HERE.parent


def _ranks(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes a torchrun started (its children carrying RANK)."""
    ranks = {}
    for pid in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(pid)
    return ranks


def _said(stderr: str) -> str:
    """What the ranks said (their 'updp:' lines), then the end of torchrun's own report."""
    return "\n".join([ln for ln in stderr.splitlines() if "updp:" in ln][-10:] + [stderr[-1500:]])


@pytest.mark.slow
def test_torchrun_runs_the_tiny_config_on_two_processes_and_resumes_after_a_killed_rank(tmp_path):
    """``torchrun --nproc_per_node 2 -m updp run``: rank 1 SIGKILLed during the baseline's training ends the
    job (no hang); the same command again resumes from the mid-epoch checkpoint and finishes: one report,
    ``final.json`` with world size 2."""
    import re
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "updp", "run",
           "--config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(ROOT / "data" / "cifar10_demo.npz"),
           "--run-dir", str(run), "--baseline-epochs", "3", "--checkpoint-minutes", "0.0005"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + 240
    while not (run / "baseline.pt").is_file():  # rank 0's first checkpoint inside the baseline's first epoch
        assert job.poll() is None and time.monotonic() < deadline, _said(job.communicate()[1])
        time.sleep(0.02)
    os.kill(_ranks(job.pid)[1], signal.SIGKILL)
    out, err = job.communicate(timeout=120)
    assert job.returncode != 0 and not (run / "final.json").exists()
    saved = torch.load(run / "baseline.pt", weights_only=True)
    assert 0 < saved["step"] and not saved["complete"]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert again.returncode == 0, _said(again.stderr)
    assert re.search(rf"baseline:[^\n\r]*\b{saved['step']}/\d+", again.stderr)  # the bar starts where it stopped
    final = json.loads((run / "final.json").read_text())
    assert final["world_size"] == 2 and final["training_device"] == "cpu"
    assert final["max_abs_logit_diff_merged_vs_subnet"] < 1e-4  # trained under DDP, merged exactly
    import optuna

    study = optuna.load_study(study_name="updp", storage=f"sqlite:///{run / 'study.db'}")
    workers = {t.user_attrs.get("worker") for t in study.trials if t.user_attrs.get("latency_source")}
    assert len(workers - {None}) >= 2  # both processes searched as workers of the one study
    assert (run / "report.md").read_text().count("## Final model") == 1
    assert again.stdout.count("final model in") == 1  # rank 0 speaks for the job


@pytest.mark.slow
def test_compiled_training_steps_follow_the_eager_ones(tmp_path):
    """``--compile`` (torch.compile, inductor on the CPU here): the same weights as eager, to float tolerance."""
    data = TensorDataset(torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(0)),
                         torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1)))

    def train(compile_):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 10))
        trainer = Trainer(model, TrainConfig(epochs=1, batch_size=16), data, ce_step(), tmp_path / f"c{compile_}.pt",
                          rt=Runtime(compile=compile_))
        trainer.fit()
        assert hasattr(trainer.ctx.net, "_orig_mod") == compile_  # the steps ran the compiled module
        return model.state_dict()

    eager, compiled = train(False), train(True)
    for k in eager:
        assert torch.allclose(eager[k], compiled[k], rtol=1e-4, atol=1e-6), k


def test_a_finished_command_leaves_its_process_group():
    """After a command returns, the CLI destroys the process group torchrun's job joined: a gloo group
    left to the interpreter's exit can abort the finished process (SIGABRT after its work was done)."""
    code = ("import sys, torch.distributed as dist\n"
            "from updp.cli import main\n"
            "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
            "code = main(['blocks', 'test_convnext'])\n"
            "print('code', code, 'still_in_group', dist.is_initialized())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "code 0 still_in_group False"
