"""Storage on an object store (RAYLM_STORAGE=s3://...): the pieces that differ from a local disk,
against moto's S3 server (tests/conftest.py: s3_env), without Ray."""

from __future__ import annotations

import json
import os
import re
import uuid

import pyarrow.fs as pafs
import pytest

from cluster import storage
from tests.conftest import REPO, S3_BUCKET


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

    from cluster.train.checkpoint import checkpoint_location

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
    from cluster.train.checkpoint import latest_checkpoint_state

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
    from cluster.train.sink import MetricsSink

    run = storage.join(s3_root, "pretrain", "m")
    first = MetricsSink(run, "m", enabled=True)
    first.log({"step": 10, "split": "train", "train_loss": 3.0})
    first.log({"step": 20, "split": "train", "train_loss": 2.5})
    first.close()
    resumed = MetricsSink(run, "m", enabled=True)
    resumed.log({"step": 30, "split": "train", "train_loss": 2.0})
    resumed.flush()
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]


def test_metrics_in_s3_are_held_between_rewrites_and_written_at_a_flush(s3_root, monkeypatch):
    """Each row used to rewrite metrics.jsonl (and the TensorBoard file) in the training loop: four
    requests a row. Rows are now held until REMOTE_FLUSH_S has passed or the loop flushes (before
    each checkpoint, and at the end)."""
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cluster.train import sink as train

    monkeypatch.setattr(train, "REMOTE_FLUSH_S", math.inf)
    run = storage.join(s3_root, "pretrain", "held")
    sink = train.MetricsSink(run, "held", enabled=True)
    for step in (10, 20):
        sink.log({"step": step, "split": "train", "train_loss": 3.0})
    assert not storage.exists(storage.join(run, "metrics.jsonl"))
    sink.flush()
    assert [json.loads(r)["step"] for r in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()] == [10, 20]
    events = EventAccumulator(storage.join(run, "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [10, 20]
    sink.log({"step": 30, "split": "train", "train_loss": 2.0})
    sink.close()
    assert len(storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()) == 3


def test_an_appender_in_s3_writes_at_most_every_so_often(s3_root, tmp_path):
    import math

    held = storage.Appender(storage.join(s3_root, "held.jsonl"), every_s=math.inf)
    held.write("1\n")
    held.write("2\n")
    assert not storage.exists(held.path)
    held.flush()
    held.flush()  # a second flush changes nothing
    assert storage.read_text(held.path) == "1\n2\n"
    local = storage.Appender(str(tmp_path / "held.jsonl"), every_s=math.inf)
    local.write("1\n")
    assert storage.read_text(local.path) == "1\n"  # a local file is appended to at once


def test_the_tokenizer_of_a_corpus_in_s3_is_copied_to_a_local_folder_once(s3_root, tmp_path, monkeypatch):
    """Workers load the tokenizer from a local folder; pyarrow wrote into a folder that did not exist,
    so pretraining on any corpus in S3 failed at its first worker."""
    import tempfile

    from cluster.data.corpus import Corpus

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
    from cluster.errors import JobError
    from cluster.runs import RunDir

    (tmp_path / "file").write_text("not a folder")
    for root in ("s3://no-such-bucket/runs", str(tmp_path / "file" / "runs")):
        with pytest.raises(JobError, match=r"storage '.*/runs/tune/r' is not writable"):
            RunDir("tune", "r", root).begin(Section())


# ---------------------------------------------------------------- corpus sources in an object store


def _write(root: str, rel: str, data: bytes) -> str:
    path = storage.join(root, *rel.split("/"))
    storage.write_bytes_atomic(path, data)
    return path


def _parquet_bytes(column: str, values: list) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({column: values}), buf)
    return buf.getvalue()


JSONL = b"".join(b'{"text": "document %d, a line of its own", "id": %d}\n' % (i, i) for i in range(60))
TXT = b"first paragraph\nstill the first\n\nsecond paragraph\n\n\nthird \xe4 paragraph\n"


def _source_tree(root: str) -> None:
    import gzip

    _write(root, "raw/a/x.jsonl", JSONL)
    _write(root, "raw/a/sub/y.jsonl.gz", gzip.compress(b"".join(JSONL.splitlines(keepends=True)[:5])))
    _write(root, "raw/b.txt", TXT)
    _write(root, "raw/c.parquet", _parquet_bytes("text", ["one", None, "three"]))
    _write(root, "raw/notes.csv", b"a,b\n")  # not a corpus file kind: folders skip it
    _write(root, "raw/.hidden.jsonl", JSONL)  # in a folder, but no wildcard matches it


def test_corpus_sources_in_s3_are_listed_as_the_same_files_are_locally(s3_root, tmp_path):
    from cluster.data.sources import expand_paths
    from cluster.errors import CorpusError

    for root in (s3_root, str(tmp_path)):
        _source_tree(root)

        def rel(patterns: list[str], root: str = root) -> list[str]:
            return [f[len(root) + 1:] for f in expand_paths([storage.join(root, p) for p in patterns], "source 'w'")]

        assert rel(["raw"]) == ["raw/.hidden.jsonl", "raw/a/sub/y.jsonl.gz", "raw/a/x.jsonl", "raw/b.txt",
                                "raw/c.parquet"]
        assert rel(["raw/*/*.jsonl"]) == ["raw/a/x.jsonl"]
        assert rel(["raw/**/*.jsonl*"]) == ["raw/a/sub/y.jsonl.gz", "raw/a/x.jsonl"]
        assert rel(["raw/?.txt", "raw/b.txt", "raw/[bc].parquet"]) == ["raw/b.txt", "raw/c.parquet"]
        assert rel(["raw/.*"]) == ["raw/.hidden.jsonl"]
        for pattern, error in (("raw/none.txt", "does not exist"), ("raw/*.md", "matches no file"),
                               ("raw/a/sub/y.jsonl.gz/*", "matches no file")):
            with pytest.raises(CorpusError, match=re.escape(f"source 'w': '{storage.join(root, pattern)}' {error}")):
                expand_paths([storage.join(root, pattern)], "source 'w'")
    with pytest.raises(CorpusError, match="after the bucket name"):
        expand_paths([f"s3://{S3_BUCKET[:3]}*/raw"], "source 'w'")


def _documents(path: str, part_bytes: int, txt_mode: str = "file") -> tuple[int, list[tuple[int, str, str]]]:
    from cluster.data.files import read_file_docs
    from cluster.data.sources import SourceConfig, file_parts

    source = SourceConfig(kind="files", paths=[path], txt_mode=txt_mode)
    parts = file_parts([path], source, 0, part_bytes)
    columns = {key: [part[key] for part in parts] for key in parts[0]}
    docs = []
    for table in read_file_docs(columns, "text", txt_mode, 1 << 20):
        docs += zip(table["key"].to_pylist(), table["text"].to_pylist(), table["drop"].to_pylist(), strict=True)
    return len(parts), docs


def test_a_corpus_file_in_s3_reads_as_the_same_documents_as_its_local_copy(s3_root, tmp_path):
    """Byte-range parts (ranged reads), gzip, parquet, .txt paragraphs and invalid UTF-8 alike."""
    for rel, part_bytes, mode in (("raw/a/x.jsonl", 500, "file"), ("raw/a/sub/y.jsonl.gz", 100, "file"),
                                  ("raw/b.txt", 1 << 20, "paragraph"), ("raw/c.parquet", 1 << 20, "file")):
        read = []
        for root in (s3_root, str(tmp_path)):
            _source_tree(root)
            read.append(_documents(storage.join(root, *rel.split("/")), part_bytes, mode))
        assert read[0] == read[1], rel
    parts, docs = _documents(storage.join(s3_root, "raw", "a", "x.jsonl"), 500)
    assert parts == len(JSONL) // 500 + 1 and [text for _, text, _ in docs] == [
        f"document {i}, a line of its own" for i in range(60)]
    _, docs = _documents(storage.join(s3_root, "raw", "b.txt"), 1 << 20, "paragraph")
    assert [(text, drop) for _, text, drop in docs] == [
        ("first paragraph\nstill the first\n", ""), ("second paragraph\n", ""), ("", "undecodable")]


