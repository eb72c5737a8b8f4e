"""Hyperparameter sweeps over fine-tuning with Ray Tune: one trial = one fine-tuning run through
cluster.finetune (the same loop, objectives and strategies), a search space in YAML, ASHA/PBT
schedulers, random/grid/Optuna search, and the best trial's checkpoint published to the registry.

A trial with one worker is a Tune function trainable running the loop in its own process
(cluster.session.TuneSession); with N workers it runs a TorchTrainer inside the trial and forwards
its reports to Tune. Re-running an interrupted sweep (same name, same config) restores it with
`Tuner.restore`: finished trials are kept, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import numbers
import os
import time
from collections.abc import MutableMapping
from dataclasses import asdict, replace
from typing import Any, Literal

from pyarrow.fs import FileType
from pydantic import Field, model_validator
from ray import tune
from ray.tune.search import BasicVariantGenerator

from cluster import registry, storage
from cluster.config import ConfigError, Section, _set_dotted, build, get_dotted, same_config
from cluster.entry import JobError
from cluster.finetune import (
    TASKS,
    FinetuneConfig,
    TaskSetup,
    epoch_datasets,
    plan_run,
    run_worker,
    setup,
)
from cluster.metrics import DEFAULT_METRIC, METRICS
from cluster.runs import RunDir, check_name
from cluster.sources import quiet_data_logs

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
        """Representative values (the bounds for ranges), used to check the key before any trial."""
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
    finetune: FinetuneConfig = Field(description="the fine-tuning run every trial starts from")
    search: dict[str, Domain] = Field(default_factory=dict, description="dotted finetune keys -> domains, "
                                      "e.g. optim.lr: {loguniform: [1e-4, 1e-2]}")
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
        return self

    @property
    def objective(self) -> tuple[str, str]:
        task = self.finetune.task
        metric = self.metric or DEFAULT_METRIC[task]
        return metric, self.mode or METRICS[task].get(metric, "max")


# ---------------------------------------------------------------- checks before any trial


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base fine-tune config with the trial's dotted values set."""
    out = copy.deepcopy(base)
    for key, value in params.items():
        _set_dotted(out, key, value)
    # every evaluation is checkpointed, so the best one can be published and PBT can clone it
    out["train"]["checkpoint_every"] = out["train"]["eval_every"]
    return out


def check_sweep(cfg: SweepConfig) -> None:
    """Every problem a trial would hit late, reported at once before any trial starts."""
    problems = []
    task = cfg.finetune.task
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
    fixed = [k for k in cfg.search if k == "task" or k.startswith(("model.checkpoint", "data.", "scaling."))]
    if fixed:
        problems.append(f"search keys {fixed}: the data, base checkpoint and tokenizer are prepared once per sweep "
                        "and trial resources come from trial.*; search training keys (optim.*, train.*, "
                        "strategy.*) instead, or run one sweep per base model / dataset")
    base = cfg.finetune.to_dict()
    for key, domain in {**cfg.search, **cfg.scheduler.mutations}.items():
        for value in domain.values():
            try:
                build(FinetuneConfig, trial_config(base, {key: value}), source=f"search.{key}")
            except ConfigError as exc:
                problems.append(str(exc).replace("config key '", f"search key '{key}' -> '"))
                break
    if cfg.search_alg.kind == "optuna" and any(d.kind == "grid" for d in cfg.search.values()):
        problems.append("search_alg 'optuna' samples its own points: use choice instead of grid")
    if cfg.search_alg.kind == "grid":
        ranged = [k for k, d in cfg.search.items() if d.kind not in ("grid", "choice")]
        if ranged:
            problems.append(f"search_alg 'grid' needs grid/choice domains; {ranged} are ranges")
    if cfg.finetune.scaling.strategy == "fsdp" and cfg.trial.workers > 1 and cfg.trial.gpus == 0:
        problems.append("finetune.scaling.strategy 'fsdp' shards the model across GPU workers: give each trial "
                        "worker a GPU (trial.gpus), or use strategy 'ddp' on CPUs")
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


# ---------------------------------------------------------------- the trial


