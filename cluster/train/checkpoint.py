"""Checkpoints: a Hugging Face directory (safetensors, config, tokenizer) loadable with transformers
alone, plus `train_state/` beside it (optimizer, scheduler, RNG, step and data position) from which
a run resumes exactly; and finding a run's latest checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cluster import storage
from cluster.train.placement import is_fsdp, is_peft, unwrap

if TYPE_CHECKING:  # annotations only: the job driver imports this module and needs no transformers
    from transformers import PreTrainedTokenizerFast
import ray
import ray.data
import ray.train

STATE_DIR = "train_state"


ADAPTER_FILE = "adapter.safetensors"


NONFINITE_FILE = "nonfinite_loss.json"


@dataclass
class TrainState:
    """Saved with each checkpoint (as JSON) next to the optimizer/scheduler/RNG tensors."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in `epoch`
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    tokenizer_hash: str = ""
    history: list[dict] = field(default_factory=list)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded weights (on rank 0 for FSDP); None on other FSDP ranks."""
    if not is_fsdp(model):
        return None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
        return model.state_dict()


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.full_optim_state_dict(model, optimizer, rank0_only=True)
    return optimizer.state_dict()


def save_checkpoint(
    dirpath: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, optimizer, scheduler,
    state: TrainState, config: dict,
) -> None:
    """A Hugging Face directory (safetensors + config + tokenizer) plus train_state/ beside it.

    Only weights go through safetensors; optimizer/scheduler/RNG tensors are a torch file loaded
    with weights_only=True (no arbitrary pickle). state.json is written last: a checkpoint without
    it is incomplete and never resumed from.

    A LoRA (peft) model is saved merged into plain weights, so the directory loads with
    transformers alone; its adapter (the trainable part) goes to train_state/ for resuming."""
    weights = full_state_dict(model)
    inner = unwrap(model)
    sd = os.path.join(dirpath, STATE_DIR)
    os.makedirs(sd, exist_ok=True)
    if is_peft(inner):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(inner).items()}
        save_file(adapter, os.path.join(sd, ADAPTER_FILE))
        merged_export(inner).save_pretrained(dirpath, safe_serialization=True)
    else:
        inner.save_pretrained(dirpath, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(dirpath)
    torch.save(
        {
            "optimizer": optimizer_state(model, optimizer),
            "scheduler": scheduler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        },
        os.path.join(sd, "optim.pt"),
    )
    with open(os.path.join(sd, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(sd, "state.json"), "w") as f:
        json.dump(asdict(state), f, indent=2)


def merged_export(peft_model: Any) -> Any:
    """A plain transformers model with the LoRA update merged into its weights. Merging works on a
    CPU copy, so the training model keeps its adapter and the device holds no second model."""
    import copy

    return copy.deepcopy(peft_model).to("cpu").merge_and_unload()


def load_train_state(dirpath: str) -> TrainState:
    path = os.path.join(dirpath, STATE_DIR, "state.json")
    with open(path) as f:
        data = json.load(f)
    return TrainState(**data)


def restore(ckpt_dir: str, model: torch.nn.Module, optimizer, scheduler, device: torch.device) -> TrainState:
    """Load weights (safetensors), optimizer, scheduler and RNG from a checkpoint directory."""
    from safetensors.torch import load_file

    inner = unwrap(model)
    if is_peft(inner):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(inner, load_file(os.path.join(ckpt_dir, STATE_DIR, ADAPTER_FILE)))
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise RuntimeError(f"checkpoint {ckpt_dir}: adapter weights {unexpected} do not match the LoRA model")
    else:
        weights = load_file(os.path.join(ckpt_dir, "model.safetensors"), device="cpu")
        missing, unexpected = inner.load_state_dict(weights, strict=False)
        # Tied output embeddings are not stored twice; anything else missing is a real mismatch.
        missing = [k for k in missing if k not in getattr(inner, "_tied_weights_keys", {}) and "lm_head" not in k]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {ckpt_dir} does not match the model: missing {missing}, unexpected {unexpected}"
            )
    extra = torch.load(os.path.join(ckpt_dir, STATE_DIR, "optim.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng_torch"])
    return load_train_state(ckpt_dir)


def latest_checkpoint_state(run_dir: str) -> dict | None:
    for name in reversed(storage.listdir(run_dir)):
        state = storage.join(run_dir, name, STATE_DIR, "state.json")
        if name.startswith("checkpoint_") and storage.exists(state):
            return storage.read_json(state)
    return None


def checkpoint_location(checkpoint: ray.train.Checkpoint | None) -> str | None:
    """A Ray checkpoint as one path or URI (its `.path` alone drops the s3:// of a URI storage)."""
    return storage.location(checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None
