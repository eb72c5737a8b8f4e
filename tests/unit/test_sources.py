"""Each bad corpus input gets a clear message naming the file and the reason (no Ray here; the
integration tests check the same errors surface through jobs.prepare)."""

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.data.files import DOC_SCHEMA, check_file, read_file_docs
from cluster.data.sources import SourceConfig, expand_paths, file_parts
from cluster.errors import CorpusError


def read_parts(parts, **kw):
    """Documents of file parts as row dicts, as the Ray Data read stage yields them in batches."""
    docs = []
    for part in parts:
        batches = read_file_docs({k: [v] for k, v in part.items()}, kw.get("text_column", "text"),
                                 kw.get("txt_mode", "file"), kw.get("max_line_bytes", 16 * 2**20),
                                 batch_rows=kw.get("batch_rows", 4096))
        for batch in batches:
            assert batch.schema == DOC_SCHEMA
            docs += batch.to_pylist()
    return docs


def read(path, **kw):
    check_file(str(path), kw.get("text_column", "text"))
    part = {"path": str(path), "source_id": 0, "file_id": 0, "source": "s", "start": 0, "end": -1}
    return read_parts([part], **kw)


def test_a_file_uri_is_a_local_path(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert expand_paths([f"file://{tmp_path}/*.txt", str(tmp_path / "a.txt")], "source 's'") == [str(tmp_path / "a.txt")]


def test_missing_path_and_empty_glob_are_named(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt' does not exist"):
        expand_paths([str(tmp_path / "nope.txt")], "source 's'")
    with pytest.raises(CorpusError, match=r"\*.jsonl' matches no file"):
        expand_paths([str(tmp_path / "*.jsonl")], "source 's'")


def test_folder_expands_to_text_files_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert [p.rsplit("/", 1)[1] for p in expand_paths([str(tmp_path)], "s")] == ["a.jsonl", "b.txt"]


def test_binary_file_is_refused_by_name(tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(CorpusError, match=r"image.txt: looks like a binary file"):
        read(path)


def test_undecodable_documents_are_counted_with_their_position(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe bytes"}\n{"text": "also fine"}\n')
    docs = read(path)
    assert [d["drop"] for d in docs] == ["", "undecodable", ""]
    assert docs[1]["note"].endswith("docs.jsonl:2: invalid UTF-8 at byte 14")


def test_huge_line_is_refused_without_reading_it_all(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "' + b"a" * (100 * 2**20) + b'"}\n')
    with pytest.raises(CorpusError, match=r"huge.jsonl:1: line longer than 16 MiB"):
        read(path)


def test_parquet_without_text_column_names_the_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    with pytest.raises(CorpusError, match=r"t.parquet: parquet file has no column 'text' \(columns: body, id\)"):
        check_file(str(path), "text")
    assert [d["text"] for d in read(path, text_column="body")] == ["x"]


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(1000)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="docs.jsonl.gz: truncated or corrupt file"):
        read(path)


def _damaged(data: bytes, at: int) -> bytes:
    flipped = bytearray(data)
    for i in range(at, at + 30):
        flipped[i] ^= 0x5A
    return bytes(flipped)


def test_corrupt_gzip_and_parquet_past_what_the_driver_checks_are_named(tmp_path):
    """Damage inside a gzip stream (zlib.error) or a Parquet data page (OSError; the footer the
    driver reads is intact) escaped the read task as a bare exception naming no file."""
    rng = random.Random(0)
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "eps"]) for _ in range(50000)).encode()
    gz = tmp_path / "docs.txt.gz"
    gz.write_bytes(_damaged(gzip.compress(words), 1000))
    pq_path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(3000)]}), pq_path)
    pq_path.write_bytes(_damaged(pq_path.read_bytes(), 200))
    check_file(str(pq_path), "text")  # the footer is fine
    for path in (gz, pq_path):
        part = {"path": str(path), "source_id": 0, "file_id": 0, "source": "s", "start": 0, "end": -1}
        with pytest.raises(CorpusError, match=rf"{path.name}: truncated or corrupt file \("):
            read_parts([part])


