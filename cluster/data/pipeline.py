"""jobs.prepare's per-batch steps, run by Ray Data's `map_batches`: clean + split, tokenize, select
(drop, de-duplicate, weight) + pack into fixed-length blocks or sentence-aware segments, and the
Parquet write of one split with its checksums.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider

from cluster import storage
from cluster.data.duplicates import duplicate_rows
from cluster.data.packing import chunk_sentences, pack_flat, split_of, split_sentences
from cluster.data.text import clean, content_hash, hash_unit


def clean_batch(batch: pa.Table, clean_cfg: dict, split_cfg: dict) -> pa.Table:
    """Cleaned text, drop reason, content hash and split per document; the other columns pass
    through as Arrow (batch_format="pyarrow": no conversion of the columns this stage leaves alone)."""
    texts, drops, hashes, splits = [], [], [], []
    for text, drop in zip(batch.column("text").to_pylist(), batch.column("drop").to_pylist(), strict=True):
        if drop:
            cleaned, reason = "", drop
        else:
            cleaned, reason = clean(
                text,
                clean_cfg["min_chars"],
                clean_cfg["max_chars"],
                clean_cfg["charsets"],
                clean_cfg["min_charset_fraction"],
            )
        digest = content_hash(cleaned)
        texts.append(cleaned)
        drops.append(reason)
        hashes.append(digest)
        splits.append(split_of(digest, split_cfg["validation_fraction"], split_cfg["seed"]))
    out = batch.drop_columns(["text", "drop"])
    for name, values, type_ in (("text", texts, pa.string()), ("drop", drops, pa.string()),
                                ("hash", hashes, pa.binary(16)), ("split", splits, pa.string())):
        out = out.append_column(pa.field(name, type_), pa.array(values, type=type_))
    return out


def weight_copies(digest: bytes, weight: float) -> int:
    """How many times a kept document enters the corpus under its source's weight: floor(w), plus
    one more for a deterministic fraction w - floor(w) of documents (drawn from the content hash)."""
    whole = math.floor(weight)
    return int(whole) + int(weight > whole and hash_unit(digest, salt=7) < weight - whole)


def select_batch(batch: pa.Table, first: Any, weights: dict[str, float], split: str | None = None,
                  to_validation: set[int] | frozenset[int] = frozenset()) -> pa.Table:
    """Drop filtered rows and duplicates (copies of a text in `first`, the duplicated texts' lowest
    keys or their reference: `cluster.data.duplicates`), and rows of other splits when `split` is
    given, the keys in `to_validation` counting as validation; apply each source's weight as a
    deterministic number of copies."""
    keep = pc.equal(batch.column("drop"), "")
    if first is not None:
        copies = duplicate_rows(batch.column("hash"), batch.column("key").to_numpy(), first)
        keep = pc.and_(keep, pa.array(~copies))
    if split is not None:
        in_split = pc.equal(batch.column("split"), split)
        if to_validation:
            moved = pc.is_in(batch.column("key"), pa.array(list(to_validation), pa.int64()))
            in_split = pc.or_(in_split, moved) if split == "validation" else pc.and_(in_split, pc.invert(moved))
        keep = pc.and_(keep, in_split)
    rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
    if any(w != 1.0 for w in weights.values()):  # copies per row, from the content hash
        digests, sources = batch.column("hash").take(rows).to_pylist(), batch.column("source").take(rows).to_pylist()
        rows = np.repeat(rows, [weight_copies(h, weights[src]) for h, src in zip(digests, sources, strict=True)])
    return batch.take(pa.array(rows, type=pa.int64()))


@lru_cache(maxsize=2)
def _rust_tokenizer(tokenizer_json: str) -> Any:
    """One parsed tokenizer per worker process and tokenizer, not one per batch."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


_PASS_THROUGH = ("key", "source", "hash", "drop", "note", "split", "logprob")


