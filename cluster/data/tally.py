"""jobs.prepare's counts: one pass over the small columns of every document (drop reasons, problem
notes, duplicates by content hash, per-split documents, tokens, bytes and log-probability after
source weights), and the validation top-up for a split too small to hold one row.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from cluster.data.corpus import SPLITS
from cluster.data.pipeline import weight_copies
from cluster.data.text import DROP_DUPLICATE, hash_unit
from cluster.errors import CorpusError

log = logging.getLogger(__name__)


@dataclass
class Counts:
    docs_in: int
    dropped: dict[str, int]
    problems: list[str]
    duplicates: set[int]
    to_validation: set[int] = field(default_factory=set)  # train documents moved to validation (`top_up`)

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
            cost: np.ndarray, need: int) -> np.ndarray:
    """Indices of the train documents to move to validation so that it holds one row.

    A split drawn by hash holds out nothing, or less than a row, from a small corpus (54 files at
    validation_fraction 0.02 held out none), and pretraining then has nothing to evaluate on. Each
    document weighs `cost` x its copies (blocks: tokens + end of document, against block_size;
    segments: 1 per non-empty document, against 1). When validation weighs less than `need`, the
    train documents with the lowest split hash (`units(indices)`: those a larger fraction would
    hold out first, so the choice is as deterministic as the split) move over until it does, as
    long as train keeps `need` too; otherwise none move. The tokenizer, trained earlier on the
    train split, has seen the moved documents' text; the model has not."""
    weight = cost * copies
    short = need - int(weight[split == SPLITS.index("validation")].sum())
    train = np.flatnonzero((split == SPLITS.index("train")) & (weight > 0))
    if short <= 0 or not len(train):
        return np.zeros(0, dtype=np.int64)
    order = train[np.argsort(units(train), kind="stable")]
    taken = np.cumsum(weight[order])
    k = int(np.searchsorted(taken, short)) + 1  # documents until validation weighs `need`
    if k > len(order) or int(taken[-1]) - int(taken[k - 1]) < need:
        return np.zeros(0, dtype=np.int64)
    return order[:k]


def tally(ds: ray.data.Dataset, dedup: bool, weights: dict[str, float], tokens: bool, max_problems: int = 50,
          top_up: tuple[str, int, int] | None = None) -> tuple[Counts, dict[str, dict[str, float]]]:
    """One pass over the small columns on the driver: drop counts, problem notes, the keys of
    duplicate documents and (with `tokens`) each split's documents, tokens, bytes and log-probability
    after source weights. Exact de-duplication needs a global view; holding 16-byte hashes on the
    driver costs far less than a shuffle by hash and keeps the corpus order (hence determinism).
    With `top_up` = (layout, block_size, split seed) and `tokens`, a validation split too small for
    one row is topped up from train (`validation_top_up`); the moved keys are in the counts."""
    arr, hashes, counts = _gather(ds, weights, tokens, max_problems)
    duplicates: set[int] = set()
    if dedup:
        seen: set[bytes] = set()
        for i in np.argsort(arr["key"], kind="stable"):  # the first document by key is the one kept
            if hashes[i] in seen:
                duplicates.add(int(arr["key"][i]))
            else:
                seen.add(hashes[i])
    counts.duplicates = duplicates
    counts.dropped[DROP_DUPLICATE] = len(duplicates)
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0, "logprob": 0.0, "synthetic_docs": 0} for s in SPLITS}
    if tokens and len(arr["key"]):
        copies = arr["copies"] * ~np.isin(arr["key"], np.fromiter(duplicates, dtype=np.int64, count=len(duplicates)))
        if top_up is not None:
            layout, block_size, seed = top_up
            cost, need = (arr["n_tokens"] + 1, block_size) if layout == "blocks" else ((arr["n_tokens"] > 0), 1)
            moved = validation_top_up(arr["split"], copies,
                                      lambda idx: np.asarray([hash_unit(hashes[i], salt=seed) for i in idx]),
                                      cost.astype(np.int64), need)
            if len(moved):
                arr["split"][moved] = SPLITS.index("validation")
                counts.to_validation = {int(k) for k in arr["key"][moved]}
        stats = _split_stats(arr, copies)
    return counts, stats


def _gather(ds: ray.data.Dataset, weights: dict[str, float], tokens: bool, max_problems: int
            ) -> tuple[dict[str, np.ndarray], list[bytes], Counts]:
    """The kept documents' small columns as arrays (key, copies after weighting and, with `tokens`,
    split, n_tokens, n_bytes, logprob), their content hashes, and the drop counts and notes."""
    names = ["key", "hash", "drop", "note", "source"] + (["split", "n_tokens", "n_bytes", "logprob"] if tokens else [])
    cols: dict[str, list] = {c: [] for c in ("key", "copies", "split", "n_tokens", "n_bytes", "logprob")}
    hashes: list[bytes] = []
    dropped: Counter[str] = Counter()
    problems: list[str] = []
    docs_in = 0
    for batch in ds.select_columns(names).iter_batches(batch_format="pyarrow", batch_size=None):
        docs_in += batch.num_rows
        drops = batch.column("drop").to_pylist()
        kept = np.flatnonzero(np.asarray([not d for d in drops], dtype=bool))
        for drop, note in zip(drops, batch.column("note").to_pylist(), strict=True):
            if drop:
                dropped[drop] += 1
                if note and len(problems) < max_problems:
                    problems.append(f"{note} ({drop})")
        batch = batch.take(pa.array(kept, type=pa.int64()))
        digests = batch.column("hash").to_pylist()
        hashes += digests
        cols["key"].append(batch.column("key").to_numpy())
        cols["copies"].append(np.fromiter((weight_copies(h, weights[src]) for h, src in zip(
            digests, batch.column("source").to_pylist(), strict=True)), dtype=np.int64, count=len(digests)))
        if tokens:
            cols["split"].append(np.asarray([SPLITS.index(x) for x in batch.column("split").to_pylist()]))
            for c in ("n_tokens", "n_bytes", "logprob"):
                cols[c].append(batch.column(c).to_numpy())
    arr = {c: np.concatenate(v) if v else np.zeros(0) for c, v in cols.items()}
    return arr, hashes, Counts(docs_in, dict(dropped), problems, set())


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
