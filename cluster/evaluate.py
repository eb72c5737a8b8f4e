"""jobs.evaluate's core: score a trained checkpoint on data it did not train on, with the metrics its
training reported, as Ray Data batch inference.

- On a prepared corpus (`corpus:`): a causal LM's loss, perplexity and bits per byte; an encoder's
  masked-LM loss and accuracy (and NSP/SOP for a pretraining head), as jobs.pretrain evaluates.
- On labelled data (`data:`, jobs.finetune's data section): classification (accuracy, macro-F1,
  per-class), tagging (token accuracy, entity P/R/F1) or completion (loss, perplexity, ROUGE-L and
  BLEU of greedy generations), as jobs.finetune evaluates.

The split is read by Ray Data and scored by a pool of actors (`scaling.workers`), each holding the
model once; every batch comes back as the objective's summable statistics (cluster.losses,
cluster.task_losses), which the driver adds up and turns into metrics. The objectives are the
training loop's own, so a checkpoint scored here on its validation split gets the numbers its run
reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from typing import Any, Literal

import numpy as np
import ray
from pydantic import Field, field_validator, model_validator

from cluster import hub, registry, runtime, storage, tasks
from cluster.config import Section
from cluster.corpus import Corpus
from cluster.entry import JobError
from cluster.finetune import CAUSAL_ARCHITECTURES, EvalOptions, base_config, local_copy, prepare_tokenizer
from cluster.pretrain import ObjectiveConfig
from cluster.runs import RunDir, RunLookupError, check_name, is_run_dir, named_run, run_checkpoint
from cluster.sources import quiet_data_logs, read_parquet
from cluster.train import STATE_DIR

log = logging.getLogger(__name__)

ENCODER_ARCHITECTURES = ("ForMaskedLM", "ForPreTraining")
BATCHES_PER_BLOCK = 4
TASK_ARCHITECTURES = {"ForSequenceClassification": "classification", "ForTokenClassification": "tagging"}


class EvalData(tasks.TaskData):
    """jobs.finetune's data section. Files may be given as data.validation alone: a held-out test
    set, scored as the validation split."""

    @model_validator(mode="after")
    def _sources(self) -> EvalData:  # replaces TaskData's check, which needs data.train
        if self.kind == "files" and not (self.train or self.validation):
            raise ValueError("data.kind 'files' needs data.validation (the files to score) or data.train")
        if self.kind == "hf" and not self.dataset:
            raise ValueError("data.kind 'hf' needs data.dataset")
        return self


class EvalScaling(Section):
    workers: int = Field(1, ge=1, description="model replicas scoring batches in parallel (Ray Data actors)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per replica")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per replica (default: its CPUs)")
    use_gpu: bool = Field(False, description="one GPU per replica")


class EvaluateConfig(Section):
    name: str = Field("evaluate", description="run name: <RAYLM_STORAGE>/evaluate/<name>/")
    model: str = Field(
        description="what to score: a checkpoint directory or URI, a run name or folder (fine-tune, sweep or "
        "pretrain: its best checkpoint), a registry model name, or a Hugging Face hub id"
    )
    corpus: str | None = Field(None, description="a prepared corpus (name or path): language-model metrics")
    data: EvalData | None = Field(None, description="labelled data, as jobs.finetune's data section: task metrics")
    split: Literal["train", "validation"] = Field("validation", description="which split of the corpus or data")
    batch_size: int = Field(16, ge=1, description="rows per scored batch")
    max_rows: int | None = Field(None, ge=1, description="score only the split's first N rows")
    seed: int = Field(0, description="masked-LM masks and NSP/SOP pairs")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig,
        description="masked-LM options for an encoder checkpoint that does not carry its training config",
    )
    eval: EvalOptions = Field(default_factory=EvalOptions)
    scaling: EvalScaling = Field(default_factory=EvalScaling)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _one_source(self) -> EvaluateConfig:
        if (self.corpus is None) == (self.data is None):
            raise ValueError("give exactly one of corpus (language-model metrics on a prepared corpus) and data "
                             "(task metrics on labelled rows)")
        return self


# ---------------------------------------------------------------- what is scored


def resolve_model(ref: str, root: str | None = None) -> str:
    """The checkpoint `ref` names: a path or URI (a run folder stands for its best, else final,
    checkpoint), a finished run's name, a registry model's name, else a hub id."""
    if storage.exists(ref) or storage.is_uri(ref):
        if not is_run_dir(ref):
            return ref
        picked = run_checkpoint(ref)
        if not picked:
            raise JobError(f"model: run '{ref}' finished without a checkpoint")
        return picked
    if ref.startswith((".", "/")):
        raise JobError(f"model '{ref}' does not exist")
    try:
        check_name(ref)
    except ValueError:
        return ref  # "org/name": only a hub id looks like that
    base = root or storage.storage_root()
    try:
        run = named_run(ref, base)
    except RunLookupError as exc:
        raise JobError(f"model: {exc}") from None
    entry = storage.join(base, "registry", ref)
    published = storage.read_json(storage.join(entry, "model.json")) if storage.exists(
        storage.join(entry, "model.json")) else None
    picked = run_checkpoint(run) if run else None
    if run and not picked:
        raise JobError(f"model: run '{run}' finished without a checkpoint")
    if picked and published is not None and published.get("source_checkpoint") != picked:
        # the same name for a run and a model published from elsewhere (a sweep publishes its best
        # under its own name: that is the same checkpoint, and no question)
        raise JobError(f"model '{ref}' names run '{run}' and registry model '{entry}', published from another "
                       "checkpoint; give the folder you mean")
    return picked or (entry if published is not None else ref)


def architecture(config: dict[str, Any], where: str) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise JobError(f"model '{where}': config.json names no architecture, so raylm cannot tell what it scores")
    return archs[0]


def task_of(arch: str, where: str) -> str:
    """The fine-tuning task a checkpoint's architecture is scored on."""
    for suffix, task in TASK_ARCHITECTURES.items():
        if arch.endswith(suffix):
            return task
    if arch.endswith(CAUSAL_ARCHITECTURES):
        return "completion"
    raise JobError(f"model '{where}' is a {arch}, which has no task head: score it on a prepared corpus "
                   "(--set corpus=<name>) instead of labelled data")


