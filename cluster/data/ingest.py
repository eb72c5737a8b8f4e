"""How training reads a prepared corpus or task data: the Ray Datasets handed to TorchTrainer (one
per epoch, its shard order seeded), the DataConfig that splits them across ranks in order, and
`RankSlice`, a small validation split each worker reads itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
from ray.data import ExecutionOptions
from ray.train import DataConfig

from cluster.data.corpus import Corpus
from cluster.train.plan import Plan

log = logging.getLogger(__name__)


def quiet_data_logs() -> None:
    """For training jobs, whose console has a progress line per log interval: no Ray Data progress
    bars (a line per step in a job log) and no "Starting execution ... / Execution plan ..." pair
    per epoch and per evaluation; each execution still logs its "execution finished in" line, and
    ray-data.log in the session's logs has everything. Datasets made after this call carry it to
    the actors that run them (Ray Train's split coordinators)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def start_data_actors() -> threading.Thread:
    """Run a one-row dataset in a background thread, so that Ray Data's per-cluster actors (its
    stats actor and autoscaling coordinator, made at a cluster's first execution) are made while Ray
    Train starts its controller. Otherwise the first execution is the train split coordinator's, and
    their processes start in the window where the worker waits for its first batch. Made from the
    driver's job, the coordinator also takes a worker Ray prestarted for the driver (none matches the
    controller's runtime environment). Time to first step on 2 cores: BENCHMARKS.md, Ray Train
    overhead. The caller joins it before returning; a failure is only logged (the job's
    own executions report real errors)."""

    def run() -> None:
        try:
            ray.data.range(1).materialize()
        except Exception as exc:  # noqa: BLE001 - a head start only
            log.debug("starting Ray Data's actors ahead failed: %s", exc)

    thread = threading.Thread(target=run, name="raylm-data-actors", daemon=True)
    thread.start()
    return thread


def read_parquet(paths: list[str], columns: list[str] | None = None) -> ray.data.Dataset:
    """`ray.data.read_parquet` through Ray Data's first Parquet datasource (V1). Ray 2.60 routes
    Parquet through DataSourceV2 by default, which lists the files on every execution with a pool
    of `FooterReader` actors (up to 32, each a fresh worker process): each training epoch, being its
    own execution, paid that again. On 2 cores, reading the 1-shard benchmark corpus took 1.5-4.0 s
    with V2 against 0.2 s with V1, 300 small files 23 s against 1.2-2.1 s, and an epoch boundary
    stalled 2-worker training ~7 s against ~2 s. V1 reads the footers once, when the dataset is made.
    The switch is read when the read is built, so it is set only around this call.

    `columns` become `select_columns` (read_parquet's `columns=` is deprecated): Ray's optimizer
    pushes the projection into the read, whose plan stays one ReadParquet of those columns."""
    ctx = ray.data.DataContext.get_current()
    if not hasattr(ctx, "use_datasource_v2"):  # a Ray without V2
        ds = ray.data.read_parquet(paths)
    else:
        previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(paths)
        finally:
            ctx.use_datasource_v2 = previous
    return ds.select_columns(columns) if columns is not None else ds


class RankSlice:
    """One rank's equal share of a small split's Parquet shards, read by the worker itself with
    pyarrow at its first `iter_batches` and kept for the later ones. Made for the validation split,
    which every evaluation reads again: as a Ray Dataset, materialised by the driver, every
    evaluation was a Ray Data execution through a split coordinator actor of its own, started at the
    first evaluation (which took 2.2-2.7 s instead of ~0.3 s on 2 cores) and idle the rest of the run.

    Like `streaming_split(equal=True)`, every rank gets `total // world` rows, in order, and the
    remainder (fewer than `world` rows) is dropped: ranks evaluate the same number of batches, which
    FSDP's collective forward needs. Only the shards that overlap this rank's rows are read. Batches
    are converted by Ray Data's own `BlockAccessor`, so they look exactly like `iter_batches`' own.

    `shards` are `{"path", "rows"}` in split order, the rows as the corpus manifest records them."""

    def __init__(self, shards: list[dict], columns: list[str] | None, rank: int, world: int) -> None:
        self.shards, self.columns = shards, columns
        per = sum(s["rows"] for s in shards) // world
        self.start, self.stop = rank * per, (rank + 1) * per
        self._table: pa.Table | None = None

    def table(self) -> pa.Table | None:
        if self._table is None:
            from cluster import storage

            parts, offset = [], 0
            for shard in self.shards:
                lo, hi = max(self.start - offset, 0), min(self.stop - offset, shard["rows"])
                if lo < hi:
                    fs, path = storage.filesystem(shard["path"])
                    table = pq.read_table(path, columns=self.columns, filesystem=fs)
                    if table.num_rows != shard["rows"]:
                        raise ValueError(f"{shard['path']}: {table.num_rows} rows, but the corpus manifest "
                                         f"records {shard['rows']}: the shard changed after prepare")
                    parts.append(table.slice(lo, hi - lo))
                offset += shard["rows"]
            self._table = pa.concat_tables(parts).combine_chunks() if parts else None
        return self._table

    def iter_batches(self, batch_size: int, batch_format: str = "numpy") -> Iterator[Any]:
        from ray.data.block import BlockAccessor

        table = self.table()
        for i in range(0, table.num_rows if table is not None else 0, batch_size):
            yield BlockAccessor.for_block(table.slice(i, batch_size)).to_batch_format(batch_format)


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The training split's shard order in `epoch`: seeded by (seed, epoch)."""

    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_shards)]


