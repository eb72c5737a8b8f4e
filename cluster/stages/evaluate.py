"""jobs.evaluate's core: score a trained checkpoint on data it did not train on, with the metrics its
training reported, as Ray Data batch inference.

- On a prepared corpus (`corpus:`): a causal LM's loss, perplexity and bits per byte; an encoder's
  masked-LM loss and accuracy (and NSP/SOP for a pretraining head), as jobs.pretrain evaluates.
- On labelled data (`data:`, jobs.finetune's data section): classification (accuracy, macro-F1,
  per-class), tagging (token accuracy, entity P/R/F1) or completion (loss, perplexity, ROUGE-L and
  BLEU of greedy generations), as jobs.finetune evaluates.

The split is read by Ray Data and scored by a pool of actors (`scaling.workers`), each holding the
model once; every batch comes back as the objective's summable statistics (cluster.objectives,
via cluster.stages.scoring), which the driver adds up and turns into metrics. The objectives are the
training loop's own, so a checkpoint scored here on its validation split gets the numbers its run
reported.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import ray
from pydantic import Field, field_validator, model_validator

from cluster import registry, runtime, storage
from cluster.checkpoints import CAUSAL_ARCHITECTURES, base_config, local_copy
from cluster.config import Section
from cluster.data import task_prep, tasks
from cluster.data.corpus import Corpus
from cluster.data.ingest import quiet_data_logs, read_parquet
from cluster.errors import JobError
from cluster.objectives.lm import ObjectiveConfig
from cluster.objectives.tasks import EvalOptions
from cluster.runs import RunDir, RunLookupError, check_name, is_run_dir, named_run, run_checkpoint
from cluster.stages.scoring import model_tokenizer, score
from cluster.train.checkpoint import STATE_DIR

log = logging.getLogger(__name__)


ENCODER_ARCHITECTURES = ("ForMaskedLM", "ForPreTraining")


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
    quantize: Literal["none", "int8"] = Field("none", description="int8: score the model as Serve's `quantize: int8` "
                                              "serves it (int8 Linear layers, CPU replicas; cluster.quantize)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _one_source(self) -> EvaluateConfig:
        if (self.corpus is None) == (self.data is None):
            raise ValueError("give exactly one of corpus (language-model metrics on a prepared corpus) and data "
                             "(task metrics on labelled rows)")
        if self.quantize == "int8" and self.scaling.use_gpu:
            raise ValueError("quantize 'int8' runs on CPU (PyTorch's dynamic int8 kernels): set scaling.use_gpu false")
        return self


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
    published = registry.find(ref, storage.join(base, "registry"))
    entry = published["path"] if published is not None else storage.join(base, "registry", ref)
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


def unknown_labels(task: str, cfg: tasks.TaskData, stats: task_prep.SplitStats, labels: list[str], split: str) -> str | None:
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


def check_resources(cfg: EvaluateConfig) -> None:
    need = {"CPU": cfg.scaling.cpus_per_worker * cfg.scaling.workers}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(cfg.scaling.workers)
    runtime.require(need, f"scaling: {cfg.scaling.workers} replica(s)", "lower scaling.workers or scaling.cpus_per_worker")


def corpus_input(cfg: EvaluateConfig, corpus: Corpus, kind: str, checkpoint: str, path: str,
                 config: dict[str, Any], arch: str) -> tuple[ray.data.Dataset, dict[str, Any], Any, dict[str, Any]]:
    """The corpus split to score, the scorer's spec, the model's tokenizer and what the summary says
    about the data; refused when the corpus does not fit the model."""
    from cluster.data.tokenizer import tokenizer_hash

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
    files = task_prep.tokenizer_files(tokenizer)
    raw = tasks.load_split(data, cfg.split)
    tasks.check_columns(data, task, {cfg.split: raw})
    stats = task_prep.split_stats({cfg.split: raw}, task, files, data)
    problems = task_prep.row_label_problems(task, data, stats) if labels else []
    if labels and (unknown := unknown_labels(task, data, stats[cfg.split], labels, cfg.split)):
        problems.append(unknown)
    if problems:
        raise tasks.TaskDataError("; ".join(problems))
    ds = task_prep.tokenize_split(raw, task, files, data, labels, token_types, cfg.split)
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
    return {"model": cfg.model, "checkpoint": checkpoint, "architecture": arch, "quantize": cfg.quantize,
            "split": cfg.split, **about,
            **result, "seconds": round(time.time() - t0, 2)}
