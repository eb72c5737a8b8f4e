"""jobs.pretrain's core: the typed config, the driver side (datasets, TorchTrainer, summary) and the
per-worker function that builds the model and runs cluster.train.Loop."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from typing import Any, Literal

import ray
import ray.data
import ray.train
from pydantic import Field, field_validator, model_validator
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster import runtime, storage
from cluster.config import Section
from cluster.corpus import Corpus
from cluster.entry import JobError
from cluster.models import ModelConfig
from cluster.runs import RunDir, check_name
from cluster.sources import RankSlice, quiet_data_logs, read_parquet, start_data_actors
from cluster.train import NONFINITE_FILE, STATE_DIR, Plan

log = logging.getLogger(__name__)


class TrainConfig(Section):
    batch_size: int = Field(16, ge=1, description="rows per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; default from epochs or token_budget")
    epochs: int = Field(1, ge=1, description="passes over the training split (when max_steps/token_budget unset)")
    token_budget: int | None = Field(None, ge=1, description="total training tokens across workers")
    log_every: int = Field(10, ge=1, description="steps between training-metric rows")
    eval_every: int = Field(100, ge=1, description="steps between validation passes")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches per worker")
    eval_at_start: bool = Field(False, description="evaluate before the first step: the untrained baseline at step 0")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="most recent checkpoints kept (plus the best)")
    seed: int = Field(0, description="seeds weights, data order and masking")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    shuffle_buffer: int = Field(256, ge=0, description="rows in the local shuffle buffer (0: off)")
    next_epoch_ahead: bool = Field(
        True, description="start the next epoch's data halfway through this one (no stall at the boundary)"
    )
    trace_data: bool = Field(
        False, description="append (epoch, batch, hash of its rows) per rank to data_trace/ to audit data order"
    )


class OptimConfig(Section):
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay (matrices only)")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")


class ScalingSection(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process each)")
    use_gpu: bool = Field(False, description="one GPU per worker (times gpus_per_worker)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(1, ge=0, description="GPUs per worker when use_gpu")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra custom resources")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism: DDP or FSDP")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs)")

    @model_validator(mode="after")
    def _fsdp_on_gpus(self) -> ScalingSection:
        # Ray Train's prepare_model raises for FSDP without CUDA, once the workers are up (~1 min in)
        if self.strategy == "fsdp" and self.num_workers > 1 and not self.use_gpu:
            raise ValueError("strategy 'fsdp' shards the model across GPU workers: set use_gpu: true, or use "
                             "strategy 'ddp' on CPUs (Ray Train has no CPU FSDP)")
        return self

    def resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker, **self.resources_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


class ObjectiveConfig(Section):
    """Encoder objectives (ignored by causal LMs, which always predict the next token)."""

    pair: Literal["auto", "none", "nsp", "sop"] = Field(
        "auto", description="sentence-pair task: auto = NSP for bert, SOP for albert, none for roberta"
    )
    mask_rate: float = Field(0.15, gt=0, lt=1, description="share of non-special tokens selected for MLM")
    whole_word: bool = Field(False, description="select whole words instead of sub-word tokens")
    static_masking: bool = Field(False, description="fixed mask per example (original BERT) instead of dynamic")

    def pair_task(self, family: str) -> str | None:
        if self.pair == "auto":
            return {"bert": "nsp", "albert": "sop"}.get(family)
        return None if self.pair == "none" else self.pair


class PretrainConfig(Section):
    name: str = Field("pretrain", description="run name: <RAYLM_STORAGE>/pretrain/<name>/; same name resumes")
    corpus: str = Field(description="corpus name (under RAYLM_STORAGE/prepare/) or path")
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: unlimited)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)


# ---------------------------------------------------------------- driver


def plan_run(cfg: PretrainConfig, corpus: Corpus, run_dir: str) -> Plan:
    rows = corpus.split_info("train")["rows"]
    per_rank = rows // cfg.scaling.num_workers
    steps_per_epoch = per_rank // cfg.train.batch_size // cfg.train.grad_accum
    if steps_per_epoch < 1:
        raise JobError(
            f"corpus '{corpus.path}' has {rows} training rows: too few for {cfg.scaling.num_workers} worker(s) x "
            f"train.batch_size {cfg.train.batch_size} x train.grad_accum {cfg.train.grad_accum}"
        )
    block = corpus.manifest.get("block_size") or corpus.manifest.get("max_segment_tokens") or 0
    tokens_per_step = cfg.scaling.num_workers * cfg.train.batch_size * cfg.train.grad_accum * block
    if cfg.train.max_steps:
        max_steps = cfg.train.max_steps
    elif cfg.train.token_budget:
        max_steps = max(1, math.ceil(cfg.train.token_budget / tokens_per_step))
    else:
        max_steps = steps_per_epoch * cfg.train.epochs
    return Plan(
        run_dir=run_dir,
        tokenizer_dir=corpus.tokenizer_path,
        tokenizer_hash=corpus.manifest["tokenizer"]["hash"],
        bytes_per_token=corpus.bytes_per_token("validation"),
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        epochs=math.ceil(max_steps / steps_per_epoch),
        tokens_per_step=tokens_per_step,
        seq_len=block or cfg.model.max_len,
        validation=local_validation(corpus),
    )


def check_inputs(cfg: PretrainConfig, corpus: Corpus) -> None:
    problems = []
    if corpus.layout == "blocks" and cfg.model.max_len < corpus.manifest["block_size"]:
        problems.append(
            f"model.max_len ({cfg.model.max_len}) is shorter than the corpus block_size ({corpus.manifest['block_size']}): "
            f"--set model.max_len={corpus.manifest['block_size']}, or prepare the corpus with "
            f"--set pack.block_size={cfg.model.max_len}"
        )
    if cfg.model.is_causal and corpus.layout != "blocks":
        problems.append(f"model.family '{cfg.model.family}' needs a corpus with layout 'blocks', not '{corpus.layout}'")
    if not cfg.model.is_causal:
        pair = cfg.objective.pair_task(cfg.model.family)
        if corpus.layout != "segments":
            problems.append(
                f"objective: model.family '{cfg.model.family}' needs a corpus prepared with pack.layout 'segments' "
                f"(sentence boundaries{' for ' + pair.upper() if pair else ''}); corpus '{corpus.path}' has '{corpus.layout}'"
            )
        elif cfg.model.max_len < corpus.manifest["max_segment_tokens"] + 3:
            seg = corpus.manifest["max_segment_tokens"]
            problems.append(
                f"model.max_len ({cfg.model.max_len}) must hold the corpus's max_segment_tokens ({seg}) + 3 special "
                f"tokens: --set model.max_len={seg + 3}, or prepare the corpus with "
                f"--set pack.max_segment_tokens={cfg.model.max_len - 3}"
            )
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(corpus.local_tokenizer_dir())
        if tok.mask_token is None:
            problems.append(
                f"objective: the tokenizer of corpus '{corpus.path}' has no mask token; prepare it with "
                "tokenizer.kind: wordpiece"
            )
    held, workers = corpus.split_info("validation"), cfg.scaling.num_workers
    if held["rows"] < workers:
        # Each worker evaluates an equal share of the rows and the remainder is dropped (RankSlice,
        # streaming_split(equal=True)): fewer rows than workers leave every worker none.
        problems.append(
            f"corpus '{corpus.path}' has {held['rows']} validation row(s) from {held['documents']} document(s), "
            f"fewer than the {workers} worker(s) (scaling.num_workers) that each evaluate an equal share: "
            "prepare it with a larger split.validation_fraction" + (" or train on fewer workers" if held["rows"] else "")
        )
    if problems:
        raise JobError("; ".join(problems))


def check_resources(cfg: PretrainConfig) -> None:
    """Say so instead of hanging when the cluster cannot hold the workers."""
    need = {k: v * cfg.scaling.num_workers for k, v in cfg.scaling.resources().items()}
    detail = runtime.resource_shortfall(need)
    if detail and os.environ.get("RAYLM_WAIT_FOR_RESOURCES") != "1":
        raise JobError(
            f"scaling: {cfg.scaling.num_workers} worker(s) need more than the cluster has ({detail}); "
            "lower scaling.num_workers / cpus_per_worker, or set RAYLM_WAIT_FOR_RESOURCES=1 on an autoscaling cluster"
        )


def latest_checkpoint_state(run_dir: str) -> dict | None:
    for name in reversed(storage.listdir(run_dir)):
        state = storage.join(run_dir, name, STATE_DIR, "state.json")
        if name.startswith("checkpoint_") and storage.exists(state):
            return storage.read_json(state)
    return None


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The training split's shard order in `epoch`: seeded by (seed, epoch)."""
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_shards)]


