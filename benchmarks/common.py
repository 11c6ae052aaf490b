"""Shared bits of the benchmark scripts: context and result writing."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime
import pandas as pd
import timm
import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"


def context() -> dict:
    gpu = {}
    if torch.cuda.is_available():  # the GPU this process sees and torch's CUDA build
        gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
               "bf16": torch.cuda.is_bf16_supported()}
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), **gpu, "torch": torch.__version__, "timm": timm.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def device_name(rt) -> str:
    """Where a benchmark trained (its runtime): the CPU, or the GPU's name and the mixed precision."""
    return f"{torch.cuda.get_device_name(rt.device)}, amp {rt.amp}" if rt.cuda else "cpu"


def require_data(path: str) -> None:
    """Exit cleanly (status 0, one line) when a dataset the benchmark reads is not on this machine.

    Datasets under other terms (Imagenette: ImageNet's) are read where they are, never copied into the project.
    """
    if not Path(path).exists():
        print(f"skipped: dataset {path} is not on this machine")
        raise SystemExit(0)


def shown(path: str) -> str:
    """A path as a command line in results/ should show it: relative to the repository when inside it."""
    full = Path(path).resolve()
    return str(full.relative_to(RESULTS.parent)) if full.is_relative_to(RESULTS.parent) else str(path)


def write_results(name: str, df: pd.DataFrame, title: str, notes: str = "") -> None:
    """``results/NAME.csv`` and ``results/NAME.md`` (title, notes, table, the run's context; also printed)."""
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / f"{name}.csv", index=False)
    ctx = "\n".join(f"- {k}: {v}" for k, v in context().items())
    table = df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt='.4g', missingval='-')
    md = f"# {title}\n\n{notes}\n\n{table}\n\nContext:\n{ctx}\n"
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


def combine_results(name: str, parts_glob: str, skip_suffix: str, cols: list[str], title: str, notes: str,
                    rebuild: str) -> pd.DataFrame:
    """``results/NAME.{csv,md}``: the result tables ``parts_glob`` matches (not ``*SKIP_SUFFIX``) in one table,
    ``cols`` of them (those present) plus ``run`` (the part's name), with each part's command listed."""
    parts = sorted(p for p in RESULTS.glob(parts_glob) if not p.stem.endswith(skip_suffix))
    if not parts:
        raise SystemExit(f"no results/{parts_glob} yet: run the benchmark first")
    table = pd.concat([pd.read_csv(p).assign(run=p.stem) for p in parts], ignore_index=True)
    commands = [f"- {p.stem}: `{p.with_suffix('.md').read_text().split('Command: ', 1)[1].splitlines()[0]}`"
                for p in parts]
    # parts kept only on the machine that ran them (Imagenette's, under ImageNet's terms): their rows and
    # commands stay as the last combined table had them
    earlier_csv, earlier_md = RESULTS / f"{name}.csv", RESULTS / f"{name}.md"
    if earlier_csv.is_file() and earlier_md.is_file():
        earlier = pd.read_csv(earlier_csv)
        gone = earlier[~earlier.run.isin([p.stem for p in parts])]
        table = pd.concat([table, gone], ignore_index=True)
        commands += [line for line in earlier_md.read_text().splitlines()
                     if any(line.startswith(f"- {run}: `") for run in gone.run.unique())]
    table = table[[c for c in [*cols, "run"] if c in table.columns]]
    commands = "\n".join(commands)
    write_results(name, table, title, f"{notes}\n\nCommands (`{rebuild}` rebuilds this table):\n{commands}")
    return table
