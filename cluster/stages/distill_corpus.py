"""jobs.distill with `task: lm` or `task: mlm`: a student taught by a pretrained teacher on a
prepared corpus, with pretraining's data path (Parquet shards streamed per epoch, the validation
split read by each rank) and the one training loop.

- lm: a causal LM (GPT-2, Llama) on a corpus of token blocks; the loss is the soft-target term plus
  next-token prediction (cluster.objectives.distill around cluster.objectives.lm's CLM), and every
  evaluation reports bits per byte against the corpus's entropy floor.
- mlm: an encoder (BERT, RoBERTa, ALBERT, with the heads pretraining gave it) on a corpus of sentence
  segments; the loss is the soft-target term over the masked tokens plus pretraining's own objective
  (MLM, with NSP for BERT and SOP for ALBERT unless `objective.pair` says otherwise), masked as
  pretraining masks, so a student trained alone is that family's pretraining.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, replace
from typing import Any

from cluster import runtime, storage
from cluster.checkpoints import local_copy
from cluster.data.corpus import Corpus
from cluster.data.ingest import RankSlice, local_validation, start_data_actors, train_datasets
from cluster.errors import JobError
from cluster.runs import RunDir
from cluster.stages import distill as D
from cluster.tracking import check_tracking
from cluster.train import launcher
from cluster.train.checkpoint import checkpoint_location
from cluster.train.plan import Plan, plan_steps

log = logging.getLogger(__name__)


# the sentence-pair head each encoder family's pretraining model has (RoBERTa's has none)
PAIR_HEADS = {"bert": "nsp", "albert": "sop"}


def teacher_context(teacher_cfg: dict[str, Any]) -> int:
    """The most tokens one row of the teacher may hold (0: no limit the config states). RoBERTa numbers
    positions from padding_idx + 1, so pad_token_id + 1 of its position slots are never used."""
    context = teacher_cfg.get("n_positions") or teacher_cfg.get("max_position_embeddings") or 0
    if teacher_cfg.get("model_type") == "roberta" and context:
        context -= (teacher_cfg.get("pad_token_id") or 0) + 1
    return int(context)


def check_corpus(cfg: Any, corpus: Corpus, teacher: str, teacher_cfg: dict[str, Any]) -> str | None:
    """The corpus the teacher can read: its tokenizer's tokens, in rows that fit its context, laid out
    for the task (blocks for lm, sentence segments for mlm). Returns the mlm sentence-pair task."""
    from transformers import AutoTokenizer

    layout = "blocks" if cfg.task == "lm" else "segments"
    if corpus.layout != layout:
        who = "a causal LM student" if cfg.task == "lm" else "a masked LM (encoder) student"
        raise JobError(f"corpus '{corpus.path}' has layout '{corpus.layout}'; {who} learns from '{layout}' (prepare it "
                       f"with pack.layout {layout})")
    tokenizer = AutoTokenizer.from_pretrained(local_copy(teacher))
    theirs = tokenizer.get_vocab()
    ours = AutoTokenizer.from_pretrained(corpus.local_tokenizer_dir()).get_vocab()
    if theirs != ours:
        raise JobError(f"corpus '{corpus.path}' is tokenized with another tokenizer than the teacher '{teacher}' "
                       f"({len(ours)} and {len(theirs)} tokens): prepare it with --set tokenizer.path=<the teacher>")
    context = teacher_context(teacher_cfg)
    if cfg.task == "lm":
        if context and corpus.manifest["block_size"] > context:
            raise JobError(f"corpus '{corpus.path}' has blocks of {corpus.manifest['block_size']} tokens, longer than "
                           f"the teacher's context ({context})")
        return None
    if tokenizer.mask_token is None:
        raise JobError(f"teacher '{teacher}': its tokenizer has no mask token, so it cannot fill masked tokens")
    segmenter = cfg.objective.check_segmenter()
    if segmenter:
        raise JobError(segmenter)
    need = corpus.manifest["max_segment_tokens"] + 3  # [CLS] A [SEP] B [SEP]
    if context and need > context:
        raise JobError(f"corpus '{corpus.path}' has segments of up to {need - 3} tokens (+3 special), longer than the "
                       f"teacher's context ({context}): prepare it with --set pack.max_segment_tokens={context - 3}")
    family = teacher_cfg.get("model_type")
    pair = cfg.objective.pair_task(family)
    if pair and pair != PAIR_HEADS.get(family):
        raise JobError(f"objective.pair '{pair}': the teacher is a {family} model, whose pretraining heads have "
                       f"{'no sentence-pair head' if family not in PAIR_HEADS else PAIR_HEADS[family].upper()}; "
                       f"set objective.pair {PAIR_HEADS.get(family, 'none')} or none")
    return pair


def distill_on_corpus(cfg: Any, run: RunDir, teacher: str, student: dict[str, Any], t0: float,
                      root: str | None) -> dict[str, Any]:
    teacher_cfg = D.base_config(local_copy(teacher), key="teacher")
    corpus = Corpus.open(cfg.corpus, root)
    pair = check_corpus(cfg, corpus, teacher, teacher_cfg)
    D.check_same_teacher(run, teacher)
    run.check_writable()
    check_tracking(run)
    runtime.connect()  # only now: the checks above need no Ray
    launcher.check_resources(cfg.scaling)
    run.begin(cfg)
    block = corpus.manifest["block_size"] if cfg.task == "lm" else corpus.manifest["max_segment_tokens"]
    steps = plan_steps(corpus.split_info("train")["rows"], cfg.scaling.num_workers, cfg.train, block,
                       f"corpus '{corpus.path}'")
    plan = Plan(run_dir=run.path, tokenizer_dir=corpus.tokenizer_path, tokenizer_hash=corpus.manifest["tokenizer"]["hash"],
                bytes_per_token=corpus.bytes_per_token("validation"), seq_len=block, validation=local_validation(corpus),
                **steps)
    log.info("plan: %d steps (%d per epoch, %d epochs), %d tokens/step", plan.max_steps, plan.steps_per_epoch,
             plan.epochs, plan.tokens_per_step)
    meta = {"teacher": teacher, "student": student, "corpus": corpus.path, "pad_id": teacher_cfg.get("pad_token_id"),
            "pair": pair, "max_len": teacher_context(teacher_cfg) or block + 3}

    def fit(plan: Plan, name: str, storage_path: str, alone: bool) -> Any:
        warmup = start_data_actors()
        try:
            return launcher.fit(
                D.worker_main, {"cfg": cfg.to_dict(), "plan": asdict(plan), "meta": meta, "alone": alone}, cfg.scaling,
                name=name, storage_path=storage_path, datasets=train_datasets(corpus, plan, cfg.train.seed),
                keep=cfg.train.keep_checkpoints, max_failures=cfg.max_failures,
                what="the student trained alone" if alone else "distillation")
        finally:
            warmup.join(timeout=30)

    result = fit(plan, cfg.name, run.job_dir, alone=False)
    alone = None
    if cfg.compare_baseline:
        alone_plan = replace(plan, run_dir=run.file("alone"))
        got = fit(alone_plan, "alone", run.path, alone=True)
        alone = {"final": {k: v for k, v in (got.metrics or {}).items() if k.startswith("val_")},
                 "best": D._best_metrics(got), "metrics": storage.join(alone_plan.run_dir, "metrics.jsonl")}
    metrics = result.metrics or {}
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf), default=None)
    scores = storage.read_json(run.file(D.TEACHER_FILE)) if storage.exists(run.file(D.TEACHER_FILE)) else {}
    return {
        "task": cfg.task, "corpus": corpus.path, "steps": metrics.get("step"),
        "final": {"checkpoint": checkpoint_location(result.checkpoint),
                  "metrics": {k: v for k, v in metrics.items() if k.startswith("val_") or k in ("step", "epoch")}},
        "best": {"checkpoint": checkpoint_location(best[0]), "metrics": best[1]} if best else None,
        **({"entropy_floor_bpb": corpus.entropy_floor("validation")} if cfg.task == "lm" else {}),
        "teacher": {"checkpoint": teacher, "params": student["teacher_params"], "layers": student["teacher_layers"],
                    "metrics": scores.get("metrics")},
        "student": {"init": student["init"], "checkpoint": student["checkpoint"], "layers": student["layers"],
                    "params": student["params"], "picked_teacher_layers": student["picks"],
                    "hidden_projection": student.get("projection")},
        "distill": cfg.distill.to_dict(), "alone": alone, "plan": asdict(plan), "metrics": run.file("metrics.jsonl"),
        "seconds": round(time.time() - t0, 2),
    }


def corpus_worker(cfg: Any, plan: Plan, meta: dict[str, Any], alone: bool) -> None:
    """One Ray Train worker, as pretraining's: the first epoch's data starts flowing first."""
    from transformers import PreTrainedTokenizerFast

    from cluster import objectives
    from cluster.objectives.distill import Distill
    from cluster.train.batches import FirstBatchAhead, epoch_batches, resume_epoch
    from cluster.train.loop import Loop
    from cluster.train.placement import autocast_dtype
    from cluster.train.session import TrainSession

    session = TrainSession()
    if plan.validation:
        session.local["validation"] = RankSlice(plan.validation["shards"], plan.validation["columns"],
                                                session.rank, session.world)
    epoch = resume_epoch(session)
    ahead = FirstBatchAhead(epoch, epoch_batches(session, cfg.train, session.rank, epoch))
    launcher.start_worker(cfg.scaling, cfg.train.seed, plan.run_dir, session.rank)
    tok_dir = plan.tokenizer_dir
    if storage.is_uri(tok_dir):
        tok_dir = Corpus(os.path.dirname(tok_dir), {"tokenizer": {"path": "tokenizer", "hash": plan.tokenizer_hash}}
                         ).local_tokenizer_dir()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    teacher = None
    if not alone:
        teacher = D.load_model(cfg.task, meta["teacher"]).eval().requires_grad_(False).to(session.device)
    model = D.build_student(cfg, meta, teacher)
    if cfg.task == "lm":
        spec = {"kind": "clm", "bytes_per_token": plan.bytes_per_token}
    else:  # pretraining's masked LM (cluster.stages.pretrain.objective_spec), on the teacher's context
        spec = {"kind": "mlm", "mlm": cfg.objective.masking(meta["pair"], meta["max_len"]), "seed": cfg.train.seed}
    objective = Distill(objectives.build(spec, tokenizer), teacher, cfg.distill.alpha, cfg.distill.temperature,
                        cfg.distill.hidden, positions="attention" if cfg.task == "lm" else "labels",
                        teacher_autocast=autocast_dtype(cfg.train.precision, session.device))
    loop = Loop(cfg, plan, objective, model, tokenizer, session, ahead=ahead)
    loop.resume()
    if teacher is not None:
        D.score_teacher(loop, teacher, plan, meta, session.rank)
    loop.run()
