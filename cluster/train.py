"""The one training loop, run by every Ray Train worker: setup -> step -> evaluate -> checkpoint.

Objectives (cluster.losses) decide what a batch means; this loop owns placement (device, DDP or
FSDP, precision), the optimiser and schedule, metrics, checkpoints and the data position that makes
a resumed run see the same blocks as an uninterrupted one.

Data position: with `preserve_order`, Ray Data's streaming split hands blocks to ranks in a fixed
order (each block to the rank that has received the fewest rows), and each epoch's order is seeded,
so (epoch, batches consumed) pins the exact rows. Resume skips that many batches: exact to one batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from cluster import storage
from cluster.losses import Objective
from cluster.session import Session

if TYPE_CHECKING:  # annotations only: the job driver imports this module and needs no transformers
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)
STATE_DIR = "train_state"
ADAPTER_FILE = "adapter.safetensors"
NONFINITE_FILE = "nonfinite_loss.json"


@dataclass
class Plan:
    """Everything the driver computed that workers need; crosses the Ray boundary as a dict."""

    run_dir: str
    tokenizer_dir: str
    tokenizer_hash: str
    bytes_per_token: float
    steps_per_epoch: int
    max_steps: int
    epochs: int
    tokens_per_step: int
    seq_len: int = 0  # tokens per row (block size or max length), for FLOPs per token
    # A validation split each worker reads itself ({"shards": [{"path", "rows"}], "columns"}:
    # `cluster.sources.RankSlice`); empty: it is the TorchTrainer dataset "validation".
    validation: dict = field(default_factory=dict)
    # Rank 0 logs a line per log interval and validation (the job's console, `ray job logs`).
    # Sweeps turn it off: Tune prints its own trial table, and a dozen trials' lines would bury it.
    progress: bool = True


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


# ---------------------------------------------------------------- setup


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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default, fp32 on CPU (CPU bf16 is slower there and less exact)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


# Dense bf16 peak FLOP/s per GPU, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention (PaLM appendix B).
    L and d come from the Hugging Face config (`num_hidden_layers`/`hidden_size` alias every family)."""
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    config = unwrap(model).config
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- distributed helpers


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
    return getattr(model, "module", model)