def test_bad_corpus_files_in_s3_are_refused_by_their_uri(s3_root):
    import gzip

    from cluster.data.files import check_file
    from cluster.errors import CorpusError

    cases = {
        "bad/bin.txt": (b"abc\x00def", "looks like a binary file"),
        "bad/cut.jsonl.gz": (gzip.compress(JSONL)[:-20], "truncated or corrupt file"),
        "bad/cols.parquet": (_parquet_bytes("body", ["x"]), "parquet file has no column 'text'"),
        "bad/key.jsonl": (b'{"body": "x"}\n', "JSON object has no key 'text'"),
    }
    for rel, (data, error) in cases.items():
        path = _write(s3_root, rel, data)
        with pytest.raises(CorpusError, match=rf"^{re.escape(path)}(:1)?: {error}"):
            check_file(path, "text")


def test_a_source_file_missing_where_it_is_read_says_what_a_cluster_needs(monkeypatch, tmp_path):
    """A local source path exists on the driver's node only: a read task on another node used to
    report it as 'truncated or corrupt'."""
    import ray

    from cluster.data.files import read_file_docs
    from cluster.errors import CorpusError

    gone = str(tmp_path / "gone.jsonl")
    part = {"path": [gone], "source_id": [0], "file_id": [0], "source": ["w"], "start": [0], "end": [-1]}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as on a driver before Ray starts
    with pytest.raises(CorpusError, match=rf"^{re.escape(gone)}: does not exist$"):
        list(read_file_docs(part, "text", "file", 1 << 20))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    with pytest.raises(CorpusError, match=rf"^{re.escape(gone)}: not found on node 10.0.0.7: .*object-store URI"):
        list(read_file_docs(part, "text", "file", 1 << 20))


