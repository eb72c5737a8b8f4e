"""Near-duplicate removal: MinHash signatures, LSH bands grouped across the cluster, one document
kept per connected component of similar documents.

The unit is a distinct text (its content hash): exact copies are exact de-duplication's business,
so two copies of one text are never each other's near-duplicate, and every copy of a text found
near-duplicate goes with it. Per text, `num_perm` MinHash values over its word n-grams (each CJK
ideograph a word); the signature is cut into `bands` bands of `rows` values, and texts that share
a band's values in any band are candidates (Ray Data sorts the bands' buckets across the cluster).
A candidate pair is kept when its signatures agree on at least `threshold` of their values (the
estimated Jaccard similarity), which removes LSH's false positives. The candidate pairs and their
signatures, both in proportion to the near-duplicates, are grouped and joined by two Ray tasks; the
driver holds a reference to the result and its count, never anything in proportion to the corpus.
In each connected component the text with the lowest document key is kept; the others are dropped
with reason `near_duplicate`.

Why not datasketch: its MinHash is an object per document fed one shingle at a time; here one
numpy expression signs a whole text, the shingle hash (crc32) is the same in every worker process
(Python's `hash` is salted per process), and the LSH index must be Ray's grouping, not an
in-memory dict.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from pydantic import Field, model_validator

from cluster.config import Section
from cluster.data.duplicates import digests, lookup, sort_blocks

DROP_NEAR_DUPLICATE = "near_duplicate"
_PRIME = np.uint64((1 << 61) - 1)
_WORD_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


class NearDedupConfig(Section):
    threshold: float = Field(0.8, gt=0, lt=1, description="estimated Jaccard similarity at which two texts are near-duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash values per text")
    ngram: int = Field(5, ge=1, le=32, description="words per shingle (a CJK ideograph is a word)")
    bands: int = Field(16, ge=1, description="LSH bands (num_perm / bands values each): more bands find less similar pairs")
    seed: int = Field(0, description="seed of the MinHash permutations")

    @model_validator(mode="after")
    def _bands_divide(self) -> NearDedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm {self.num_perm} must be a multiple of bands {self.bands}")
        return self


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # (a * x + b) mod p with a, b drawn below the Mersenne prime p = 2^61 - 1, as MinHash is usually
    # computed (datasketch too): the product wraps modulo 2^64 first, which mixes the bits. With a
    # and x both below 2^32 there is no wrap and the smallest shingle hashes win most permutations.
    rng = np.random.default_rng(seed)
    return (rng.integers(1, int(_PRIME), num_perm, dtype=np.uint64), rng.integers(0, int(_PRIME), num_perm, dtype=np.uint64))


def signature(text: str, ngram: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint32[num_perm]: the minimum of each permuted hash over the text's word n-grams."""
    words = _WORD_RE.findall(text.lower())
    n = max(1, len(words) - ngram + 1)
    shingles = {" ".join(words[i:i + ngram]) for i in range(n)}
    x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64, count=len(shingles))
    return (((x[:, None] * a[None, :] + b[None, :]) % _PRIME).min(axis=0) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def signature_batch(batch: pa.Table, cfg: dict[str, Any]) -> pa.Table:
    """One row per kept document: key, hash and signature (documents already dropped are left out)."""
    a, b = _permutations(cfg["num_perm"], cfg["seed"])
    keep = [not d for d in batch.column("drop").to_pylist()]
    rows = batch.filter(pa.array(keep, pa.bool_()))
    sigs = [signature(t, cfg["ngram"], a, b).tobytes() for t in rows.column("text").to_pylist()]
    return pa.table({"key": rows.column("key"), "hash": rows.column("hash"), "sig": pa.array(sigs, pa.binary())})


def band_batch(batch: pa.Table, bands: int) -> pa.Table:
    """Each signature cut into `bands` buckets: (band, bucket, key, hash) rows."""
    out: dict[str, list] = {"band": [], "bucket": [], "key": [], "hash": []}
    for key, digest, sig in zip(*(batch.column(c).to_pylist() for c in ("key", "hash", "sig")), strict=True):
        width = len(sig) // bands
        for band in range(bands):
            out["band"].append(band)
            digest8 = hashlib.blake2b(sig[band * width:(band + 1) * width], digest_size=8).digest()
            out["bucket"].append(int.from_bytes(digest8, "little", signed=True))
            out["key"].append(key)
            out["hash"].append(digest)
    return pa.table({"band": pa.array(out["band"], pa.int32()), "bucket": pa.array(out["bucket"], pa.int64()),
                     "key": pa.array(out["key"], pa.int64()), "hash": pa.array(out["hash"], pa.binary())})


def shared_in_block(batch: pa.Table) -> pa.Table:
    """The rows of a block sorted by (band, bucket) whose bucket holds more than one row in it, and
    those of its first and last bucket whatever their size (a bucket can straddle two blocks)."""
    if not batch.num_rows:
        return batch
    band, bucket = batch.column("band").to_numpy(), batch.column("bucket").to_numpy()
    starts = np.concatenate([[True], (band[1:] != band[:-1]) | (bucket[1:] != bucket[:-1])])
    group = np.cumsum(starts) - 1
    size = np.bincount(group)
    keep = (size[group] > 1) | (group == 0) | (group == group[-1])
    return batch.filter(pa.array(keep))


def bucket_pairs(group: pa.Table) -> pa.Table:
    """Candidate pairs of one bucket: each distinct text (by hash, at its lowest key) paired with
    the bucket's lowest-keyed text. A bucket of one text yields none."""
    first: dict[bytes, int] = {}
    for key, digest in zip(group.column("key").to_pylist(), group.column("hash").to_pylist(), strict=True):
        first[digest] = min(key, first.get(digest, key))
    texts = sorted((key, digest) for digest, key in first.items())
    root = texts[0][1] if texts else b""
    others = [digest for _, digest in texts[1:]]
    return pa.table({"a": pa.array([root] * len(others), pa.binary()), "b": pa.array(others, pa.binary())})


def _root(parent: dict[bytes, bytes], x: bytes) -> bytes:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def components_to_drop(pairs: list[tuple[bytes, bytes]], sigs: dict[bytes, tuple[int, np.ndarray]],
                       threshold: float) -> set[bytes]:
    """Hashes to drop: of each connected component of pairs whose signatures agree on at least
    `threshold` of their values, all but the text with the lowest key. `sigs`: hash -> (lowest key,
    signature)."""
    parent: dict[bytes, bytes] = {}
    for x, y in pairs:
        if float(np.mean(sigs[x][1] == sigs[y][1])) < threshold:
            continue
        parent.setdefault(x, x)
        parent.setdefault(y, y)
        rx, ry = _root(parent, x), _root(parent, y)
        if rx != ry:  # the root is the text with the lowest key
            keep, other = (rx, ry) if sigs[rx][0] < sigs[ry][0] else (ry, rx)
            parent[other] = keep
    return {x for x in parent if _root(parent, x) != x}


def candidate_pairs(*parts: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """One task: what `shared_in_block` sent from each (band, bucket)-sorted block, in order ->
    (the candidate pairs (a, b), distinct; the sorted hashes they involve, numpy "S16"). Work and
    memory in proportion to the near-duplicates: the rest of the corpus never reaches here."""
    parts = tuple(p for p in parts if p.num_rows)
    if not parts:
        return pa.table({"a": pa.array([], pa.binary()), "b": pa.array([], pa.binary())}), np.zeros(0, dtype="S16")
    table = pa.concat_tables(parts).sort_by([("band", "ascending"), ("bucket", "ascending")])
    band, bucket = table.column("band").to_numpy(), table.column("bucket").to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], (band[1:] != band[:-1]) | (bucket[1:] != bucket[:-1]), [True]]))
    pairs: set[tuple[bytes, bytes]] = set()
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        if end - start > 1:
            found = bucket_pairs(table.slice(start, end - start))
            pairs.update(zip(found.column("a").to_pylist(), found.column("b").to_pylist(), strict=True))
    ordered = sorted(pairs)
    out = pa.table({"a": pa.array([x for x, _ in ordered], pa.binary()), "b": pa.array([y for _, y in ordered], pa.binary())})
    involved = np.unique(np.concatenate([digests(out.column("a")), digests(out.column("b"))])) if ordered else \
        np.zeros(0, dtype="S16")
    return out, involved


