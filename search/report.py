"""The search report: trials.csv, pareto.csv, a Pareto plot and a Markdown summary."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from updp.core.fileio import atomic_path, write_text
from updp.search.metrics import METRIC_AXES, METRIC_NAMES
from updp.search.study import trial_plan

COLUMNS = ["trial", "state", "score", "latency_ms", "latency_source", "n_pruned", "pruned", "top1", "loss",
           "predicted_latency_ms", "feasible", "score_s", "latency_s", "fail_reason", "duplicate_of"]


RULE = ("Every figure, the front and the best plan use each trial's own objective values: the score (the "
        "search metric: {metric}, on {images}), and latency measured where the trial was "
        "measured (latency_source 'measured'), else predicted by the latency table. With a latency budget the "
        "Pareto front is that of the plans within the budget (Optuna's rule for constrained studies); the best "
        "plan is the front's highest score. top1 and loss: the supernet's top-1 (%) and cross-entropy on the same "
        "images, from the same pass.")


def trials_frame(study: optuna.Study, model: str, budget_ms: float | None = None) -> pd.DataFrame:
    """One row per trial; ``score`` and ``latency_ms`` are the trial's objective values (see ``RULE``)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        done = t.state == TrialState.COMPLETE
        latency = t.values[1] if done else a.get("latency_ms")
        source = a.get("latency_source")
        rows.append({
            "trial": t.number, "state": t.state.name, "score": t.values[0] if done else math.nan,
            "latency_ms": latency, "latency_source": source,
            "n_pruned": a.get("n_pruned"), "pruned": trial_plan(t, model).to_str(), "top1": a.get("top1"),
            "loss": a.get("loss"),
            "predicted_latency_ms": latency if source == "predicted" else a.get("predicted_latency_ms"),
            "feasible": bool(done and (budget_ms is None or (latency is not None and latency <= budget_ms))),
            "score_s": a.get("score_s"), "latency_s": a.get("latency_s"),
            "fail_reason": a.get("fail_reason") or a.get("dropped"), "duplicate_of": a.get("duplicate_of")})
    return pd.DataFrame(rows, columns=COLUMNS)


def pareto_front(df: pd.DataFrame, budget_ms: float | None = None) -> pd.DataFrame:
    """Completed plans (within ``budget_ms`` when given) no other such plan dominates on score (up) and
    latency (down): Optuna's rule, so the front equals ``study.best_trials``, which in a study with
    constraints looks at feasible trials only (equal points are all kept)."""
    done = df[df.state == "COMPLETE"]
    if budget_ms is not None:
        done = done[done.latency_ms.astype(float) <= budget_ms]
    done = done.drop_duplicates("pruned").sort_values(["latency_ms", "score"], ascending=[True, False])
    points = list(zip(done.score, done.latency_ms))
    keep = [not any(s2 >= s and ms2 <= ms and (s2, ms2) != (s, ms) for s2, ms2 in points) for s, ms in points]
    return done[pd.Series(keep, index=done.index, dtype=bool)].reset_index(drop=True)


def best_under_budget(front: pd.DataFrame, budget_ms: float | None) -> pd.Series | None:
    ok = front if budget_ms is None else front[front.latency_ms <= budget_ms]
    return None if ok.empty else ok.sort_values("score", ascending=False).iloc[0]


