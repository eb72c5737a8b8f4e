"""Re-preparing a corpus keeps the previous one until the new one is complete (cluster/data/corpus.py
CorpusBuild): on a local disk by renames, on an object store (moto's S3) by a pointer. A crash is
simulated at each step of the swap by an exception no `except OSError` catches, as a killed process
would stop there; the name must open a complete corpus (the previous or the new) right after it, and
the next prepare's `start` must leave only that one. No Ray."""

from __future__ import annotations

import threading
import uuid

import pytest

from cluster import storage
from cluster.data import corpus as corpus_mod
from cluster.data.corpus import POINTER, Corpus, CorpusBuild, resolve_corpus_path
from cluster.errors import CorpusError
from tests.conftest import S3_BUCKET


class Crash(BaseException):
    """The process dying at this point: nothing after it runs, no handler sees it."""


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "storage")
    request.getfixturevalue("s3_env")
    return f"s3://{S3_BUCKET}/swap-{uuid.uuid4().hex[:8]}"


def build(root: str, tag: str, name: str = "c") -> CorpusBuild:
    """A started build holding one shard whose bytes say which build it is."""
    b = CorpusBuild.start(name, f"tag: {tag}\n", root)
    storage.write_text_atomic(b.file("shards", "train", "train-00000.parquet"), f"rows of {tag}")
    storage.write_text_atomic(b.file("tokenizer", "tokenizer.json"), f'{{"of": "{tag}"}}')
    return b


def manifest(tag: str) -> dict:
    return {"tag": tag, "tokenizer": {"path": "tokenizer", "hash": tag},
            "shards": [{"file": "shards/train/train-00000.parquet", "split": "train", "rows": 1}]}


def prepared(root: str, tag: str, name: str = "c") -> Corpus:
    return build(root, tag, name).commit(manifest(tag))


def assert_complete(root: str, tag: str, name: str = "c") -> Corpus:
    """The name opens the corpus `tag` whole: its manifest, config, shard and tokenizer."""
    c = Corpus.open(name, root)
    assert c.manifest["tag"] == tag
    assert storage.read_text(c.shard_paths("train")[0]) == f"rows of {tag}"
    assert storage.read_text(storage.join(c.path, "config.yaml")) == f"tag: {tag}\n"
    assert storage.read_json(storage.join(c.tokenizer_path, "tokenizer.json")) == {"of": tag}
    return c


def entries(root: str) -> list[str]:
    return storage.listdir(storage.join(root, "prepare"))


def test_a_prepare_swaps_in_whole_and_leaves_one_folder_per_corpus(root):
    prepared(root, "old")
    assert_complete(root, "old")
    new = prepared(root, "new")
    assert_complete(root, "new")
    assert Corpus.open(storage.join(root, "prepare", "c")).path == new.path  # by path as by name
    if storage.is_uri(root):
        assert entries(root) == [storage.basename(new.path), "c"]
        assert storage.listdir(storage.join(root, "prepare", "c")) == [POINTER]
    else:
        assert new.path == storage.join(root, "prepare", "c") and entries(root) == ["c"]


def test_a_failed_build_leaves_the_previous_corpus_and_no_leftovers(root):
    before = prepared(root, "old")
    storage.write_text_atomic(storage.join(root, "prepare", "c", "summary.json"), '{"of": "old"}')
    b = build(root, "new")  # shards and tokenizer written, then the run fails
    assert_complete(root, "old")
    b.abandon()
    assert assert_complete(root, "old").path == before.path
    assert storage.read_json(storage.join(root, "prepare", "c", "summary.json")) == {"of": "old"}
    assert set(entries(root)) == {"c", storage.basename(before.path)}


def test_a_corpus_without_pointer_opens_and_is_replaced(root):
    """The layout every corpus had before builds and pointers: everything in `<name>/`."""
    named = storage.join(root, "prepare", "c")
    storage.write_text_atomic(storage.join(named, "config.yaml"), "tag: old\n")
    storage.write_text_atomic(storage.join(named, "shards", "train", "train-00000.parquet"), "rows of old")
    storage.write_text_atomic(storage.join(named, "tokenizer", "tokenizer.json"), '{"of": "old"}')
    storage.write_json_atomic(storage.join(named, "summary.json"), {"of": "old"})
    storage.write_json_atomic(storage.join(named, "manifest.json"), manifest("old"))
    assert assert_complete(root, "old").path == named
    prepared(root, "new")
    assert_complete(root, "new")
    assert not storage.exists(storage.join(named, "summary.json"))  # it described the replaced corpus
    if storage.is_uri(root):
        assert storage.listdir(named) == [POINTER]