def train_datasets(corpus: Corpus, plan: Plan, seed: int) -> dict[str, ray.data.Dataset]:
    """One dataset per epoch, its shard order seeded by (seed, epoch): reproducible (resume, with
    `preserve_order`) and different from the other epochs; the workers' seeded local shuffle buffer
    mixes rows across the blocks it holds. No `randomize_block_order`: it is an all-to-all stage,
    so every epoch would read the whole split into the object store before the first batch."""
    shards = corpus.shard_paths("train")
    quiet_data_logs()
    out = {}
    for epoch in range(plan.epochs):
        order = shard_order(len(shards), seed, epoch)
        out[f"train_{epoch}"] = read_parquet([shards[i] for i in order], columns=corpus.manifest["columns"])
    if not plan.validation:
        out["validation"] = read_parquet(corpus.shard_paths("validation"), columns=corpus.manifest["columns"]).materialize()
    return out


def data_config() -> DataConfig:
    """How TorchTrainer hands the datasets to workers: every dataset split across ranks, in order
    (the data position a resume relies on: `cluster.train`'s module docstring)."""
    return DataConfig(datasets_to_split="all", execution_options=ExecutionOptions(preserve_order=True))


# Validation splits of up to this many tokens are read by each worker itself.
LOCAL_VALIDATION_MAX_TOKENS = 16 * 2**20


def local_validation(corpus: Corpus, max_tokens: int = LOCAL_VALIDATION_MAX_TOKENS) -> dict:
    """The validation split for workers to read themselves (`cluster.data.ingest.RankSlice`), or {} for a
    split of over `max_tokens`, which Ray Data tasks read and the driver materialises in the object
    store before training starts (every evaluation reads it again). A rank holds at most its share
    of `max_tokens` (64 MiB as int32), read at its first evaluation: nothing of it is on the way to
    the first step, and no Ray Data execution runs per evaluation."""
    if corpus.split_info("validation")["tokens"] > max_tokens:
        return {}
    return {"shards": corpus.shards("validation"), "columns": corpus.manifest["columns"]}


def epoch_datasets(train: Any, validation: Any, epochs: int, seed: int) -> dict[str, Any]:
    """Per epoch a seeded block order (rows are shuffled further in a local buffer); validation as is."""
    out = {f"train_{e}": train.randomize_block_order(seed=seed * 7919 + e) for e in range(epochs)}
    out["validation"] = validation
    return out
