"""Storage on an object store (RAYLM_STORAGE=s3://...): the pieces that differ from a local disk,
against moto's S3 server (tests/conftest.py: s3_env), without Ray."""

from __future__ import annotations

import json
import os
import uuid

import pyarrow.fs as pafs
import pytest

from cluster import storage
from tests.conftest import S3_BUCKET


@pytest.fixture
def s3_root(s3_env) -> str:
    return f"s3://{S3_BUCKET}/unit-{uuid.uuid4().hex[:8]}"


def test_a_path_inside_a_filesystem_becomes_a_uri_that_opens_it_again(s3_root, tmp_path):
    storage.write_text_atomic(storage.join(s3_root, "ckpt", "config.json"), "{}")
    fs, path = storage.filesystem(storage.join(s3_root, "ckpt"))
    assert not path.startswith("s3://")  # what Ray's Checkpoint.path holds
    uri = storage.location(fs, path)
    assert uri == storage.join(s3_root, "ckpt")
    assert storage.read_text(storage.join(uri, "config.json")) == "{}"
    assert storage.location(pafs.LocalFileSystem(), str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="subtree"):
        storage.location(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "x")


def test_a_ray_checkpoint_in_s3_is_summarised_with_its_scheme(s3_root):
    """Ray's Checkpoint.path is 'bucket/key': a summary that kept it named a local path, so
    fine-tuning a pretrain run by name took it for a hub id."""
    from ray.train import Checkpoint

    from cluster.pretrain import checkpoint_location

    fs, path = storage.filesystem(storage.join(s3_root, "checkpoint_0000010"))
    assert checkpoint_location(Checkpoint(path, filesystem=fs)) == storage.join(s3_root, "checkpoint_0000010")
    assert checkpoint_location(None) is None


def test_listdir_names_the_entries_of_local_and_s3_folders(s3_root, tmp_path):
    for root in (s3_root, str(tmp_path)):
        storage.write_text_atomic(storage.join(root, "run", "workers", "rank-1.json"), "{}")
        storage.write_text_atomic(storage.join(root, "run", "workers", "rank-0.json"), "{}")
        storage.write_text_atomic(storage.join(root, "run", "config.yaml"), "")
        assert storage.listdir(storage.join(root, "run")) == ["config.yaml", "workers"]
        assert storage.listdir(storage.join(root, "run", "workers")) == ["rank-0.json", "rank-1.json"]
        assert storage.listdir(storage.join(root, "no-such-run")) == []


def test_a_resumed_run_in_s3_finds_its_latest_checkpoint_state(s3_root):
    """The driver checks a resumed run's tokenizer against the corpus's from the latest checkpoint's
    state; on a URI it used to find none, so the check never ran there."""
    from cluster.pretrain import latest_checkpoint_state

    run = storage.join(s3_root, "pretrain", "r")
    assert latest_checkpoint_state(run) is None
    for step in (5, 10):
        storage.write_json_atomic(storage.join(run, f"checkpoint_{step:07d}", "train_state", "state.json"),
                                  {"step": step, "tokenizer_hash": "abc"})
    storage.write_text_atomic(storage.join(run, "checkpoint_0000015", "config.json"), "{}")  # no state: skipped
    assert latest_checkpoint_state(run) == {"step": 10, "tokenizer_hash": "abc"}


def test_metrics_in_s3_keep_the_rows_of_the_attempt_a_run_resumes(s3_root):
    """An object store cannot append, so metrics.jsonl is rewritten whole; a resumed run (or a
    restarted worker) used to start from no rows and erase the earlier attempt's."""
    from cluster.train import MetricsSink

    run = storage.join(s3_root, "pretrain", "m")
    first = MetricsSink(run, "m", enabled=True)
    first.log({"step": 10, "split": "train", "train_loss": 3.0})
    first.log({"step": 20, "split": "train", "train_loss": 2.5})
    first.close()
    resumed = MetricsSink(run, "m", enabled=True)
    resumed.log({"step": 30, "split": "train", "train_loss": 2.0})
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]


def test_the_tokenizer_of_a_corpus_in_s3_is_copied_to_a_local_folder_once(s3_root, tmp_path, monkeypatch):
    """Workers load the tokenizer from a local folder; pyarrow wrote into a folder that did not exist,
    so pretraining on any corpus in S3 failed at its first worker."""
    import tempfile

    from cluster.corpus import Corpus

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    corpus_uri = storage.join(s3_root, "prepare", "c")
    storage.write_text_atomic(storage.join(corpus_uri, "tokenizer", "tokenizer.json"), '{"version": "1.0"}')
    storage.write_text_atomic(storage.join(corpus_uri, "tokenizer", "tokenizer_config.json"), "{}")
    corpus = Corpus(corpus_uri, {"tokenizer": {"path": "tokenizer", "hash": "h" + uuid.uuid4().hex[:8]}})
    local = corpus.local_tokenizer_dir()
    assert local.startswith(str(tmp_path)) and sorted(os.listdir(local)) == ["tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(local, "tokenizer.json")) as f:
        assert f.read() == '{"version": "1.0"}'
    assert corpus.local_tokenizer_dir() == local
    # no half-copied folders left beside it
    assert os.listdir(os.path.dirname(local)) == [os.path.basename(local)]


def test_an_appender_appends_locally_and_rewrites_in_s3_from_what_was_there(s3_root, tmp_path):
    for path in (storage.join(s3_root, "a", "rows.jsonl"), str(tmp_path / "a" / "rows.jsonl")):
        first = storage.Appender(path)  # the folder does not exist yet
        first.write("1\n")
        first.write("2\n")
        storage.Appender(path).write("3\n")
        assert storage.read_text(path) == "1\n2\n3\n"


def test_a_run_begins_by_removing_what_says_an_earlier_attempt_finished(s3_root, tmp_path):
    from cluster.config import Section
    from cluster.runs import RunDir

    class Cfg(Section):
        x: int = 1

    for root in (s3_root, str(tmp_path)):
        run = RunDir("prepare", "r", root).begin(Cfg())
        storage.write_text_atomic(run.summary_path, "{}")
        storage.write_text_atomic(run.file("manifest.json"), "{}")
        storage.write_text_atomic(run.file("shards", "train", "a.parquet"), "")
        storage.write_text_atomic(run.file("metrics.jsonl"), "kept\n")
        RunDir("prepare", "r", root).begin(Cfg(x=2), "manifest.json", "shards", "not-there")
        assert storage.listdir(run.path) == ["config.yaml", "metrics.jsonl"]
        assert "x: 2" in storage.read_text(run.file("config.yaml"))


def test_a_storage_that_cannot_be_written_is_named_when_a_run_begins(s3_env, tmp_path):
    from cluster.config import Section
    from cluster.entry import JobError
    from cluster.runs import RunDir

    (tmp_path / "file").write_text("not a folder")
    for root in ("s3://no-such-bucket/runs", str(tmp_path / "file" / "runs")):
        with pytest.raises(JobError, match=r"storage '.*/runs/tune/r' is not writable"):
            RunDir("tune", "r", root).begin(Section())
