"""The config sections every training stage shares: `train` (batches, steps, evaluation,
checkpoints, precision), `optim` (AdamW and its schedule) and `scaling` (Ray Train workers, their
resources and the data-parallel strategy).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cluster.config import Section


class TrainConfig(Section):
    batch_size: int = Field(16, ge=1, description="rows per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; default from epochs or token_budget")
    epochs: int = Field(1, ge=1, description="passes over the training split (when max_steps/token_budget unset)")
    token_budget: int | None = Field(None, ge=1, description="total training tokens across workers")
    log_every: int = Field(10, ge=1, description="steps between training-metric rows")
    eval_every: int = Field(100, ge=1, description="steps between validation passes")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches per worker")
    eval_at_start: bool = Field(False, description="evaluate before the first step: the untrained baseline at step 0")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="most recent checkpoints kept (plus the best)")
    seed: int = Field(0, description="seeds weights, data order and masking")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    shuffle_buffer: int = Field(256, ge=0, description="rows in the local shuffle buffer (0: off)")
    next_epoch_ahead: bool = Field(
        True, description="start the next epoch's data halfway through this one (no stall at the boundary)"
    )
    trace_data: bool = Field(
        False, description="append (epoch, batch, hash of its rows) per rank to data_trace/ to audit data order"
    )


class OptimConfig(Section):
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay (matrices only)")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")


class ScalingSection(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process each)")
    use_gpu: bool = Field(False, description="one GPU per worker (times gpus_per_worker)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(1, ge=0, description="GPUs per worker when use_gpu")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra custom resources")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism: DDP or FSDP")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs)")

    def resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker, **self.resources_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res