def trial_main(config: dict[str, Any], base: dict[str, Any], meta: dict[str, Any], data: dict[str, Any],
               trial: dict[str, Any], sweep_dir: str) -> None:
    """A Tune function trainable: build the trial's fine-tune config and run it."""
    from cluster.session import TuneSession

    ctx = tune.get_context()
    cfg_dict = trial_config(base, config)
    cfg_dict["name"] = f"trial-{ctx.get_trial_id()}"
    cfg = FinetuneConfig.model_validate(cfg_dict)
    run_dir = storage.join(sweep_dir, os.path.basename(ctx.get_trial_dir().rstrip("/")))
    quiet_data_logs()
    if trial["workers"] == 1:
        cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = 1, trial["cpus"]
        plan = replace(plan_run(cfg, meta, run_dir, 1), progress=False)
        session = TuneSession(epoch_datasets(data["train"], data["validation"], plan.epochs, cfg.train.seed),
                              use_gpu=trial["gpus"] > 0)
        run_worker(cfg, plan, meta, session)
        return
    _trial_on_train(cfg, meta, data, trial, run_dir, ctx.get_trial_id(), sweep_dir)


def _trial_on_train(cfg: FinetuneConfig, meta: dict, data: dict, trial: dict, run_dir: str, trial_id: str,
                    sweep_dir: str) -> None:
    """N workers: a TorchTrainer inside the trial; TuneReportCallback forwards each report (with the
    checkpoint's path) to Tune. Re-running the trial resumes the Train run of the same name."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.finetune import worker_main
    from cluster.pretrain import data_config

    metric, mode = trial["metric"], trial["mode"]
    # GPUs first: the worker count is checked against them (FSDP needs GPUs) as it is assigned
    cfg.scaling.use_gpu, cfg.scaling.gpus_per_worker = trial["gpus"] > 0, trial["gpus"] or 1
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = trial["workers"], trial["cpus"]
    plan = replace(plan_run(cfg, meta, run_dir, trial["workers"]), progress=False)
    TorchTrainer(
        worker_main,
        train_loop_config={"cfg": cfg.to_dict(), "plan": asdict(plan), "meta": meta},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=cfg.scaling.resources()),
        run_config=RunConfig(name=trial_id, storage_path=storage.join(sweep_dir, "train-runs"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                                checkpoint_score_order=mode),
                             callbacks=[TuneReportCallback()]),
        datasets=epoch_datasets(data["train"], data["validation"], plan.epochs, cfg.train.seed),
        dataset_config=data_config(),
    ).fit()


def trial_resources(trial: TrialConfig) -> dict[str, float]:
    """What Tune reserves for one trial: its worker's CPUs/GPUs (one worker), or for N workers a
    sliver of a CPU for the trial that only drives a TorchTrainer, whose workers reserve the real
    resources. Tune refuses a request of nothing ("an empty head and zero worker bundles")."""
    if trial.workers == 1:
        return {"cpu": trial.cpus, "gpu": trial.gpus}
    return {"cpu": 0.01}


# ---------------------------------------------------------------- checkpoints under PBT


class PBTCheckpointPruner(tune.Callback):
    """Deletes a PBT trial's checkpoints that no trial can need any more.

    PBT restarts a bottom trial from the checkpoint a top trial had at its last perturbation, possibly
    much later (the paused trial may wait for a free slot). Tune's CheckpointConfig keeps the best N
    or the latest N, so the top trial may delete that checkpoint meanwhile, and the clone fails with
    "Could not recover from checkpoint as it does not exist on storage anymore". Under PBT Tune keeps
    every checkpoint (num_to_keep=None) and this callback prunes, after each save of a trial, all of
    its checkpoints except: the best `keep_best` by the metric, the latest `keep_recent` (PBT's
    recorded clone source is among them), and any checkpoint that a trial will restore from (each
    trial's latest, which is the cloned one for a trial waiting to restart).
    """

    def __init__(self, metric: str, mode: str, keep_best: int, keep_recent: int):
        self.metric, self.mode, self.keep_best, self.keep_recent = metric, mode, keep_best, keep_recent
        self._saved: dict[str, list[tuple[str, float | None]]] = {}  # trial id -> [(path, score)], oldest first

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        latest = trial.latest_checkpoint_result
        if latest is None or latest.checkpoint is None:
            return
        saved = self._saved.setdefault(trial.trial_id, [])
        path = latest.checkpoint.path
        if not saved or saved[-1][0] != path:  # the same save seen again (on_trial_save per pause) is not new
            score = latest.metrics.get(self.metric)
            saved[:] = [s for s in saved if s[0] != path]  # a folder written again holds the newer checkpoint
            saved.append((path, float(score) if isinstance(score, int | float) and score == score else None))
        fs = latest.checkpoint.filesystem
        for stale in prunable(saved, self.mode, self.keep_best, self.keep_recent,
                              in_use={t.checkpoint.path for t in trials if t.checkpoint is not None}):
            saved.remove(next(s for s in saved if s[0] == stale))
            try:
                fs.delete_dir(stale)
            except FileNotFoundError:
                pass

    def get_state(self) -> dict[str, Any]:  # saved with the experiment state: a restored sweep goes on pruning
        return {"saved": self._saved}

    def set_state(self, state: dict[str, Any]) -> None:
        self._saved = {k: [tuple(s) for s in v] for k, v in state.get("saved", {}).items()}


def prunable(saved: list[tuple[str, float | None]], mode: str, keep_best: int, keep_recent: int,
             in_use: set[str]) -> list[str]:
    """Paths of `saved` (oldest first, (path, score)) outside the best keep_best, the latest keep_recent
    and in_use. A checkpoint without a score never counts among the best."""
    scored = [s for s in saved if s[1] is not None]
    best = sorted(scored, key=lambda s: s[1], reverse=mode == "max")[:keep_best]  # stable: ties keep the earlier
    keep = {p for p, _ in best} | {p for p, _ in saved[-keep_recent:]} | in_use
    return [p for p, _ in saved if p not in keep]


# ---------------------------------------------------------------- driver


def build_scheduler(cfg: SweepConfig, max_steps: int, eval_every: int) -> Any:
    s = cfg.scheduler
    if s.kind == "asha":
        max_t = s.max_t or max_steps
        grace = min(s.grace_period or eval_every, max_t)
        return tune.schedulers.ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace,
                                             reduction_factor=s.reduction_factor)
    if s.kind == "pbt":
        return tune.schedulers.PopulationBasedTraining(
            time_attr="step", perturbation_interval=s.perturbation_interval or eval_every,
            hyperparam_mutations={k: d.to_tune() for k, d in s.mutations.items()},
            quantile_fraction=s.quantile_fraction, synch=False,
        )
    return tune.schedulers.FIFOScheduler()


def build_search(cfg: SweepConfig) -> tuple[dict[str, Any], Any]:
    """(param_space, search algorithm or None)."""
    space = {k: d.to_tune(grid_choices=cfg.search_alg.kind == "grid") for k, d in cfg.search.items()}
    if cfg.scheduler.kind == "pbt":  # PBT starts each trial from a sample of the mutated keys
        space |= {k: d.to_tune() for k, d in cfg.scheduler.mutations.items() if k not in space}
    if cfg.search_alg.kind == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        metric, mode = cfg.objective
        return space, OptunaSearch(metric=metric, mode=mode, sampler=TPESampler(seed=cfg.search_alg.seed))
    if cfg.search_alg.kind == "random" and cfg.search_alg.seed is not None:
        # Tune applies TuneConfig(max_concurrent_trials) only to the generator it builds itself
        # (or by wrapping a Searcher); a generator handed in must carry the limit, or it is ignored.
        return space, BasicVariantGenerator(random_state=cfg.search_alg.seed, max_concurrent=cfg.max_concurrent_trials)
    return space, None


def tune_env_defaults(environ: MutableMapping[str, str]) -> None:
    """Tune settings read by the driver when the sweep starts; a user's own values win."""
    # Tune saves the experiment state at most every 10 s by default; a trial that finished since the
    # last save would run again after an interrupted driver is restored. Save more often.
    environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Trials checkpoint at every evaluation (to publish the best, and for PBT to clone), and Tune
    # forces a state snapshot whenever it deletes one, which keeps a restored sweep consistent. With
    # evaluations seconds apart Tune printed a 4-line warning per snapshot (14 in a 4-trial sweep),
    # advising to keep more checkpoints or save fewer: both chosen against here.
    environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def sweep(cfg: SweepConfig, root: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    check_sweep(cfg)
    metric, mode = cfg.objective
    run = RunDir("tune", cfg.name, root)
    previous = storage.read_text(run.file("config.yaml")) if storage.exists(run.file("config.yaml")) else None
    restoring = tune.Tuner.can_restore(run.path)
    if restoring and previous is not None and not same_config(previous, cfg):
        raise JobError(f"sweep '{cfg.name}' already exists at '{run.path}' with a different config; use another "
                       "name, or delete that folder to start over")
    ts = setup(cfg.finetune, root, run)
    run.begin(cfg)
    base_plan = plan_run(cfg.finetune, ts.meta, run.path, cfg.trial.workers)
    trainable = tune.with_parameters(
        trial_main, base=cfg.finetune.to_dict(), meta=ts.meta, data={"train": ts.train, "validation": ts.validation},
        trial={**cfg.trial.to_dict(), "metric": metric, "mode": mode}, sweep_dir=run.path,
    )
    trainable = tune.with_resources(trainable, trial_resources(cfg.trial))
    tune_env_defaults(os.environ)
    pbt = cfg.scheduler.kind == "pbt"
    # PBT clones the checkpoint a top trial had at its last perturbation; it saves one per evaluation
    interval = cfg.scheduler.perturbation_interval or cfg.finetune.train.eval_every
    keep_recent = -(-interval // cfg.finetune.train.eval_every) + 1
    if restoring:
        log.info("restoring sweep '%s' from %s", cfg.name, run.path)
        tuner = tune.Tuner.restore(run.path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        space, search_alg = build_search(cfg)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=cfg.num_samples,
                # a generator of our own carries the limit (build_search); Tune applies it to the rest
                max_concurrent_trials=None if isinstance(search_alg, BasicVariantGenerator) else cfg.max_concurrent_trials,
                scheduler=build_scheduler(cfg, base_plan.max_steps, cfg.finetune.train.eval_every),
                search_alg=search_alg, reuse_actors=cfg.reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=storage.join(root or storage.storage_root(), "tune"),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                # under PBT every checkpoint stays with Tune and PBTCheckpointPruner deletes the ones no
                # clone can need; Tune's own num_to_keep would delete a checkpoint PBT is about to clone
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if pbt else cfg.keep_checkpoints,
                                                        checkpoint_score_attribute=metric,
                                                        checkpoint_score_order=mode),
                callbacks=[PBTCheckpointPruner(metric, mode, cfg.keep_checkpoints, keep_recent)] if pbt else None,
                verbose=1,
            ),
        )
    results = tuner.fit()
    return finish(cfg, run, ts, results, base_plan.max_steps, t0, restored=restoring)


# ---------------------------------------------------------------- results, plot, publish


def trial_rows(cfg: SweepConfig, results: Any, max_steps: int) -> list[dict[str, Any]]:
    """One row per trial: its searched values, best metric (and step), steps run, status, checkpoint."""
    metric, mode = cfg.objective
    pick = max if mode == "max" else min
    searched = [*cfg.search, *cfg.scheduler.mutations]
    rows = []
    for result in results:
        df = result.metrics_dataframe
        history = df[df[metric].notna()] if df is not None and metric in df else None
        history = _with_checkpoint_reports(history, result, metric)
        # the trial's own id: under PBT a trial cloned at its last step ends on its source's result
        own_id = df["trial_id"].iloc[0] if df is not None and "trial_id" in df and len(df) else None
        row: dict[str, Any] = {"trial_id": own_id or (result.metrics or {}).get("trial_id")
                               or os.path.basename(result.path)}
        row |= {k: (result.config or {}).get(k) for k in searched}
        start = history[history["step"] == 0] if history is not None else None
        row["untuned"] = float(start[metric].iloc[0]) if start is not None and len(start) else None
        # steps trained: the trial's own reports, or its last result when that is further on. Under PBT a
        # trial cloned from its source's final checkpoint restarts there with nothing left to train and
        # reports nothing more; Tune's last result for it is then the source's, at the final step.
        seen_steps = [(result.metrics or {}).get("step")]
        seen_steps += [frame["step"].max() for frame in (history, df) if frame is not None and "step" in frame
                       and len(frame)]
        steps = int(max([s for s in seen_steps if isinstance(s, numbers.Real) and s == s], default=0))  # numpy ints too
        if history is not None and len(history):
            best_i = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
            row |= {metric: float(history.loc[best_i, metric]), "best_step": int(history.loc[best_i, "step"])}
        else:
            row |= {metric: None, "best_step": None}
        row["steps"] = steps
        stopped_early = row["steps"] < max_steps
        row["status"] = "ERROR" if result.error else ("STOPPED" if stopped_early else "DONE")
        row["checkpoint"] = best_checkpoint(result, metric, pick)
        # PBT mutates a trial's config as it goes: the values that trained the best checkpoint are
        # the ones it saved, not the trial's final ones
        trained = registry.checkpoint_config(row["checkpoint"]) if row["checkpoint"] else None
        if trained is not None:
            row |= {k: get_dotted(trained, k) for k in searched}
        rows.append(row)
    return sorted(rows, key=lambda r: (r[metric] is None, -(r[metric] or 0) if mode == "max" else (r[metric] or 0)))


def _with_checkpoint_reports(history: Any, result: Any, metric: str) -> Any:
    """The trial's evaluations from its result file, plus those it reported with a checkpoint that
    the file lacks. Tune re-copies result.json from the trial's storage folder when a trial restarts
    in place (PBT exploit with reused actors), over a local copy that had more lines: the file can
    end at the step before the exploit while Tune still holds the later checkpoints' reports."""
    import pandas as pd

    reports = [{"step": int(m["step"]), metric: float(m[metric])} for _, m in (result.best_checkpoints or [])
               if m.get(metric) is not None and m.get("step") is not None]
    seen = set() if history is None else set(zip(history["step"], history[metric], strict=True))
    extra = [r for r in reports if (r["step"], r[metric]) not in seen]
    if not extra:
        return history
    return pd.concat([history, pd.DataFrame(extra)], ignore_index=True) if history is not None else pd.DataFrame(extra)


def best_checkpoint(result: Any, metric: str, pick: Any) -> str | None:
    """The trial's best checkpointed path: Tune checkpoints (function trials) or the checkpoint_path
    that TuneReportCallback put in the metrics (N-worker trials)."""
    # under PBT Tune lists every checkpoint a trial saved, and PBTCheckpointPruner deleted some
    kept = [(storage.location(c.filesystem, c.path), m[metric]) for c, m in (result.best_checkpoints or [])
            if m.get(metric) is not None and c.filesystem.get_file_info(c.path).type != FileType.NotFound]
    df = result.metrics_dataframe
    if df is not None and "checkpoint_path" in df and metric in df:
        # paths inside the run's storage filesystem, as Ray gives them: no s3:// on a URI storage
        kept += [(storage.location(result.filesystem, p), v) for p, v in zip(df["checkpoint_path"], df[metric], strict=True)
                 if isinstance(p, str) and v == v and result.filesystem.get_file_info(p).type != FileType.NotFound]
    return pick(kept, key=lambda pv: pv[1])[0] if kept else None


def write_table(rows: list[dict[str, Any]], path: str) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text_atomic(path, buf.getvalue())
    return path


def format_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    table = [keys] + [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table)


def plot_sweep(cfg: SweepConfig, rows: list[dict[str, Any]], path: str) -> str | None:
    """The metric against each searched hyperparameter (log axis for loguniform), one panel each."""
    metric, _ = cfg.objective
    keys = [*cfg.search, *[k for k in cfg.scheduler.mutations if k not in cfg.search]]
    scored = [r for r in rows if r.get(metric) is not None]
    if not keys or not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = {**cfg.scheduler.mutations, **cfg.search}
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [r[key] for r in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            ax.scatter(values, [r[metric] for r in scored])
            if domains[key].kind == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], [r[metric] for r in scored])
            ax.set_xticks(range(len(labels)), labels)
        for r in scored:
            if r["status"] == "STOPPED":
                ax.annotate("stopped", (r[key] if numeric else sorted({str(v) for v in values}).index(str(r[key])),
                                        r[metric]), fontsize=6, alpha=0.6)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.suptitle(f"sweep {cfg.name}: best {metric} per trial")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())
    return path


