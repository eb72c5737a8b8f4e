"""The duplicated texts' lowest keys (`cluster.data.duplicates`): merged from hash-sorted blocks
cut anywhere, looked up by binary search, the same answer as a Python dict of every text."""

import numpy as np
import pyarrow as pa
import pytest

from cluster.data.duplicates import digests, duplicate_rows, duplicated_in_block, merge_duplicated


def corpus(n: int, distinct: int, seed: int) -> pa.Table:
    """`n` documents drawn from `distinct` texts, hashes with many zero bytes (numpy's "S" strings
    pad with zeros: a hash ending in zero bytes must still be told apart from its prefix)."""
    rng = np.random.default_rng(seed)
    texts = [bytes(rng.integers(0, 3, 16, dtype=np.uint8)) for _ in range(distinct)]
    texts += [b"\0" * 16, b"\0" * 15 + b"\1", b"\1" + b"\0" * 15]
    picks = rng.integers(0, len(texts), n)
    return pa.table({"hash": pa.array([texts[i] for i in picks], pa.binary(16)),
                     "key": pa.array(rng.permutation(n), pa.int64())})


def expected_copies(table: pa.Table) -> list[bool]:
    lowest: dict[bytes, int] = {}
    count: dict[bytes, int] = {}
    for h, k in zip(table.column("hash").to_pylist(), table.column("key").to_pylist(), strict=True):
        lowest[h] = min(k, lowest.get(h, k))
        count[h] = count.get(h, 0) + 1
    return [count[h] > 1 and lowest[h] != k
            for h, k in zip(table.column("hash").to_pylist(), table.column("key").to_pylist(), strict=True)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_copies_found_from_sorted_blocks_cut_anywhere(seed):
    table = corpus(3000, 700, seed)
    ordered = table.sort_by("hash")
    rng = np.random.default_rng(seed)
    cuts = sorted({0, table.num_rows, *rng.integers(0, table.num_rows, 25).tolist()})
    parts = [duplicated_in_block(ordered.slice(a, b - a)) for a, b in zip(cuts, cuts[1:], strict=False)]
    first = merge_duplicated(*parts)
    want = expected_copies(table)
    assert duplicate_rows(table.column("hash"), table.column("key").to_numpy(), first).tolist() == want
    # a slice of a block (Arrow offset) and a chunked column answer the same
    sliced = table.slice(1234, 500)
    assert duplicate_rows(sliced.column("hash"), sliced.column("key").to_numpy(), first).tolist() == want[1234:1734]
    chunked = pa.chunked_array([table.column("hash").chunk(0)[:10], table.column("hash").chunk(0)[10:]])
    assert duplicate_rows(chunked, table.column("key").to_numpy(), first).tolist() == want
    # every duplicated text once, sorted, its lowest key beside it
    hashes, keys = first
    lowest: dict[bytes, list[int]] = {}
    for h, k in zip(table.column("hash").to_pylist(), table.column("key").to_pylist(), strict=True):
        lowest.setdefault(h, []).append(k)
    many = {h: min(ks) for h, ks in lowest.items() if len(ks) > 1}
    assert [bytes(h).ljust(16, b"\0") for h in hashes] == sorted(many)
    assert keys.tolist() == [many[h] for h in sorted(many)]


def test_no_duplicates_and_no_rows():
    table = corpus(50, 50_000, 3)  # (almost surely) all distinct
    first = merge_duplicated(duplicated_in_block(table.sort_by("hash")))
    assert not duplicate_rows(table.column("hash"), table.column("key").to_numpy(), first).any()
    assert duplicate_rows(table.column("hash"), table.column("key").to_numpy(), None).tolist() == [False] * 50
    assert merge_duplicated()[0].shape == (0,)
    empty = table.slice(0, 0)
    assert duplicate_rows(empty.column("hash"), empty.column("key").to_numpy(), first).shape == (0,)


def test_digests_are_the_hash_bytes():
    hashes = [b"\0" * 16, b"ab" + b"\0" * 14, bytes(range(16))]
    assert [bytes(x).ljust(16, b"\0") for x in digests(pa.array(hashes, pa.binary()))] == hashes
    with pytest.raises(ValueError, match="missing"):
        digests(pa.array([hashes[0], None], pa.binary(16)))
