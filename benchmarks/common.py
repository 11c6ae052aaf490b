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
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


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
