"""jobs.distill's stage: a fine-tuned teacher + task data -> a smaller student of the same family,
trained through fine-tuning's data preparation and the one training loop, with the teacher's soft
targets added to the task loss (cluster.objectives.distill).

The driver resolves the teacher, plans the student's shape and checks both before Ray starts; the
data is fine-tuning's (cluster.stages.finetune.setup, on the teacher's tokenizer, which the student
shares). Each Ray Train worker builds the student (fresh, from every k-th teacher block as
DistilBERT did, or from a smaller checkpoint) and holds the frozen teacher beside it on the same
device, under the same autocast. With `compare_baseline` the same student, from the same
initialisation, is trained again for the same steps without the teacher, so the summary says what
the teacher added.

With `scaling.strategy: fsdp` the student is sharded (FSDP2) and the teacher, frozen, stays whole
on every worker: it runs no collective, and under FSDP's bf16 policy on a GPU it runs under bf16
autocast (Distill's `teacher_autocast`), as the student computes.

Causal and masked LM distillation on a prepared corpus is cluster.stages.distill_corpus. A
hidden-state term between different widths trains a projection (cluster.objectives.distill) under
DDP; with FSDP it is refused.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster import storage
from cluster.checkpoints import TASKS, base_config, local_copy, resolve_checkpoint
from cluster.config import Section
from cluster.data import tasks
from cluster.data.ingest import epoch_datasets
from cluster.errors import JobError
from cluster.objectives.lm import ObjectiveConfig
from cluster.objectives.tasks import EvalOptions
from cluster.runs import RunDir, RunLookupError, check_name, named_run, run_checkpoint
from cluster.stages import finetune
from cluster.train import launcher
from cluster.train.config import ScalingSection
from cluster.train.plan import Plan

log = logging.getLogger(__name__)

# the teacher's checkpoint and validation metrics, written by rank 0 before the student's first step
TEACHER_FILE = "teacher.json"

# student.<key> -> the transformers config attribute it sets (GPT-2 maps these names to n_layer,
# n_embd and n_head itself; its feed-forward width is n_inner)
SHAPE_KEYS = {"layers": "num_hidden_layers", "hidden_size": "hidden_size", "heads": "num_attention_heads",
              "intermediate_size": "intermediate_size"}

# a transformer block's parameters: GPT-2 `transformer.h.N.`, BERT `encoder.layer.N.`, Llama `model.layers.N.`
LAYER_KEY = re.compile(r"^(.*?\.(?:h|layer|layers))\.(\d+)\.(.+)$")

# what a teacher for each task is: the architecture suffixes its config.json names
TEACHER_HEADS = {"classification": ("ForSequenceClassification",), "tagging": ("ForTokenClassification",),
                 "completion": ("ForCausalLM", "LMHeadModel"), "lm": ("ForCausalLM", "LMHeadModel"),
                 "mlm": ("ForPreTraining", "ForMaskedLM")}

# the tasks learnt from a prepared corpus (the rest from fine-tuning's task data)
CORPUS_TASKS = ("lm", "mlm")


class StudentSection(Section):
    init: Literal["teacher_layers", "fresh", "checkpoint"] = Field(
        "teacher_layers", description="teacher_layers: the teacher's embeddings, head and every k-th block (its width); "
        "fresh: random weights; checkpoint: student.checkpoint's weights with a new task head")
    layers: int | None = Field(None, ge=1, description="transformer blocks (default: half the teacher's, rounded up)")
    hidden_size: int | None = Field(None, ge=1, description="model width (default: the teacher's)")
    heads: int | None = Field(None, ge=1, description="attention heads (default: the teacher's)")
    intermediate_size: int | None = Field(None, ge=1, description="feed-forward width (default: the teacher's)")
    checkpoint: str | None = Field(None, description="init 'checkpoint': a smaller model of the teacher's family and tokenizer")
    compile: bool = Field(False, description="torch.compile the student")

    @model_validator(mode="after")
    def _init(self) -> StudentSection:
        shape = [k for k in ("layers", "hidden_size", "heads", "intermediate_size") if getattr(self, k) is not None]
        if self.init == "checkpoint":
            if not self.checkpoint:
                raise ValueError("student.init 'checkpoint' needs student.checkpoint")
            if shape:
                raise ValueError(f"student.{shape[0]}: a student from student.checkpoint has that checkpoint's shape")
        elif self.checkpoint:
            raise ValueError(f"student.checkpoint is read only with student.init 'checkpoint' (init is '{self.init}')")
        return self


class DistillSection(Section):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the teacher's soft targets (1 - alpha: the task's labels)")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of both models' logits in the soft term")
    hidden: float = Field(0.0, ge=0, description="weight of the mean squared error between the student's and the "
                          "teacher's last hidden states, added to the loss (another width: through a learned "
                          "projection, not exported)")


class DistillConfig(Section):
    name: str = Field("distill", description="run name: <RAYLM_STORAGE>/distill/<name>/; same name resumes")
    task: Literal["classification", "tagging", "completion", "lm", "mlm"] = Field(
        description="what the student learns: a fine-tuning task on `data`, or on `corpus` lm (next-token "
        "prediction, a GPT/Llama teacher) or mlm (masked LM, a BERT/RoBERTa/ALBERT teacher)")
    teacher: str = Field(description="a checkpoint for the task: a directory or URI, a fine-tuning run, sweep or "
                         "(lm, mlm) pretraining run (its best checkpoint) or a registry name")
    corpus: str | None = Field(None, description="lm, mlm: the prepared corpus (name or path), tokenized with the "
                               "teacher's tokenizer")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig,
                                       description="mlm: masking and the sentence-pair task, as pretraining's")
    student: StudentSection = Field(default_factory=StudentSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    compare_baseline: bool = Field(False, description="also train the same student without the teacher, for comparison")
    data: tasks.TaskData = Field(default_factory=tasks.TaskData)
    train: finetune.FinetuneTrain = Field(default_factory=finetune.FinetuneTrain)
    optim: finetune.FinetuneOptim = Field(default_factory=finetune.FinetuneOptim)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: unlimited)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _combinations(self) -> DistillConfig:
        if (self.task in CORPUS_TASKS) != (self.corpus is not None):
            raise ValueError("tasks 'lm' and 'mlm' distil on a prepared corpus: give corpus with them, and data "
                             "(not corpus) with the fine-tuning tasks")
        if self.task == "completion" and self.scaling.strategy == "fsdp" and self.scaling.num_workers > 1:
            # as fine-tuning (FinetuneConfig): evaluation generates per rank, which sharded forwards cannot follow
            raise ValueError("task 'completion' runs with scaling.strategy 'ddp' (generation with a model "
                             "sharded across workers is not supported)")
        return self

    @property
    def model(self) -> StudentSection:
        """What the training loop reads as `cfg.model` (compile): the student."""
        return self.student

    def as_finetune(self, teacher: str) -> finetune.FinetuneConfig:
        """Fine-tuning's view of this run, for its data preparation and checks: the teacher is the
        checkpoint whose tokenizer and task the data is prepared for."""
        return finetune.FinetuneConfig.model_validate({
            "name": self.name, "task": self.task, "model": {"checkpoint": teacher}, "data": self.data.to_dict(),
            "train": self.train.to_dict(), "optim": self.optim.to_dict(), "scaling": self.scaling.to_dict(),
            "eval": self.eval.to_dict(), "max_failures": self.max_failures})


def resolve_teacher(name: str, root: str | None = None) -> str:
    """The checkpoint `teacher` names: a finished fine-tuning run, sweep or distillation by name (its
    best checkpoint), else whatever `model.checkpoint` accepts (a folder, a run folder, a registry name)."""
    if not storage.exists(name) and not storage.is_uri(name) and "/" not in name:
        try:
            run = named_run(name, root)
        except RunLookupError as exc:
            raise JobError(f"teacher: {exc}") from None
        if run is not None:
            picked = run_checkpoint(run)
            if not picked:
                raise JobError(f"teacher: run '{run}' finished without a checkpoint")
            return picked
    try:
        return resolve_checkpoint(name, root)
    except JobError as exc:
        raise JobError(str(exc).replace("model.checkpoint", "teacher")) from None


def check_teacher(task: str, config: dict[str, Any], where: str) -> None:
    archs = config.get("architectures") or []
    if not any(a.endswith(TEACHER_HEADS[task]) for a in archs):
        made = "pretrained (pretrain one with jobs.pretrain" if task in CORPUS_TASKS else \
            "fine-tuned for it (fine-tune one with jobs.finetune"
        raise JobError(f"teacher '{where}' is {archs or config.get('model_type')}: distilling '{task}' needs a teacher "
                       f"{made}: a *{' or *'.join(TEACHER_HEADS[task])})")


def _layers(config: Any) -> int:
    return int(config.num_hidden_layers)


def student_config(student: StudentSection, teacher_config: Any) -> Any:
    """The student's transformers config: the teacher's with the student's shape. Checks what
    `teacher_layers` needs (the teacher's width, no more blocks than the teacher has)."""
    values = teacher_config.to_dict()
    teacher_layers = _layers(teacher_config)
    layers = student.layers or -(-teacher_layers // 2)
    shape = {"layers": layers, "hidden_size": student.hidden_size, "heads": student.heads,
             "intermediate_size": student.intermediate_size}
    if student.init == "teacher_layers":
        if layers > teacher_layers:
            raise JobError(f"student.layers {layers}: student.init 'teacher_layers' copies teacher blocks, and the "
                           f"teacher has {teacher_layers}; a student larger than its teacher needs student.init 'fresh'")
        for key in ("hidden_size", "heads", "intermediate_size"):
            have = _config_value(teacher_config, key)
            if shape[key] is not None and shape[key] != have:
                raise JobError(f"student.{key} {shape[key]}: student.init 'teacher_layers' copies the teacher's blocks, "
                               f"so it keeps the teacher's {key} ({have}); use student.init 'fresh' for another shape")
    overrides: dict[str, Any] = {}
    for key, value in shape.items():
        if value is None:
            continue
        attr = "n_inner" if key == "intermediate_size" and "n_inner" in values else SHAPE_KEYS[key]
        overrides[teacher_config.attribute_map.get(attr, attr)] = value
    if student.hidden_size is not None or student.heads is not None:
        values.pop("head_dim", None)  # Llama derives it from the width and heads
        heads = student.heads or _config_value(teacher_config, "heads")
        width = student.hidden_size or _config_value(teacher_config, "hidden_size")
        if width % heads:
            raise JobError(f"student: hidden_size {width} is not a multiple of heads {heads}")
        kv = values.get("num_key_value_heads")
        if kv is not None:
            overrides["num_key_value_heads"] = heads if kv == _config_value(teacher_config, "heads") or heads % kv else kv
    values.update(overrides)
    return type(teacher_config)(**values)


def _config_value(config: Any, key: str) -> Any:
    if key == "intermediate_size" and hasattr(config, "n_inner"):
        return config.n_inner or 4 * config.hidden_size
    return getattr(config, SHAPE_KEYS[key])


def picked_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher block i * k for student block i, k = teacher blocks // student blocks (DistilBERT: 0, 2, 4, ...)."""
    k = max(1, teacher_layers // student_layers)
    return [i * k for i in range(student_layers)]


def copy_teacher_layers(student: Any, teacher_state: dict[str, Any], picks: list[int]) -> None:
    """Every student tensor from the teacher's: block i from block picks[i], everything else (embeddings,
    final norm, the task head) as it is."""
    new = {}
    for key, value in student.state_dict().items():
        m = LAYER_KEY.match(key)
        src = f"{m[1]}.{picks[int(m[2])]}.{m[3]}" if m else key
        if src not in teacher_state or tuple(teacher_state[src].shape) != tuple(value.shape):
            raise JobError(f"student.init 'teacher_layers': the student's {key} has no teacher tensor of its shape "
                           f"({src}); use student.init 'fresh'")
        new[key] = teacher_state[src]
    student.load_state_dict(new)


def model_class(task: str) -> str:
    """The transformers Auto class of a task's teacher and student ("lm": a causal LM on a corpus,
    "mlm": an encoder with its pretraining heads, BertForPreTraining, RobertaForMaskedLM, ...)."""
    return {"lm": "AutoModelForCausalLM", "mlm": "AutoModelForPreTraining"}.get(task) or TASKS[task][0]


def load_model(task: str, path: str) -> Any:
    """A task model from a checkpoint folder: safetensors only, no remote code."""
    import transformers

    return getattr(transformers, model_class(task)).from_pretrained(local_copy(path), use_safetensors=True,
                                                                   trust_remote_code=False)


def plan_student(cfg: DistillConfig, teacher: str, teacher_cfg: dict[str, Any]) -> dict[str, Any]:
    """The student's shape, checked against the teacher before Ray starts, and both models' sizes
    (counted on the meta device: nothing is allocated)."""
    import torch
    import transformers
    from transformers import AutoConfig

    model_cls = getattr(transformers, model_class(cfg.task))
    tconfig = AutoConfig.from_pretrained(local_copy(teacher))
    if cfg.student.init == "checkpoint":
        path = resolve_checkpoint(cfg.student.checkpoint or "")
        sconf = base_config(local_copy(path), key="student.checkpoint")
        if sconf.get("model_type") != teacher_cfg.get("model_type"):
            raise JobError(f"student.checkpoint '{path}' is a {sconf.get('model_type')} model and the teacher a "
                           f"{teacher_cfg.get('model_type')}: distillation needs one family (the logits must line up)")
        _check_same_vocabulary(path, teacher)
        config = AutoConfig.from_pretrained(local_copy(path))
        layers, picks = _layers(config), None
    else:
        path, config = None, student_config(cfg.student, tconfig)
        layers = _layers(config)
        picks = picked_layers(_layers(tconfig), layers) if cfg.student.init == "teacher_layers" else None
    projection = bool(cfg.distill.hidden) and config.hidden_size != tconfig.hidden_size
    if projection and cfg.scaling.strategy == "fsdp":
        raise JobError(f"distill.hidden: the student's width ({config.hidden_size}) is not the teacher's "
                       f"({tconfig.hidden_size}), and the learned projection between them runs with scaling.strategy "
                       "'ddp' only: use ddp, keep the teacher's hidden_size or set distill.hidden 0")
    with torch.device("meta"):
        student_params = sum(p.numel() for p in model_cls.from_config(config).parameters())
        teacher_params = sum(p.numel() for p in model_cls.from_config(tconfig).parameters())
    return {"init": cfg.student.init, "checkpoint": path, "layers": layers, "teacher_layers": _layers(tconfig),
            "picks": picks, "params": student_params, "teacher_params": teacher_params,
            "projection": [config.hidden_size, tconfig.hidden_size] if projection else None}


def _check_same_vocabulary(student: str, teacher: str) -> None:
    from transformers import AutoTokenizer

    vocab = [AutoTokenizer.from_pretrained(local_copy(p)).get_vocab() for p in (student, teacher)]
    if vocab[0] != vocab[1]:
        raise JobError(f"student.checkpoint '{student}' and the teacher '{teacher}' have different tokenizers "
                       f"({len(vocab[0])} and {len(vocab[1])} tokens): the student must read the teacher's tokens")


def check_labels(teacher_cfg: dict[str, Any], labels: list[str] | None, where: str) -> None:
    """The teacher's classes, in its head's order, are the data's: else its logits mean other things."""
    if not labels:
        return
    id2label = teacher_cfg.get("id2label") or {}
    theirs = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if theirs != list(labels):
        raise JobError(f"teacher '{where}' was trained for labels {theirs}, the data has {list(labels)}: "
                       "distil on the task data the teacher was fine-tuned on")


def build_student(cfg: DistillConfig, meta: dict[str, Any], teacher: Any | None) -> Any:
    """This worker's student, seeded: every rank starts from the same weights. Taught by a teacher of
    another width with `distill.hidden`, it carries the learned projection to the teacher's width."""
    from cluster.objectives.distill import attach_projection

    model = _student_model(cfg, meta, teacher)
    if teacher is not None and cfg.distill.hidden and model.config.hidden_size != teacher.config.hidden_size:
        attach_projection(model, teacher.config.hidden_size, cfg.train.seed)
    return model


def _student_model(cfg: DistillConfig, meta: dict[str, Any], teacher: Any | None) -> Any:
    import torch
    import transformers

    torch.manual_seed(cfg.train.seed)
    student = meta["student"]
    if student["init"] == "checkpoint" and cfg.task in CORPUS_TASKS:
        return load_model(cfg.task, student["checkpoint"])
    if student["init"] == "checkpoint":
        return finetune.build_task_model(cfg.as_finetune(student["checkpoint"]), meta, local_copy(student["checkpoint"]))
    from transformers import AutoConfig

    config = student_config(cfg.student, AutoConfig.from_pretrained(local_copy(meta["teacher"])))
    model = getattr(transformers, model_class(cfg.task)).from_config(config)
    if student["init"] == "teacher_layers":
        source = teacher if teacher is not None else load_model(cfg.task, meta["teacher"])
        copy_teacher_layers(model, {k: v.detach().cpu() for k, v in source.state_dict().items()}, student["picks"])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = meta["pad_id"]
    return model


def run_worker(cfg: DistillConfig, plan: Plan, meta: dict[str, Any], session: Any, alone: bool) -> None:
    """One Ray Train worker: the student trains, the teacher (unless `alone`) answers beside it."""
    from cluster import objectives
    from cluster.data import task_prep
    from cluster.objectives.distill import Distill
    from cluster.train.loop import Loop
    from cluster.train.placement import autocast_dtype

    launcher.start_worker(cfg.scaling, cfg.train.seed, plan.run_dir, session.rank)
    tokenizer = task_prep.tokenizer_from_files(meta["tokenizer_files"])
    teacher = None
    if not alone:
        teacher = load_model(cfg.task, meta["teacher"]).eval().requires_grad_(False).to(session.device)
    model = build_student(cfg, meta, teacher)
    ft = cfg.as_finetune(meta["teacher"])
    objective = Distill(objectives.build(finetune.objective_spec(ft, meta), tokenizer), teacher,
                        cfg.distill.alpha, cfg.distill.temperature, cfg.distill.hidden,
                        teacher_autocast=autocast_dtype(cfg.train.precision, session.device))
    loop = Loop(cfg, plan, objective, model, tokenizer, session)
    loop.resume()
    if teacher is not None:
        score_teacher(loop, teacher, plan, meta, session.rank)
    loop.run()


def worker_main(config: dict) -> None:
    from cluster.train.session import TrainSession

    if config["meta"].get("corpus"):
        from cluster.stages.distill_corpus import corpus_worker

        return corpus_worker(DistillConfig.model_validate(config["cfg"]), Plan(**config["plan"]), config["meta"],
                             alone=config["alone"])
    run_worker(DistillConfig.model_validate(config["cfg"]), Plan(**config["plan"]), config["meta"], TrainSession(),
               alone=config["alone"])


def check_same_teacher(run: RunDir, teacher: str) -> None:
    """A re-submitted run resumes its student: refused when `teacher` now names another checkpoint."""
    earlier = storage.read_json(run.file(TEACHER_FILE)) if storage.exists(run.file(TEACHER_FILE)) else None
    if earlier and earlier.get("checkpoint") != teacher:
        raise JobError(f"run '{run.path}' distils from teacher {earlier.get('checkpoint')}, and teacher now names "
                       f"{teacher}: choose another name for a student of this teacher")


def score_teacher(loop: Any, teacher: Any, plan: Plan, meta: dict[str, Any], rank: int) -> None:
    """The teacher on the student's validation rows, through the same evaluation, before the first
    step (every rank takes part); rank 0 writes it to the run folder."""
    if loop.state.step != 0:
        return
    scores = loop.evaluate(teacher)
    if rank == 0:
        storage.write_json_atomic(storage.join(plan.run_dir, TEACHER_FILE),
                                  {"checkpoint": meta["teacher"], "metrics": {f"val_{k}": v for k, v in scores.items()}})


def distill(cfg: DistillConfig, root: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    run = RunDir("distill", cfg.name, root)
    teacher = resolve_teacher(cfg.teacher, root)
    teacher_cfg = base_config(local_copy(teacher) if storage.is_uri(teacher) else teacher, key="teacher",
                              runs="a fine-tuning run")
    check_teacher(cfg.task, teacher_cfg, teacher)
    student = plan_student(cfg, teacher, teacher_cfg)
    log.info("student: %d of the teacher's %d blocks (%s), %.2fM of %.2fM parameters", student["layers"],
             student["teacher_layers"], student["init"], student["params"] / 1e6, student["teacher_params"] / 1e6)
    if cfg.task in CORPUS_TASKS:
        from cluster.stages.distill_corpus import distill_on_corpus

        return distill_on_corpus(cfg, run, teacher, student, t0, root)
    ft = cfg.as_finetune(teacher)
    ts = finetune.setup(ft, root, run, fits=lambda: launcher.check_resources(cfg.scaling, launcher.MATERIALIZED_DATA_CPUS))
    check_labels(teacher_cfg, ts.meta["labels"], teacher)
    check_same_teacher(run, teacher)
    run.begin(cfg)
    plan = finetune.plan_run(ft, ts.meta, run.path, cfg.scaling.num_workers)
    log.info("plan: %d steps (%d per epoch, %d epochs)", plan.max_steps, plan.steps_per_epoch, plan.epochs)
    meta = {**ts.meta, "teacher": teacher, "student": student}

    def fit(plan: Plan, name: str, storage_path: str, alone: bool) -> Any:
        return launcher.fit(
            worker_main, {"cfg": cfg.to_dict(), "plan": asdict(plan), "meta": meta, "alone": alone}, cfg.scaling,
            name=name, storage_path=storage_path,
            datasets=epoch_datasets(ts.train, ts.validation, plan.epochs, cfg.train.seed),
            keep=cfg.train.keep_checkpoints, max_failures=cfg.max_failures,
            what="the student trained alone" if alone else "distillation")

    result = fit(plan, cfg.name, run.job_dir, alone=False)
    summary = finetune.summarize(ft, run, plan, ts, result, t0)
    alone = None
    if cfg.compare_baseline:
        alone_plan = replace(plan, run_dir=run.file("alone"))
        alone_result = fit(alone_plan, "alone", run.path, alone=True)
        alone = {"final": {k: v for k, v in (alone_result.metrics or {}).items() if k.startswith("val_")},
                 "best": _best_metrics(alone_result), "metrics": storage.join(alone_plan.run_dir, "metrics.jsonl")}
    teacher_scores = storage.read_json(run.file(TEACHER_FILE)) if storage.exists(run.file(TEACHER_FILE)) else None
    summary.pop("base_checkpoint")
    summary.pop("strategy")
    return {**summary,
            "teacher": {"checkpoint": teacher, "params": student["teacher_params"], "layers": student["teacher_layers"],
                        "metrics": (teacher_scores or {}).get("metrics")},
            "student": {"init": student["init"], "checkpoint": student["checkpoint"], "layers": student["layers"],
                        "params": student["params"], "picked_teacher_layers": student["picks"],
                        "hidden_projection": student.get("projection")},
            "distill": cfg.distill.to_dict(),
            "alone": alone,
            "seconds": round(time.time() - t0, 2)}


def _best_metrics(result: Any) -> dict[str, Any] | None:
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf), default=None)
    return {k: v for k, v in best[1].items() if k.startswith("val_")} if best else None