def publish_best(cfg: SweepConfig, ts: TaskSetup, best: dict[str, Any], trial_cfg: dict[str, Any]) -> dict[str, Any]:
    metric, mode = cfg.objective
    name = cfg.publish.name or cfg.name
    if not cfg.publish.enabled:
        return {"published": False, "reason": "publish.enabled is false"}
    if not best.get("checkpoint"):
        return {"published": False, "reason": "no trial left a checkpoint"}
    if best.get("best_step") == 0:  # the evaluation before any step: the base model with an untrained head
        return {"published": False, "name": name,
                "reason": f"no trial improved on the untuned model ({metric} {best[metric]:.4g} before any step); "
                          "train longer (finetune.train.max_steps) or search other learning rates"}
    try:
        path = registry.publish(
            best["checkpoint"], name, TASKS[cfg.finetune.task][1],
            metric={"name": metric, "value": best[metric], "mode": mode}, labels=ts.meta["labels"],
            config=trial_cfg, sweep_id=f"{cfg.name}/{best['trial_id']}", force=cfg.publish.force,
        )
    except registry.RegistryError as exc:
        return {"published": False, "name": name, "reason": str(exc)}
    return {"published": True, "name": name, "path": path}


def finish(cfg: SweepConfig, run: RunDir, ts: TaskSetup, results: Any, max_steps: int, t0: float,
           restored: bool) -> dict[str, Any]:
    metric, mode = cfg.objective
    rows = trial_rows(cfg, results, max_steps)
    keys = ["trial_id", *cfg.search, *[k for k in cfg.scheduler.mutations if k not in cfg.search], "untuned", metric,
            "best_step", "steps", "status"]
    print(f"\n# sweep {cfg.name}: {len(rows)} trials, {metric} ({mode})\n{format_table(rows, keys)}\n", flush=True)
    table = write_table(rows, run.file("results.csv"))
    plot = plot_sweep(cfg, rows, run.file("results.png"))
    scored = [r for r in rows if r.get(metric) is not None and r.get("checkpoint")]
    best = scored[0] if scored else None
    errors = [r["trial_id"] for r in rows if r["status"] == "ERROR"]
    if best is None:
        raise JobError(f"sweep '{cfg.name}': no trial reported '{metric}' with a checkpoint "
                       f"({len(errors)} of {len(rows)} trials failed; see {run.path})")
    searched = [*cfg.search, *cfg.scheduler.mutations]
    trial_cfg = trial_config(cfg.finetune.to_dict(), {k: best[k] for k in searched if best.get(k) is not None})
    published = publish_best(cfg, ts, best, trial_cfg)
    print(f"published '{published['name']}': {published['path']}" if published["published"]
          else f"not published: {published['reason']}", flush=True)
    return {
        "task": cfg.finetune.task, "metric": metric, "mode": mode, "restored": restored,
        "trials": len(rows), "errored": errors, "stopped_early": sum(r["status"] == "STOPPED" for r in rows),
        "trial_steps": sum(r["steps"] for r in rows), "max_steps_per_trial": max_steps,
        "best": {k: best[k] for k in ("trial_id", metric, "best_step", "checkpoint")} | {
            "config": {k: best[k] for k in [*cfg.search, *cfg.scheduler.mutations] if k in best}},
        "baseline": ts.baseline, "registry": published, "results": table, "plot": plot,
        "seconds": round(time.time() - t0, 2),
    }
