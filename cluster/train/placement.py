"""Where the model runs and in what precision: FSDP2 sharding (`shard`), autocast dtype, unwrapping
DDP/compile wrappers, seeding, and the cross-rank sums and gathers the loop's metrics need.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default, fp32 on CPU (CPU bf16 is slower there and less exact)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def inference_placement(use_gpu: bool = True) -> tuple[torch.device, torch.dtype]:
    """Where a model for inference goes, and in what dtype: this process's GPU in bf16 (fp16 where
    the GPU has no bf16), else the CPU in fp32. Ray makes a GPU visible only to the actors and
    replicas that reserved one, so a replica with `num_gpus: 0` sees none."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def all_gather_objects(items: list) -> list:
    """Every rank's list, concatenated in rank order (the same result on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def unwrap(model: torch.nn.Module) -> Any:
    """The model itself under torch.compile's and DDP's wrappers. FSDP2 wraps nothing: a sharded
    model is still the transformers model (its class gains FSDPModule)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def transformer_blocks(model: Any) -> Any | None:
    """The ModuleList of transformer blocks (as many as num_hidden_layers), or None (ALBERT shares
    one layer across its depth)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    return None


def shard(model: torch.nn.Module, device: torch.device, param_dtype: torch.dtype | None) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) over the default process group: each transformer block is its own
    unit, then the root holds the rest (embeddings, final norm, head; tied weights stay together
    there), as torchtitan does. Parameters become DTensors in place, so nothing may hold them from
    before (an optimizer is built after this). With `param_dtype` (bf16 on GPU) blocks compute in
    it and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in transformer_blocks(model) or []:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")