def test_json_without_key_and_invalid_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="d.jsonl:1: JSON object has no key 'text'"):
        read(path)
    path.write_text("{not json\n")
    with pytest.raises(CorpusError, match="d.jsonl:1: not valid JSON"):
        read(path)


def test_txt_modes(tmp_path):
    path = tmp_path / "n.txt"
    path.write_text("para one\nline two\n\npara two\n")
    assert len(read(path, txt_mode="file")) == 1
    assert [d["text"] for d in read(path, txt_mode="paragraph")] == ["para one\nline two\n", "para two\n"]
    assert len(read(path, txt_mode="line")) == 4


def _parts(path, part_bytes, txt_mode="line"):
    source = SourceConfig(kind="files", name="s", paths=[str(path)], txt_mode=txt_mode)
    return file_parts([str(path)], source, 0, part_bytes)


@pytest.mark.parametrize("part_bytes", [1, 7, 16, 33, 64, 10**6])
def test_a_file_read_in_parts_yields_each_document_once_in_order(tmp_path, part_bytes):
    """Parts cut anywhere: inside a line, at a newline, inside the invalid bytes of a document."""
    lines = [b'{"text": "first"}', b"", b'{"text": "bad \xff byte"}', b'{"text": "' + b"x" * 40 + b'"}',
             b'{"text": "\u4e2d\u6587 CJK"}', b'{"text": "last, no newline"}']
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\n".join(lines))
    whole = read(path)
    parts = _parts(path, part_bytes)
    size = path.stat().st_size
    assert len(parts) == (-(-size // part_bytes) if part_bytes < size else 1)
    assert parts[0]["start"] == 0 and all(a["end"] == b["start"] for a, b in zip(parts, parts[1:], strict=False))
    assert parts[-1]["end"] in (size, -1)
    in_parts = read_parts(parts, batch_rows=2)
    assert [d["text"] for d in in_parts] == ["first", "", "x" * 40, "\u4e2d\u6587 CJK", "last, no newline"]
    fields = ("text", "key", "drop", "note", "source")
    assert [[d[f] for f in fields] for d in in_parts] == [[d[f] for f in fields] for d in whole]
    assert sorted(d["key"] for d in in_parts) == [d["key"] for d in in_parts]
    # the position is named by its line in the whole file, whichever part read it
    assert in_parts[1]["drop"] == "undecodable" and in_parts[1]["note"].endswith("docs.jsonl:3: invalid UTF-8 at byte 14")


def test_an_error_in_a_later_part_names_its_line_in_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' * 50 + "{broken\n")
    parts = _parts(path, 100)
    assert len(parts) > 5
    with pytest.raises(CorpusError, match="d.jsonl:51: not valid JSON"):
        read_parts(parts[-1:])


def test_only_uncompressed_line_based_files_are_split(tmp_path):
    text = "".join(f"line {i}\n" for i in range(200))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert len(_parts(tmp_path / "a.txt", 100, txt_mode="line")) > 1
    assert len(_parts(tmp_path / "a.txt", 100, txt_mode="paragraph")) == 1
    assert len(_parts(tmp_path / "b.jsonl.gz", 100)) == 1


def test_a_huge_line_in_a_later_part_is_refused_with_its_line(tmp_path):
    path = tmp_path / "h.txt"
    path.write_bytes(b"short\n" * 10 + b"y" * 3000 + b"\n")
    parts = _parts(path, 64)
    with pytest.raises(CorpusError, match=r"h.txt:11: line longer than"):
        read_parts(parts, txt_mode="line", max_line_bytes=2048)


def test_first_json_document_without_the_key_is_refused_on_the_driver_with_its_keys(tmp_path):
    # Refused by check_file (before Ray starts), not by the first read task; the message lists the
    # keys the object has and how to name one from the command line.
    path = tmp_path / "books.jsonl.gz"
    path.write_bytes(gzip.compress(b'\n{"body": "a book", "id": 1}\n'))
    with pytest.raises(CorpusError, match=r"books.jsonl.gz:2: JSON object has no key 'text' "
                                          r"\(its keys: body, id\).*--text-column"):
        check_file(str(path), "text")
    check_file(str(path), "body")
    arr = tmp_path / "a.json"
    arr.write_text('[{"body": "x"}]')
    with pytest.raises(CorpusError, match=r"a.json: item 0: JSON object has no key 'text' \(its keys: body\)"):
        check_file(str(arr), "text")
    # A first document the head does not hold whole is left to the read, which names its line.
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"body": "x" * 10000}) + "\n")
    check_file(str(big), "text")
    with pytest.raises(CorpusError, match=r"big.jsonl:1: JSON object has no key 'text' \(its keys: body\)"):
        read(big)


