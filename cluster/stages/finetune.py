"""jobs.finetune's stage: a pretrained checkpoint + labelled data -> a task model, through the same
training loop as pretraining (cluster.train.loop) with a task objective (cluster.objectives.tasks)
and a strategy (cluster.train.strategies: full, frozen backbone, LoRA). `jobs.finetune` runs it on
Ray Train; `tune.sweep` runs one of these per trial.

The driver resolves the base checkpoint, checks it can serve the task, prepares the data
(cluster.data.tasks, cluster.data.task_prep) and plans the steps; workers rebuild everything from
plain dicts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster import hub, runtime, storage
from cluster.checkpoints import (
    TASKS,
    base_config,
    check_family,
    local_copy,
    prepare_tokenizer,
    resolve_checkpoint,
)
from cluster.config import Section
from cluster.data import task_prep, tasks
from cluster.data.ingest import epoch_datasets, quiet_data_logs
from cluster.errors import JobError
from cluster.objectives.tasks import EvalOptions
from cluster.runs import RunDir, check_name
from cluster.tracking import check_tracking
from cluster.train import launcher
from cluster.train.checkpoint import checkpoint_location
from cluster.train.config import OptimConfig, ScalingSection, TrainConfig
from cluster.train.plan import Plan, plan_steps
from cluster.train.strategies import StrategyConfig, apply_strategy, check_strategy, module_names

log = logging.getLogger(__name__)


class FinetuneModel(Section):
    checkpoint: str = Field(
        description="base model: a checkpoint directory or URI, a pretrain run name or folder (its best checkpoint), "
        "a registry model name, or a Hugging Face hub id (downloaded only because you named it)"
    )
    compile: bool = Field(False, description="torch.compile the model")


class FinetuneTrain(TrainConfig):
    """Pretraining's train section with fine-tuning defaults: short runs, an evaluation before the
    first step (the untuned model's score), a smaller shuffle buffer for small datasets."""

    epochs: int = Field(3, ge=1, description="passes over the training split (when max_steps/token_budget unset)")
    log_every: int = Field(10, ge=1, description="steps between training-metric rows")
    eval_every: int = Field(50, ge=1, description="steps between validation passes")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    shuffle_buffer: int = Field(128, ge=0, description="rows in the local shuffle buffer (0: off)")
    eval_at_start: bool = Field(True, description="evaluate before the first step: the untuned model at step 0")


class FinetuneOptim(OptimConfig):
    lr: float = Field(5e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="decoupled weight decay (matrices only)")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")


class FinetuneConfig(Section):
    name: str = Field("finetune", description="run name: <RAYLM_STORAGE>/finetune/<name>/; same name resumes")
    task: Literal["classification", "tagging", "completion"] = Field(description="what the model learns")
    model: FinetuneModel
    data: tasks.TaskData = Field(default_factory=tasks.TaskData)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: FinetuneTrain = Field(default_factory=FinetuneTrain)
    optim: FinetuneOptim = Field(default_factory=FinetuneOptim)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: unlimited)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _combinations(self) -> FinetuneConfig:
        if self.strategy.kind == "lora" and self.scaling.strategy == "fsdp":
            raise ValueError("strategy.kind 'lora' runs with scaling.strategy 'ddp' (LoRA with FSDP is not supported)")
        if self.task == "completion" and self.scaling.strategy == "fsdp" and self.scaling.num_workers > 1:
            # Evaluation generates on each rank until its samples end; a sharded model's every forward
            # is a collective, so ranks that stop at different lengths would wait on each other.
            raise ValueError("task 'completion' runs with scaling.strategy 'ddp' (generation with a model "
                             "sharded across workers is not supported)")
        return self


