"""jobs.prepare's counts, computed where the blocks are: drop reasons, problem notes, duplicates
by content hash, per-split documents, tokens, bytes and log-probability after source weights, and
the validation top-up for a split too small to hold one row.

Ray Data does the work across the cluster: exact duplicates are found by a group-by on the content
hash (count and lowest key per hash), and every block sums its own counts; the driver holds the
per-block sums and the duplicates alone, never a row per document. The results do not depend on
the cluster's size or the blocks: the lowest key of each text is the copy kept, and problem notes
come in corpus order.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from cluster.data.corpus import SPLITS
from cluster.data.duplicates import duplicate_rows, duplicated_texts
from cluster.data.pipeline import weight_copies
from cluster.data.text import DROP_DUPLICATE, hash_unit
from cluster.errors import CorpusError

log = logging.getLogger(__name__)


@dataclass
class Counts:
    docs_in: int
    dropped: dict[str, int]
    problems: list[str]
    to_validation: set[int] = field(default_factory=set)  # train documents moved to validation (`top_up`)
    # The lowest key of each text kept more than once (`cluster.data.duplicates`), by reference;
    # None without de-duplication.
    first: ray.ObjectRef | None = None

    @property
    def kept(self) -> int:
        """Documents that passed every filter (before source weights copy or drop them)."""
        return self.docs_in - sum(self.dropped.values())


def unwrap_error(exc: BaseException) -> BaseException:
    """Ray wraps errors raised in tasks (RayTaskError, UserCodeException); find our CorpusError."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CorpusError) and type(e) is CorpusError:
            # Ray Data appends its retry advice to errors raised in a UDF; ours are not transient.
            return CorpusError(str(e).split("\nFailed to ", 1)[0])
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    # Last resort: the remote traceback is flattened into the message.
    match = re.search(r"cluster\.errors\.CorpusError: (.+)", str(exc))
    return CorpusError(match.group(1).strip()) if match else exc


def validation_top_up(split: np.ndarray, copies: np.ndarray, units: Callable[[np.ndarray], np.ndarray],
            cost: np.ndarray, need: int, train_total: int | None = None) -> np.ndarray:
    """Indices of the train documents to move to validation so that it holds one row.

    A split drawn by hash holds out nothing, or less than a row, from a small corpus (54 files at
    validation_fraction 0.02 held out none), and pretraining then has nothing to evaluate on. Each
    document weighs `cost` x its copies (blocks: tokens + end of document, against block_size;
    segments: 1 per non-empty document, against 1). When validation weighs less than `need`, the
    train documents with the lowest split hash (`units(indices)`: those a larger fraction would
    hold out first, so the choice is as deterministic as the split) move over until it does, as
    long as train keeps `need` too; otherwise none move. `train_total`: train's whole weight when
    the arrays hold only each block's lowest-hash train documents (the candidates). The tokenizer, trained earlier on the
    train split, has seen the moved documents' text; the model has not."""
    weight = cost * copies
    short = need - int(weight[split == SPLITS.index("validation")].sum())
    train = np.flatnonzero((split == SPLITS.index("train")) & (weight > 0))
    if short <= 0 or not len(train):
        return np.zeros(0, dtype=np.int64)
    order = train[np.argsort(units(train), kind="stable")]
    taken = np.cumsum(weight[order])
    k = int(np.searchsorted(taken, short)) + 1  # documents until validation weighs `need`
    total = int(taken[-1]) if train_total is None else train_total
    if k > len(order) or total - int(taken[k - 1]) < need:
        return np.zeros(0, dtype=np.int64)
    return order[:k]


