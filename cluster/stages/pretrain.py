"""jobs.pretrain's stage: the typed config, the driver (checks, plan, datasets, the Ray Train run,
summary) and the per-worker function that builds the model and runs the training loop."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from typing import Any

from pydantic import Field, field_validator

from cluster import runtime, storage
from cluster.config import Section
from cluster.data.corpus import Corpus
from cluster.data.ingest import (
    RankSlice,
    local_validation,
    start_data_actors,
    train_datasets,
)
from cluster.errors import JobError
from cluster.objectives.lm import ObjectiveConfig
from cluster.runs import RunDir, check_name
from cluster.tracking import check_tracking
from cluster.train import launcher
from cluster.train.checkpoint import NONFINITE_FILE, checkpoint_location, latest_checkpoint_state
from cluster.train.config import OptimConfig, ScalingSection, TrainConfig
from cluster.train.models import ModelConfig
from cluster.train.plan import Plan, plan_steps

log = logging.getLogger(__name__)


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


def plan_run(cfg: PretrainConfig, corpus: Corpus, run_dir: str) -> Plan:
    block = corpus.manifest.get("block_size") or corpus.manifest.get("max_segment_tokens") or 0
    steps = plan_steps(corpus.split_info("train")["rows"], cfg.scaling.num_workers, cfg.train, block,
                       f"corpus '{corpus.path}'")
    return Plan(run_dir=run_dir, tokenizer_dir=corpus.tokenizer_path, tokenizer_hash=corpus.manifest["tokenizer"]["hash"],
                bytes_per_token=corpus.bytes_per_token("validation"), seq_len=block or cfg.model.max_len,
                validation=local_validation(corpus), **steps)


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

        segmenter = cfg.objective.check_segmenter()
        if segmenter:
            problems.append(segmenter)
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
    # storage before tracking: the TensorBoard folder lies under it, and "not writable" names the cause
    run.check_writable()
    check_tracking(run)
    # Ray starts (or is joined) only now: the checks above need none, and bad input fails in seconds.
    runtime.connect()
    launcher.check_resources(cfg.scaling)
    run.begin(cfg, NONFINITE_FILE)
    plan = plan_run(cfg, corpus, run.path)
    log.info("plan: %d steps (%d per epoch, %d epochs), %d tokens/step%s", plan.max_steps, plan.steps_per_epoch,
             plan.epochs, plan.tokens_per_step, f"; resuming from step {previous['step']}" if previous else "")

    warmup = start_data_actors()
    try:
        result = launcher.fit(
            worker_main, {"cfg": cfg.to_dict(), "plan": asdict(plan)}, cfg.scaling, name=cfg.name,
            storage_path=storage.join(root or storage.storage_root(), "pretrain"),
            datasets=train_datasets(corpus, plan, cfg.train.seed), keep=cfg.train.keep_checkpoints,
            max_failures=cfg.max_failures,
        )
    finally:
        warmup.join(timeout=30)
    return summarize(cfg, run, plan, corpus, result, t0)


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
    from cluster.train.plots import plot_curves

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


def objective_spec(cfg: PretrainConfig, plan: Plan) -> dict[str, Any]:
    """The objective `cluster.objectives.build` makes for this run: next-token prediction for a
    causal LM, masked LM (with NSP/SOP where the family has one) for an encoder."""
    if cfg.model.is_causal:
        return {"kind": "clm", "bytes_per_token": plan.bytes_per_token}
    pair = cfg.objective.pair_task(cfg.model.family)
    return {"kind": "mlm", "mlm": cfg.objective.masking(pair, cfg.model.max_len), "seed": cfg.train.seed}


def worker_main(config: dict) -> None:
    """Runs on every Ray Train worker: rebuild typed config, build model + objective, run the loop."""
    from cluster.train.batches import FirstBatchAhead, epoch_batches, resume_epoch
    from cluster.train.session import TrainSession

    cfg = PretrainConfig.model_validate(config["cfg"])
    plan = Plan(**config["plan"])
    session = TrainSession()
    if plan.validation:
        session.local["validation"] = RankSlice(plan.validation["shards"], plan.validation["columns"],
                                                session.rank, session.world)
    # The first epoch's data starts flowing now, while transformers is imported and the model built.
    epoch = resume_epoch(session)
    ahead = FirstBatchAhead(epoch, epoch_batches(session, cfg.train, session.rank, epoch))

    from transformers import PreTrainedTokenizerFast

    from cluster import objectives
    from cluster.train.loop import Loop
    from cluster.train.models import build_model, special_ids

    launcher.start_worker(cfg.scaling, cfg.train.seed, plan.run_dir, session.rank)
    tok_dir = plan.tokenizer_dir
    if storage.is_uri(tok_dir):
        tok_dir = Corpus(os.path.dirname(tok_dir), {"tokenizer": {"path": "tokenizer", "hash": plan.tokenizer_hash}}
                         ).local_tokenizer_dir()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    model = build_model(cfg.model, len(tokenizer), special_ids(tokenizer), seed=cfg.train.seed)
    loop = Loop(cfg, plan, objectives.build(objective_spec(cfg, plan), tokenizer), model, tokenizer, session,
                ahead=ahead)
    loop.resume()
    loop.run()