def tokenize_batch(batch: pa.Table, tokenizer_json: str, layout: str, max_segment_tokens: int) -> Any:
    """Every kept document's tokens (a filtered one gets none: it may be a huge line) and the
    columns that selection, counting and the manifest need; the text is not carried further."""
    tok = _rust_tokenizer(tokenizer_json)
    texts = ["" if drop else t for t, drop in zip(batch.column("text").to_pylist(), batch.column("drop").to_pylist(),
                                                    strict=True)]
    # UTF-8 bytes of the kept documents' text, counted by Arrow (a filtered document counts none)
    n_bytes = pc.if_else(pc.equal(batch.column("drop"), ""), pc.binary_length(batch.column("text")), 0
                         ).to_numpy(zero_copy_only=False).astype(np.int64)
    passed = batch.select(list(_PASS_THROUGH))  # as Arrow columns, untouched
    if layout == "blocks":
        encs = tok.encode_batch_fast(texts, add_special_tokens=False)
        lens = np.fromiter((len(e) for e in encs), dtype=np.int32, count=len(encs))
        offsets = np.zeros(len(encs) + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        # One flat array and offsets make the Arrow list column directly (no array per document).
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=int(offsets[-1]))
        return pa.table({**{c: passed.column(c) for c in _PASS_THROUGH}, "n_bytes": n_bytes, "n_tokens": lens,
                         "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))})
    out: dict[str, Any] = {c: passed.column(c).to_numpy(zero_copy_only=False) for c in _PASS_THROUGH}
    out["n_bytes"] = n_bytes
    # segments: tokenise sentence by sentence so chunk boundaries fall between sentences
    sentences = [split_sentences(t) for t in texts]
    flat_sents = [s for doc in sentences for s in doc]
    encs = iter(tok.encode_batch_fast(flat_sents, add_special_tokens=False))
    chunks, n_tokens = [], []
    for doc in sentences:
        ids = [np.asarray(next(encs).ids, dtype=np.int32) for _ in doc]
        n_tokens.append(int(sum(len(x) for x in ids)))
        chunks.append(chunk_sentences(ids, max_segment_tokens))
    out["ids"] = [np.concatenate([c[0] for c in ch]) if ch else np.zeros(0, np.int32) for ch in chunks]
    out["chunk_lens"] = [np.asarray([len(c[0]) for c in ch], dtype=np.int32) for ch in chunks]
    out["chunk_sents"] = [np.asarray([len(c[1]) for c in ch], dtype=np.int32) for ch in chunks]
    out["sent_starts"] = [
        np.concatenate([c[1] for c in ch]).astype(np.int32) if ch else np.zeros(0, np.int32) for ch in chunks
    ]
    out["n_tokens"] = n_tokens
    return out


def pack_batch(batch: pa.Table, block_size: int, eod_id: int) -> dict[str, Any]:
    """Blocks straight from the Arrow list column's flat tokens and offsets: converting it to one
    NumPy array per document and back cost more than the packing itself."""
    ids = batch.column("ids").combine_chunks()
    blocks, _tail = pack_flat(ids.flatten().to_numpy(), ids.offsets.to_numpy(), block_size, eod_id)
    return {"input_ids": blocks}


def segment_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """One row per chunk of whole sentences, from the per-document encoding of `tokenize_batch`."""
    rows_ids, rows_starts, rows_doc = [], [], []
    cols = ("ids", "chunk_lens", "chunk_sents", "sent_starts", "key")
    for ids, lens, n_sents, starts, key in zip(*(batch[c] for c in cols), strict=True):
        tok_off = sent_off = 0
        for length, n_sent in zip(lens, n_sents, strict=True):
            rows_ids.append(np.asarray(ids[tok_off : tok_off + length], dtype=np.int32))
            rows_starts.append(np.asarray(starts[sent_off : sent_off + n_sent], dtype=np.int32))
            rows_doc.append(int(key))
            tok_off += int(length)
            sent_off += int(n_sent)
    return {"input_ids": rows_ids, "sentence_starts": rows_starts, "doc_id": rows_doc}


class _ShardNames(FilenameProvider):
    """Deterministic shard names: `<split>-<task>.parquet` (Ray's default has a random id)."""

    def __init__(self, split: str):
        super().__init__(file_format="parquet")
        self.split = split

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.split}-{task_index:05d}.parquet"


def _file_sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_split(ds: ray.data.Dataset, out_dir: str, split: str, rows_per_shard: int) -> list[dict]:
    ds = ds.materialize()
    rows = ds.count()
    if rows == 0:
        return []
    split_dir = storage.join(out_dir, split)
    # OVERWRITE (the split's folder is ours alone) lets shard names carry no random write id.
    ds.repartition(max(1, math.ceil(rows / rows_per_shard))).write_parquet(
        split_dir, filename_provider=_ShardNames(split), mode=SaveMode.OVERWRITE
    )
    fs, base = storage.filesystem(split_dir)
    shards = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda i: i.path):
        name = os.path.basename(info.path)
        if name.startswith(split + "-") and name.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                n = pq.ParquetFile(f).metadata.num_rows
            shards.append({"file": f"shards/{split}/{name}", "split": split, "rows": n,
                           "sha256": _file_sha256(fs, info.path)})
    return shards