def test_the_tokenizer_path_of_a_corpus_name_finds_the_build(root):
    """`tokenizer.path: <storage>/prepare/c/tokenizer` reuses corpus c's tokenizer wherever it lies."""
    c = prepared(root, "old")
    assert resolve_corpus_path(storage.join(root, "prepare", "c", "tokenizer")) == c.tokenizer_path
    assert resolve_corpus_path(storage.join(root, "elsewhere", "tok")) == storage.join(root, "elsewhere", "tok")


def crash_on(monkeypatch, target, attr: str, when) -> None:
    """Make `target.attr(*args)` crash at the call for which `when(args)` is true."""
    real = getattr(target, attr)

    def fake(*args, **kwargs):
        if when(args):
            raise Crash(f"{attr}{args}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, fake)


# (where the crash is, what it patches, which call crashes, the corpus the name opens right after)
LOCAL_STEPS = [
    ("manifest", storage, "write_json_atomic", lambda a: a[0].endswith("manifest.json"), "old"),
    ("first rename", corpus_mod.os, "rename", lambda a: True, "old"),
    ("between renames", corpus_mod.os, "rename", lambda a: ".build-" in a[0], "old"),
    ("removing the parked", storage, "delete", lambda a: a[0].endswith(".previous"), "new"),
]
S3_STEPS = [
    ("manifest", storage, "write_json_atomic", lambda a: a[0].endswith("manifest.json"), "old"),
    ("summary", storage, "delete", lambda a: a[0].endswith("summary.json"), "old"),
    ("pointer", storage, "write_json_atomic", lambda a: a[0].endswith(POINTER), "old"),
    ("removing the previous build", storage, "delete", lambda a: ".build-" in a[0], "new"),
]


@pytest.mark.parametrize("step", LOCAL_STEPS + S3_STEPS,
                         ids=[f"local-{s[0]}" for s in LOCAL_STEPS] + [f"s3-{s[0]}" for s in S3_STEPS])
def test_a_crash_at_each_step_of_the_swap_leaves_a_complete_corpus(step, request, tmp_path, monkeypatch):
    local = step in LOCAL_STEPS
    root = str(tmp_path / "storage") if local else request.getfixturevalue("root_s3")
    _, target, attr, when, opens = step
    prepared(root, "old")
    b = build(root, "new")
    with monkeypatch.context() as m:
        crash_on(m, target, attr, when)
        with pytest.raises(Crash):
            b.commit(manifest("new"))
    assert_complete(root, opens)
    CorpusBuild.start("c", "tag: next\n", root).abandon()  # the next prepare tidies, then fails
    current = assert_complete(root, opens)
    kept = {"c"} | ({storage.basename(current.path)} if not local else set())
    assert set(entries(root)) == kept
    if not local:
        assert storage.listdir(storage.join(root, "prepare", "c")) in ([POINTER], [POINTER, "summary.json"])


@pytest.fixture
def root_s3(s3_env) -> str:
    return f"s3://{S3_BUCKET}/swap-{uuid.uuid4().hex[:8]}"


SWAPS = 100  # without the second look in Corpus.open, a reader here misses the corpus in most runs


def test_a_reader_opening_by_name_during_swaps_always_gets_a_complete_corpus(tmp_path):
    root = str(tmp_path / "storage")
    prepared(root, "0")
    seen, errors, done = set(), [], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.add(Corpus.open("c", root).manifest["tag"])
            except Exception as exc:  # what the test reports
                errors.append(repr(exc))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, SWAPS):
            prepared(root, str(i))
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert seen <= {str(i) for i in range(SWAPS)} and len(seen) > 1


def test_a_pointer_naming_no_build_is_refused_by_name(root_s3):
    storage.write_json_atomic(storage.join(root_s3, "prepare", "c", POINTER), {"build": "../elsewhere"})
    with pytest.raises(CorpusError, match=r"corpus '.*/prepare/c': current.json names no build folder"):
        Corpus.open("c", root_s3)
    storage.write_json_atomic(storage.join(root_s3, "prepare", "c", POINTER), {"build": ".c.build-0123456789ab"})
    with pytest.raises(CorpusError, match=r"has no manifest.json in the build its current.json names"):
        Corpus.open("c", root_s3)
    prepared(root_s3, "new")  # a prepare replaces the broken pointer
    assert_complete(root_s3, "new")


def test_tidying_one_corpus_never_touches_another_whose_name_extends_it(tmp_path):
    root = str(tmp_path / "storage")
    other = build(root, "x", name="c.build-0123456789ab")  # a legal corpus name
    CorpusBuild.start("c", "", root).abandon()
    assert storage.exists(other.path)
    other.commit(manifest("x"))
    assert_complete(root, "x", name="c.build-0123456789ab")
