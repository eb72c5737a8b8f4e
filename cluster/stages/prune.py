"""jobs.prune's stage: remove a model's least important attention heads (Michel et al. 2019, "Are
Sixteen Heads Really Better than One?") and save a smaller Hugging Face checkpoint.

Importance: a gate of 1 on every head's output (the input of the attention's output projection,
split into heads), and |dL/d gate| summed over validation batches of the task's own loss, each
layer's scores normalised to unit L2 norm as the paper does. The same number of heads is removed
from every layer, so the checkpoint stays one config (`num_attention_heads`, `head_dim`) that
transformers loads alone.

Families: those whose attention states its head width apart from the model width (`head_dim`) and
has separate q/k/v/o projections: Llama, Mistral, Qwen2 (without grouped-query attention). GPT-2
and BERT derive the head width as hidden_size / num_attention_heads, so no config of theirs
describes fewer heads of the same width, and transformers 5 removed `prune_heads`: refused with
a message.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from typing import Any

from pydantic import Field, field_validator

from cluster import registry, runtime, storage
from cluster.checkpoints import base_config, local_copy
from cluster.config import Section
from cluster.data import tasks
from cluster.errors import JobError
from cluster.runs import RunDir, check_name
from cluster.stages import evaluate as ev

log = logging.getLogger(__name__)

PRUNABLE = ("llama", "mistral", "qwen2")


class PruneConfig(Section):
    name: str = Field("prune", description="run name: <RAYLM_STORAGE>/prune/<name>/ (the checkpoint in checkpoint/)")
    model: str = Field(description="a fine-tuned checkpoint, run or registry name (as jobs.evaluate's model)")
    heads: float = Field(0.25, gt=0, lt=1, description="share of each layer's attention heads to remove")
    data: ev.EvalData = Field(default_factory=ev.EvalData, description="labelled rows the importance is measured "
                              "on and both models are scored on, as jobs.evaluate's data")
    split: str = Field("validation", description="which split of the data")
    batch_size: int = Field(16, ge=1, description="rows per batch")
    importance_batches: int = Field(16, ge=1, description="batches the head importance is summed over")
    evaluate: bool = Field(True, description="score the model before and after pruning (jobs.evaluate)")
    seed: int = Field(0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)


def check_prunable(config: dict[str, Any], where: str) -> None:
    family = config.get("model_type")
    if family not in PRUNABLE:
        raise JobError(f"model '{where}' is a {family} model: raylm prunes the attention heads of {', '.join(PRUNABLE)} "
                       "models, whose config states the head width apart from the model width; a "
                       f"{family} config cannot describe fewer heads of the same width (and transformers 5 has no "
                       "prune_heads)")
    if config.get("num_key_value_heads", config["num_attention_heads"]) != config["num_attention_heads"]:
        raise JobError(f"model '{where}' uses grouped-query attention ({config['num_key_value_heads']} key/value heads "
                       f"for {config['num_attention_heads']}): removing query heads would unbalance the groups")


def _attention(model: Any) -> list[Any]:
    base = getattr(model, model.base_model_prefix)
    return [layer.self_attn for layer in base.layers]


def head_importance(model: Any, objective: Any, batches: list[dict[str, Any]]) -> Any:
    """(layers, heads) importance: |dL/d gate| summed over `batches` (collated inputs), each layer
    normalised to unit L2 norm. The model's parameters get no gradients kept."""
    import torch

    attention = _attention(model)
    heads = model.config.num_attention_heads
    gates = torch.ones(len(attention), heads, requires_grad=True)

    def gate(index: int):
        def hook(module: Any, args: tuple) -> tuple:
            x = args[0]  # (B, T, heads * head_dim): the heads' outputs, side by side
            shaped = x.view(*x.shape[:-1], heads, -1) * gates[index].view(heads, 1).to(x.dtype)
            return (shaped.view(x.shape), *args[1:])
        return hook

    handles = [a.o_proj.register_forward_pre_hook(gate(i)) for i, a in enumerate(attention)]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        total = torch.zeros_like(gates)
        for inputs in batches:
            loss, _ = objective.forward(model, inputs)
            (grad,) = torch.autograd.grad(loss, gates)
            total += grad.abs()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total / total.norm(dim=1, keepdim=True).clamp(min=1e-12)


def removed_per_layer(config: dict[str, Any], fraction: float, where: str) -> int:
    """round(fraction x heads), at least one removed and one kept. LlamaConfig (transformers 5)
    requires hidden_size to be a multiple of the head count, even with head_dim stated: a count that
    is not is refused, naming the fractions that work."""
    heads, width = config["num_attention_heads"], config["hidden_size"]
    drop = min(heads - 1, max(1, round(fraction * heads)))
    if config.get("model_type") == "llama" and width % (heads - drop):
        fits = [f"{k / heads:g}" for k in range(1, heads) if width % (heads - k) == 0]
        raise JobError(f"heads {fraction:g}: {heads - drop} of {heads} heads per layer would not divide hidden_size "
                       f"{width}, which LlamaConfig requires of model '{where}'; --heads {' or '.join(fits) or '(none)'} fits")
    return drop