def tally(ds: ray.data.Dataset, dedup: bool, weights: dict[str, float], tokens: bool, max_problems: int = 50,
          top_up: tuple[str, int, int] | None = None,
          first: ray.ObjectRef | None = None) -> tuple[Counts, dict[str, dict[str, float]]]:
    """Drop counts (duplicates among them), problem notes and each split's documents and bytes of
    text after source weights (with `tokens` also its tokens and log-probability), computed across the
    cluster. With `top_up` = (layout, block_size, split seed) and `tokens`, a validation split too
    small for one row is topped up from train (`validation_top_up`); the moved keys are in the
    counts. `first`: an earlier tally's `Counts.first` of the same documents, which spares the
    sort. With `dedup`, `Counts.first` references the duplicated texts' lowest keys, which
    `select_batch` drops the other copies by."""
    if first is None and dedup:
        from ray.data.expressions import col

        first = duplicated_texts(ds.filter(expr=col("drop") == "").select_columns(["hash", "key"]))
    spec = {"weights": weights, "tokens": tokens, "max_problems": max_problems, "first": first, "top_up": top_up}
    # Without tokens, the text's bytes (for the tokenizer sample's size); select_columns fuses
    # with the map below, so no column is copied.
    names = ["key", "hash", "drop", "note", "source", "split"] + (["n_tokens", "n_bytes", "logprob"] if tokens else ["text"])
    blocks = ds.select_columns(names).map_batches(_block_sums, fn_kwargs=spec, batch_format="pyarrow",
                                                   batch_size=None).take_all()
    counts = Counts(sum(b["docs_in"] for b in blocks), {}, [], first=first)
    dropped: Counter[str] = Counter()
    for b in blocks:
        dropped.update(json.loads(b["dropped"]))
        counts.problems += json.loads(b["problems"])[: max_problems - len(counts.problems)]
    counts.dropped = {**dropped, DROP_DUPLICATE: sum(b["duplicates"] for b in blocks)}
    keys = ("documents", "tokens", "bytes", "logprob", "synthetic_docs")
    stats = {s: {k: sum(json.loads(b["stats"])[s][k] for b in blocks) for k in keys} for s in SPLITS}
    if tokens and top_up is not None:
        _top_up(blocks, top_up, counts, stats)
    return counts, stats


_BLOCK_SCHEMA = pa.schema([("docs_in", pa.int64()), ("dropped", pa.string()), ("problems", pa.string()),
                           ("duplicates", pa.int64()), ("stats", pa.string()), ("candidates", pa.string())])


def _block_sums(batch: pa.Table, weights: dict[str, float], tokens: bool, max_problems: int,
                first: ray.ObjectRef | None, top_up: tuple[str, int, int] | None) -> pa.Table:
    """One row for the block: documents in, drop counts, its first problem notes, its number of
    duplicates, and with `tokens` its per-split sums and its top-up candidates (`_candidates`)."""
    drops, notes = batch.column("drop").to_pylist(), batch.column("note").to_pylist()
    dropped = Counter(d for d in drops if d)
    problems = [f"{n} ({d})" for d, n in zip(drops, notes, strict=True) if d and n][:max_problems]
    kept = batch.filter(pa.array([not d for d in drops], pa.bool_()))
    keys, digests = kept.column("key").to_numpy(), kept.column("hash").to_pylist()
    is_dup = duplicate_rows(kept.column("hash"), keys, first)
    row: dict[str, Any] = {"docs_in": batch.num_rows, "dropped": json.dumps(dropped), "problems": json.dumps(problems),
                           "duplicates": int(is_dup.sum()), "candidates": "[]"}
    copies = np.fromiter((weight_copies(h, weights[s]) for h, s in zip(
        digests, kept.column("source").to_pylist(), strict=True)), dtype=np.int64, count=len(digests)) * ~is_dup
    arr = {"key": keys, "split": np.asarray([SPLITS.index(x) for x in kept.column("split").to_pylist()], np.int64)}
    if tokens:
        arr.update({c: kept.column(c).to_numpy() for c in ("n_tokens", "n_bytes", "logprob")})
    else:  # documents and bytes of text per split only
        n_bytes = (pc.binary_length(kept.column("text")).to_numpy().astype(np.int64) if "text" in kept.column_names
                   else np.zeros(len(keys), np.int64))
        arr.update({"n_tokens": np.zeros(len(keys), np.int64), "n_bytes": n_bytes,
                    "logprob": np.full(len(keys), np.nan)})
    row["stats"] = json.dumps(_split_stats(arr, copies))
    if tokens and top_up is not None:
        row["candidates"] = json.dumps(_candidates(arr, copies, digests, top_up))
    return pa.Table.from_pylist([row], schema=_BLOCK_SCHEMA)


