"""Checkpoints: a Hugging Face directory (safetensors, config, tokenizer) loadable with transformers
alone, plus `train_state/` beside it (optimizer, scheduler, RNG, step and data position) from which
a run resumes exactly; and finding a run's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cluster import storage
from cluster.train.placement import is_fsdp, is_peft, unwrap

if TYPE_CHECKING:  # annotations only: the job driver imports this module and needs no transformers
    import ray.train
    from transformers import PreTrainedTokenizerFast

STATE_DIR = "train_state"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_DIR = "optimizer"  # torch.distributed.checkpoint's folder: one file per rank, resharded on load
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


# A model attribute: state-dict key prefixes of weights that train with the model and resume with it
# but are no part of the model a user loads (a distillation student's projection to its teacher's
# width). They go to train_state/TRAIN_ONLY_FILE, not to model.safetensors.
TRAIN_ONLY = "raylm_train_only"
TRAIN_ONLY_FILE = "train_only.safetensors"


def split_train_only(model: Any, weights: dict[str, torch.Tensor] | None) -> tuple[dict | None, dict]:
    """(the weights to export, the train-only ones) of `weights` (None: the model's own state dict,
    left None when nothing is train-only, so save_pretrained handles tied weights itself)."""
    prefixes = tuple(getattr(model, TRAIN_ONLY, ()))
    if not prefixes:
        return weights, {}
    if weights is None:
        tied = tied_keys(model) if getattr(model.config, "tie_word_embeddings", False) else set()
        weights = {k: v for k, v in model.state_dict().items() if k not in tied}
    export = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
    return export, {k: v.detach().cpu().contiguous() for k, v in weights.items() if k.startswith(prefixes)}


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole weights on rank 0's CPU ({} on other ranks; every rank must call it,
    it is a collective). None for a model that is not sharded: it saves its own."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = unwrap(model)
    weights = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied output embedding is the input embedding: transformers stores it once and ties it at load.
    tied = tied_keys(inner) if getattr(inner.config, "tie_word_embeddings", False) else set()
    return {k: v for k, v in weights.items() if k not in tied}


def tied_keys(model: Any) -> set[str]:
    """State-dict keys transformers ties to another (an LM head to the input embeddings)."""
    return set(getattr(model, "_tied_weights_keys", None) or ())


@contextlib.contextmanager
def single_process_ok() -> Iterator[None]:
    """torch.distributed.checkpoint warns at every save and load without a process group; a Tune
    function trial has none on purpose, and its checkpoint is the whole state."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)", category=UserWarning)
        yield


def save_optimizer(dirpath: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's state keyed by parameter name, written with torch.distributed.checkpoint:
    every rank writes its own shard (a collective), and a later run reads it back with any number
    of workers, sharded or not."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(unwrap(model), optimizer)}
    with single_process_ok():
        dcp.save(state, checkpoint_id=os.path.join(dirpath, STATE_DIR, OPTIMIZER_DIR))


def save_checkpoint(
    dirpath: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, optimizer, scheduler,
    state: TrainState, config: dict, rank: int,
) -> None:
    """A Hugging Face directory (safetensors + config + tokenizer) plus train_state/ beside it.
    Every rank calls it (gathering a sharded model and writing the optimizer are collectives);
    rank 0 writes everything but the other ranks' optimizer shards.

    Only weights go through safetensors; the optimizer is torch.distributed.checkpoint's files and
    scheduler/RNG a torch file loaded with weights_only=True (no arbitrary pickle). state.json is
    written last: a checkpoint without it is incomplete and never resumed from.

    A LoRA (peft) model is saved merged into plain weights, so the directory loads with
    transformers alone; its adapter (the trainable part) goes to train_state/ for resuming."""
    weights = full_weights(model)
    sd = os.path.join(dirpath, STATE_DIR)
    os.makedirs(sd, exist_ok=True)
    save_optimizer(dirpath, model, optimizer)
    if rank != 0:
        return
    inner = unwrap(model)
    if is_peft(inner):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(inner).items()}
        save_file(adapter, os.path.join(sd, ADAPTER_FILE))
        merged_export(inner).save_pretrained(dirpath, safe_serialization=True)
    else:
        weights, train_only = split_train_only(inner, weights)
        if train_only:
            from safetensors.torch import save_file

            save_file(train_only, os.path.join(sd, TRAIN_ONLY_FILE))
        inner.save_pretrained(dirpath, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(dirpath)
    torch.save(
        {
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


def restore(ckpt_dir: str, model: torch.nn.Module, optimizer, scheduler) -> TrainState:
    """Weights (safetensors), optimizer, scheduler and RNG from a checkpoint directory, into a model
    already placed or sharded and the optimizer built on it: restored state lands on the device of
    the parameter it belongs to."""
    restore_weights(ckpt_dir, model)
    extra = torch.load(os.path.join(ckpt_dir, STATE_DIR, "optim.pt"), map_location="cpu", weights_only=True)
    if os.path.isdir(os.path.join(ckpt_dir, STATE_DIR, OPTIMIZER_DIR)):
        restore_optimizer(ckpt_dir, model, optimizer)
    else:  # a checkpoint from before the optimizer had its own folder: state by parameter index
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng_torch"])
    return load_train_state(ckpt_dir)


def restore_weights(ckpt_dir: str, model: torch.nn.Module) -> None:
    """The model's weights from model.safetensors (every rank reads the whole file and keeps its
    shard), or a LoRA model's adapter from train_state/."""
    from safetensors.torch import load_file

    inner = unwrap(model)
    if is_peft(inner):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(inner, load_file(os.path.join(ckpt_dir, STATE_DIR, ADAPTER_FILE)))
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise RuntimeError(f"checkpoint {ckpt_dir}: adapter weights {unexpected} do not match the LoRA model")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = load_file(os.path.join(ckpt_dir, "model.safetensors"), device="cpu")
    train_only = os.path.join(ckpt_dir, STATE_DIR, TRAIN_ONLY_FILE)
    if os.path.exists(train_only):
        weights.update(load_file(train_only, device="cpu"))
    missing, unexpected = set_model_state_dict(
        inner, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    # Tied output embeddings are not stored twice; anything else missing is a real mismatch.
    missing = [k for k in missing if k not in tied_keys(inner) and "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing}, unexpected {unexpected}")


def restore_optimizer(ckpt_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the optimizer's shards into this run's layout (any number of workers, sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    inner = unwrap(model)
    state = {"optimizer": get_optimizer_state_dict(inner, optimizer)}  # the target layout, filled in place
    with single_process_ok():
        dcp.load(state, checkpoint_id=os.path.join(ckpt_dir, STATE_DIR, OPTIMIZER_DIR))
    set_optimizer_state_dict(inner, optimizer, optim_state_dict=state["optimizer"])


def latest_checkpoint_state(run_dir: str) -> dict | None:
    for name in reversed(storage.listdir(run_dir)):
        state = storage.join(run_dir, name, STATE_DIR, "state.json")
        if name.startswith("checkpoint_") and storage.exists(state):
            return storage.read_json(state)
    return None


def checkpoint_location(checkpoint: ray.train.Checkpoint | None) -> str | None:
    """A Ray checkpoint as one path or URI (its `.path` alone drops the s3:// of a URI storage)."""
    return storage.location(checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None