def in_sorted(hashes: pa.Array | pa.ChunkedArray, sorted_hashes: np.ndarray | ray.ObjectRef) -> np.ndarray:
    """True for each content hash found in `sorted_hashes` (numpy "S16", or its reference)."""
    table = ray.get(sorted_hashes) if isinstance(sorted_hashes, ray.ObjectRef) else sorted_hashes
    return lookup(table, hashes)[0]


def involved_rows(batch: pa.Table, involved: np.ndarray | ray.ObjectRef) -> pa.Table:
    """The signature rows of the texts some candidate pair involves."""
    return batch.filter(pa.array(in_sorted(batch.column("hash"), involved)))


def texts_to_drop(pairs: pa.Table, threshold: float, *sig_parts: pa.Table) -> tuple[np.ndarray, int]:
    """One task: the candidate pairs and their texts' signatures -> (the hashes to drop, sorted numpy
    "S16"; how many)."""
    found: dict[bytes, tuple[int, np.ndarray]] = {}
    for part in sig_parts:
        for key, digest, sig in zip(*(part.column(c).to_pylist() for c in ("key", "hash", "sig")), strict=True):
            if digest not in found or key < found[digest][0]:
                found[digest] = (key, np.frombuffer(sig, dtype=np.uint32))
    pairs_list = list(zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist(), strict=True))
    drop = np.sort(np.array(list(components_to_drop(pairs_list, found, threshold)), dtype="S16"))
    return drop, len(drop)