def lm_kind(arch: str, where: str) -> str:
    if arch.endswith(CAUSAL_ARCHITECTURES):
        return "clm"
    if arch.endswith(ENCODER_ARCHITECTURES):
        return "mlm"
    raise JobError(f"model '{where}' is a {arch}, a task model: score it on labelled data (data: as in its "
                   "fine-tuning config) instead of a corpus")


def model_labels(config: dict[str, Any], where: str) -> list[str]:
    """The label of each output id, from config.json's id2label."""
    labels = registry.labels_from_config(config)
    if not labels or sorted(int(k) for k in config["id2label"]) != list(range(len(labels))):
        raise JobError(f"model '{where}': config.json id2label {config.get('id2label')} does not give a label "
                       "for each output 0..n-1")
    return [str(label) for label in labels]


def unknown_labels(task: str, cfg: tasks.TaskData, stats: tasks.SplitStats, labels: list[str], split: str) -> str | None:
    """Labels in the data that the model has no output for: scoring them would mean nothing."""
    unknown = sorted(set(stats.labels) - set(labels))
    if not unknown:
        return None
    key = "label_column" if task == "classification" else "tags_column"
    return f"data.{key}: the {split} split has labels {unknown[:10]} the model does not predict (its labels: {labels})"


def masked_lm_options(checkpoint: str, arch: str, family: str, cfg: EvaluateConfig, corpus: Corpus) -> dict[str, Any]:
    """Masking and pairing as the checkpoint was pretrained (its train_state/config.json), else from
    `objective:`; the pair task follows the head (a *ForPreTraining head has one)."""
    state = storage.join(checkpoint, STATE_DIR, "config.json")
    trained = storage.read_json(state) if storage.exists(state) else {}
    objective = ObjectiveConfig.model_validate(trained.get("objective") or cfg.objective.to_dict())
    pair = objective.pair_task(family) if arch.endswith("ForPreTraining") else None
    seg = corpus.manifest.get("max_segment_tokens") or 0
    max_len = (trained.get("model") or {}).get("max_len") or seg + 3
    if max_len < seg + 3:
        raise JobError(f"corpus '{corpus.path}' has segments of up to {seg} tokens, longer than the model's "
                       f"max_len {max_len} holds with its 3 special tokens")
    return {"pair": pair, "max_len": max_len, "mask_rate": objective.mask_rate, "whole_word": objective.whole_word,
            "static_masking": objective.static_masking}


