"""The search run's configuration (YAML file and CLI flags map onto it)."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    img_size: int | None = None  # default: the model's own input size
    precision: str = "fp32"
    threads: int | None = None
    runs: int = 50
    verify_top: int = 8  # hybrid: measure this many best plans at the end


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 50
    sampler: str = "nsga2"  # nsga2 | tpe
    space: str = "blocks"  # blocks (one boolean each) | stages (pruned count per stage)
    seed: int = 0
    latency_budget_ms: float | None = None
    target_speedup: float | None = None
    keep: list[str] = field(default_factory=list)
    max_per_stage: int | None = None
    finetune_steps: int = 0
    storage: str | None = None
    study_name: str = "updp"


@dataclass(frozen=True)
class TrainPlanConfig:
    """Progressive training of the chosen plan (method.md sections 2 and 7)."""

    plan: list[str] | None = None  # default: the search's best plan under the budget
    epochs: float = 6
    lr: float = 1e-3
    schedule: str = "linear"  # linear | cosine
    lambda_end_frac: float = 0.6  # lambda reaches 0 at this fraction of training
    stagger_frac: float = 0.0  # each block starts fading this fraction of training after the previous
    kd_alpha: float = 0.5
    kd_temperature: float = 2.0


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