_pairs_task = ray.remote(num_cpus=1, num_returns=2)(candidate_pairs)
_drop_task = ray.remote(num_cpus=1, num_returns=2)(texts_to_drop)


def near_duplicates(cleaned: Any, cfg: NearDedupConfig) -> tuple[ray.ObjectRef, int]:
    """(the reference to the sorted content hashes of the texts `cleaned` (rows with key, hash, text,
    drop) holds that are near-duplicates of a text with a lower key; how many). The driver holds
    the reference and the count: the buckets, pairs and signatures go from Ray Data's blocks to
    two tasks (`candidate_pairs`, `texts_to_drop`) through the object store."""
    sigs = cleaned.map_batches(signature_batch, fn_kwargs={"cfg": cfg.model_dump()}, batch_format="pyarrow").materialize()
    bands = sigs.map_batches(band_batch, fn_kwargs={"bands": cfg.bands}, batch_format="pyarrow")
    # Sorted by bucket, each block keeps its shared buckets (Arrow-speed) and one task groups what is
    # left: rows in proportion to the near-duplicates. Ray Data's groupby().map_groups() calls Python
    # once per bucket, i.e. `bands` times per document.
    shared = sort_blocks(bands).sort(["band", "bucket"]).map_batches(shared_in_block, batch_format="pyarrow",
                                                                     batch_size=None)
    pairs, involved = _pairs_task.remote(*shared.to_arrow_refs())
    sig_parts = sigs.map_batches(involved_rows, fn_kwargs={"involved": involved}, batch_format="pyarrow")
    drop, count = _drop_task.remote(pairs, cfg.threshold, *sig_parts.to_arrow_refs())
    return drop, ray.get(count)


def mark_batch(batch: pa.Table, hashes: np.ndarray | ray.ObjectRef) -> pa.Table:
    """Every not yet dropped row whose text is a near-duplicate (its hash in `hashes`, sorted numpy
    "S16" or their reference) gets drop reason `near_duplicate`."""
    near = in_sorted(batch.column("hash"), hashes)
    drops = [DROP_NEAR_DUPLICATE if not d and n else d for d, n in zip(batch.column("drop").to_pylist(), near, strict=True)]
    i = batch.column_names.index("drop")
    return batch.set_column(i, pa.field("drop", pa.string()), pa.array(drops, pa.string()))
