"""The one way raylm runs training on Ray Train.

`fit` builds every `TorchTrainer` (pretraining, fine-tuning, a sweep's multi-worker trials) from a
job's scaling section, so a checkpoint, failure or data setting is changed in one place;
`start_worker` is every worker's first step (threads, seed, a record of where it runs);
`check_resources` says so in seconds when the cluster cannot hold the workers, instead of Ray
waiting for resources that never come.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from cluster import runtime, storage
from cluster.errors import JobError
from cluster.train.config import ScalingSection

# Pretraining streams its corpus from storage: Ray Data's read tasks ask for one CPU each (Ray's
# default for a task) and run beside the training workers for the whole run, so a cluster whose CPUs
# the workers take all of never reads a block. Fine-tuning and sweeps materialize their tokenized
# rows before training starts (cluster.data.task_prep): their workers take blocks already in the
# object store, which runs no task and needs no CPU (seen on a 2-CPU Ray with every CPU held by the
# consumers, through iter_batches and streaming_split alike).
DATA_CPUS = 1.0
MATERIALIZED_DATA_CPUS = 0.0


def check_resources(scaling: ScalingSection, data_cpus: float = DATA_CPUS) -> None:
    """Say so in seconds, with the numbers and the fixes, instead of hanging when the cluster cannot
    hold the workers and, beside them, the data pipeline's readers."""
    import ray

    need = {k: v * scaling.num_workers for k, v in scaling.resources().items()}
    need["CPU"] = need.get("CPU", 0.0) + data_cpus
    # a per-worker share that leaves the readers their CPU, in quarters
    share = int((ray.cluster_resources().get("CPU", 0.0) - data_cpus) / scaling.num_workers * 4) / 4
    fits = f" (--set scaling.cpus_per_worker={share:g} fits)" if share >= 0.25 else ""
    readers = f" and {data_cpus:g} CPU for Ray Data's readers beside them" if data_cpus else ""
    runtime.require(need, f"scaling: {scaling.num_workers} worker(s) x {scaling.cpus_per_worker:g} CPU{readers}",
                    f"lower scaling.num_workers or scaling.cpus_per_worker{fits}, start Ray with more CPUs, or "
                    "set RAYLM_WAIT_FOR_RESOURCES=1 on an autoscaling cluster")


def fit(worker: Callable[[dict], None], loop_config: dict[str, Any], scaling: ScalingSection, *, name: str,
        storage_path: str, datasets: dict[str, Any], keep: int, metric: str = "val_loss", mode: str = "min",
        max_failures: int = 0, callbacks: list | None = None, what: str = "training") -> Any:
    """Run `worker(loop_config)` on `scaling.num_workers` Ray Train workers and return the Result.

    Checkpoints: the `keep` best by `metric` (plus the latest, which Ray Train always keeps);
    `max_failures` restarts from the latest one. A failed run is a JobError naming `what` failed."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.data.ingest import data_config

    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=scaling.resources(),
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=metric,
                                               checkpoint_score_order=mode),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=data_config(),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise JobError(f"{what} failed: {exc}") from None


def start_worker(scaling: ScalingSection, seed: int, run_dir: str, rank: int) -> None:
    """A worker's first step, the same for every stage: torch threads (default: the CPUs it
    reserved), where it runs (`<run>/workers/rank-N.json`, which the summary lists), and its seed
    (offset by rank, so dropout and masking differ across ranks)."""
    import ray
    import torch

    from cluster.train.placement import seed_everything

    torch.set_num_threads(scaling.threads_per_worker or max(1, int(scaling.cpus_per_worker)))
    record = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
              "node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid()}
    storage.write_json_atomic(storage.join(run_dir, "workers", f"rank-{rank}.json"), record)
    seed_everything(seed + rank)
