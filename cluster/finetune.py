"""Fine-tuning: a pretrained checkpoint + labelled data -> a task model, through the same training
loop as pretraining (cluster.train.Loop) with a task objective (cluster.task_losses) and a strategy
(full, frozen backbone, LoRA). `jobs.finetune` runs it on Ray Train; `tune.sweep` runs one of these
per trial.

The driver resolves the base checkpoint, checks it can serve the task, prepares the data
(cluster.tasks) and plans the steps; workers rebuild everything from plain dicts.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import ray
import ray.train
from pydantic import Field, field_validator, model_validator
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster import hub, registry, runtime, storage, tasks
from cluster.config import Section, StrList
from cluster.entry import JobError
from cluster.pretrain import (
    OptimConfig,
    ScalingSection,
    TrainConfig,
    check_resources,
    checkpoint_location,
    data_config,
)
from cluster.runs import RunDir, check_name, is_run_dir, run_checkpoint
from cluster.sources import quiet_data_logs
from cluster.train import Plan

log = logging.getLogger(__name__)

# task -> transformers Auto class name, the registry task it publishes as, peft task type
TASKS: dict[str, tuple[str, str, str]] = {
    "classification": ("AutoModelForSequenceClassification", "classification", "SEQ_CLS"),
    "tagging": ("AutoModelForTokenClassification", "tagging", "TOKEN_CLS"),
    "completion": ("AutoModelForCausalLM", "generation", "CAUSAL_LM"),
}
CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


class FinetuneModel(Section):
    checkpoint: str = Field(
        description="base model: a checkpoint directory or URI, a pretrain run name or folder (its best checkpoint), "
        "a registry model name, or a Hugging Face hub id (downloaded only because you named it)"
    )
    compile: bool = Field(False, description="torch.compile the model")


class LoraOptions(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (update scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: StrList | None = Field(
        None, description="module names to adapt (default: peft's choice for the architecture, e.g. c_attn, query/value)"
    )


class StrategyConfig(Section):
    kind: Literal["full", "frozen", "lora"] = Field("full", description="what trains: everything, the head, or LoRA")
    unfreeze_top_k: int = Field(0, ge=0, description="frozen: also train the top k transformer blocks")
    lora: LoraOptions = Field(default_factory=LoraOptions)


class EvalOptions(Section):
    generate_examples: int = Field(64, ge=0, description="completion: validation prompts generated per evaluation")
    max_new_tokens: int = Field(32, ge=1, description="completion: tokens generated per prompt")


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
        return self


# ---------------------------------------------------------------- the base checkpoint


def resolve_checkpoint(name: str, root: str | None = None) -> str:
    """A checkpoint directory (or URI, or hub id) for `model.checkpoint`: a pretraining run, by name
    or by its folder, stands for its best checkpoint (else its final one)."""
    if storage.exists(name) or storage.is_uri(name):
        return (run_checkpoint(name) or name) if is_run_dir(name) else name
    base = root or storage.storage_root()
    picked = run_checkpoint(storage.join(base, "pretrain", name))
    if picked:
        return picked
    entry = storage.join(base, "registry", name)
    if storage.exists(storage.join(entry, "model.json")):
        return entry
    if name.startswith((".", "/")):
        raise JobError(f"model.checkpoint '{name}' does not exist")
    return name  # a hub id such as "bert-base-uncased": transformers fetches it (base_config says if it cannot)


@functools.lru_cache(maxsize=8)
def local_copy(path: str) -> str:
    """from_pretrained reads local folders: copy a URI checkpoint here (once per process)."""
    if not storage.is_uri(path):
        return path
    import tempfile

    local = tempfile.mkdtemp(prefix="raylm-base-")
    registry.copy_tree(path, local)
    return local


def base_config(path: str, key: str = "model.checkpoint", runs: str = "a pretrain run") -> dict[str, Any]:
    """The config.json of the checkpoint `key` names (a local folder or a hub id); `runs` says
    which run names `key` accepts, for the message when it is none of them."""
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.exists(config_file):
            raise JobError(f"{key} '{path}' has no config.json: not a Hugging Face checkpoint")
        if not glob.glob(os.path.join(path, "*.safetensors")):
            raise JobError(f"{key} '{path}' has no *.safetensors weights (pickled weights are never loaded)")
        with open(config_file) as f:
            return json.load(f)
    from transformers import AutoConfig

    with hub.offline_if_unreachable() as unresolved:
        try:
            # With no hub to reach, only the local Hugging Face cache can hold it: look there alone.
            return AutoConfig.from_pretrained(path, local_files_only=unresolved is not None).to_dict()
        except Exception as exc:  # offline, or no such hub model
            raise JobError(
                f"{key} '{path}' is not a checkpoint directory, {runs} or registry model under "
                f"RAYLM_STORAGE, nor loadable from the Hugging Face hub ({hub.offline_note(unresolved) or type(exc).__name__})"
            ) from None


def check_family(task: str, config: dict[str, Any], where: str) -> None:
    """A checkpoint of the wrong family for the task is refused before training starts."""
    from transformers.models.auto import modeling_auto as auto

    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if task == "completion":
        if not any(a.endswith(CAUSAL_ARCHITECTURES) for a in archs):
            raise JobError(
                f"task 'completion' needs a causal language model checkpoint; '{where}' is {archs or model_type} "
                "(an encoder: use it for classification or tagging)"
            )
        return
    mapping = (auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if task == "classification"
               else auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)
    if model_type not in mapping:
        raise JobError(f"task '{task}': checkpoint '{where}' (model_type '{model_type}') has no {TASKS[task][0]} head")


def prepare_tokenizer(path: str, task: str, pair: bool, token_types: bool = False) -> Any:
    """The base checkpoint's tokenizer, ready for the task: a pad token; for text pairs on a
    tokenizer without a pair template (byte-level BPE), "A <eos> B"; token_type_ids in its outputs
    when the model has segment embeddings. Saved with the fine-tuned checkpoint, so Serve and
    `pipeline` encode inputs exactly as training did."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = hub.from_pretrained(AutoTokenizer.from_pretrained, path)
    if not tok.is_fast:
        raise JobError(f"model.checkpoint '{path}': raylm needs a fast (Rust) tokenizer, got {type(tok).__name__}")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise JobError(f"model.checkpoint '{path}': the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if task == "completion" and tok.eos_token_id is None:
        raise JobError(f"task 'completion': the tokenizer of '{path}' has no eos token to end completions")
    if pair and tok("a", "b")["input_ids"] == tok("a")["input_ids"] + tok("b")["input_ids"]:
        sep = tok.sep_token or tok.eos_token
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A", pair=f"$A {sep} $B:1", special_tokens=[(sep, tok.convert_tokens_to_ids(sep))]
        )
    if token_types and "token_type_ids" not in tok.model_input_names:
        names = ["input_ids", "token_type_ids", "attention_mask"]
        tok.model_input_names = names
        tok.init_kwargs["model_input_names"] = names  # saved in tokenizer_config.json
    return tok


