"""A small validation split read by each training worker itself (`cluster.data.ingest.RankSlice`): every
rank gets an equal, disjoint, in-order share, as Ray Data's `streaming_split(equal=True)` gives it
(no Ray here; tests/integration/test_pretrain.py checks it against Ray Data's own read)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.extensions import ArrowTensorArray

from cluster.data.ingest import RankSlice

BLOCK = 4


def write_shards(tmp_path, sizes):
    """Shards of BLOCK-token rows; row r (counted over all shards) holds r*BLOCK .. r*BLOCK+3."""
    shards, first = [], 0
    for i, n in enumerate(sizes):
        ids = np.arange(first * BLOCK, (first + n) * BLOCK, dtype=np.int32).reshape(n, BLOCK)
        path = str(tmp_path / f"validation-{i:05d}.parquet")
        pq.write_table(pa.table({"input_ids": ArrowTensorArray.from_numpy(ids), "extra": np.arange(n)}), path)
        shards.append({"path": path, "rows": n})
        first += n
    return shards


def rows_of(rank_slice, batch_size):
    batches = list(rank_slice.iter_batches(batch_size=batch_size, batch_format="numpy"))
    for b in batches:
        assert set(b) == {"input_ids"}  # only the requested columns
        assert isinstance(b["input_ids"], np.ndarray) and b["input_ids"].shape[1:] == (BLOCK,)
    return [len(b["input_ids"]) for b in batches], [int(r[0]) // BLOCK for b in batches for r in b["input_ids"]]


def test_ranks_get_equal_disjoint_in_order_shares_and_the_remainder_is_dropped(tmp_path):
    shards = write_shards(tmp_path, [5, 7, 4])  # 16 rows
    got = [rows_of(RankSlice(shards, ["input_ids"], rank, 3), batch_size=2) for rank in range(3)]
    assert [rows for _, rows in got] == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]
    assert [sizes for sizes, _ in got] == [[2, 2, 1]] * 3  # the same number of batches on every rank
    assert rows_of(RankSlice(shards, ["input_ids"], 0, 1), batch_size=16) == ([16], list(range(16)))


def test_only_the_shards_holding_the_ranks_rows_are_read(tmp_path):
    shards = write_shards(tmp_path, [5, 7, 4])
    (tmp_path / "validation-00002.parquet").unlink()  # rank 0 of 2 (rows 0-7) never needs it
    assert rows_of(RankSlice(shards, ["input_ids"], 0, 2), batch_size=8)[1] == list(range(8))
    with pytest.raises(FileNotFoundError):
        list(RankSlice(shards, ["input_ids"], 1, 2).iter_batches(batch_size=8))


def test_a_shard_that_no_longer_matches_the_manifest_is_named(tmp_path):
    shards = write_shards(tmp_path, [5, 7])
    shards[1]["rows"] = 9
    with pytest.raises(ValueError, match=r"validation-00001\.parquet: 7 rows, but the corpus manifest records 9"):
        list(RankSlice(shards, ["input_ids"], 0, 1).iter_batches(batch_size=4))


def test_more_ranks_than_rows_leaves_every_rank_empty(tmp_path):
    shards = write_shards(tmp_path, [2])
    assert [list(RankSlice(shards, None, rank, 3).iter_batches(batch_size=4)) for rank in range(3)] == [[], [], []]
