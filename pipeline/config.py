"""The search run's configuration (YAML file and CLI flags map onto it), and its checks."""
from __future__ import annotations

from dataclasses import dataclass, field

from updp.core.config import ConfigError, option
from updp.core.errors import UpdpError
from updp.latency.backends import NAMES
from updp.latency.base import PRECISIONS
from updp.pruner.schedule import SCHEDULES
from updp.search.forms import MODES as FORM_MODES
from updp.search.metrics import METRICS, SCORE_SPLITS
from updp.search.study import SAMPLERS, SEEDINGS, make_sampler
from updp.train.progressive_training import FadeConfig
from updp.train.runtime import RuntimeConfig, resolve

SPACES = ("blocks", "stages")
SUPERNET_SAMPLING = ("sandwich", "uniform", "budget")
LATENCY_MODES = ("measure", "table", "hybrid")
# trtexec: figures imported from a target that only runs trtexec ('updp latency export' / 'import')
SEARCH_BACKENDS = (*NAMES, "trtexec")


@dataclass(frozen=True)
class DataConfig:
    root: str = option("", "ImageFolder dataset with train/ and val/, or an .npz", "--data", metavar="DIR")
    img_size: int = option(32, "training and scoring image size", "--img-size", metavar="PX")
    batch_size: int = option(64, "training batch size", "--batch-size")
    calib_images: int = option(256, "images for BN re-estimation per candidate")
    eval_images: int = option(2000, "images scored per candidate (from --score-on's split, all of it when smaller)",
                              "--eval-images", metavar="N")
    cache_mb: float = option(2048, "decode a split into memory once if its images fit in this many MB, else "
                             "stream it from disk (decoded in the DataLoader workers)", "--cache-mb", metavar="MB")


@dataclass(frozen=True)
class BaselineConfig:
    epochs: float = option(10, "baseline training epochs (when no checkpoint is given)", "--baseline-epochs")
    lr: float = option(2e-3, "baseline learning rate")


@dataclass(frozen=True)
class SupernetConfig:
    epochs: float = option(3, "supernet training epochs", "--supernet-epochs")
    lr: float = option(1e-3, "supernet learning rate")
    random_plans: int = option(1, "sandwich rule: full + most pruned + this many random plans per step")
    # uniform: its scores order trained plans best where they differ (results/ranking_fidelity.md); the sandwich
    # rule trains the most pruned plan every step and scores it above what it reaches after training
    sampling: str = option("uniform", "subnets trained each step besides the full model: uniform (random plans), "
                           "sandwich (the most pruned plan + random ones), budget (the most pruned + random ones "
                           "drawn near the latency budget)", "--supernet-sampling", SUPERNET_SAMPLING)
    kd_alpha: float = option(0.5, "weight of the distillation loss")
    kd_temperature: float = option(2.0, "distillation temperature")


@dataclass(frozen=True)
class LatencyConfig:
    backend: str = option("auto", "latency backend; trtexec: only figures imported with 'updp latency import' "
                          "(with --latency-mode table and --latency-device)", "--backend", SEARCH_BACKENDS)
    mode: str = option("hybrid", "measure every plan, predict from the per-block table, or predict and measure "
                       "plans joining the front (hybrid)", "--latency-mode", LATENCY_MODES)
    batch_size: int = option(1, "latency batch size")
    img_size: int | None = option(None, "input size of every latency figure, search and final (default: "
                                  "--img-size)", "--latency-img-size", metavar="PX")
    precision: str = option("fp32", "latency precision", "--precision", PRECISIONS)
    threads: int | None = option(None, "CPU threads for CPU backends", "--threads")
    runs: int = option(50, "timed runs per figure")
    verify_top: int = option(8, "hybrid: at most this many plans measured in their trials")
    fit_plans: int = option(16, "random plans timed (with the table's single blocks) to fit the latency model "
                            "that predicts plans; 0: the additive table predicts", "--fit-plans", metavar="N")
    held_out_plans: int = option(8, "other random plans timed in that pass to report the model's error")
    merge_forms: str = option("auto", "auto: time each family's merged forms on the target (before the table), merge "
                              "every block in its group's fastest form and leave out blocks no form speeds up; "
                              "default: every family's default form, nothing timed", "--merge-forms", FORM_MODES)
    device: str | None = option(None, "trtexec backend: the device name of the imported figures to use",
                                "--latency-device", metavar="NAME")
    cache: str | None = option(None, "trtexec backend: the latency cache the figures were imported into "
                               "(default: $UPDP_CACHE_DIR or ~/.cache/updp/latency.sqlite)", "--latency-cache",
                               metavar="FILE")


