"""The tokenizer's training sample, drawn across every source and trained on off the driver.

The sample is a seeded draw over the kept training documents after source weights (a source of
weight 2 is drawn twice as often as one of weight 1), decided per document from its content hash:
it depends neither on the order the sources are listed in nor on the cluster's size, and a corpus
no larger than `tokenizer.train_docs` is taken whole, in corpus order. A corpus whose draw would
hold more than `tokenizer.train_bytes` of text is drawn at a smaller fraction, so the cap does not
cut away the last-listed sources. The sample is drawn into the object store, then one Ray task
reads it and trains the tokenizer, so the driver never holds the texts; it stops reading at
`tokenizer.train_bytes` whatever the draw held.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray

from cluster.data.text import hash_unit
from cluster.data.tokenizer import TokenizerConfig, train_tokenizer_json, wrap_tokenizer

# Salts the sample's draw apart from the split's (salt = split.seed) and the weight copies' (7).
SAMPLE_SALT = 2**32


# The draw aims this far under `tokenizer.train_bytes`: a hash draw's bytes vary around their
# expectation, and what passes the cap is cut in corpus order (the last-listed sources' documents).
BYTES_MARGIN = 0.95


def sample_fraction(n_train: int, train_docs: int, train_bytes: int = 0, cap_bytes: int = 0) -> float:
    """The share of training documents the sample takes: `train_docs` of the `n_train`, and no more
    than keeps the draw under `cap_bytes` of the `train_bytes` the training documents hold (the
    draw stays a sample of every source instead of being cut at the cap in corpus order); all of
    them when they are few and small enough."""
    fraction = 1.0 if n_train <= train_docs else train_docs / n_train
    if cap_bytes and train_bytes > cap_bytes:
        fraction = min(fraction, BYTES_MARGIN * cap_bytes / train_bytes)
    return fraction


def sample_batch(batch: pa.Table, fraction: float, seed: int) -> pa.Table:
    """The batch's training rows the draw picks, as (source, text)."""
    splits, digests = batch.column("split").to_pylist(), batch.column("hash").to_pylist()
    keep = [split == "train" and (fraction >= 1.0 or hash_unit(digest, salt=SAMPLE_SALT + seed) < fraction)
            for split, digest in zip(splits, digests, strict=True)]
    return batch.filter(pa.array(keep, pa.bool_())).select(["source", "text"])


def _texts(sample: Any, train_bytes: int, seen: Counter, totals: dict[str, int]) -> Iterator[str]:
    """The sample's texts in order, counted per source, until `train_bytes` of text were read."""
    for batch in sample.iter_batches(batch_format="pyarrow", batch_size=1024):
        for source, text in zip(batch.column("source").to_pylist(), batch.column("text").to_pylist(), strict=True):
            size = len(text.encode("utf-8"))
            if totals["bytes"] + size > train_bytes and totals["documents"]:
                totals["capped"] = 1
                return
            seen[source] += 1
            totals["documents"] += 1
            totals["bytes"] += size
            yield text


@ray.remote(num_cpus=1)
def _train(sample: Any, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    config = TokenizerConfig.model_validate(cfg)
    seen: Counter = Counter()
    totals = {"documents": 0, "bytes": 0, "capped": 0}
    body = train_tokenizer_json(_texts(sample, config.train_bytes, seen, totals), config)
    return body, {"documents": totals["documents"], "bytes": totals["bytes"], "capped": bool(totals["capped"]),
                  "per_source": dict(sorted(seen.items()))}


def train_on_sample(kept: Any, cfg: TokenizerConfig, seed: int, n_train: int,
                    train_bytes: int = 0) -> tuple[Any, dict[str, Any]]:
    """(the trained PreTrainedTokenizerFast, what its sample held: documents, bytes, per source),
    or (None, {"documents": 0}) when `kept` has no training document. `n_train`, `train_bytes`:
    how many training documents it has and their bytes of text (the counts know them: no pass over
    the corpus to count them)."""
    if n_train == 0:
        return None, {"documents": 0}
    fraction = sample_fraction(n_train, cfg.train_docs, train_bytes, cfg.train_bytes)
    # Drawn before the training task starts: that task holds a CPU while it reads, and a pipeline
    # still running behind it would wait for a CPU it holds (a 1-CPU cluster never finished).
    sample = kept.map_batches(sample_batch, fn_kwargs={"fraction": fraction, "seed": seed},
                               batch_format="pyarrow").materialize()
    body, seen = ray.get(_train.remote(sample, cfg.model_dump()))
    if not seen["documents"]:
        return None, seen
    return wrap_tokenizer(body, cfg), {"fraction": round(fraction, 6), **seen}
