"""jobs.distill's student: its shape (the teacher's config with fewer blocks, optionally another
width), planned and checked against the teacher on the driver before Ray starts, and built on each
worker (fresh, from every k-th teacher block as DistilBERT did, or from a smaller checkpoint of the
teacher's family and tokenizer), with the learned projection to the teacher's width where the
hidden-state term needs one."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from cluster.checkpoints import TASKS, base_config, local_copy, resolve_checkpoint
from cluster.config import Section
from cluster.errors import JobError
from cluster.stages import finetune

if TYPE_CHECKING:
    from cluster.stages.distill import DistillConfig

# the tasks learnt from a prepared corpus (the rest from fine-tuning's task data)
CORPUS_TASKS = ("lm", "mlm")

# student.<key> -> the transformers config attribute it sets (GPT-2 maps these names to n_layer,
# n_embd and n_head itself; its feed-forward width is n_inner)
SHAPE_KEYS = {"layers": "num_hidden_layers", "hidden_size": "hidden_size", "heads": "num_attention_heads",
              "intermediate_size": "intermediate_size"}

# a transformer block's parameters: GPT-2 `transformer.h.N.`, BERT `encoder.layer.N.`, Llama `model.layers.N.`
LAYER_KEY = re.compile(r"^(.*?\.(?:h|layer|layers))\.(\d+)\.(.+)$")


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
