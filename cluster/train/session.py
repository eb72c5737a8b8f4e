"""Where the training loop runs: a Ray Train worker, or a single process inside a Ray Tune trial.

`cluster.train.loop.Loop` talks to its host only through a session: rank and world size, the device,
the checkpoint to resume from, the datasets, how the model is placed, and how metrics and
checkpoints are reported. Ray Train's `ray.train.*` functions refuse to run inside a Tune function
trainable (Ray 2.60 raises there and points to `ray.tune.*`), so a one-worker trial gets its own
session (`tune.trial.TuneSession`) instead of a copy of the loop.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import torch


class Session(Protocol):
    rank: int
    world: int
    device: torch.device

    def checkpoint(self) -> Any | None:
        """The checkpoint to resume from (a ray Checkpoint), or None for a fresh start."""

    def dataset(self, name: str) -> Any:
        """Something with Ray Data's `iter_batches` for the named dataset (this rank's share)."""

    def prepare_model(self, model: torch.nn.Module, strategy: str, param_dtype: torch.dtype | None) -> torch.nn.Module:
        """The model placed on this session's device: sharded (strategy "fsdp", computing in
        `param_dtype` when given) or wrapped for DDP when distributed."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        """Report metrics, with a checkpoint directory to persist when given."""


def quiet_exit_on_sigterm() -> None:
    """When a run or trial ends, Ray removes its placement group and the raylet SIGTERMs the worker
    process (SIGKILL 200 ms later); Ray's handler raises SystemExit in the main thread. When that
    lands inside a finalizer (a weakref callback of a garbage collection), Python cannot raise it
    and prints "Exception ignored in ... Traceback ... SystemExit: 1" on the worker's stderr,
    which reaches the job's console from a run that worked. Such an unraisable SystemExit is left
    unprinted; every other unraisable exception still goes to the hook that was there."""
    if getattr(sys.unraisablehook, "raylm_quiet_exit", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            return
        previous(unraisable)

    hook.raylm_quiet_exit = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def quiet_report_log() -> None:
    """Ray Train logs every `ray.train.report` to the console with its whole metrics dict ("Reporting
    training result 3: TrainingReport(checkpoint=..., metrics={...})", ~500 characters), beside the
    loop's own progress and validation lines; its checkpoint lines stay. That logger is named
    after its module's file, so it is looked up by the module (private: a no-op if Ray moves it)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class TrainSession:
    """A Ray Train worker started by TorchTrainer: every rank calls `report` (it is a barrier)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        quiet_report_log()
        quiet_exit_on_sigterm()
        # Datasets this worker reads itself (a small validation split: `cluster.data.ingest.RankSlice`),
        # by name; every other name is the TorchTrainer dataset's shard.
        self.local: dict[str, Any] = {}

    def checkpoint(self) -> Any | None:
        import ray.train

        return ray.train.get_checkpoint()

    def dataset(self, name: str) -> Any:
        import ray.train

        return self.local[name] if name in self.local else ray.train.get_dataset_shard(name)

    def prepare_model(self, model: torch.nn.Module, strategy: str, param_dtype: torch.dtype | None) -> torch.nn.Module:
        import ray.train.torch

        if strategy == "fsdp":
            from cluster.train.placement import shard

            return shard(model, self.device, param_dtype)
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=dir_name if ckpt else None)
        if ckpt is not None:
            # The controller registers a reported checkpoint at its next poll of the workers (every 2 s);
            # a worker that dies before then takes the report with it and the run resumes from the
            # checkpoint before, losing more than one interval (seen in the worker-kill drill). So training
            # goes on only once this one is committed: at most one poll's wait per checkpoint.
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
            )