# ---------------------------------------------------------------- scoring (Ray Data actors)


def model_tokenizer(path: str, spec: dict[str, Any]) -> Any:
    """The checkpoint's tokenizer, made ready for a task as jobs.finetune makes it (a fine-tuned
    checkpoint's is ready already; a hub model's may lack a pad token or a pair template)."""
    if spec["kind"] in ("clm", "mlm"):
        from transformers import AutoTokenizer

        return hub.from_pretrained(AutoTokenizer.from_pretrained, path)
    return prepare_tokenizer(path, spec["kind"], pair=spec["pair"], token_types=spec["token_types"])


def build_objective(spec: dict[str, Any], tokenizer: Any) -> Any:
    from cluster import losses, task_losses

    kind = spec["kind"]
    if kind == "clm":
        return losses.CausalLM(spec["bytes_per_token"])
    if kind == "mlm":
        m = spec["mlm"]
        return losses.MaskedLM(tokenizer, m["pair"], m["max_len"], m["mask_rate"], m["whole_word"],
                               m["static_masking"], spec["seed"])
    if kind == "classification":
        return task_losses.SequenceClassification(spec["labels"], spec["pad_id"], spec["token_types"])
    if kind == "tagging":
        return task_losses.TokenClassification(spec["labels"], spec["pad_id"])
    return task_losses.Completion(tokenizer, spec["sample_cap"], spec["max_new_tokens"])


def batch_seed(seed: int, batch: dict[str, Any]) -> tuple[int, int, int, int]:
    """A batch's masking seed, shaped as the training loop's evaluation seed (seed, epoch -1, batch,
    rank) with the batch named by its first row, not by which actor scores it or when: the same
    split, batch size and seed always get the same masks."""
    first = np.asarray(batch["input_ids"][0], dtype=np.int64).tobytes()
    return seed, -1, int.from_bytes(hashlib.sha256(first).digest()[:6], "little"), 0


class Scorer:
    """One model replica in the actor pool: a batch of rows in, one row of summed statistics out
    (and, for completion, this replica's share of generated samples)."""

    def __init__(self, checkpoint: str, spec: dict[str, Any]):
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        from cluster.train import autocast_dtype

        hf_logging.disable_progress_bar()
        torch.set_num_threads(spec["threads"])
        self.spec = spec
        self.device = torch.device("cuda" if spec["use_gpu"] and torch.cuda.is_available() else "cpu")
        self.amp = autocast_dtype(spec["precision"], self.device)
        model_cls = getattr(transformers, spec["architecture"])
        self.model = hub.from_pretrained(model_cls.from_pretrained, local_copy(checkpoint), use_safetensors=True,
                                         trust_remote_code=False)
        self.model.to(self.device).eval()
        self.objective = build_objective(spec, model_tokenizer(local_copy(checkpoint), spec))
        self.generated = 0
        self.replica = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        inputs = self.objective.collate(batch, batch_seed(self.spec["seed"], batch))
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        samples: list = []
        generate = getattr(self.objective, "generate", None)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                             enabled=self.amp is not None):
            _, stats = self.objective.forward(self.model, inputs)
            if generate and self.generated < self.spec["sample_cap"]:
                samples = generate(self.model, inputs, self.spec["sample_cap"] - self.generated)
                self.generated += len(samples)
        sums = {k: float(v) for k, v in stats.items()}
        return {"sums": np.array([json.dumps(sums)]), "samples": np.array([json.dumps(samples)]),
                "rows": np.array([len(batch["input_ids"])], dtype=np.int64), "replica": np.array([self.replica])}


def add_sums(rows: list[dict[str, Any]]) -> tuple[dict[str, float], list, int]:
    """The scored batches' statistics added up, their samples, and the rows scored."""
    sums: dict[str, float] = {}
    samples: list = []
    n = 0
    for r in rows:
        for k, v in json.loads(r["sums"]).items():
            sums[k] = sums.get(k, 0.0) + v
        samples += [tuple(p) for p in json.loads(r["samples"])]
        n += int(r["rows"])
    return sums, samples, n