@dataclass(frozen=True)
class SearchConfig:
    trials: int = option(50, "completed trials to reach", "--trials", metavar="N")
    sampler: str = option("ehvi", f"sampler: {', '.join(SAMPLERS)} (ehvi: updp's own; the others Optuna's), or "
                          "module:Class of an installed Optuna sampler (e.g. an OptunaHub one)", "--sampler",
                          metavar="NAME")
    space: str = option("blocks", "one boolean per block, or a pruned count per stage", "--space", SPACES)
    metric: str = option("likelihood", "what the search maximizes: the supernet's likelihood of the true class, "
                         "100 x exp(-cross-entropy) (far less noisy than top-1 on the same images), or its top-1",
                         "--metric", METRICS)
    # train: on the CIFAR-10 subset the likelihood on 500 / 1,000 / 2,000 / 4,000 training images ranks 12 trained
    # plans with Kendall tau 0.70 / 0.73 / 0.67 / 0.64, on the 500 held-out ones 0.42 (results/ranking_fidelity.md;
    # tau's standard error is ~0.2 with 12 plans); the order of plans is what counts, not the level
    score_on: str = option("train", "images each candidate is scored on: training images (--eval-images of them; "
                           "the supernet has seen them, yet they rank plans by trained accuracy far better, see "
                           "results/ranking_fidelity.md) or the held-out tenth of the training set it never trains "
                           "on", "--score-on", tuple(SCORE_SPLITS))
    seed: int = option(0, "seed of the sampler, subsets and training", "--seed")
    seeding: str = option("auto", "first trials: simple seed plans, or also every block alone and then the greedy "
                          "chain (blocks by score lost per ms saved); auto: greedy in the block space when --trials "
                          "is at least 5 x the blocks and the sampler is not ehvi", "--seeding", SEEDINGS)
    latency_budget_ms: float | None = option(None, "latency budget in ms", "--latency-budget-ms", metavar="MS")
    target_speedup: float | None = option(None, "budget = baseline latency / X", "--target-speedup", metavar="X")
    budget_frac: float | None = option(
        None, "budget = baseline - F x (baseline - most-pruned plan), both as the latency table measured them: "
        "0 < F <= 1, reachable on any machine", "--budget-frac", metavar="F")
    keep: list[str] = option(help="never prune BLOCK (repeatable)", flag="--keep", metavar="BLOCK", factory=list)
    max_per_stage: int | None = option(None, "at most N pruned blocks per stage", "--max-per-stage", metavar="N")
    finetune_steps: int = option(0, "short fine-tune per candidate", "--finetune-steps", metavar="N")
    storage: str | None = option(None, "Optuna storage URL, or journal:PATH (default: RUN/study.db)", "--storage",
                                 metavar="URL")
    study_name: str = option("updp", "Optuna study name")


@dataclass(frozen=True)
class TrainPlanConfig(FadeConfig):
    """Progressive training of the chosen plan (method.md sections 2 and 7)."""

    plan: list[str] | None = option(None, "blocks to prune (default: the search's best plan under the budget)")


@dataclass(frozen=True)
class RunConfig:
    model: str = option("", "timm model name", "--model")
    run_dir: str | None = option(None, "run directory (default: runs/<model>)")
    checkpoint: str | None = option(None, "baseline weights (default: train a baseline on DATA)", "--checkpoint",
                                    metavar="FILE")
    pretrained: bool = option(False, "start from timm's pretrained weights (needs the model hub)", "--pretrained")
    num_classes: int | None = option(None, "default: the number of classes in DATA", "--num-classes", metavar="N")
    data: DataConfig = field(default_factory=DataConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainPlanConfig = field(default_factory=TrainPlanConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


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
    _positive(cfg, "data.img_size data.batch_size data.calib_images data.eval_images baseline.lr supernet.lr "
                   "latency.batch_size latency.runs search.trials train.lr supernet.kd_temperature "
                   "train.kd_temperature")
    _positive(cfg, "data.cache_mb baseline.epochs supernet.epochs train.epochs supernet.random_plans "
                   "latency.verify_top latency.fit_plans latency.held_out_plans search.finetune_steps "
                   "train.stagger_frac", strict=False)
    _positive(cfg, "num_classes latency.img_size latency.threads search.max_per_stage search.latency_budget_ms",
              optional=True)
    if cfg.search.sampler not in SAMPLERS:  # an import path: built (imported) here, before any long work
        try:
            make_sampler(cfg.search.sampler, 0, cfg.search.trials)
        except UpdpError as e:
            raise ConfigError(f"search.sampler: {e}") from None
    _choice("search.space", cfg.search.space, SPACES)
    _choice("search.seeding", cfg.search.seeding, SEEDINGS)
    _choice("supernet.sampling", cfg.supernet.sampling, SUPERNET_SAMPLING)
    _choice("latency.mode", cfg.latency.mode, LATENCY_MODES)
    _choice("latency.backend", cfg.latency.backend, SEARCH_BACKENDS)
    if cfg.latency.backend == "trtexec":
        if cfg.latency.mode != "table":
            raise ConfigError(f"--backend trtexec predicts every plan from imported figures and measures none: "
                              f"use --latency-mode table (not {cfg.latency.mode})")
        if not cfg.latency.device:
            raise ConfigError("--backend trtexec needs --latency-device NAME: the GPU the imported trtexec figures "
                              "were timed on (as 'updp latency import' printed it)")
    _choice("latency.precision", cfg.latency.precision, PRECISIONS)
    _choice("latency.merge_forms", cfg.latency.merge_forms, FORM_MODES)
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
    if cfg.supernet.sampling == "budget" and not budgets:
        raise ConfigError("--supernet-sampling budget draws subnets near the latency budget: give one "
                          "(--latency-budget-ms, --target-speedup or --budget-frac), or use sandwich or uniform")
    resolve(cfg.runtime)  # the device, precision, workers and checkpoint period this machine can give
    if t.plan is not None and not t.plan:
        raise ConfigError("train.plan is empty: name at least one block (see 'updp blocks MODEL') or leave it unset")