def build_task_model(cfg: FinetuneConfig, meta: dict[str, Any], base: str) -> Any:
    """The base checkpoint with the task's head (seeded init), safetensors only, no remote code."""
    import torch
    import transformers

    torch.manual_seed(cfg.train.seed)
    kwargs: dict[str, Any] = {}
    labels = meta.get("labels")
    if labels:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {label: i for i, label in enumerate(labels)}}
    from transformers.utils import logging as hf_logging

    model_cls = getattr(transformers, TASKS[cfg.task][0])
    # transformers reports a new head and the dropped pretraining heads as a table of every tensor
    # (~20 lines per worker and trial) plus a progress bar; one line of module names says the same.
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = hub.from_pretrained(model_cls.from_pretrained, base, use_safetensors=True,
                                          trust_remote_code=False, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    log.info("%s from %s: new %s; not used %s", type(model).__name__, base,
             ", ".join(module_names(info["missing_keys"])) or "nothing",
             ", ".join(module_names(info["unexpected_keys"])) or "nothing")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = meta["pad_id"]
    return model


def objective_spec(cfg: FinetuneConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The task's objective for `cluster.objectives.build`."""
    return {"kind": cfg.task, "labels": meta["labels"], "pad_id": meta["pad_id"], "token_types": meta["token_types"],
            "sample_cap": cfg.eval.generate_examples, "max_new_tokens": cfg.eval.max_new_tokens}


def run_worker(cfg: FinetuneConfig, plan: Plan, meta: dict[str, Any], session: Any) -> None:
    """One process's fine-tuning run (a Ray Train worker or a Tune trial)."""
    from cluster import objectives
    from cluster.train.loop import Loop

    launcher.start_worker(cfg.scaling, cfg.train.seed, plan.run_dir, session.rank)
    tokenizer = task_prep.tokenizer_from_files(meta["tokenizer_files"])
    model = apply_strategy(build_task_model(cfg, meta, local_copy(meta["base"])), cfg.strategy, cfg.task)
    loop = Loop(cfg, plan, objectives.build(objective_spec(cfg, meta), tokenizer), model, tokenizer, session)
    loop.resume()
    loop.run()


def worker_main(config: dict) -> None:
    """Ray Train entry point: plain dicts in, typed objects rebuilt here."""
    from cluster.train.session import TrainSession

    run_worker(FinetuneConfig.model_validate(config["cfg"]), Plan(**config["plan"]), config["meta"], TrainSession())


@dataclass
class TaskSetup:
    """Everything the driver prepared once (a sweep shares it across trials)."""

    base: str
    meta: dict[str, Any]
    train: Any
    validation: Any
    stats: dict[str, Any]
    baseline: dict[str, Any]


def setup(cfg: FinetuneConfig, root: str | None = None, run: RunDir | None = None,
          fits: Callable[[], None] | None = None) -> TaskSetup:
    """Check the inputs, then start Ray and read, check and tokenize the data (seconds). `run`, the
    run folder the job will write: its storage is checked between the two, so neither an
    unwritable storage waits for the data nor bad input leaves a folder behind. `fits`: the
    job's resource check, run as soon as Ray is up (before the data asks it for anything)."""
    t0 = time.time()
    quiet_data_logs()
    base = resolve_checkpoint(cfg.model.checkpoint, root)
    config = base_config(local_copy(base) if storage.is_uri(base) else base)
    check_family(cfg.task, config, base)
    check_strategy(cfg, config)
    data_cfg = cfg.data.resolved(cfg.task)
    tasks.check_file_columns(data_cfg, cfg.task)
    if run is not None:
        run.check_writable()
    check_tracking(run)
    # Ray starts (or is joined) only now: a wrong checkpoint, strategy or column fails in seconds.
    runtime.connect()
    if fits is not None:
        fits()
    token_types = cfg.task == "classification" and config.get("type_vocab_size", 0) >= 2
    tokenizer = prepare_tokenizer(local_copy(base) if storage.is_uri(base) else base, cfg.task,
                                  pair=bool(data_cfg.text_pair_column), token_types=token_types)
    prepared = task_prep.prepare_data(cfg.task, data_cfg, tokenizer, token_types, cfg.eval.generate_examples)
    from cluster.data.tokenizer import tokenizer_hash

    meta = {
        "task": cfg.task, "base": base, "labels": prepared.labels, "rows": prepared.rows,
        "pad_id": tokenizer.pad_token_id, "token_types": token_types,
        "tokenizer_files": prepared.extra["tokenizer_files"], "tokenizer_hash": tokenizer_hash(tokenizer),
        "max_length": data_cfg.max_length,
    }
    log.info("data ready in %.1f s: %s train / %s validation rows%s", time.time() - t0, prepared.rows["train"],
             prepared.rows["validation"], f", labels {prepared.labels}" if prepared.labels else "")
    return TaskSetup(base, meta, prepared.train, prepared.validation, prepared.stats, prepared.baseline)


def plan_run(cfg: FinetuneConfig, meta: dict[str, Any], run_dir: str, workers: int) -> Plan:
    if meta["rows"]["validation"] < workers:
        # streaming_split(equal=True) gives each worker an equal share and drops the remainder: fewer
        # rows than workers leave every worker none to evaluate.
        raise JobError(f"data: {meta['rows']['validation']} validation row(s) are fewer than the {workers} worker(s) "
                       "(scaling.num_workers) that each evaluate an equal share")
    steps = plan_steps(meta["rows"]["train"], workers, cfg.train, meta["max_length"], "data")
    return Plan(run_dir=run_dir, tokenizer_dir="", tokenizer_hash=meta["tokenizer_hash"], bytes_per_token=0.0,
                seq_len=meta["max_length"], **steps)


def finetune(cfg: FinetuneConfig, root: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    run = RunDir("finetune", cfg.name, root)
    ts = setup(cfg, root, run, fits=lambda: launcher.check_resources(cfg.scaling, launcher.MATERIALIZED_DATA_CPUS))
    run.begin(cfg)
    plan = plan_run(cfg, ts.meta, run.path, cfg.scaling.num_workers)
    log.info("plan: %d steps (%d per epoch, %d epochs)", plan.max_steps, plan.steps_per_epoch, plan.epochs)
    result = launcher.fit(
        worker_main, {"cfg": cfg.to_dict(), "plan": asdict(plan), "meta": ts.meta}, cfg.scaling, name=cfg.name,
        storage_path=storage.join(root or storage.storage_root(), "finetune"),
        datasets=epoch_datasets(ts.train, ts.validation, plan.epochs, cfg.train.seed),
        keep=cfg.train.keep_checkpoints, max_failures=cfg.max_failures, what="fine-tuning",
    )
    return summarize(cfg, run, plan, ts, result, t0)


def summarize(cfg: FinetuneConfig, run: RunDir, plan: Plan, ts: TaskSetup, result: Any, t0: float) -> dict[str, Any]:
    from cluster.train.plots import plot_curves

    metrics = result.metrics or {}
    rows = [json.loads(line) for line in storage.read_text(run.file("metrics.jsonl")).splitlines() if line.strip()]
    untuned = next((r for r in rows if r.get("split") == "validation" and r["step"] == 0), None)
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf), default=None)
    final = {k: v for k, v in metrics.items() if k.startswith("val_") or k in ("step", "epoch", "trainable_params")}
    return {
        "task": cfg.task,
        "base_checkpoint": ts.base,
        "strategy": cfg.strategy.to_dict(),
        "labels": ts.meta["labels"],
        "data": ts.stats,
        "baseline": ts.baseline,
        "untuned": {k: v for k, v in untuned.items() if k.startswith("val_")} if untuned else None,
        "steps": metrics.get("step"),
        "final": {"checkpoint": checkpoint_location(result.checkpoint), "metrics": final},
        "best": {"checkpoint": checkpoint_location(best[0]), "metrics": best[1]} if best else None,
        "plan": asdict(plan),
        "metrics": run.file("metrics.jsonl"),
        "plot": plot_curves(run.file("metrics.jsonl"), run.file("curves.png")),
        "seconds": round(time.time() - t0, 2),
    }