def is_fsdp(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel"


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


# ---------------------------------------------------------------- checkpoints


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


# ---------------------------------------------------------------- metrics sinks (rank 0)


def progress_line(row: dict[str, Any], max_steps: int) -> str | None:
    """One console line for a metrics row (train, validation or resume), or None for other rows."""
    split, step = row.get("split"), row.get("step")
    if split == "train":
        loss = f"loss {row['train_loss']:.4f}" if "train_loss" in row else "loss -"
        mfu = f" | mfu {row['mfu'] * 100:.1f}%" if "mfu" in row else ""
        return (f"step {step}/{max_steps} epoch {row['epoch']} | {loss} | lr {row['lr']:.2e} | "
                f"grad norm {row['grad_norm']:.3g} | {row['tokens_per_s']:,.0f} tokens/s{mfu} | "
                f"data wait {row['data_wait_fraction'] * 100:.1f}% | {_duration(row['elapsed_s'])} elapsed, "
                f"eta {_duration(row['eta_s'])}")
    if split == "validation":
        shown = [(k[4:], v) for k, v in row.items() if k.startswith("val_") and isinstance(v, int | float)]
        return f"step {step}/{max_steps} validation | " + " | ".join(f"{k} {v:.4g}" for k, v in shown)
    if split == "resume":
        return f"resumed at step {step} (epoch {row['epoch']}, micro-batch {row['batches_in_epoch']} of that epoch)"
    return None


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# How often metrics.jsonl and the data trace are rewritten on an object store (which cannot append),
# besides before every checkpoint and at the end: a tail of a run's rows shows up this late there.
REMOTE_FLUSH_S = 30.0


def tensorboard_writer(path: str) -> Any:
    """A TensorBoard SummaryWriter for a local folder or an object-store URI, or None where
    TensorBoard cannot write. Its own file layer writes s3:// through boto3 (the same credentials
    and AWS_ENDPOINT_URL as pyarrow), rewriting the event file whole at each flush as S3 cannot
    append; other schemes go through fsspec and need its filesystem package (gcsfs for gs://)."""
    from torch.utils.tensorboard import SummaryWriter

    try:
        return SummaryWriter(path)
    except (ImportError, ValueError, OSError) as exc:
        log.warning("no TensorBoard event files in %s (%s: %s); metrics.jsonl has every row",
                    path, type(exc).__name__, exc)
        return None


class MetricsSink:
    """metrics.jsonl always; TensorBoard where it can write (`tensorboard_writer`); MLflow when MLFLOW_TRACKING_URI is set;
    a progress line per train/validation row when `max_steps` is given, logged at INFO: in a Ray
    Train worker the root logger goes to the console (which Ray forwards to the driver and to
    `ray job logs`) and to Train's worker log file. Not `print`: Ray Train patches it into the same
    logger and, as Ray's worker wraps sys.stdout, also prints it, so every line came out twice."""

    def __init__(self, run_dir: str, run_name: str, enabled: bool, max_steps: int | None = None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.tb = None
        self.mlflow = None
        if not enabled:
            return
        self.tb = tensorboard_writer(storage.join(run_dir, "tensorboard"))
        if os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_experiment("raylm")
            mlflow.start_run(run_name=run_name)
            self.mlflow = mlflow
        self._remote = storage.is_uri(run_dir)
        self._rows = storage.Appender(storage.join(run_dir, "metrics.jsonl"), every_s=REMOTE_FLUSH_S)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._rows.write(json.dumps(row) + "\n")
        step = int(row["step"])
        numeric = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if self.tb:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, step)
            if not self._remote:  # on an object store a flush rewrites the event file: see flush()
                self.tb.flush()
        if self.mlflow:
            self.mlflow.log_metrics(numeric, step=step)
        line = progress_line(row, self.max_steps) if self.max_steps else None
        if line:
            log.info(line)

    def flush(self) -> None:
        """Rows held for an object store written now: before each checkpoint, so that a run resumed
        from it has every row up to it. Otherwise they go every REMOTE_FLUSH_S (TensorBoard's own
        writer: every 2 minutes)."""
        if not self.enabled:
            return
        self._rows.flush()
        if self.tb and self._remote:
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._rows.flush()
        if self.tb:
            self.tb.close()
        if self.mlflow:
            self.mlflow.end_run()


# ---------------------------------------------------------------- the loop


def epoch_batches(session: Session, train: Any, rank: int, epoch: int) -> Any:
    """This rank's iterator over the micro-batches of `epoch` (train: the config's train section)."""
    return session.dataset(f"train_{epoch}").iter_batches(
        batch_size=train.batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=train.shuffle_buffer or None,
        local_shuffle_seed=(train.seed * 1_000_003 + epoch * 1009 + rank) if train.shuffle_buffer else None,
        prefetch_batches=2,
    )


def resume_epoch(session: Session) -> int:
    """The epoch a run starts in: its checkpoint's, or 0 for a fresh start. Reads only the state
    file (the checkpoint's weights are fetched once, later, by `Loop.resume`)."""
    ckpt = session.checkpoint()
    if ckpt is None:
        return 0
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{STATE_DIR}/state.json") as f:
        return int(json.loads(f.read())["epoch"])


class FirstBatchAhead:
    """An epoch's batch iterator whose first batch is fetched by a background thread from the
    moment it is made. Ray Data's pipeline behind the first batch (the split coordinator actor and
    the read tasks, in other processes) then starts while this process imports transformers and
    builds the model, instead of after: on a 2-core machine the first batch used to arrive ~7 s
    after the model was ready."""

    def __init__(self, epoch: int, batches: Any):
        self.epoch = epoch
        self._it = iter(batches)
        self._first: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="raylm-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it)
        except BaseException as exc:  # StopIteration for an empty epoch; anything else re-raised below
            self._error = exc

    def __iter__(self):
        self._thread.join()
        if isinstance(self._error, StopIteration):
            return
        if self._error is not None:
            raise self._error
        yield self._first
        yield from self._it


def next_epoch_ahead_at(plan: Plan, grad_accum: int) -> int:
    """The micro-batch index, within an epoch, at which every rank starts the next epoch's data.

    Each epoch is its own Ray Data pipeline, and starting one (split coordinator actor, read tasks,
    first blocks) stalled training at every boundary: ~2 s with 2 workers on 2 cores. Starting it
    halfway through the epoch before hides that. The index must be the same on every rank: Ray Train hands
    out a dataset's shards when rank 0 asks, and Ray Data's split coordinator starts an epoch only
    once every rank has asked for its first batch; a rank that asked on its own schedule (an earlier
    version used a time estimate) blocked while the others waited for it in a DDP collective. Every
    rank sees the same number of micro-batches per epoch (`DataConfig` splits with `equal=True`),
    and the plan's count is the same on all of them. Halfway, not near the end: it costs only the
    next pipeline's buffered blocks, which it holds either way, and leaves time for any step speed."""
    return plan.steps_per_epoch * grad_accum // 2


class Loop:
    """One worker's training run. Built from plain dicts (configs cross the Ray boundary as dicts);
    everything about its host (Ray Train worker or Tune trial) goes through `session`. `ahead`, when
    given, is the first epoch's iterator, already started (see FirstBatchAhead)."""

    def __init__(self, cfg: Any, plan: Plan, objective: Objective, model: torch.nn.Module,
                 tokenizer: PreTrainedTokenizerFast, session: Session, ahead: FirstBatchAhead | None = None):
        self.cfg, self.plan, self.objective, self.tokenizer = cfg, plan, objective, tokenizer
        self.session = session
        self.ahead = ahead
        # transformers draws a tqdm bar per checkpoint write ("Writing model shards") into a job log
        # that already has a line per log interval.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.amp = autocast_dtype(cfg.train.precision, self.device)
        self.model = model
        opt = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(opt.schedule, opt.warmup_steps, plan.max_steps, opt.min_lr_ratio)
        )
        self.state = TrainState(tokenizer_hash=plan.tokenizer_hash)
        self.sink = MetricsSink(plan.run_dir, cfg.name, enabled=self.rank == 0,
                                max_steps=plan.max_steps if plan.progress else None)
        self.last_checkpoint_step = -1
        self._trace: storage.Appender | None = None  # train.trace_data's file, opened at the first batch
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.flops_per_token = flops_per_token(model, plan.seq_len)
        self.peak_flops = peak_flops(self.device)

    # -- setup
    def resume(self) -> None:
        ckpt = self.session.checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            state = load_train_state(d)
            if state.tokenizer_hash != self.plan.tokenizer_hash:
                raise RuntimeError(
                    f"checkpoint at step {state.step} was trained with tokenizer {state.tokenizer_hash}, "
                    f"but the corpus uses {self.plan.tokenizer_hash}"
                )
            self.state = restore(d, self.model, self.optimizer, self.scheduler, self.device)
        apply_hyperparameters(self.optimizer, self.scheduler, self.cfg.optim)
        self.last_checkpoint_step = self.state.step
        # the metrics log shows where a restarted or re-submitted run picked up
        self.sink.log({"step": self.state.step, "epoch": self.state.epoch, "split": "resume",
                       "batches_in_epoch": self.state.batches_in_epoch, "time": time.time()})

    def place(self) -> None:
        self.model = self.session.prepare_model(self.model, self.cfg.scaling.strategy)
        if self.cfg.model.compile:
            self.model = torch.compile(self.model)

    # -- one optimizer step over grad_accum micro-batches
    def micro_step(self, inputs: dict[str, torch.Tensor], sync: bool) -> dict[str, torch.Tensor]:
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        ctx = self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else contextlib.nullcontext()
        with ctx, torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss, stats = self.objective.forward(self.model, inputs)
            (loss / self.cfg.train.grad_accum).backward()
        return stats

    def optimizer_step(self) -> float:
        if is_fsdp(self.model):
            norm = self.model.clip_grad_norm_(self.cfg.train.max_grad_norm)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- evaluation over the whole validation split, reduced across ranks
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        shard = self.session.dataset("validation")
        sums: dict[str, float] = {}
        generate = getattr(self.objective, "generate", None)
        # generated samples are capped per run, split evenly over the ranks
        sample_cap = -(-getattr(self.objective, "sample_limit", 0) // self.world)
        samples: list = []
        for i, batch in enumerate(shard.iter_batches(batch_size=self.cfg.train.batch_size, batch_format="numpy")):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            inputs = self.objective.collate(batch, (self.cfg.train.seed, -1, i, self.rank))
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                _, stats = self.objective.forward(self.model, inputs)
                if generate and len(samples) < sample_cap:
                    samples += generate(unwrap(self.model), inputs, sample_cap - len(samples))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train()
        metrics = self.objective.summarize(all_reduce_sum(sums, self.device))
        if generate:
            metrics.update(self.objective.score_samples(all_gather_objects(samples)))
        return metrics

    # -- checkpoint via the session (with Ray Train every rank calls report: it is a barrier)
    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        metrics = {**metrics, "step": self.state.step, "epoch": self.state.epoch,
                   "trainable_params": self.trainable_params}
        if not checkpoint:
            self.session.report(metrics)
            return
        self.sink.flush()
        if self._trace is not None:
            self._trace.flush()
        tmp = tempfile.mkdtemp(prefix="raylm-ckpt-")
        try:
            if self.rank == 0 or is_fsdp(self.model):
                # FSDP gathers the full weights collectively; only rank 0 writes them.
                if self.rank == 0:
                    save_checkpoint(tmp, self.model, self.tokenizer, self.optimizer, self.scheduler, self.state,
                                    self.cfg.to_dict())
                else:
                    full_state_dict(self.model)
                    optimizer_state(self.model, self.optimizer)
            self.session.report(metrics, checkpoint_dir=tmp if self.rank == 0 else None,
                                dir_name=f"checkpoint_{self.state.step:07d}")
            self.last_checkpoint_step = self.state.step
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def batches(self, epoch: int):
        """This rank's micro-batches of `epoch`, skipping those consumed before a resume."""
        skip = self.state.batches_in_epoch if epoch == self.state.epoch else 0
        if self.ahead is not None and self.ahead.epoch == epoch:
            it, self.ahead = self.ahead, None
        else:
            it = epoch_batches(self.session, self.cfg.train, self.rank, epoch)
        for i, batch in enumerate(it):
            if i >= skip:
                yield i, batch

    def trace(self, epoch: int, index: int, batch: dict[str, np.ndarray]) -> None:
        import hashlib

        rows = np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in batch["input_ids"]])
        digest = hashlib.sha1(rows.tobytes()).hexdigest()[:16]
        if self._trace is None:
            self._trace = storage.Appender(storage.join(self.plan.run_dir, "data_trace", f"rank-{self.rank}.jsonl"),
                                           every_s=REMOTE_FLUSH_S)
        self._trace.write(json.dumps({"epoch": epoch, "batch": index, "step": self.state.step, "hash": digest}) + "\n")

    def run(self) -> None:
        try:
            self._run()
        finally:  # rows held for an object store are written even when the loop raises
            if self._trace is not None:
                self._trace.flush()
            self.sink.close()

    def _run(self) -> None:
        cfg, plan, st = self.cfg.train, self.plan, self.state
        accum = cfg.grad_accum
        t_start = time.perf_counter()
        window = {"t0": time.perf_counter(), "wait": 0.0, "tokens": 0, "stats": {}, "steps": 0, "norm": 0.0}
        stopped_for_nan = None
        if cfg.eval_at_start and st.step == 0:
            self.log_validation(self.evaluate(), checkpoint=False)
        for epoch in range(st.epoch, plan.epochs):
            if st.step >= plan.max_steps:
                break
            if epoch != st.epoch:
                st.epoch, st.batches_in_epoch = epoch, 0
            t_wait = time.perf_counter()
            micro = 0
            # the same index on every rank: see next_epoch_ahead_at
            ahead_at = next_epoch_ahead_at(plan, accum) if cfg.next_epoch_ahead and epoch + 1 < plan.epochs else None
            for i, batch in self.batches(epoch):
                window["wait"] += time.perf_counter() - t_wait
                if ahead_at is not None and i >= ahead_at:
                    self.ahead = FirstBatchAhead(epoch + 1, epoch_batches(self.session, cfg, self.rank, epoch + 1))
                    ahead_at = None
                inputs = self.objective.collate(batch, (cfg.seed, epoch, i, self.rank))
                if cfg.trace_data:
                    self.trace(epoch, i, batch)
                micro += 1
                stats = self.micro_step(inputs, sync=micro % accum == 0)
                for k, v in stats.items():
                    window["stats"][k] = window["stats"].get(k, 0.0) + float(v)
                n_tok = int(inputs["input_ids"].numel())
                window["tokens"] += n_tok
                st.tokens_seen += n_tok * self.world
                st.batches_in_epoch = i + 1
                if micro % accum:
                    t_wait = time.perf_counter()
                    continue
                window["norm"] = self.optimizer_step()
                st.step += 1
                window["steps"] += 1
                stopped_for_nan = self.after_step(window, t_start)
                if stopped_for_nan is not None or st.step >= plan.max_steps:
                    break
                t_wait = time.perf_counter()
            if stopped_for_nan is not None or st.step >= plan.max_steps:
                break
            # The epoch ended on rows; trailing micro-batches that did not fill a step are discarded.
            self.optimizer.zero_grad(set_to_none=True)
        if stopped_for_nan is None:
            self.finish()

    def after_step(self, window: dict, t_start: float) -> int | None:
        cfg, st = self.cfg.train, self.state
        # step 1 is always logged: its wall time is the run's time-to-first-step
        is_log = st.step % cfg.log_every == 0 or st.step == self.plan.max_steps or st.step == 1
        if is_log:
            summed = all_reduce_sum(window["stats"], self.device)
            metrics = self.objective.summarize(summed) if summed else {}
            if not math.isfinite(metrics.get("loss", 0.0)):
                return self.stop_for_nan(metrics)
            elapsed = time.perf_counter() - window["t0"]
            total_elapsed = time.perf_counter() - t_start
            tok_s = window["tokens"] / max(elapsed, 1e-9)
            steps_left = self.plan.max_steps - st.step
            row = {
                "step": st.step, "epoch": st.epoch, "split": "train",
                **{f"train_{k}": v for k, v in metrics.items()},
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": window["norm"],
                "tokens_per_s_worker": tok_s, "tokens_per_s": tok_s * self.world,
                "data_wait_fraction": window["wait"] / max(elapsed, 1e-9),
                "elapsed_s": total_elapsed,
                "eta_s": elapsed / max(window["steps"], 1) * steps_left,
                "tokens_seen": st.tokens_seen,
                "time": time.time(),
            }
            if self.peak_flops:
                row["mfu"] = tok_s * self.flops_per_token / self.peak_flops
            self.sink.log(row)
            window.update(t0=time.perf_counter(), wait=0.0, tokens=0, stats={}, steps=0)
        is_eval = st.step % cfg.eval_every == 0 or st.step == self.plan.max_steps
        is_ckpt = st.step % cfg.checkpoint_every == 0 or st.step == self.plan.max_steps
        if is_eval or is_ckpt:
            val = self.evaluate()
            if not math.isfinite(val["loss"]):
                return self.stop_for_nan(val)
            self.log_validation(val, checkpoint=is_ckpt)
        return None

    def log_validation(self, val: dict[str, float], checkpoint: bool) -> None:
        st = self.state
        st.best_val_loss = min(st.best_val_loss, val["loss"])
        val_metrics = {f"val_{k}": v for k, v in val.items()}
        self.sink.log({"step": st.step, "epoch": st.epoch, "split": "validation", **val_metrics})
        st.history.append({"step": st.step, **val_metrics})
        self.report(val_metrics, checkpoint=checkpoint)

    def stop_for_nan(self, metrics: dict[str, float]) -> int:
        """All ranks see the same reduced loss, so all stop here together; no checkpoint is written."""
        step = self.state.step
        last = self.last_checkpoint_step
        self.sink.log({"step": step, "split": "error", "nonfinite_loss": True, "last_checkpoint_step": last})
        if self.rank == 0:
            # Result.metrics keeps only checkpointed reports, so the driver learns of the stop from this file.
            storage.write_json_atomic(storage.join(self.plan.run_dir, NONFINITE_FILE),
                                      {"step": step, "last_checkpoint_step": last, "metrics": metrics})
        self.session.report({"nonfinite_loss_step": step, "last_good_checkpoint_step": last,
                             "step": step, "epoch": self.state.epoch})
        return step

    def finish(self) -> None:
        if self.last_checkpoint_step != self.state.step:
            val = self.evaluate()
            self.report({f"val_{k}": v for k, v in val.items()}, checkpoint=True)