def test_json_file_holding_one_array_is_read_whole(tmp_path):
    path = tmp_path / "docs.json"
    docs = [{"text": f"document number {i}", "id": i} for i in range(50)] + [{"text": None}, "a bare string"]
    path.write_text("\ufeff  " + json.dumps(docs, indent=2))
    parts = file_parts([str(path)], SourceConfig(kind="files", paths=[str(path)]), 0, part_bytes=100)
    assert len(parts) == 1  # no line boundaries to split an array at, however small the parts
    got = read(path)
    assert [d["text"] for d in got[:50]] == [f"document number {i}" for i in range(50)]
    assert [(d["text"], d["drop"]) for d in got[50:]] == [("", "empty"), ("a bare string", "")]
    assert len({d["key"] for d in got}) == 52
    (tmp_path / "bad.json").write_text('[{"text": "x"},\n {"text": ]')
    with pytest.raises(CorpusError, match=r"bad.json:2: not valid JSON"):
        read(tmp_path / "bad.json")
    (tmp_path / "nums.json").write_text('[{"text": "x"}, 3]')
    with pytest.raises(CorpusError, match=r"nums.json: item 1: JSON object has no key 'text' \(a JSON int\)"):
        read(tmp_path / "nums.json")


def test_a_hub_dataset_on_a_machine_without_network_fails_at_once_and_leaves_online_mode_as_it_was(
        monkeypatch, caplog):
    """Offline, `kind: hf` with a hub name was refused only after huggingface_hub's five retries
    (~30 s for prepare). With a hub host that does not resolve, datasets runs offline (local cache
    only) for that call."""
    import datasets.config
    from huggingface_hub import constants

    from cluster.data.sources import hf_dataset

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.raylm-test.invalid")  # .invalid never resolves
    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    with pytest.raises(CorpusError, match=r"cannot load dataset 'someone/mistyped'.*hub.raylm-test.invalid does not "
                                          r"resolve \(offline\), and it is not in the local Hugging Face cache"):
        hf_dataset(SourceConfig(kind="hf", dataset="someone/mistyped"), 0)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


def test_auto_parts_grow_with_the_source_within_their_bounds(tmp_path):
    # auto: 8 MiB parts for a small source (as the fixed default was: its shards do not change),
    # about 64 parts for a larger one (fewer blocks for the driver to track), at most 64 MiB each
    source = SourceConfig(kind="files", paths=["x"])
    assert source.part_mb == "auto"
    mib = 2**20
    assert [source.part_bytes(n * mib) / mib for n in (1, 512, 2048, 10**6)] == [8, 8, 32, 64]
    assert SourceConfig(kind="files", paths=["x"], part_mb=0.5).part_bytes(10**12) == mib // 2
    path = tmp_path / "a.jsonl"
    path.write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(100)))
    assert len(file_parts([str(path)], source, 0)) == 1  # far under 8 MiB
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b")
    parts = file_parts([str(path), str(gz)], SourceConfig(kind="files", paths=["x"], part_mb=0.001), 0)
    assert [p["path"] for p in parts].count(str(path)) == 2 and [p["path"] for p in parts].count(str(gz)) == 1
