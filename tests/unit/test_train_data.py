"""Epochs' batches are fetched ahead: the first while the model is built, each next one before the
previous ends (no Ray here)."""

import threading

import pytest

from cluster.train import FirstBatchAhead


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

    from cluster.train import STATE_DIR, resume_epoch

    class Session:
        def __init__(self, ckpt):
            self.ckpt = ckpt

        def checkpoint(self):
            return self.ckpt

    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "state.json").write_text(json.dumps({"step": 40, "epoch": 2, "batches_in_epoch": 7}))
    assert resume_epoch(Session(ray.train.Checkpoint.from_directory(str(tmp_path)))) == 2
    assert resume_epoch(Session(None)) == 0


class Clock:
    """A clock the test advances by hand: one batch takes `per_batch` seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_next_epoch_starts_once_when_the_rest_of_this_one_fits_in_the_lead():
    from cluster.train import with_next_epoch_ahead

    clock, started_at = Clock(), []
    out = []
    for batch in with_next_epoch_ahead(range(100), 100, lambda: started_at.append(len(out)), lead_s=10.0,
                                       clock=clock):
        out.append(batch)
        clock.now += 0.5  # 0.5 s per batch: 10 s is the last 20 batches
    assert out == list(range(100))
    assert started_at == [79]  # (100 - 79 - 1) batches x 0.5 s <= 10 s


def test_a_short_epoch_starts_the_next_at_once_and_a_slow_pipeline_start_does_not_skew_the_pace():
    from cluster.train import with_next_epoch_ahead

    calls = []
    assert list(with_next_epoch_ahead(range(5), 5, lambda: calls.append(1), lead_s=30.0, clock=Clock())) == list(range(5))
    assert calls == [1]

    clock, started_at, seen = Clock(), [], []

    def epoch():
        clock.now += 20.0  # the pipeline's start, before the first batch
        yield from range(1000)

    for batch in with_next_epoch_ahead(epoch(), 1000, lambda: started_at.append(len(seen)), lead_s=30.0, clock=clock):
        seen.append(batch)
        clock.now += 0.1
    assert started_at == [699]  # 300 batches x 0.1 s <= 30 s; the 20 s start is not in the pace
    assert seen == list(range(1000))
