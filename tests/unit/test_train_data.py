"""The first epoch's batches are fetched ahead, while the model is built (no Ray here)."""

import threading

import pytest

from cluster.train.batches import FirstBatchAhead


class Recording:
    """An iterator that says when its first item was asked for."""

    def __init__(self, items, fail=None):
        self.items, self.fail, self.asked = list(items), fail, threading.Event()

    def __iter__(self):
        self.asked.set()
        if self.fail:
            raise self.fail
        yield from self.items


def test_the_first_batch_is_fetched_before_anyone_iterates_and_nothing_is_lost_or_repeated():
    source = Recording(range(5))
    ahead = FirstBatchAhead(3, source)
    assert source.asked.wait(timeout=10), "the first batch was not requested ahead of the loop"
    assert ahead.epoch == 3
    assert list(ahead) == [0, 1, 2, 3, 4]


def test_an_empty_epoch_yields_nothing_and_an_error_surfaces_in_the_loop():
    assert list(FirstBatchAhead(0, Recording([]))) == []
    ahead = FirstBatchAhead(0, Recording([1], fail=RuntimeError("read failed: shard-00003.parquet")))
    with pytest.raises(RuntimeError, match="shard-00003"):
        list(ahead)


def test_the_resume_epoch_comes_from_the_checkpoint_state_file(tmp_path):
    import json

    import ray.train

    from cluster.train.batches import resume_epoch
    from cluster.train.checkpoint import STATE_DIR

    class Session:
        def __init__(self, ckpt):
            self.ckpt = ckpt

        def checkpoint(self):
            return self.ckpt

    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "state.json").write_text(json.dumps({"step": 40, "epoch": 2, "batches_in_epoch": 7}))
    assert resume_epoch(Session(ray.train.Checkpoint.from_directory(str(tmp_path)))) == 2
    assert resume_epoch(Session(None)) == 0


def test_the_shard_order_of_each_epoch_is_pinned_by_seed_and_epoch():
    """A resumed run re-reads its epoch in this order and skips the batches it consumed, so the order
    must not change between versions of raylm (nor between the bench and jobs.pretrain)."""
    from cluster.data.ingest import shard_order

    assert shard_order(6, 0, 0) == [3, 2, 5, 4, 0, 1]
    assert shard_order(6, 0, 1) == [1, 4, 3, 0, 2, 5]
    assert shard_order(6, 1, 0) == [4, 0, 2, 1, 5, 3]
    assert all(type(i) is int for i in shard_order(6, 0, 0))
