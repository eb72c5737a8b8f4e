"""jobs.distill's stage: a fine-tuned teacher + task data -> a smaller student of the same family,
trained through fine-tuning's data preparation and the one training loop, with the teacher's soft
targets added to the task loss (cluster.objectives.distill).

The driver resolves the teacher, plans the student's shape and checks both before Ray starts; the
data is fine-tuning's (cluster.stages.finetune.setup, on the teacher's tokenizer, which the student
shares). Each Ray Train worker builds the student (cluster.stages.distill_student: fresh, from
every k-th teacher block as DistilBERT did, or from a smaller checkpoint) and holds the frozen
teacher beside it on the same device, under the same autocast. With `compare_baseline` the same student, from the same
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
import time
from dataclasses import asdict, replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster import storage
from cluster.checkpoints import base_config, local_copy, resolve_checkpoint
from cluster.config import Section
from cluster.data import tasks
from cluster.data.ingest import epoch_datasets
from cluster.errors import JobError
from cluster.objectives.lm import ObjectiveConfig
from cluster.objectives.tasks import EvalOptions
from cluster.runs import RunDir, RunLookupError, check_name, named_run, run_checkpoint
from cluster.stages import finetune
from cluster.stages.distill_student import (
    CORPUS_TASKS,
    StudentSection,
    build_student,
    load_model,
    plan_student,
)
from cluster.train import launcher
from cluster.train.config import ScalingSection
from cluster.train.plan import Plan

log = logging.getLogger(__name__)

# the teacher's checkpoint and validation metrics, written by rank 0 before the student's first step
TEACHER_FILE = "teacher.json"

# what a teacher for each task is: the architecture suffixes its config.json names
TEACHER_HEADS = {"classification": ("ForSequenceClassification",), "tagging": ("ForTokenClassification",),
                 "completion": ("ForCausalLM", "LMHeadModel"), "lm": ("ForCausalLM", "LMHeadModel"),
                 "mlm": ("ForPreTraining", "ForMaskedLM")}



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


def check_labels(teacher_cfg: dict[str, Any], labels: list[str] | None, where: str) -> None:
    """The teacher's classes, in its head's order, are the data's: else its logits mean other things."""
    if not labels:
        return
    id2label = teacher_cfg.get("id2label") or {}
    theirs = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if theirs != list(labels):
        raise JobError(f"teacher '{where}' was trained for labels {theirs}, the data has {list(labels)}: "
                       "distil on the task data the teacher was fine-tuned on")


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


def teacher_and_student(cfg: DistillConfig, root: str | None = None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(the teacher's checkpoint, its config.json, the student planned against it), all checked
    before Ray starts (jobs.distill and a distillation sweep)."""
    teacher = resolve_teacher(cfg.teacher, root)
    teacher_cfg = base_config(local_copy(teacher) if storage.is_uri(teacher) else teacher, key="teacher",
                              runs="a fine-tuning run")
    check_teacher(cfg.task, teacher_cfg, teacher)
    return teacher, teacher_cfg, plan_student(cfg, teacher, teacher_cfg)


def distill(cfg: DistillConfig, root: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    run = RunDir("distill", cfg.name, root)
    teacher, teacher_cfg, student = teacher_and_student(cfg, root)
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
