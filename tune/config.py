"""The sweep's typed config: the run every trial starts from (a fine-tuning or a distillation
config), search space domains, scheduler, search algorithm, trial resources and publishing; every
problem a trial would hit late is checked before any trial starts.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

from pydantic import Field, model_validator
from ray import tune

from cluster.config import ConfigError, Section, build, set_dotted
from cluster.objectives.metrics import DEFAULT_METRIC, METRICS
from cluster.runs import check_name
from cluster.stages.distill import CORPUS_TASKS, DistillConfig
from cluster.stages.finetune import FinetuneConfig

log = logging.getLogger(__name__)


class Domain(Section):
    """One searched value: exactly one of the keys below."""

    loguniform: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high], log scale")
    uniform: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high]")
    randint: list[int] | None = Field(None, min_length=2, max_length=2, description="[low, high) integers")
    choice: list[Any] | None = Field(None, min_length=1, description="values sampled uniformly")
    grid: list[Any] | None = Field(None, min_length=1, description="every value, crossed with the other grids")

    @model_validator(mode="after")
    def _one(self) -> Domain:
        given = [k for k in ("loguniform", "uniform", "randint", "choice", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, randint, choice, grid (got {given or 'none'})")
        for key in ("loguniform", "uniform", "randint"):
            low_high = getattr(self, key)
            if low_high is not None and not low_high[0] < low_high[1]:
                raise ValueError(f"{key}: low {low_high[0]} must be below high {low_high[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low {self.loguniform[0]} must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "randint", "choice", "grid") if getattr(self, k) is not None)

    def values(self) -> list[Any]:
        """Representative values (the bounds for ranges; randint's high is excluded): the key is checked with
        each before any trial."""
        if self.kind == "randint":
            return [self.randint[0], self.randint[1] - 1]
        return list(getattr(self, self.kind))

    def to_tune(self, grid_choices: bool = False) -> Any:
        if self.kind == "loguniform":
            return tune.loguniform(*self.loguniform)
        if self.kind == "uniform":
            return tune.uniform(*self.uniform)
        if self.kind == "randint":
            return tune.randint(*self.randint)
        if self.kind == "grid" or grid_choices:
            return tune.grid_search(list(self.values()))
        return tune.choice(list(self.choice))


class SchedulerConfig(Section):
    kind: Literal["asha", "pbt", "fifo"] = Field("asha", description="early stopping (asha), population-based "
                                                 "training (pbt), or run every trial to the end (fifo)")
    grace_period: int | None = Field(None, ge=1, description="asha: steps before a trial can be stopped "
                                     "(default: one evaluation interval)")
    reduction_factor: float = Field(3.0, gt=1, description="asha: keep the best 1/factor at each rung")
    max_t: int | None = Field(None, ge=1, description="asha: steps of a full trial (default: the base plan's)")
    perturbation_interval: int | None = Field(None, ge=1, description="pbt: steps between exploit/explore "
                                              "(default: one evaluation interval)")
    mutations: dict[str, Domain] = Field(default_factory=dict, description="pbt: optim.* values to resample")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="pbt: share of trials cloned / replaced")


class SearchAlgConfig(Section):
    kind: Literal["random", "grid", "optuna"] = Field(
        "random", description="random (grids crossed, the rest sampled), grid (choices become grids too), "
        "optuna (TPE)")
    seed: int | None = Field(0, description="sampler seed (random / optuna)")


class TrialConfig(Section):
    workers: int = Field(1, ge=1, description="1: a function trainable; N: a TorchTrainer with N workers per trial")
    cpus: float = Field(1.0, gt=0, description="CPUs per trial worker (fractions allowed)")
    gpus: float = Field(0.0, ge=0, description="GPUs per trial worker (fractions share a GPU)")


class PublishConfig(Section):
    enabled: bool = Field(True, description="publish the best trial's checkpoint to the registry")
    name: str | None = Field(None, description="registry name (default: the sweep's name)")
    force: bool = Field(False, description="replace the published model even if its metric is not better")


class SweepConfig(Section):
    name: str = Field("sweep", description="<RAYLM_STORAGE>/tune/<name>/; the same name and config resumes")
    finetune: FinetuneConfig | None = Field(None, description="the fine-tuning run every trial starts from")
    distill: DistillConfig | None = Field(None, description="or the distillation every trial starts from (a "
                                          "fine-tuning task's data; its student learns beside the teacher)")
    search: dict[str, Domain] = Field(default_factory=dict, description="dotted keys of the base run -> domains, "
                                      "e.g. optim.lr: {loguniform: [1e-4, 1e-2]}, distill.alpha: {uniform: [0.2, 0.9]}")
    metric: str | None = Field(None, description="validation metric to optimise (default by task)")
    mode: Literal["max", "min"] | None = Field(None, description="default: the metric's natural direction")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search_alg: SearchAlgConfig = Field(default_factory=SearchAlgConfig)
    num_samples: int = Field(4, ge=1, description="samples of the space (each grid point num_samples times)")
    max_concurrent_trials: int = Field(2, ge=1, description="trials running at once")
    trial: TrialConfig = Field(default_factory=TrialConfig)
    max_failures: int = Field(1, ge=0, description="retries of a failed trial (from its last checkpoint)")
    keep_checkpoints: int = Field(1, ge=1, description="best checkpoints kept per trial (pbt also keeps the "
                                  "latest few, which another trial may clone)")
    publish: PublishConfig = Field(default_factory=PublishConfig)
    reuse_actors: bool = Field(True, description="a finished or stopped trial's process runs the next trial (and "
                               "PBT restarts) instead of a new one importing torch and transformers again")

    @model_validator(mode="after")
    def _name(self) -> SweepConfig:
        check_name(self.name)
        if (self.finetune is None) == (self.distill is None):
            raise ValueError("give exactly one of finetune (a fine-tuning sweep) and distill (a distillation sweep)")
        if self.distill is not None and self.distill.task in CORPUS_TASKS:
            raise ValueError(f"distill.task '{self.distill.task}': a sweep distils on a fine-tuning task's data "
                             "(classification, tagging, completion); run jobs.distill for a corpus")
        if self.distill is not None and self.distill.compare_baseline:
            raise ValueError("distill.compare_baseline: a sweep's trials train with the teacher only; set it false "
                             "and run jobs.distill with the best trial's config to compare")
        return self

    @property
    def base(self) -> FinetuneConfig | DistillConfig:
        """The run every trial starts from."""
        return self.finetune if self.finetune is not None else self.distill

    @property
    def base_key(self) -> str:
        """Where that run sits in this config: finetune or distill."""
        return "finetune" if self.finetune is not None else "distill"

    @property
    def objective(self) -> tuple[str, str]:
        task = self.base.task
        metric = self.metric or DEFAULT_METRIC[task]
        return metric, self.mode or METRICS[task].get(metric, "max")


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base run's config (fine-tuning or distillation) with the trial's dotted values set."""
    out = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(out, key, value)
    # every evaluation is checkpointed, so the best one can be published and PBT can clone it
    out["train"]["checkpoint_every"] = out["train"]["eval_every"]
    return out


def check_sweep(cfg: SweepConfig) -> None:
    """Every problem a trial would hit late, reported at once before any trial starts."""
    problems = []
    task = cfg.base.task
    metric, _ = cfg.objective
    if not cfg.search and not (cfg.scheduler.kind == "pbt" and cfg.scheduler.mutations):
        problems.append("search: the search space is empty; give at least one key, e.g. "
                        "search: {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    if metric not in METRICS[task]:
        problems.append(f"metric '{metric}' is never reported by a {task} trial (reported: "
                        f"{', '.join(METRICS[task])})")
    elif cfg.mode and cfg.mode != METRICS[task][metric]:
        problems.append(f"mode '{cfg.mode}' would pick the worst trial: '{metric}' is better when "
                        f"{'higher' if METRICS[task][metric] == 'max' else 'lower'} (set mode: "
                        f"{METRICS[task][metric]}, or leave mode out)")
    fixed = [k for k in cfg.search if k in ("task", "teacher", "corpus", "compare_baseline")
             or k.startswith(("model.checkpoint", "data.", "scaling.", "student.checkpoint"))]
    if fixed:
        prepared, searchable = ("base checkpoint", "optim.*, train.*, strategy.*") if cfg.finetune is not None else \
            ("teacher", "optim.*, train.*, distill.*, student.* shape")
        problems.append(f"search keys {fixed}: the data, {prepared} and tokenizer are prepared once per sweep and trial "
                        f"resources come from trial.*; search training keys ({searchable}) instead, or run one sweep "
                        "per base model / dataset")
    base = cfg.base.to_dict()
    for key, domain in {**cfg.search, **cfg.scheduler.mutations}.items():
        for value in domain.values():
            try:
                build(type(cfg.base), trial_config(base, {key: value}), source=f"search.{key}")
            except ConfigError as exc:
                problems.append(str(exc).replace("config key '", f"search key '{key}' -> '"))
                break
    if cfg.search_alg.kind == "optuna" and any(d.kind == "grid" for d in cfg.search.values()):
        problems.append("search_alg 'optuna' samples its own points: use choice instead of grid")
    if cfg.search_alg.kind == "grid":
        ranged = [k for k, d in cfg.search.items() if d.kind not in ("grid", "choice")]
        if ranged:
            problems.append(f"search_alg 'grid' needs grid/choice domains; {ranged} are ranges")
    if cfg.scheduler.kind == "pbt":
        if cfg.trial.workers > 1:
            problems.append("scheduler 'pbt' clones checkpoints between trials: it runs with trial.workers 1")
        if not cfg.scheduler.mutations:
            problems.append("scheduler.mutations: pbt needs at least one key to mutate, e.g. optim.lr")
        off = [k for k in cfg.scheduler.mutations if not k.startswith("optim.")]
        if off:
            problems.append(f"scheduler.mutations {off}: pbt mutates optim.* keys only (a trial resumes its data "
                            "position and step count, which other keys would change)")
    if problems:
        raise ConfigError("sweep config: " + str(len(problems)) + " problem(s)\n  - " + "\n  - ".join(problems))
