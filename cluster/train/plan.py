"""What the driver decides before any worker starts: steps, epochs and tokens per step (`plan_steps`,
the same arithmetic for every stage), in a `Plan` that crosses the Ray boundary as a dict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import JobError


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
    # `cluster.data.ingest.RankSlice`); empty: it is the TorchTrainer dataset "validation".
    validation: dict = field(default_factory=dict)
    # Rank 0 logs a line per log interval and validation (the job's console, `ray job logs`).
    # Sweeps turn it off: Tune prints its own trial table, and a dozen trials' lines would bury it.
    progress: bool = True


def plan_steps(rows: int, workers: int, train: Any, tokens_per_row: int, what: str) -> dict[str, int]:
    """Steps per epoch, total steps, epochs and tokens per step for `rows` training rows split
    equally over `workers` (train: the config's train section). `max_steps` wins, then
    `token_budget`, then `epochs`; `what` names the data in the message when it is too small."""
    steps_per_epoch = rows // workers // train.batch_size // train.grad_accum
    if steps_per_epoch < 1:
        raise JobError(f"{what} has {rows} training rows: too few for {workers} worker(s) x train.batch_size "
                       f"{train.batch_size} x train.grad_accum {train.grad_accum}")
    tokens_per_step = workers * train.batch_size * train.grad_accum * tokens_per_row
    if train.max_steps:
        max_steps = train.max_steps
    elif train.token_budget:
        max_steps = max(1, math.ceil(train.token_budget / tokens_per_step))
    else:
        max_steps = steps_per_epoch * train.epochs
    return {"steps_per_epoch": steps_per_epoch, "max_steps": max_steps,
            "epochs": math.ceil(max_steps / steps_per_epoch), "tokens_per_step": tokens_per_step}
