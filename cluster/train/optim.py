"""AdamW's parameter groups (decoupled weight decay on matrices only), the warmup-then-decay
learning-rate schedule, and the config's hyperparameters applied over a restored optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decoupled weight decay on matrices only: no decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embeddings or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, opt: Any, max_steps: int, device: torch.device) -> tuple[Any, Any]:
    """AdamW over `model`'s trainable parameters as they are now (placed or sharded: build it after
    placement) and its LambdaLR schedule. `opt`: the config's optim section."""
    from cluster.train.placement import is_fsdp

    # fused kernels for plain CUDA tensors; sharded (DTensor) parameters take the foreach default
    fused = device.type == "cuda" and not is_fsdp(model)
    optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                  eps=opt.eps, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(opt.schedule, opt.warmup_steps, max_steps, opt.min_lr_ratio))
    return optimizer, scheduler


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Linear warmup to the peak, then cosine or linear decay to min_ratio * peak."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return f


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, opt: Any) -> None:
    """After a restore, the config's optimizer hyperparameters win over the checkpoint's: a resumed
    run, or a PBT trial that exploited another trial's checkpoint with mutated values, trains with
    what its config says. Schedule position (step) stays the checkpoint's."""
    scheduler.base_lrs = [opt.lr for _ in optimizer.param_groups]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = opt.lr
        group["lr"] = opt.lr * factor
        group["betas"], group["eps"] = (opt.beta1, opt.beta2), opt.eps
        # param_groups() puts decayed matrices first and everything else (no decay) second
        group["weight_decay"] = opt.weight_decay if i == 0 else 0.0
