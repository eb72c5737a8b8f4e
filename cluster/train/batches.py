"""This rank's micro-batches of an epoch, and starting an epoch's Ray Data pipeline ahead of time
(the first batch while the model is built, the next epoch halfway through this one), so training
does not stall waiting for data.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from cluster.train.checkpoint import STATE_DIR
from cluster.train.plan import Plan
from cluster.train.session import Session


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
    builds the model, instead of after, where on a 2-core machine it arrived ~7 s after the model
    was ready."""

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
    once every rank has asked for its first batch; a rank that asked on its own schedule (a time
    estimate, say) would block while the others waited for it in a DDP collective. Every
    rank sees the same number of micro-batches per epoch (`DataConfig` splits with `equal=True`),
    and the plan's count is the same on all of them. Halfway, not near the end: it costs only the
    next pipeline's buffered blocks, which it holds either way, and leaves time for any step speed."""
    return plan.steps_per_epoch * grad_accum // 2
