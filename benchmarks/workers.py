"""Trials per hour with 1 and 2 workers sharing one study, on PostgreSQL and on a journal file.

Each worker is a fresh process with 1 torch thread running the real search
code as ``updp search`` runs it (``open_storage``, ``worker_slot``, the
pipeline's ``worker_sampler`` and ``study_seeding``, ``Objective``,
``optimize``) over convnext_atto's blocks; a trial costs a fixed CPU load
(forward passes of the unpruned model) so that 2 workers can use 2 cores. The
clock starts when every worker is past its imports and stops when the last one
finishes; lost trials (RUNNING/WAITING left) and plans evaluated twice are
counted. PostgreSQL is a throwaway server started here (tests/pgserver.py).

The control row (storage "none") runs the same compute without a study: its
ratio is what this machine gives 2 processes at that moment (the 2 cores are
shared with other users), the bound for the storages' ratios.

Run: python benchmarks/workers.py [--trials 40] [--workers 1,2] [--storages none,postgres,journal]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
from common import write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import pgserver  # noqa: E402 - the tests' throwaway server


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40, help="COMPLETE trials per run")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--storages", default="none,postgres,journal", help="'none' is the control: compute only")
    p.add_argument("--model", default="convnext_atto")
    p.add_argument("--img", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--passes", type=int, default=2, help="forward passes per trial: its fixed cost")
    p.add_argument("--n-workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("URL", "DIR"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- one worker process -------------------------------------------------------------------------

def worker(args: argparse.Namespace, url: str, work_dir: Path) -> None:
    import torch

    from updp.pipeline.search import study_seeding, worker_sampler
    from updp.pruner import create_model, find_blocks
    from updp.search import study as st
    from updp.search.space import SearchSpace

    torch.set_num_threads(1)
    model = create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.img, args.img)
    space = SearchSpace.build(args.model, find_blocks(model, (3, args.img, args.img)).blocks)

    def scorer(plan):
        with torch.no_grad():
            for _ in range(args.passes):
                model(x)
        return {"top1": 80.0 - len(plan), "loss": 1.0}

    def latency(plan):
        return 10.0 - 0.5 * len(plan), "predicted", {}

    if url == "none":  # the control: the same compute, no study
        _at_go(work_dir)
        for _ in range(args.trials // args.n_workers):
            scorer(frozenset())
    else:
        # as run_search: the sampler seeded by this worker's slot and steered off tried plans, seed plans first
        sampler = worker_sampler("nsga2", space, "blocks", 0, args.trials, st.worker_slot(work_dir))
        study = st.open_study(st.open_storage(url, work_dir), "bench", sampler)
        seeding = study_seeding(space, "blocks", "auto", args.trials, "nsga2")
        seeding.enqueue(study)
        objective = st.Objective(space, "blocks", scorer, latency, budget_ms=None)
        _at_go(work_dir)
        st.optimize(study, objective, args.trials, callbacks=[seeding])
    (work_dir / f"done-{os.getpid()}").write_text(repr(time.monotonic()))


def _at_go(work_dir: Path) -> None:
    (work_dir / f"ready-{os.getpid()}").touch()
    while not (work_dir / "go").exists():
        time.sleep(0.005)


# --- the driver ---------------------------------------------------------------------------------

def run_workers(args: argparse.Namespace, url: str, n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="updp-bench-") as tmp:
        work_dir = Path(tmp)
        url = url.format(dir=work_dir)
        cmd = [sys.executable, __file__, "--worker", url, str(work_dir), "--trials", str(args.trials),
               "--model", args.model, "--img", str(args.img), "--batch", str(args.batch),
               "--passes", str(args.passes), "--n-workers", str(n)]
        procs = [subprocess.Popen(cmd, cwd=ROOT / "benchmarks") for _ in range(n)]
        while len(list(work_dir.glob("ready-*"))) < n:
            if any(p.poll() for p in procs):
                raise RuntimeError("a worker failed before it was ready")
            time.sleep(0.05)
        t0 = time.monotonic()
        (work_dir / "go").touch()
        if any(p.wait() for p in procs):
            raise RuntimeError("a worker failed")
        elapsed = max(float(f.read_text()) for f in work_dir.glob("done-*")) - t0
        if url == "none":
            return {"workers": n, "elapsed_s": elapsed, "complete": n * (args.trials // n)}
        return {"workers": n, "elapsed_s": elapsed, **study_figures(url, work_dir)}


def study_figures(url: str, work_dir: Path) -> dict:
    from optuna.trial import TrialState

    from updp.search import study as st

    study = st.open_study(st.open_storage(url, work_dir), "bench", None)
    counts = st.summary_counts(study)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    plans = Counter(t.user_attrs["plan"] for t in complete)
    return {**counts, "lost": counts["running"] + counts["waiting"],
            "plans_evaluated_twice": sum(c - 1 for c in plans.values()),
            "score_s_mean": sum(t.user_attrs["score_s"] for t in complete) / max(1, len(complete))}


def run_storage(args: argparse.Namespace, storage: str, counts: list[int]) -> tuple[list[dict], str]:
    if storage == "none":
        return [run_workers(args, "none", n) for n in counts], "none (control: the trial's compute alone)"
    if storage == "journal":
        return [run_workers(args, "journal:{dir}/study.journal", n) for n in counts], "journal file (local disk)"
    rows = []
    with pgserver.pg_server() as server:
        version = _pg_version(server)
        for n in counts:
            rows.append(run_workers(args, pgserver.create_database(server, f"bench_{n}_{os.getpid()}"), n))
    return rows, version


def _pg_version(url: str) -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        version = conn.execute(sqlalchemy.text("SHOW server_version")).scalar()
    engine.dispose()
    return f"PostgreSQL {version.split()[0]} (local, fsync off)"


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args, args.worker[0], Path(args.worker[1]))
    counts = [int(n) for n in args.workers.split(",")]
    rows = []
    for storage in args.storages.split(","):
        load = os.getloadavg()[0]
        runs, described = run_storage(args, storage, counts)
        one = runs[0]["complete"] / runs[0]["elapsed_s"]
        for r in runs:
            rate = r["complete"] / r["elapsed_s"]
            rows.append({"storage": described, **r, "trials_per_hour": 3600 * rate,
                         "ratio_vs_1_worker": rate / one, "load_avg_before": load})
    df = pd.DataFrame(rows)
    write_results("workers", df, "Trials per hour with 1 and 2 workers sharing a study", notes(args))


def notes(args: argparse.Namespace) -> str:
    import psycopg2
    import sqlalchemy

    default = vars(parse_args([]))
    changed = "".join(f" --{k} {getattr(args, k)}" for k in ("model", "img", "batch", "passes")
                      if getattr(args, k) != default[k])
    return (f"Trial: {args.passes} forward passes of {args.model} (batch {args.batch}, {args.img} px, fp32, "
            f"1 torch thread per worker; score_s_mean is its measured cost) plus the study's own work "
            f"(sampling, duplicate check, storage). {args.trials} COMPLETE trials per run; NSGA-II as "
            f"`updp search` runs it (seeded by the worker's slot, steered off plans the study holds, seed plans "
            f"first); clock from the moment all workers are ready to the last one done. "
            f"trials_per_hour counts COMPLETE trials. Machine: {platform.machine()}, {os.cpu_count()} cores "
            f"(shared with other users: load_avg_before is the 1-minute load average before each storage); "
            f"optuna {optuna.__version__}, SQLAlchemy {sqlalchemy.__version__}, psycopg2 "
            f"{psycopg2.__version__.split()[0]}.\n\nCommand: python benchmarks/workers.py --trials {args.trials} "
            f"--workers {args.workers} --storages {args.storages}{changed}")


if __name__ == "__main__":
    main()
