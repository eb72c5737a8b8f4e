"""Exact duplicates without the driver: the lowest key of every text kept more than once, as two
sorted numpy arrays (16-byte content hashes, keys) that live in Ray's object store.

The driver holds a reference to them and nothing in proportion to the corpus: the arrays are built
by one task from what the hash-sorted blocks send (`merge_duplicated`), and every block looks its
rows up in them by binary search (`duplicate_rows`), ~1 ms for 4,096 rows against 300,000 texts.
Arrow's `is_in` / `index_in` rebuild a hash table of the whole value set on every call (~45 ms for
300,000 hashes). Before, the driver gathered a dict of the duplicated hashes and a set of the
duplicate keys, and passed the set to every selecting task.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

# (hashes sorted, as numpy "S16"; the lowest key of each); or the ObjectRef of such a pair.
Duplicated = tuple[np.ndarray, np.ndarray]
NONE: Duplicated = (np.zeros(0, dtype="S16"), np.zeros(0, dtype=np.int64))


def digests(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column of 16-byte content hashes as a numpy "S16" array (no Python object per row). Numpy
    compares "S16" values byte by byte over all 16 bytes, so sorting and equality are the bytes'."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(pa.binary(16)) if arr.type != pa.binary(16) else arr
    if arr.null_count:
        raise ValueError("a content hash is missing")
    return np.frombuffer(arr.buffers()[1], dtype="S16", count=len(arr), offset=arr.offset * 16)


def resolve(duplicated: Duplicated | ray.ObjectRef | None) -> Duplicated:
    """The arrays, fetched (zero-copy) when given their reference."""
    if duplicated is None:
        return NONE
    return ray.get(duplicated) if isinstance(duplicated, ray.ObjectRef) else duplicated


def duplicate_rows(hashes: pa.Array | pa.ChunkedArray, keys: np.ndarray,
                   duplicated: Duplicated | ray.ObjectRef | None) -> np.ndarray:
    """True for each row whose text is kept more than once and whose key is not its lowest: the
    copies that de-duplication drops."""
    sorted_hashes, lowest = resolve(duplicated)
    found, at = lookup(sorted_hashes, hashes)
    return found & (lowest[at] != np.asarray(keys)) if found.any() else found


def lookup(sorted_hashes: np.ndarray, hashes: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(whether each of `hashes` is in `sorted_hashes` (numpy "S16", sorted), where it is there (0
    where not)), by binary search."""
    if not len(sorted_hashes) or not len(hashes):
        return np.zeros(len(hashes), dtype=bool), np.zeros(len(hashes), dtype=np.int64)
    h = digests(hashes)
    at = np.minimum(np.searchsorted(sorted_hashes, h), len(sorted_hashes) - 1)
    found = sorted_hashes[at] == h
    return found, np.where(found, at, 0)


def duplicated_in_block(batch: pa.Table) -> pa.Table:
    """(hash, key_min, key_count) of a hash-sorted block's texts that occur more than once in it,
    and of its first and last text whatever their count (a text can straddle two blocks)."""
    groups = batch.group_by("hash").aggregate([("key", "min"), ("key", "count")])
    if not batch.num_rows:
        return groups
    ends = pa.array([batch.column("hash")[0].as_py(), batch.column("hash")[-1].as_py()], batch.schema.field("hash").type)
    keep = pc.or_(pc.greater(groups.column("key_count"), 1), pc.is_in(groups.column("hash"), value_set=ends))
    return groups.filter(keep)


def merge_duplicated(*parts: pa.Table) -> Duplicated:
    """What `duplicated_in_block` sent from every block, merged: the texts counted more than once
    in all, sorted by hash, with their lowest key. Memory in proportion to the duplicated texts
    and the number of blocks, never to the corpus."""
    parts = tuple(p for p in parts if p.num_rows)
    if not parts:
        return NONE
    table = pa.concat_tables(parts).group_by("hash").aggregate([("key_min", "min"), ("key_count", "sum")])
    table = table.filter(pc.greater(table.column("key_count_sum"), 1))
    hashes = digests(table.column("hash"))
    order = np.argsort(hashes, kind="stable")
    return hashes[order].copy(), table.column("key_min_min").to_numpy()[order].copy()


# Rows per block going into a sort. Ray Data's sort-based shuffle makes (blocks in) x (blocks out)
# intermediate objects, each owned by the driver (~4 KB of its memory apiece): sorting the hash and
# key pairs of a 2M-document corpus in its 300 read blocks took the driver +460 MB and 19 s, the
# same pairs gathered into blocks of 2^18 rows +3 MB and 1.6 s. A pair is 24 bytes, so a block of
# 2^20 pairs is ~24 MB and a corpus of 50M documents sorts as ~50 blocks.
SORT_BLOCK_ROWS = 2**20


def _same(batch: pa.Table) -> pa.Table:
    return batch


def sort_blocks(ds: ray.data.Dataset, rows: int = SORT_BLOCK_ROWS) -> ray.data.Dataset:
    """`ds` in blocks of about `rows` rows (map tasks bundle the blocks, no shuffle), for a sort."""
    return ds.map_batches(_same, batch_format="pyarrow", batch_size=rows)


_merge_task = ray.remote(num_cpus=1)(merge_duplicated)


def duplicated_texts(kept: ray.data.Dataset) -> ray.ObjectRef:
    """The reference to `merge_duplicated` over `kept` (the kept documents' hash and key columns),
    computed across the cluster: Ray Data sorts the pairs by hash (in few large blocks:
    `SORT_BLOCK_ROWS`), each sorted block counts its own texts with Arrow's group-by, and one task
    merges what the blocks send. Ray Data's own groupby().aggregate() took ~15 s for 240,000 texts
    on 2 cores (a Python call per group); this takes ~1 s."""
    per_block = sort_blocks(kept).sort("hash").map_batches(duplicated_in_block, batch_format="pyarrow", batch_size=None)
    return _merge_task.remote(*per_block.to_arrow_refs())