def train_datasets(corpus: Corpus, plan: Plan, seed: int) -> dict[str, ray.data.Dataset]:
    """One dataset per epoch, its shard order seeded by (seed, epoch): reproducible (resume, with
    `preserve_order`) and different from the other epochs; the workers' seeded local shuffle buffer
    mixes rows across the blocks it holds. No `randomize_block_order`: it is an all-to-all stage,
    so every epoch would read the whole split into the object store before the first batch."""
    shards = corpus.shard_paths("train")
    quiet_data_logs()
    out = {}
    for epoch in range(plan.epochs):
        order = shard_order(len(shards), seed, epoch)
        out[f"train_{epoch}"] = read_parquet([shards[i] for i in order], columns=corpus.manifest["columns"])
    if not plan.validation:
        out["validation"] = read_parquet(corpus.shard_paths("validation"), columns=corpus.manifest["columns"]).materialize()
    return out


def data_config() -> DataConfig:
    """How TorchTrainer hands the datasets to workers: every dataset split across ranks, in order
    (the data position a resume relies on: `cluster.train`'s module docstring)."""
    return DataConfig(datasets_to_split="all", execution_options=ExecutionOptions(preserve_order=True))


# Validation splits of up to this many tokens are read by each worker itself.
LOCAL_VALIDATION_MAX_TOKENS = 16 * 2**20


