"""One sweep trial = one fine-tuning run through cluster.stages.finetune, or one distillation through
cluster.stages.distill (the same loop, objectives and strategies). With one worker a trial is a Tune
function trainable running the loop in its own process (TuneSession); with N workers it runs Ray
Train (cluster.train.launcher) inside the trial and forwards its reports to Tune."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from ray import tune

from cluster import storage
from cluster.data.ingest import epoch_datasets, quiet_data_logs
from cluster.stages.finetune import FinetuneConfig, plan_run, run_worker
from cluster.train.session import quiet_exit_on_sigterm
from tune.config import SweepConfig, TrialConfig, trial_config

if TYPE_CHECKING:  # the sweep's driver imports this module; trials import torch when they start
    import torch

log = logging.getLogger(__name__)


class TuneSession:
    """One process in a Ray Tune function trainable: rank 0 of 1, datasets handed in whole."""

    def __init__(self, datasets: dict[str, Any], use_gpu: bool = False) -> None:
        import torch

        quiet_exit_on_sigterm()
        self.rank, self.world = 0, 1
        self.datasets = datasets
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def checkpoint(self) -> Any | None:
        return tune.get_checkpoint()

    def dataset(self, name: str) -> Any:
        return self.datasets[name]

    def prepare_model(self, model: torch.nn.Module, strategy: str, param_dtype: torch.dtype | None) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        # Tune names checkpoints itself (checkpoint_000000, ...); dir_name applies to Ray Train only.
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)


def trial_main(config: dict[str, Any], base: dict[str, Any], meta: dict[str, Any], data: dict[str, Any],
               trial: dict[str, Any], sweep_dir: str) -> None:
    """A Tune function trainable: build the trial's fine-tune config and run it."""
    ctx = tune.get_context()
    cfg_dict = trial_config(base, config)
    cfg_dict["name"] = f"trial-{ctx.get_trial_id()}"
    distill = trial["base"] == "distill"
    if distill:
        from cluster.stages import distill as D

        cfg = D.DistillConfig.model_validate(cfg_dict)
        # this trial's student: its shape may be searched (checked against the teacher before the sweep)
        meta = {**meta, "student": D.plan_student(cfg, meta["teacher"], meta["teacher_config"])}
    else:
        cfg = FinetuneConfig.model_validate(cfg_dict)
    run_dir = storage.join(sweep_dir, os.path.basename(ctx.get_trial_dir().rstrip("/")))
    quiet_data_logs()
    if trial["workers"] == 1:
        cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = 1, trial["cpus"]
        plan = replace(plan_run(_finetune_view(cfg, meta), meta, run_dir, 1), progress=False)
        session = TuneSession(epoch_datasets(data["train"], data["validation"], plan.epochs, cfg.train.seed),
                              use_gpu=trial["gpus"] > 0)
        if distill:
            D.run_worker(cfg, plan, meta, session, alone=False)
        else:
            run_worker(cfg, plan, meta, session)
        return
    _trial_on_train(cfg, meta, data, trial, run_dir, ctx.get_trial_id(), sweep_dir)


def _finetune_view(cfg: Any, meta: dict[str, Any]) -> FinetuneConfig:
    """The fine-tuning config a trial's steps are planned with: a distillation's, on its teacher."""
    return cfg if isinstance(cfg, FinetuneConfig) else cfg.as_finetune(meta["teacher"])


def _trial_on_train(cfg: Any, meta: dict, data: dict, trial: dict, run_dir: str, trial_id: str,
                    sweep_dir: str) -> None:
    """N workers: a TorchTrainer inside the trial; TuneReportCallback forwards each report (with the
    checkpoint's path) to Tune. Re-running the trial resumes the Train run of the same name."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.stages import distill, finetune
    from cluster.train import launcher

    # GPUs first: the worker count is checked against them (FSDP needs GPUs) as it is assigned
    cfg.scaling.use_gpu, cfg.scaling.gpus_per_worker = trial["gpus"] > 0, trial["gpus"] or 1
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = trial["workers"], trial["cpus"]
    plan = replace(plan_run(_finetune_view(cfg, meta), meta, run_dir, trial["workers"]), progress=False)
    config = {"cfg": cfg.to_dict(), "plan": asdict(plan), "meta": meta}
    worker_main = finetune.worker_main
    if trial["base"] == "distill":
        config, worker_main = {**config, "alone": False}, distill.worker_main
    launcher.fit(worker_main, config, cfg.scaling, name=trial_id,
                 storage_path=storage.join(sweep_dir, "train-runs"),
                 datasets=epoch_datasets(data["train"], data["validation"], plan.epochs, cfg.train.seed),
                 keep=1, metric=trial["metric"], mode=trial["mode"], callbacks=[TuneReportCallback()],
                 what=f"trial {trial_id}")


def concurrent_trials(cfg: SweepConfig) -> int:
    """How many trials run at once: `max_concurrent_trials`, lowered (and logged) to what the
    cluster holds. A trial's data is materialized before any trial starts, so it reads no block
    with a task of its own (cluster.train.launcher.MATERIALIZED_DATA_CPUS): the trials alone are
    counted. A JobError, in seconds, when not even one trial fits."""
    import ray

    from cluster import runtime
    from cluster.train.launcher import MATERIALIZED_DATA_CPUS as data_cpus

    trial = cfg.trial
    cpus = trial.cpus * trial.workers + (0.01 if trial.workers > 1 else 0.0)
    need = {"CPU": cpus + data_cpus, **({"GPU": trial.gpus * trial.workers} if trial.gpus else {})}
    runtime.require(need, f"trial: the {trial.workers} worker(s) x {trial.cpus:g} CPU of one trial",
                    "lower trial.cpus or trial.workers, start Ray with more CPUs, or set "
                    "RAYLM_WAIT_FOR_RESOURCES=1 on an autoscaling cluster")
    have = ray.cluster_resources()
    fit = int((have.get("CPU", 0.0) - data_cpus + 1e-9) // cpus)
    if trial.gpus:
        fit = min(fit, int(have.get("GPU", 0.0) // (trial.gpus * trial.workers)))
    if 1 <= fit < cfg.max_concurrent_trials:
        log.warning("max_concurrent_trials %d -> %d: the cluster's %g CPUs hold %d trial(s) of %g CPU",
                    cfg.max_concurrent_trials, fit, have.get("CPU", 0.0), fit, cpus)
        return fit
    return cfg.max_concurrent_trials


def trial_resources(trial: TrialConfig) -> dict[str, float]:
    """What Tune reserves for one trial: its worker's CPUs/GPUs (one worker), or for N workers a
    sliver of a CPU for the trial that only drives a TorchTrainer, whose workers reserve the real
    resources. Tune refuses a request of nothing ("an empty head and zero worker bundles")."""
    if trial.workers == 1:
        return {"cpu": trial.cpus, "gpu": trial.gpus}
    return {"cpu": 0.01}