def score(ds: ray.data.Dataset, checkpoint: str, spec: dict[str, Any], cfg: EvaluateConfig,
          tokenizer: Any) -> dict[str, Any]:
    """Every row of `ds` through the actor pool; the summed statistics as the objective's metrics."""
    if cfg.max_rows:
        ds = ds.limit(cfg.max_rows)
    # A few batches per block, so that a split in one or two shards still reaches every replica
    # (one block goes to one actor).
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size * BATCHES_PER_BLOCK)
    # Read and re-blocked before the actors start, in split order: the actors hold their CPUs from
    # the start, and on a cluster with no CPU beyond them the read tasks waited for the actors,
    # which waited for the reads (2 replicas on a 2-CPU `ray start` cluster hung for good).
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    workers = cfg.scaling.workers
    spec = {**spec, "seed": cfg.seed, "precision": cfg.precision, "use_gpu": cfg.scaling.use_gpu,
            "threads": cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)),
            # each replica generates its share of the samples, as each training worker does
            "sample_cap": -(-cfg.eval.generate_examples // workers), "max_new_tokens": cfg.eval.max_new_tokens}
    scored = ds.map_batches(
        Scorer, fn_constructor_kwargs={"checkpoint": checkpoint, "spec": spec}, batch_size=cfg.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cfg.scaling.cpus_per_worker,
        **({"num_gpus": 1} if cfg.scaling.use_gpu else {}),
    )
    # Rows in split order make the same batches whichever actor scores them: masked-LM masks and
    # NSP/SOP pairs are drawn per batch, so the metrics of a run do not depend on its scheduling.
    scored.context.execution_options.preserve_order = True
    t0 = time.time()
    try:
        rows = scored.take_all()
    except Exception as exc:
        raise JobError(f"scoring failed: {tasks.user_error(exc)}") from None
    seconds = time.time() - t0
    sums, samples, n = add_sums(rows)
    if not n:
        raise JobError(f"the {cfg.split} split has no rows to score")
    objective = build_objective(spec, tokenizer)
    metrics = objective.summarize(sums)
    if hasattr(objective, "score_samples"):
        metrics |= objective.score_samples(samples)
    return {"rows": n, "replicas_used": len({r["replica"] for r in rows}), "scoring_seconds": round(seconds, 2),
            "metrics": metrics, "samples": [{"generated": h, "reference": r} for h, r in samples[:8]]}


# ---------------------------------------------------------------- the job


def check_resources(cfg: EvaluateConfig) -> None:
    need = {"CPU": cfg.scaling.cpus_per_worker * cfg.scaling.workers}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(cfg.scaling.workers)
    detail = runtime.resource_shortfall(need)
    if detail:
        raise JobError(f"scaling: {cfg.scaling.workers} replica(s) need more than the cluster has ({detail}); "
                       "lower scaling.workers or scaling.cpus_per_worker")


def corpus_input(cfg: EvaluateConfig, corpus: Corpus, kind: str, checkpoint: str, path: str,
                 config: dict[str, Any], arch: str) -> tuple[ray.data.Dataset, dict[str, Any], Any, dict[str, Any]]:
    """The corpus split to score, the scorer's spec, the model's tokenizer and what the summary says
    about the data; refused when the corpus does not fit the model."""
    from cluster.tokenizer import tokenizer_hash

    tokenizer = model_tokenizer(path, {"kind": kind})
    theirs, ours = corpus.manifest["tokenizer"]["hash"], tokenizer_hash(tokenizer)
    if theirs != ours:
        raise JobError(f"corpus '{corpus.path}' was tokenized with tokenizer {theirs}, but model '{checkpoint}' uses "
                       f"{ours}: score a model on a corpus prepared with its own tokenizer")
    if kind == "clm" and corpus.layout != "blocks":
        raise JobError(f"corpus '{corpus.path}' has layout '{corpus.layout}'; a causal LM is scored on 'blocks'")
    if kind == "mlm" and corpus.layout != "segments":
        raise JobError(f"corpus '{corpus.path}' has layout '{corpus.layout}'; an encoder is scored on 'segments'")
    positions = config.get("n_positions") or config.get("max_position_embeddings") or 0
    if kind == "clm" and positions < corpus.manifest["block_size"]:
        raise JobError(f"corpus '{corpus.path}' has blocks of {corpus.manifest['block_size']} tokens, more than "
                       f"model '{checkpoint}' has positions ({positions})")
    info = corpus.split_info(cfg.split)
    if not info["rows"]:
        raise JobError(f"corpus '{corpus.path}' has no {cfg.split} rows")
    spec: dict[str, Any] = {"kind": kind, "bytes_per_token": corpus.bytes_per_token(cfg.split)}
    if kind == "mlm":
        spec["mlm"] = masked_lm_options(checkpoint, arch, config.get("model_type", ""), cfg, corpus)
    ds = read_parquet(corpus.shard_paths(cfg.split), columns=corpus.manifest["columns"])
    about = {"corpus": corpus.path, "tokens": info["tokens"],
             "entropy_floor_bpb": corpus.entropy_floor(cfg.split) if kind == "clm" else None}
    return ds, spec, tokenizer, about


def data_input(cfg: EvaluateConfig, data: tasks.TaskData, task: str, checkpoint: str, path: str,
               config: dict[str, Any]) -> tuple[ray.data.Dataset, dict[str, Any], Any, dict[str, Any]]:
    """The labelled split to score, tokenized as fine-tuning did, the scorer's spec, the tokenizer
    and the data's counts; refused when it holds labels the model has no output for."""
    token_types = task == "classification" and config.get("type_vocab_size", 0) >= 2
    spec = {"kind": task, "pair": bool(data.text_pair_column), "token_types": token_types}
    tokenizer = model_tokenizer(path, spec)
    labels = model_labels(config, checkpoint) if task != "completion" else None
    files = tasks.tokenizer_files(tokenizer)
    raw = tasks.load_split(data, cfg.split)
    tasks.check_columns(data, task, {cfg.split: raw})
    stats = tasks.split_stats({cfg.split: raw}, task, files, data)
    problems = tasks.row_label_problems(task, data, stats) if labels else []
    if labels and (unknown := unknown_labels(task, data, stats[cfg.split], labels, cfg.split)):
        problems.append(unknown)
    if problems:
        raise tasks.TaskDataError("; ".join(problems))
    ds = tasks.tokenize_split(raw, task, files, data, labels, token_types, cfg.split)
    spec |= {"labels": labels, "pad_id": tokenizer.pad_token_id}
    return ds, spec, tokenizer, {"task": task, "labels": labels, "data": stats[cfg.split].summary()}


def evaluate(cfg: EvaluateConfig, root: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    quiet_data_logs()
    checkpoint = resolve_model(cfg.model, root)
    path = local_copy(checkpoint) if storage.is_uri(checkpoint) else checkpoint
    config = base_config(path, key="model", runs="a fine-tune, sweep or pretrain run")
    arch = architecture(config, checkpoint)
    if cfg.data is not None:
        task = task_of(arch, checkpoint)
        data = cfg.data.resolved(task)
        tasks.check_file_columns(data, task)
    else:
        corpus = Corpus.open(cfg.corpus, root)
        kind = lm_kind(arch, checkpoint)
    run = RunDir("evaluate", cfg.name, root)
    # Ray starts (or is joined) only now: a wrong model, corpus or column fails in seconds.
    runtime.connect()
    check_resources(cfg)
    run.begin(cfg)
    if cfg.data is not None:
        ds, spec, tokenizer, about = data_input(cfg, data, task, checkpoint, path, config)
    else:
        ds, spec, tokenizer, about = corpus_input(cfg, corpus, kind, checkpoint, path, config, arch)
    spec["architecture"] = arch
    log.info("scoring %s (%s) on the %s split with %d replica(s)", checkpoint, arch, cfg.split, cfg.scaling.workers)
    result = score(ds, checkpoint, spec, cfg, tokenizer)
    log.info("%d rows: %s", result["rows"], ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()
                                                      if isinstance(v, float)))
    return {"model": cfg.model, "checkpoint": checkpoint, "architecture": arch, "split": cfg.split, **about,
            **result, "seconds": round(time.time() - t0, 2)}