def _cost(arr: dict[str, np.ndarray], layout: str, block_size: int) -> tuple[np.ndarray, int]:
    """Each document's weight toward a row, and a row's (blocks: tokens + end of document against
    block_size; segments: 1 per non-empty document, against 1)."""
    if layout == "blocks":
        return (arr["n_tokens"] + 1).astype(np.int64), block_size
    return (arr["n_tokens"] > 0).astype(np.int64), 1


def _candidates(arr: dict[str, np.ndarray], copies: np.ndarray, digests: list[bytes],
                top_up: tuple[str, int, int]) -> dict[str, Any]:
    """The block's validation and train weights, and its train documents of lowest split hash until
    they weigh a row: every document a top-up could move is among some block's candidates."""
    layout, block_size, seed = top_up
    cost, need = _cost(arr, layout, block_size)
    weight = cost * copies
    train = np.flatnonzero((arr["split"] == SPLITS.index("train")) & (weight > 0))
    units = np.asarray([hash_unit(digests[i], salt=seed) for i in train], dtype=np.float64)
    order = train[np.argsort(units, kind="stable")]
    n = int(np.searchsorted(np.cumsum(weight[order]), need)) + 1
    one = {"split": np.zeros(1, np.int64), "n_tokens": None, "n_bytes": None, "logprob": None}
    rows = [{"key": int(arr["key"][i]), "unit": float(units[np.searchsorted(train, i)]), "cost": int(cost[i]),
             "copies": int(copies[i]),
             "split_stats": _split_stats({**one, **{c: arr[c][i:i + 1] for c in ("n_tokens", "n_bytes", "logprob")}},
                                         copies[i:i + 1])["train"]} for i in order[:n]]
    return {"validation": int(weight[arr["split"] == SPLITS.index("validation")].sum()),
            "train": int(weight[train].sum()), "rows": rows}


def _top_up(blocks: list[dict[str, Any]], top_up: tuple[str, int, int], counts: Counts,
            stats: dict[str, dict[str, float]]) -> None:
    """Move the documents `validation_top_up` picks from the blocks' candidates to validation, in
    `counts.to_validation` and in `stats`."""
    parts = [json.loads(b["candidates"]) for b in blocks]
    rows = [r for p in parts for r in p["rows"]]
    if not rows:
        return
    need = top_up[1] if top_up[0] == "blocks" else 1
    split = np.asarray([SPLITS.index("train")] * len(rows) + [SPLITS.index("validation")])
    cost = np.asarray([r["cost"] for r in rows] + [sum(p["validation"] for p in parts)], np.int64)
    copies = np.asarray([r["copies"] for r in rows] + [1], np.int64)
    units = np.asarray([r["unit"] for r in rows] + [0.0])
    moved = validation_top_up(split, copies, lambda idx: units[idx], cost, need,
                              train_total=sum(p["train"] for p in parts))
    for i in moved:
        counts.to_validation.add(rows[i]["key"])
        for k, v in rows[i]["split_stats"].items():
            stats["train"][k] -= v
            stats["validation"][k] += v


def _split_stats(arr: dict[str, np.ndarray], copies: np.ndarray) -> dict[str, dict[str, float]]:
    """Documents, tokens, bytes and the synthetic documents' log-probability per split, each
    document counted `copies` times (0 for a duplicate)."""
    synthetic = ~np.isnan(arr["logprob"])
    stats = {}
    for code, split in enumerate(SPLITS):
        c = copies * (arr["split"] == code)
        stats[split] = {
            "documents": int(c.sum()),
            "tokens": int((c * arr["n_tokens"]).sum()),
            "bytes": int((c * arr["n_bytes"]).sum()),
            "logprob": float((c * np.where(synthetic, arr["logprob"], 0.0)).sum()),
            "synthetic_docs": int((c * synthetic).sum()),
        }
    return stats