def plot(df: pd.DataFrame, front: pd.DataFrame, path: Path, title: str, subtitle: str,
         budget_ms: float | None, metric: str = "top1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = df[df.state == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    ax.scatter(done.latency_ms, done.score, s=16, c="0.65", label=f"trials ({len(done)})")
    ax.plot(front.latency_ms, front.score, "-", c="tab:red", lw=1.5, drawstyle="steps-post",
            label=f"Pareto front ({len(front)})")
    for source, fill in (("measured", "tab:red"), ("predicted", "white")):
        pts = front[front.latency_source == source]
        ax.scatter(pts.latency_ms, pts.score, s=36, c=fill, edgecolors="tab:red", zorder=4,
                   label=f"front, latency {source}")
    base = done[done.n_pruned == 0]
    if not base.empty:
        ax.scatter(base.latency_ms, base.score, marker="*", s=220, c="gold", edgecolors="k", zorder=5,
                   label="baseline (unpruned)")
    if budget_ms:
        ax.axvline(budget_ms, ls="--", c="tab:blue", lw=1, label=f"budget {budget_ms:.3g} ms")
    ax.set_xlabel("latency (ms, lower is better)")
    ax.set_ylabel(METRIC_AXES[metric])
    ax.set_title(title, fontsize=11)
    fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=7.5, color="0.3", wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _md_table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".4g")


def write_report(run_dir: Path, study: optuna.Study, context: dict, budget_ms: float | None) -> dict:
    """Write the four report files into ``run_dir``; returns the best plan under the budget."""
    metric = context.get("metric", "top1")  # a report saved before --metric: top-1
    df = trials_frame(study, context.get("model", ""), budget_ms)
    front = pareto_front(df, budget_ms)
    for name, frame in (("trials.csv", df), ("pareto.csv", front)):
        with atomic_path(run_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    ctx_line = ", ".join(f"{k} {v}" for k, v in context.items() if k in
                         ("backend", "device", "precision", "batch_size", "latency_input", "latency_mode"))
    plot(df, front, run_dir / "pareto.png", f"{context.get('model')} on {context.get('data')}: "
         "accuracy vs latency", ctx_line, budget_ms, metric)
    best = best_under_budget(front, budget_ms)
    write_text(run_dir / "report.md", _markdown(df, front, best, context, budget_ms, metric))
    states = df.state.value_counts()
    return {"best": None if best is None else best.to_dict(), "front": len(front), "trials": len(df),
            "distinct_plans": int(df.pruned.nunique()), "metric": metric,
            **{state.lower(): int(states.get(state, 0)) for state in ("COMPLETE", "FAIL", "PRUNED")}}


def _markdown(df, front, best, context, budget_ms, metric: str) -> str:
    done = df[df.state == "COMPLETE"]
    failed = df[df.state == "FAIL"]
    pruned = df[df.state == "PRUNED"]
    repeats = int(pruned.duplicate_of.notna().sum())
    rule = RULE.format(metric=METRIC_AXES[metric], images=context.get("score_images", "held-out images"))
    lines = [f"# updp search report: {context.get('model')}", "", rule, "", "## Context", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += ["", "## Best plan under the budget", ""]
    if best is None:
        lines.append(f"No completed plan meets the budget of {budget_ms:.4g} ms.")
    else:
        lines += [f"- trial {int(best.trial)}: supernet {METRIC_NAMES[metric]} {best.score:.2f} %, latency "
                  f"{best.latency_ms:.4g} ms "
                  f"({best.latency_source}), {int(best.n_pruned)} blocks pruned",
                  f"- pruned: {best.pruned.replace(',', ', ') or '(none)'}"]
    if budget_ms:
        lines.append(f"- budget: {budget_ms:.4g} ms")
    lines += ["", "## Pareto front", "", "![Pareto front](pareto.png)", "",
              _md_table(front[["trial", "score", "top1", "latency_ms", "latency_source", "n_pruned", "pruned"]]), "",
              "## Trials", "",
              f"- completed: {len(done)}, failed: {len(failed)}, pruned: {len(pruned)} ({repeats} repeated plans "
              f"not scored again), total: {len(df)}; distinct plans {df.pruned.nunique()} "
              f"({df.pruned.nunique() / max(1, len(df)):.2f} per trial)",
              f"- mean seconds per trial: scoring {done.score_s.mean():.3g}, latency {done.latency_s.mean():.3g}"]
    if not failed.empty:
        lines += ["", "Failed trials:", ""] + [f"- trial {int(r.trial)}: {r.fail_reason}" for r in failed.itertuples()]
    return "\n".join(lines) + "\n"
