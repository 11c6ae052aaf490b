"""The search run's configuration (YAML file and CLI flags map onto it), and its checks."""
from __future__ import annotations

from dataclasses import dataclass, field

from updp.core.config import ConfigError
from updp.core.errors import UpdpError
from updp.search.study import SAMPLERS, make_sampler
from updp.train.progressive_training import FadeConfig


@dataclass(frozen=True)
class DataConfig:
    root: str = ""
    img_size: int = 32
    batch_size: int = 64
    calib_images: int = 256  # BN re-estimation per candidate
    eval_images: int = 500  # held-out training images scored per candidate


@dataclass(frozen=True)
class BaselineConfig:
    epochs: float = 10
    lr: float = 2e-3


@dataclass(frozen=True)
class SupernetConfig:
    epochs: float = 3
    lr: float = 1e-3
    random_plans: int = 1  # sandwich rule: full + most pruned + this many random
    kd_alpha: float = 0.5
    kd_temperature: float = 2.0


@dataclass(frozen=True)
class LatencyConfig:
    backend: str = "auto"
    mode: str = "hybrid"  # measure | table | hybrid
    batch_size: int = 1
    img_size: int | None = None  # default: data.img_size (the size the model is trained and scored at)
    precision: str = "fp32"
    threads: int | None = None
    runs: int = 50
    verify_top: int = 8  # hybrid: measure this many best plans at the end


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 50
    sampler: str = "nsga2"  # nsga2 | tpe | gp | random | module:Class
    space: str = "blocks"  # blocks (one boolean each) | stages (pruned count per stage)
    seed: int = 0
    latency_budget_ms: float | None = None
    target_speedup: float | None = None
    # budget = baseline - F * (baseline - most-pruned plan), both from the latency table: reachable on any machine
    budget_frac: float | None = None
    keep: list[str] = field(default_factory=list)
    max_per_stage: int | None = None
    finetune_steps: int = 0
    storage: str | None = None
    study_name: str = "updp"


@dataclass(frozen=True)
class TrainPlanConfig(FadeConfig):
    """Progressive training of the chosen plan (method.md sections 2 and 7)."""

    plan: list[str] | None = None  # default: the search's best plan under the budget


@dataclass(frozen=True)
class RunConfig:
    model: str = ""
    run_dir: str | None = None  # default: runs/<model>
    checkpoint: str | None = None
    pretrained: bool = False  # timm pretrained weights (needs the hub to be reachable)
    num_classes: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainPlanConfig = field(default_factory=TrainPlanConfig)


SPACES = ("blocks", "stages")
LATENCY_MODES = ("measure", "table", "hybrid")
SCHEDULES = ("linear", "cosine")


def _check(ok: bool, key: str, value, want: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {want}, got {value!r} (flag --{key.split('.')[-1].replace('_', '-')} "
                          f"or config key '{key}')")


def _positive(cfg, keys: str, strict: bool = True, optional: bool = False) -> None:
    for key in keys.split():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if optional and value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if strict else value >= 0)
        _check(ok, key, value, "a positive number" if strict else "zero or more")


def _choice(key: str, value, choices) -> None:
    _check(value in choices, key, value, f"one of {', '.join(choices)}")


def validate(cfg: RunConfig) -> None:
    """Every value checked before any long work: a bad one is a ConfigError naming the key."""
    from updp.latency.backends import NAMES
    from updp.latency.base import PRECISIONS

    _positive(cfg, "data.img_size data.batch_size data.calib_images data.eval_images baseline.lr supernet.lr "
                   "latency.batch_size latency.runs search.trials train.lr supernet.kd_temperature "
                   "train.kd_temperature")
    _positive(cfg, "baseline.epochs supernet.epochs train.epochs supernet.random_plans latency.verify_top "
                   "search.finetune_steps train.stagger_frac", strict=False)
    _positive(cfg, "num_classes latency.img_size latency.threads search.max_per_stage search.latency_budget_ms",
              optional=True)
    if cfg.search.sampler not in SAMPLERS:  # an import path: built (imported) here, before any long work
        try:
            make_sampler(cfg.search.sampler, 0, cfg.search.trials)
        except UpdpError as e:
            raise ConfigError(f"search.sampler: {e}") from None
    _choice("search.space", cfg.search.space, SPACES)
    _choice("latency.mode", cfg.latency.mode, LATENCY_MODES)
    _choice("latency.backend", cfg.latency.backend, NAMES)
    _choice("latency.precision", cfg.latency.precision, PRECISIONS)
    _choice("train.schedule", cfg.train.schedule, SCHEDULES)
    t, s = cfg.train, cfg.search
    _check(0 < t.lambda_end_frac <= 1, "train.lambda_end_frac", t.lambda_end_frac, "in (0, 1]")
    _check(t.stagger_frac < 1, "train.stagger_frac", t.stagger_frac, "below 1")
    for key, a in (("train.kd_alpha", t.kd_alpha), ("supernet.kd_alpha", cfg.supernet.kd_alpha)):
        _check(0 <= a <= 1, key, a, "in [0, 1]")
    _check(s.target_speedup is None or s.target_speedup >= 1, "search.target_speedup", s.target_speedup,
           "at least 1 (e.g. 1.3 for a 1.3x faster model)")
    _check(s.budget_frac is None or 0 < s.budget_frac <= 1, "search.budget_frac", s.budget_frac, "in (0, 1]")
    budgets = [k for k, v in (("latency_budget_ms", s.latency_budget_ms), ("target_speedup", s.target_speedup),
                              ("budget_frac", s.budget_frac)) if v is not None]
    if len(budgets) > 1:
        raise ConfigError(f"give one latency budget, not {' and '.join(budgets)}")
    if t.plan is not None and not t.plan:
        raise ConfigError("train.plan is empty: name at least one block (see 'updp blocks MODEL') or leave it unset")