def heads_to_keep(importance: Any, drop: int) -> list[list[int]]:
    """Per layer, the heads that stay: all but the `drop` least important."""
    layers, heads = importance.shape
    keep = []
    for row in importance.tolist():
        ranked = sorted(range(heads), key=lambda h: row[h], reverse=True)
        keep.append(sorted(ranked[: heads - drop]))
    return keep


def pruned(model: Any, keep: list[list[int]]) -> Any:
    """A new model of `model`'s class with only the `keep` heads in each layer, their weights as they were."""
    import copy

    import torch

    config = copy.deepcopy(model.config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n = len(keep[0])
    config.head_dim, config.num_attention_heads, config.num_key_value_heads = head_dim, n, n
    state = model.state_dict()
    rows = {}
    for attn, heads in zip(_attention(model), keep, strict=True):
        index = torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)])
        prefix = next(k for k, v in model.named_modules() if v is attn)
        for proj in ("q_proj", "k_proj", "v_proj"):
            rows[f"{prefix}.{proj}.weight"] = state[f"{prefix}.{proj}.weight"][index]
            if f"{prefix}.{proj}.bias" in state:
                rows[f"{prefix}.{proj}.bias"] = state[f"{prefix}.{proj}.bias"][index]
        rows[f"{prefix}.o_proj.weight"] = state[f"{prefix}.o_proj.weight"][:, index]
    small = type(model)(config)
    small.load_state_dict({**state, **rows}, strict=True)
    return small.eval()


def prune(cfg: PruneConfig, root: str | None = None) -> dict[str, Any]:
    import torch
    import transformers

    from cluster import objectives

    t0 = time.time()
    checkpoint = ev.resolve_model(cfg.model, root)
    path = local_copy(checkpoint) if storage.is_uri(checkpoint) else checkpoint
    config = base_config(path, key="model", runs="a fine-tune, sweep or distill run")
    arch = ev.architecture(config, checkpoint)
    task = ev.task_of(arch, checkpoint)
    check_prunable(config, checkpoint)
    drop = removed_per_layer(config, cfg.heads, checkpoint)
    data = cfg.data.resolved(task)
    tasks.check_file_columns(data, task)
    run = RunDir("prune", cfg.name, root)
    run.check_writable()
    runtime.connect()
    scoring = ev.EvaluateConfig(name=f"{cfg.name}-before", model=checkpoint, data=data.to_dict(), split=cfg.split,
                                batch_size=cfg.batch_size, seed=cfg.seed)
    run.begin(cfg)
    ds, spec, tokenizer, _ = ev.data_input(scoring, data, task, checkpoint, path, config)
    objective = objectives.build({**spec, "sample_cap": 0, "max_new_tokens": 1}, tokenizer)
    model = getattr(transformers, arch).from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    batches = []
    for i, batch in enumerate(ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy")):
        if i >= cfg.importance_batches:
            break
        batches.append(objective.collate(batch, (cfg.seed, -1, i, 0)))
    torch.manual_seed(cfg.seed)
    importance = head_importance(model, objective, batches)
    keep = heads_to_keep(importance, drop)
    small = pruned(model, keep)
    out = run.file("checkpoint")
    local = tempfile.mkdtemp(prefix="raylm-pruned-")
    small.save_pretrained(local, safe_serialization=True)
    tokenizer.save_pretrained(local)
    registry.copy_tree(local, out)  # to the run folder, local or in an object store
    shutil.rmtree(local, ignore_errors=True)
    params = {"before": sum(p.numel() for p in model.parameters()), "after": sum(p.numel() for p in small.parameters())}
    log.info("pruned %d of %d heads per layer: %.2fM -> %.2fM parameters", config["num_attention_heads"] - len(keep[0]),
             config["num_attention_heads"], params["before"] / 1e6, params["after"] / 1e6)
    before = after = None
    if cfg.evaluate:
        before = ev.evaluate(scoring, root)["metrics"]
        after = ev.evaluate(scoring.model_copy(update={"name": f"{cfg.name}-after", "model": out}), root)["metrics"]
    final = {f"val_{k}": v for k, v in (after or {}).items() if isinstance(v, int | float)}
    return {"task": task, "model": cfg.model, "source_checkpoint": checkpoint,
            "heads": {"fraction": cfg.heads, "before": config["num_attention_heads"], "after": len(keep[0]),
                      "kept": keep, "importance": [[round(x, 4) for x in row] for row in importance.tolist()]},
            "params": params, "before": before, "after": after,
            "final": {"checkpoint": out, "metrics": final}, "best": None,
            "seconds": round(time.time() - t0, 2)}
