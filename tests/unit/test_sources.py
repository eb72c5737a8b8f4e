"""Each bad corpus input gets a clear message naming the file and the reason (no Ray here; the
integration tests check the same errors surface through jobs.prepare)."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.sources import CorpusError, check_file, expand_paths, read_file_docs


def read(path, **kw):
    row = {"path": str(path), "source_id": 0, "file_id": 0, "source": "s"}
    return read_file_docs(row, kw.get("text_column", "text"), kw.get("txt_mode", "file"),
                          kw.get("max_line_bytes", 16 * 2**20))


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
