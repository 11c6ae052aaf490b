"""Worker processes sharing one study: opening it at once, and SIGKILLed mid-trial and restarted.

A worker is a real process (forked, so it starts at once) running the real
``updp.search.study`` code (``open_storage``, ``worker_slot``,
``make_sampler``, ``Objective``, ``optimize``) over a 10-block search space,
with a cheap deterministic scorer and latency and a short sleep per trial.
The harness starts, kills and restarts such workers; ``check`` asserts what
the study they leave must be. Run as a script, this is one worker.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

STUDY = "killed"


def toy_space():
    """10 prunable blocks in 3 stages: 1024 plans, enough for a few dozen distinct trials."""
    from updp.pruner.spec import BlockSpec
    from updp.search.space import SearchSpace

    blocks = [BlockSpec(f"stages.{s}.blocks.{i}", s, i, "toy", "ToyBlock", 8, 8, 1, macs=100 + 10 * i, params=10,
                        merged_macs=50) for s, n in enumerate((3, 4, 3)) for i in range(n)]
    return SearchSpace.build("toy", blocks)


class Scorer:
    """Deterministic top-1 of a plan; writes when it starts (monotonic clock) so the harness can kill it."""

    def __init__(self, work_dir: Path, sleep_s: float):
        self.busy, self.sleep_s = work_dir / f"busy-{os.getpid()}", sleep_s

    def __call__(self, plan) -> dict:
        tmp = self.busy.with_suffix(".tmp")
        tmp.write_text(repr(time.monotonic()))
        tmp.replace(self.busy)
        time.sleep(self.sleep_s)
        return {"top1": 80.0 - 2.0 * len(plan) - 0.1 * sum(len(n) for n in plan), "loss": 1.0 + 0.01 * len(plan)}


def latency(plan):
    return 10.0 - 0.5 * len(plan) - 0.01 * sum(int(n[-1]) for n in plan), "predicted", {"toy": True}


def worker(url: str, work_dir: Path, target: int, sleep_s: float) -> None:
    from updp.search import study as st

    storage = st.open_storage(url, work_dir, heartbeat_s=1, grace_s=5)
    slot = st.worker_slot(work_dir)
    study = st.open_study(storage, STUDY, st.make_sampler("nsga2", 0, target, slot))
    space = toy_space()
    st.seed_study(study, space, "blocks")
    objective = st.Objective(space, "blocks", Scorer(work_dir, sleep_s), latency, budget_ms=None)
    print(json.dumps({"slot": slot, **st.optimize(study, objective, target)}), flush=True)


# --- the harnesses -----------------------------------------------------------------------------

def _open_at_go(url: str, barrier: Path, i: int, rounds: int) -> None:
    from updp.search import study as st

    failed = 0
    for k in range(rounds):
        (barrier / f"ready-{k}-{i}").touch()
        while not (barrier / f"go-{k}").exists():
            time.sleep(0.0005)
        try:
            st.open_study(st.open_storage(url.format(k=k), barrier), "first", None)
        except Exception as e:  # noqa: BLE001 - reported, counted
            print(f"worker {i}, round {k}: {e}", file=sys.stderr)
            failed += 1
    sys.exit(min(failed, 100))


def open_all_at_once(url: str, barrier: Path, n: int = 6, rounds: int = 3) -> list[int]:
    """``n`` processes open a new study (``url.format(k=round)``) at the same moment, ``rounds`` times.

    One round may miss the race on 2 cores (a process must look for the tables
    while another creates them); without a fix, most rounds hit it. The exit
    codes: how many opens failed in each process.
    """
    procs = [multiprocessing.get_context("fork").Process(target=_open_at_go, args=(url, barrier, i, rounds))
             for i in range(n)]
    for p in procs:
        p.start()
    for k in range(rounds):
        deadline = time.monotonic() + 120
        while len(list(barrier.glob(f"ready-{k}-*"))) < n and time.monotonic() < deadline:  # a hang guard
            time.sleep(0.002)
        (barrier / f"go-{k}").touch()
    for p in procs:
        p.join(timeout=300)
    return [p.exitcode for p in procs]



def start(url: str, work_dir: Path, target: int, sleep_s: float) -> multiprocessing.Process:
    """A worker process, forked from this one (already past its imports: a fresh interpreter takes seconds)."""
    p = multiprocessing.get_context("fork").Process(target=worker, args=(url, work_dir, target, sleep_s))
    p.start()
    return p


def kill_mid_trial(p: multiprocessing.Process, work_dir: Path, sleep_s: float, rng: random.Random) -> None:
    """SIGKILL ``p`` at a random moment inside the scorer of one of its next trials."""
    busy, seen, deadline = work_dir / f"busy-{p.pid}", None, time.monotonic() + 240
    skip = rng.randint(0, 2)  # kill during the 1st, 2nd or 3rd trial we see start
    while time.monotonic() < deadline:
        assert p.exitcode is None, f"worker {p.pid} exited before it could be killed ({p.exitcode})"
        started = float(busy.read_text()) if busy.exists() else None
        if started is not None and started != seen:
            seen, kill_at = started, started + rng.uniform(0.1, 0.7) * sleep_s
            if skip == 0 and time.monotonic() < kill_at:
                time.sleep(kill_at - time.monotonic())
                os.kill(p.pid, signal.SIGKILL)
                p.join()
                return
            skip = max(0, skip - 1)
        time.sleep(0.005)
    raise AssertionError(f"worker {p.pid} ran no trial in 240 s")


def run(url: str, work_dir: Path, workers: int = 4, kills: int = 2, target: int = 40, sleep_s: float = 0.25,
        seed: int | None = None) -> None:
    """Start ``workers``, SIGKILL ``kills`` of them mid-trial and restart each; wait for all to finish."""
    seed = random.randrange(2 ** 32) if seed is None else seed
    print(f"killed-workers harness seed: {seed}")  # shown by pytest on failure
    rng = random.Random(seed)
    procs = [start(url, work_dir, target, sleep_s) for _ in range(workers)]
    for victim in rng.sample(range(workers), kills):
        kill_mid_trial(procs[victim], work_dir, sleep_s, rng)
        assert procs[victim].exitcode == -signal.SIGKILL
        procs[victim] = start(url, work_dir, target, sleep_s)
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * workers, "a worker failed (its traceback is in the captured stderr)"


def check(study, target: int, workers: int, kills: int) -> dict:
    """The study a killed-workers run leaves: no trial lost, run twice or retried twice."""
    from optuna.trial import TrialState

    from updp.search import study as st

    trials = study.get_trials(deepcopy=False)
    counts = st.summary_counts(study)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert target <= counts["complete"] <= target + workers - 1, counts
    assert counts["running"] == 0 and counts["waiting"] == 0, counts
    plans = Counter(t.user_attrs["plan"] for t in trials if t.state == TrialState.COMPLETE)
    assert not [p for p, n in plans.items() if n > 1], "a plan was evaluated twice"
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == kills, [(t.number, t.user_attrs) for t in failed]
    for t in failed:
        assert t.user_attrs.get("fail_reason", "").startswith(("worker process", "no heartbeat")), t.user_attrs
        retries = [r for r in trials if st.retried_trial(r) == t.number]
        assert len(retries) == 1, f"trial {t.number} retried {len(retries)} times"
        assert retries[0].system_attrs["failed_trial"] == t.system_attrs.get("failed_trial", t.number)
    return counts


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))


def heartbeat_goes_stale(study):
    """A trial of another host whose heartbeat stops; returns it as ``fail_stale_trials`` left it.

    The worker attribute names another host, so no pid check can fail it: only the heartbeat tells.
    The study's storage must have been opened with a short heartbeat and grace period.
    """
    import warnings

    import optuna

    from updp.search import study as st

    with warnings.catch_warnings():  # Optuna: "heartbeats are meant for study.optimize"
        warnings.simplefilter("ignore")
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("worker", "another-host:123")
    study._storage.record_heartbeat(trial._trial_id)
    deadline = time.monotonic() + 60
    while not st.fail_stale_trials(study) and time.monotonic() < deadline:  # until the grace period is over
        time.sleep(0.2)
    return study.trials[trial.number]