def local_validation(corpus: Corpus, max_tokens: int = LOCAL_VALIDATION_MAX_TOKENS) -> dict:
    """The validation split for workers to read themselves (`cluster.sources.RankSlice`), or {} for a
    split of over `max_tokens`, which Ray Data tasks read and the driver materialises in the object
    store before training starts (every evaluation reads it again). A rank holds at most its share
    of `max_tokens` (64 MiB as int32), read at its first evaluation: nothing of it is on the way to
    the first step, and no Ray Data execution runs per evaluation."""
    if corpus.split_info("validation")["tokens"] > max_tokens:
        return {}
    return {"shards": corpus.shards("validation"), "columns": corpus.manifest["columns"]}


def pretrain(cfg: PretrainConfig, root: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    corpus = Corpus.open(cfg.corpus, root)
    check_inputs(cfg, corpus)
    run = RunDir("pretrain", cfg.name, root)
    previous = latest_checkpoint_state(run.path)
    tok_hash = corpus.manifest["tokenizer"]["hash"]
    if previous and previous.get("tokenizer_hash") != tok_hash:
        raise JobError(
            f"run '{cfg.name}' has checkpoints trained with tokenizer {previous.get('tokenizer_hash')}, but corpus "
            f"'{cfg.corpus}' uses {tok_hash}: pick another run name or the original corpus"
        )
    # Ray starts (or is joined) only now: the checks above need none, and bad input fails in seconds.
    runtime.connect()
    check_resources(cfg)
    run.begin(cfg, NONFINITE_FILE)
    plan = plan_run(cfg, corpus, run.path)
    log.info("plan: %d steps (%d per epoch, %d epochs), %d tokens/step%s", plan.max_steps, plan.steps_per_epoch,
             plan.epochs, plan.tokens_per_step, f"; resuming from step {previous['step']}" if previous else "")

    trainer = TorchTrainer(
        worker_main,
        train_loop_config={"cfg": cfg.to_dict(), "plan": asdict(plan)},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources(), placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage.join(root or storage.storage_root(), "pretrain"),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=train_datasets(corpus, plan, cfg.train.seed),
        dataset_config=data_config(),
    )
    warmup = start_data_actors()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise JobError(f"training failed: {exc}") from None
    finally:
        warmup.join(timeout=30)
    return summarize(cfg, run, plan, corpus, result, t0)


def checkpoint_location(checkpoint: ray.train.Checkpoint | None) -> str | None:
    """A Ray checkpoint as one path or URI (its `.path` alone drops the s3:// of a URI storage)."""
    return storage.location(checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None


def summarize(cfg: PretrainConfig, run: RunDir, plan: Plan, corpus: Corpus, result, t0: float) -> dict[str, Any]:
    metrics = result.metrics or {}
    nonfinite = run.file(NONFINITE_FILE)
    if storage.exists(nonfinite):
        info = storage.read_json(nonfinite)
        ckpt = checkpoint_location(result.checkpoint)
        raise JobError(
            f"loss became NaN/inf at step {info['step']}; stopped without checkpointing. "
            f"Last good checkpoint: {ckpt or 'none'}" + (f" (step {info['last_checkpoint_step']})" if ckpt else "")
        )
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf), default=None)
    workers = [storage.read_json(run.file("workers", name)) for name in storage.listdir(run.file("workers"))
               if name.startswith("rank-") and name.endswith(".json")]
    from cluster.plots import plot_curves

    plot = plot_curves(run.file("metrics.jsonl"), run.file("curves.png"))
    return {
        "corpus": corpus.path,
        "steps": metrics.get("step"),
        "final": {"checkpoint": checkpoint_location(result.checkpoint),
                  "metrics": {k: v for k, v in metrics.items() if k.startswith("val_") or k in ("step", "epoch")}},
        "best": {"checkpoint": checkpoint_location(best[0]), "metrics": best[1]} if best else None,
        "entropy_floor_bpb": corpus.entropy_floor("validation"),
        "plan": asdict(plan),
        "workers": workers,
        "metrics": run.file("metrics.jsonl"),
        "plot": plot,
        "seconds": round(time.time() - t0, 2),
    }


