"""Fine-tuning strategies: full (everything trains), frozen (the head, plus the top k blocks) and
LoRA (peft adapters, merged into plain weights in every checkpoint); checked on the driver against a
weightless copy of the model before any worker starts.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from cluster.checkpoints import TASKS
from cluster.config import Section, StrList
from cluster.errors import JobError
from cluster.train.placement import transformer_blocks

if TYPE_CHECKING:  # the stage imports this module
    from cluster.stages.finetune import FinetuneConfig


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
        if s.unfreeze_top_k and not transformer_blocks(model):
            raise JobError(f"strategy.unfreeze_top_k: {config.get('model_type')} has no per-layer blocks to unfreeze "
                           "(ALBERT shares one layer across its depth)")
        n_layers = len(transformer_blocks(model) or [])
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


def module_names(keys: Any) -> list[str]:
    """State-dict keys -> the outermost modules holding them: `classifier.weight`, `classifier.bias`,
    `predictions.bias` and `predictions.dense.bias` give `classifier`, `predictions`."""
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    return [m for m in modules if not any(m.startswith(o + ".") for o in modules)]


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
        blocks = transformer_blocks(backbone)
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