def linear_layer_names(model: Any) -> list[str]:
    """The names LoRA usually targets: the last part of every linear layer's name (GPT-2's Conv1D too)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and type(m).__name__ in ("Linear", "Conv1D")})


def check_strategy(cfg: FinetuneConfig, config: dict[str, Any]) -> None:
    """Problems a strategy would hit on the worker, found on the driver with a weightless model."""
    import torch
    import transformers

    s = cfg.strategy
    model_cls = getattr(transformers, TASKS[cfg.task][0])
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = model_cls.from_config(hf_config)
    if s.kind == "frozen":
        if s.unfreeze_top_k and not find_blocks(model):
            raise JobError(f"strategy.unfreeze_top_k: {config.get('model_type')} has no per-layer blocks to unfreeze "
                           "(ALBERT shares one layer across its depth)")
        n_layers = len(find_blocks(model) or [])
        if s.unfreeze_top_k > n_layers:
            raise JobError(f"strategy.unfreeze_top_k ({s.unfreeze_top_k}) exceeds the model's {n_layers} blocks")
        if cfg.task == "completion" and not s.unfreeze_top_k:
            raise JobError("strategy.kind 'frozen' for completion trains nothing with unfreeze_top_k 0 (the LM head "
                           "is part of the backbone); set strategy.unfreeze_top_k >= 1")
    if s.kind == "lora" and s.lora.target_modules:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = sorted(set(s.lora.target_modules) - names)
        if missing:
            raise JobError(f"strategy.lora.target_modules {missing} are not modules of {config.get('model_type')} "
                           f"(its linear layers: {', '.join(linear_layer_names(model))})")


# ---------------------------------------------------------------- model and strategy (worker side)


def find_blocks(model: Any) -> Any | None:
    """The ModuleList of transformer blocks (as many as num_hidden_layers), or None."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    return None