# ---------------------------------------------------------------- worker


def worker_main(config: dict) -> None:
    """Runs on every Ray Train worker: rebuild typed config, build model + objective, run the loop."""
    import socket

    import torch

    from cluster.session import TrainSession
    from cluster.train import FirstBatchAhead, Loop, epoch_batches, resume_epoch, seed_everything

    cfg = PretrainConfig.model_validate(config["cfg"])
    plan = Plan(**config["plan"])
    ctx = ray.train.get_context()
    session = TrainSession()
    if plan.validation:
        session.local["validation"] = RankSlice(plan.validation["shards"], plan.validation["columns"],
                                                session.rank, session.world)
    # The first epoch's data starts flowing now, while transformers is imported and the model built.
    epoch = resume_epoch(session)
    ahead = FirstBatchAhead(epoch, epoch_batches(session, cfg.train, ctx.get_world_rank(), epoch))

    from transformers import PreTrainedTokenizerFast

    from cluster.losses import CausalLM, MaskedLM
    from cluster.models import build_model, special_ids

    threads = cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    record = {"rank": ctx.get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
              "node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid()}
    storage.write_json_atomic(storage.join(plan.run_dir, "workers", f"rank-{record['rank']}.json"), record)

    seed_everything(cfg.train.seed + ctx.get_world_rank())
    tok_dir = plan.tokenizer_dir
    if storage.is_uri(tok_dir):
        tok_dir = Corpus(os.path.dirname(tok_dir), {"tokenizer": {"path": "tokenizer", "hash": plan.tokenizer_hash}}).local_tokenizer_dir()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    model = build_model(cfg.model, len(tokenizer), special_ids(tokenizer), seed=cfg.train.seed)
    if cfg.model.is_causal:
        objective = CausalLM(plan.bytes_per_token)
    else:
        objective = MaskedLM(tokenizer, cfg.objective.pair_task(cfg.model.family), cfg.model.max_len,
                             cfg.objective.mask_rate, cfg.objective.whole_word, cfg.objective.static_masking,
                             cfg.train.seed)
    loop = Loop(cfg, plan, objective, model, tokenizer, session, ahead=ahead)
    loop.resume()
    loop.place()
    loop.run()