def test_a_gz_file_in_s3_reads_back_as_the_bytes_written(s3_root, tmp_path):
    """pyarrow's streams detect compression from the name by default: a .gz written through storage
    was compressed a second time in S3 (and read back decompressed), unlike the same file on disk."""
    import gzip

    data = gzip.compress(b"hello")
    for root in (s3_root, str(tmp_path)):
        path = _write(root, "x.jsonl.gz", data)
        assert storage.read_bytes(path) == data
    fs, path = storage.filesystem(storage.join(s3_root, "x.jsonl.gz"))
    with fs.open_input_file(path) as f:
        assert f.read() == data


def test_a_run_in_s3_gets_tensorboard_event_files(s3_root):
    """TensorBoard was written for local run folders only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cluster.train.sink import MetricsSink

    run = storage.join(s3_root, "pretrain", "tb")
    sink = MetricsSink(run, "tb", enabled=True)
    for step, loss in ((10, 3.0), (20, 2.5)):
        sink.log({"step": step, "split": "train", "train_loss": loss})
    sink.close()
    events = EventAccumulator(storage.join(run, "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(10, 3.0), (20, 2.5)]


def test_a_storage_tensorboard_cannot_write_to_costs_the_event_files_only(caplog):
    from cluster.train.sink import tensorboard_writer

    with caplog.at_level("WARNING", logger="cluster.train.sink"):
        assert tensorboard_writer("nosuchscheme://bucket/run/tensorboard") is None
    assert "no TensorBoard event files in nosuchscheme://bucket/run/tensorboard" in caplog.text


def test_a_tokenizer_in_s3_is_reused_by_prepare(s3_root, tmp_path):
    """tokenizer.path took local folders only: the tokenizer of a corpus in S3 could not be reused."""
    import pyarrow.fs as pafs

    from cluster.data.tokenizer import TokenizerConfig, save_tokenizer, tokenizer_hash, train_tokenizer
    from cluster.errors import CorpusError
    from cluster.stages.prepare import PrepareConfig, check_sources, corpus_tokenizer

    tok = train_tokenizer(["a few words to learn from", "and a few more"] * 20, TokenizerConfig(vocab_size=300))
    save_tokenizer(tok, str(tmp_path / "tok"))
    uri = storage.join(s3_root, "prepare", "c", "tokenizer")
    fs, path = storage.filesystem(uri)
    pafs.copy_files(str(tmp_path / "tok"), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    cfg = PrepareConfig(sources=[{"kind": "synthetic"}], tokenizer={"path": uri})
    check_sources(cfg)
    reused, local, _ = corpus_tokenizer(cfg, None, str(tmp_path / "work"))
    assert tokenizer_hash(reused) == tokenizer_hash(tok) and os.path.isfile(os.path.join(local, "tokenizer.json"))
    missing = storage.join(s3_root, "prepare", "none", "tokenizer")
    with pytest.raises(CorpusError, match=re.escape(f"'tokenizer.path': '{missing}' is not a tokenizer directory")):
        check_sources(PrepareConfig(sources=[{"kind": "synthetic"}], tokenizer={"path": missing}))


def test_a_writable_storage_passes_the_probe_and_keeps_an_earlier_run(s3_root, tmp_path):
    """check_writable leaves nothing behind: an earlier run's files stay as they were, a new run
    gets no folder (bad input found later must leave none) and no probe file remains (local
    folder and object store alike)."""
    from cluster.runs import RunDir

    for root in (s3_root, str(tmp_path / "runs")):
        run = RunDir("finetune", "r", root)
        storage.write_text_atomic(run.file("summary.json"), "{}")
        assert RunDir("finetune", "r", root).check_writable().path == run.path
        assert RunDir("finetune", "new", root).check_writable()
        assert storage.listdir(run.path) == ["summary.json"]
        assert storage.listdir(run.job_dir) == ["r"]


def test_an_unwritable_storage_is_named_by_the_probe(s3_env, tmp_path):
    from cluster.errors import JobError
    from cluster.runs import RunDir

    (tmp_path / "file").write_text("not a folder")
    for root in ("s3://no-such-bucket/runs", str(tmp_path / "file" / "runs")):
        with pytest.raises(JobError, match=r"storage '.*/runs/finetune/r' is not writable"):
            RunDir("finetune", "r", root).check_writable()


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory) -> str:
    from serve import tiny

    return tiny.save_gpt(str(tmp_path_factory.mktemp("gpt") / "ckpt"))


@pytest.mark.parametrize("job", ["finetune", "sweep"])
def test_fine_tuning_and_sweeps_check_their_storage_before_ray_and_the_data(job, tiny_gpt, tmp_path, monkeypatch):
    """Both start Ray and read and tokenize their data before their run begins: an unwritable
    storage was reported only after that, ~15 s in. Now it fails right after the input checks."""
    import cluster.stages.finetune as ft
    import tune.config as sw
    import tune.driver as sw_driver
    from cluster import runtime
    from cluster.config import load_config
    from cluster.errors import JobError

    def connect(*args, **kwargs):
        raise AssertionError("Ray started (and the data setup with it) before the storage check")

    monkeypatch.setattr(runtime, "connect", connect)
    (tmp_path / "file").write_text("not a folder")
    root = str(tmp_path / "file" / "runs")
    with pytest.raises(JobError, match=f"storage '{root}/{'finetune' if job == 'finetune' else 'tune'}/topic-tiny' "
                                       "is not writable"):
        if job == "finetune":
            cfg = load_config(ft.FinetuneConfig, os.path.join(REPO, "configs/finetune-topic-tiny.yaml"),
                              [f"model.checkpoint={tiny_gpt}"])
            ft.finetune(cfg, root)
        else:
            cfg = load_config(sw.SweepConfig, os.path.join(REPO, "configs/tune-topic-tiny.yaml"),
                              [f"finetune.model.checkpoint={tiny_gpt}"])
            sw_driver.sweep(cfg, root)


def test_bad_input_is_refused_before_the_storage_probe_leaves_a_job_folder(tiny_gpt, tmp_path):
    """The probe comes after the input checks: a missing checkpoint leaves the storage as it was."""
    import cluster.stages.finetune as ft
    from cluster.config import load_config
    from cluster.errors import JobError

    cfg = load_config(ft.FinetuneConfig, os.path.join(REPO, "configs/finetune-topic-tiny.yaml"),
                      [f"model.checkpoint={tmp_path / 'no-such-ckpt'}"])
    with pytest.raises(JobError, match="does not exist"):
        ft.finetune(cfg, str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