def module_names(keys: Any) -> list[str]:
    """State-dict keys -> the outermost modules holding them: `classifier.weight`, `classifier.bias`,
    `predictions.bias` and `predictions.dense.bias` give `classifier`, `predictions`."""
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    return [m for m in modules if not any(m.startswith(o + ".") for o in modules)]


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


def apply_strategy(model: Any, strategy: StrategyConfig, task: str) -> Any:
    """Full: unchanged. Frozen: the backbone stops training except its top k blocks; the head trains.
    LoRA: peft adapters on the target modules (the task head trains in full, as peft's
    modules_to_save)."""
    if strategy.kind == "full":
        return model
    if strategy.kind == "frozen":
        backbone = getattr(model, model.base_model_prefix)
        for p in backbone.parameters():
            p.requires_grad = False
        blocks = find_blocks(backbone)
        if strategy.unfreeze_top_k and blocks is not None:
            for block in list(blocks)[-strategy.unfreeze_top_k :]:
                for p in block.parameters():
                    p.requires_grad = True
        return model
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    opts = strategy.lora
    # GPT-2's projections are Conv1D (weights stored transposed): peft needs fan_in_fan_out for them,
    # and sets it itself with a warning per layer kind when it is not given
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = LoraConfig(task_type=TASKS[task][2], r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                        target_modules=opts.target_modules, fan_in_fan_out=conv1d)
    with warnings.catch_warnings():
        # peft reads model.is_gradient_checkpointing, which transformers 5.24 deprecated (a FutureWarning
        # from every worker of every LoRA run about peft's code, not ours)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def make_objective(cfg: FinetuneConfig, meta: dict[str, Any], tokenizer: Any) -> Any:
    from cluster import task_losses

    if cfg.task == "classification":
        return task_losses.SequenceClassification(meta["labels"], meta["pad_id"], meta["token_types"])
    if cfg.task == "tagging":
        return task_losses.TokenClassification(meta["labels"], meta["pad_id"])
    return task_losses.Completion(tokenizer, cfg.eval.generate_examples, cfg.eval.max_new_tokens)


def run_worker(cfg: FinetuneConfig, plan: Plan, meta: dict[str, Any], session: Any) -> None:
    """One process's fine-tuning run (a Ray Train worker or a Tune trial)."""
    import torch

    from cluster.train import Loop, seed_everything

    threads = cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    record = {"rank": session.rank, "node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
              "pid": os.getpid()}
    storage.write_json_atomic(storage.join(plan.run_dir, "workers", f"rank-{session.rank}.json"), record)
    seed_everything(cfg.train.seed + session.rank)
    tokenizer = tasks.tokenizer_from_files(meta["tokenizer_files"])
    model = apply_strategy(build_task_model(cfg, meta, local_copy(meta["base"])), cfg.strategy, cfg.task)
    loop = Loop(cfg, plan, make_objective(cfg, meta, tokenizer), model, tokenizer, session)
    loop.resume()
    loop.place()
    loop.run()


def worker_main(config: dict) -> None:
    """Ray Train entry point: plain dicts in, typed objects rebuilt here."""
    from cluster.session import TrainSession

    run_worker(FinetuneConfig.model_validate(config["cfg"]), Plan(**config["plan"]), config["meta"], TrainSession())


# ---------------------------------------------------------------- driver


@dataclass
class TaskSetup:
    """Everything the driver prepared once (a sweep shares it across trials)."""

    base: str
    meta: dict[str, Any]
    train: Any
    validation: Any
    stats: dict[str, Any]
    baseline: dict[str, Any]


def setup(cfg: FinetuneConfig, root: str | None = None, run: RunDir | None = None) -> TaskSetup:
    """Check the inputs, then start Ray and read, check and tokenize the data (seconds). `run`, the
    run folder the job will write: its storage is checked between the two, so neither an
    unwritable storage waits for the data nor bad input leaves a folder behind."""
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
    # Ray starts (or is joined) only now: a wrong checkpoint, strategy or column fails in seconds.
    runtime.connect()
    token_types = cfg.task == "classification" and config.get("type_vocab_size", 0) >= 2
    tokenizer = prepare_tokenizer(local_copy(base) if storage.is_uri(base) else base, cfg.task,
                                  pair=bool(data_cfg.text_pair_column), token_types=token_types)
    prepared = tasks.prepare_data(cfg.task, data_cfg, tokenizer, token_types, cfg.eval.generate_examples)
    from cluster.tokenizer import tokenizer_hash

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
    rows = meta["rows"]["train"]
    steps_per_epoch = rows // workers // cfg.train.batch_size // cfg.train.grad_accum
    if steps_per_epoch < 1:
        raise JobError(f"data: {rows} training rows are too few for {workers} worker(s) x train.batch_size "
                       f"{cfg.train.batch_size} x train.grad_accum {cfg.train.grad_accum}")
    if meta["rows"]["validation"] < workers:
        # streaming_split(equal=True) gives each worker an equal share and drops the remainder: fewer
        # rows than workers leave every worker none to evaluate.
        raise JobError(f"data: {meta['rows']['validation']} validation row(s) are fewer than the {workers} worker(s) "
                       "(scaling.num_workers) that each evaluate an equal share")
    tokens_per_step = workers * cfg.train.batch_size * cfg.train.grad_accum * meta["max_length"]
    if cfg.train.max_steps:
        max_steps = cfg.train.max_steps
    elif cfg.train.token_budget:
        max_steps = max(1, math.ceil(cfg.train.token_budget / tokens_per_step))
    else:
        max_steps = steps_per_epoch * cfg.train.epochs
    return Plan(run_dir=run_dir, tokenizer_dir="", tokenizer_hash=meta["tokenizer_hash"], bytes_per_token=0.0,
                steps_per_epoch=steps_per_epoch, max_steps=max_steps, epochs=math.ceil(max_steps / steps_per_epoch),
                tokens_per_step=tokens_per_step, seq_len=meta["max_length"])


def epoch_datasets(train: Any, validation: Any, epochs: int, seed: int) -> dict[str, Any]:
    """Per epoch a seeded block order (rows are shuffled further in a local buffer); validation as is."""
    out = {f"train_{e}": train.randomize_block_order(seed=seed * 7919 + e) for e in range(epochs)}
    out["validation"] = validation
    return out


def finetune(cfg: FinetuneConfig, root: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    run = RunDir("finetune", cfg.name, root)
    ts = setup(cfg, root, run)
    check_resources(cfg)
    run.begin(cfg)
    plan = plan_run(cfg, ts.meta, run.path, cfg.scaling.num_workers)
    log.info("plan: %d steps (%d per epoch, %d epochs)", plan.max_steps, plan.steps_per_epoch, plan.epochs)
    trainer = TorchTrainer(
        worker_main,
        train_loop_config={"cfg": cfg.to_dict(), "plan": asdict(plan), "meta": ts.meta},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources(), placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage.join(root or storage.storage_root(), "finetune"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="val_loss", checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=epoch_datasets(ts.train, ts.validation, plan.epochs, cfg.train.seed),
        dataset_config=data_config(),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise JobError(f"fine-tuning failed: {exc}") from None
    return summarize(cfg, run, plan, ts, result, t0)


def summarize(cfg: FinetuneConfig, run: RunDir, plan: Plan, ts: TaskSetup, result: Any, t0: float) -> dict[str, Any]:
    from cluster.plots import plot_curves

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
