"""Corpus sources as Ray Datasets with one schema: text, key, source, logprob, drop, note.

`key` orders documents deterministically (source, file, position) so a re-run reproduces the same
shards; `drop` holds a reason for documents that cannot be used (they are counted, never silently
lost); `note` says where (file and position) for the manifest's problem list.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import math
import os
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field, model_validator

from cluster.config import Section
from cluster.text import DROP_UNDECODABLE

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".md")
_FILE_BITS = 24  # key = source << 55 | file << 31 | position
_POS_BITS = 31


class CorpusError(ValueError):
    """Bad corpus input; the message names the file (or source) and the reason."""


class SourceConfig(Section):
    kind: Literal["synthetic", "files", "hf"] = Field(description="where documents come from")
    name: str | None = Field(None, description="label used in the manifest; defaults to the kind")
    weight: float = Field(
        1.0, ge=0, description="mixing weight: each kept document appears floor(w) or ceil(w) times"
    )
    # synthetic
    num_docs: int = Field(20000, ge=1, description="synthetic: number of documents")
    seed: int = Field(0, description="synthetic: generator seed")
    # files
    paths: list[str] = Field(default_factory=list, description="files: paths, folders or globs")
    text_column: str = Field("text", description="files/hf: column or JSON key holding the text")
    txt_mode: Literal["file", "paragraph", "line"] = Field(
        "file", description="files: what one document is in a .txt file"
    )
    # hf
    dataset: str | None = Field(None, description="hf: dataset name or local builder (json, parquet, text)")
    data_files: list[str] | None = Field(None, description="hf: local data files for a builder")
    subset: str | None = Field(None, description="hf: dataset configuration name")
    split: str = Field("train", description="hf: split to read")

    @model_validator(mode="after")
    def _check_kind(self) -> SourceConfig:
        if self.kind == "files" and not self.paths:
            raise ValueError("a 'files' source needs 'paths'")
        if self.kind == "hf" and not self.dataset:
            raise ValueError("an 'hf' source needs 'dataset'")
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


def make_key(source: int, file: int, position: int) -> int:
    return (source << (_FILE_BITS + _POS_BITS)) | (file << _POS_BITS) | position


def expand_paths(patterns: list[str], where: str) -> list[str]:
    """Patterns -> sorted files. A pattern that matches nothing is an error naming it."""
    files: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matched = sorted(glob.glob(pattern, recursive=True))
            if not matched:
                raise CorpusError(f"{where}: '{pattern}' matches no file")
        elif os.path.isdir(pattern):
            matched = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(pattern)
                for f in names
                if f.endswith(TEXT_SUFFIXES) or f.endswith(tuple(s + ".gz" for s in TEXT_SUFFIXES))
            )
            if not matched:
                raise CorpusError(f"{where}: folder '{pattern}' holds no .txt/.jsonl/.json/.parquet file")
        elif os.path.exists(pattern):
            matched = [pattern]
        else:
            raise CorpusError(f"{where}: '{pattern}' does not exist")
        files.extend(m for m in matched if os.path.isfile(m))
    return sorted(dict.fromkeys(os.path.abspath(f) for f in files))


def _base_suffix(path: str) -> str:
    stem = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(stem)[1].lower()


def check_file(path: str, text_column: str) -> None:
    """Cheap checks on the driver before any task starts (parquet schema, unknown suffix)."""
    suffix = _base_suffix(path)
    if suffix not in TEXT_SUFFIXES:
        raise CorpusError(f"{path}: unsupported file type '{suffix}' (use .txt, .jsonl, .json, .parquet, .gz)")
    if suffix == ".parquet" and not path.endswith(".gz"):
        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
        if text_column not in schema.names:
            raise CorpusError(
                f"{path}: parquet file has no column '{text_column}' (columns: {', '.join(schema.names)}); "
                "set the source's text_column"
            )


def _open_binary(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _lines(path: str, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) with a bound on line length so one huge line cannot exhaust memory."""
    try:
        with _open_binary(path) as f:
            head = f.peek(8192)[:8192] if hasattr(f, "peek") else b""
            if b"\x00" in head:
                raise CorpusError(f"{path}: looks like a binary file (NUL bytes in its first 8 KiB)")
            lineno = 0
            while True:
                line = f.readline(max_line_bytes + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    raise CorpusError(
                        f"{path}:{lineno}: line longer than {max_line_bytes / 2**20:.0f} MiB "
                        "(raise clean.max_line_mb if this is intended)"
                    )
                yield lineno, line
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"{path}: truncated or corrupt file ({exc})") from None


def _decode(raw: bytes, where: str) -> tuple[str, str, str]:
    """(text, drop, note): undecodable bytes are a counted drop with the position named."""
    try:
        return raw.decode("utf-8"), "", ""
    except UnicodeDecodeError as exc:
        return "", DROP_UNDECODABLE, f"{where}: invalid UTF-8 at byte {exc.start}"


def _txt_docs(path: str, mode: str, max_line_bytes: int) -> Iterator[tuple[int, bytes, str]]:
    if mode == "line":
        for lineno, line in _lines(path, max_line_bytes):
            yield lineno, line, f"{path}:{lineno}"
        return
    buf: list[bytes] = []
    start = 1
    index = 0
    for lineno, line in _lines(path, max_line_bytes):
        if mode == "paragraph" and not line.strip():
            if buf:
                yield index, b"".join(buf), f"{path}:{start}"
                index += 1
            buf, start = [], lineno + 1
            continue
        buf.append(line)
    if buf:
        yield index, b"".join(buf), f"{path}:{start}"


def _json_docs(path: str, column: str, max_line_bytes: int) -> Iterator[tuple[int, Any, str]]:
    for lineno, line in _lines(path, max_line_bytes):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        text, drop, note = _decode(line, where)
        if drop:
            yield lineno, None, note
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or column not in obj:
            raise CorpusError(f"{where}: JSON object has no key '{column}'; set the source's text_column")
        yield lineno, obj[column], where


def read_file_docs(row: dict[str, Any], text_column: str, txt_mode: str, max_line_bytes: int) -> list[dict]:
    """Ray Data flat_map: one file -> its documents."""
    path, source_id, file_id, label = row["path"], row["source_id"], row["file_id"], row["source"]
    suffix = _base_suffix(path)
    out: list[dict] = []

    def emit(position: int, text: str, drop: str, note: str) -> None:
        out.append(
            {
                "text": text,
                "key": make_key(source_id, file_id, position),
                "source": label,
                "logprob": math.nan,
                "drop": drop,
                "note": note,
            }
        )

    if suffix == ".parquet":
        with _open_binary(path) as f:
            table = pq.read_table(f, columns=[text_column])
        for i, value in enumerate(table.column(text_column).to_pylist()):
            emit(i, value if isinstance(value, str) else "", "" if isinstance(value, str) else "empty", "")
    elif suffix in (".jsonl", ".json"):
        for lineno, value, where in _json_docs(path, text_column, max_line_bytes):
            if value is None:
                emit(lineno, "", DROP_UNDECODABLE, where)
            else:
                emit(lineno, value if isinstance(value, str) else str(value), "", "")
    else:
        for index, raw, where in _txt_docs(path, txt_mode, max_line_bytes):
            text, drop, note = _decode(raw, where)
            emit(index, text, drop, note)
    return out


def file_dataset(source: SourceConfig, source_id: int, max_line_bytes: int) -> ray.data.Dataset:
    where = f"source '{source.label}'"
    files = expand_paths(source.paths, where)
    for path in files:
        check_file(path, source.text_column)
    rows = [{"path": p, "source_id": source_id, "file_id": i, "source": source.label} for i, p in enumerate(files)]
    # One file per task: files are the unit of parallelism and of error reporting.
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).flat_map(
        read_file_docs,
        fn_kwargs={
            "text_column": source.text_column,
            "txt_mode": source.txt_mode,
            "max_line_bytes": max_line_bytes,
        },
    )


def _synthetic_batch(batch: dict[str, Any], seed: int, source_id: int, label: str) -> dict[str, Any]:
    from cluster import synthetic

    docs = [synthetic.document(seed, int(i)) for i in batch["id"]]
    n = len(docs)
    return {
        "text": [d.text for d in docs],
        "key": [make_key(source_id, 0, d.index) for d in docs],
        "source": [label] * n,
        "logprob": [d.logprob for d in docs],
        "drop": [""] * n,
        "note": [""] * n,
    }


def synthetic_dataset(source: SourceConfig, source_id: int) -> ray.data.Dataset:
    blocks = max(1, min(64, source.num_docs // 2000))
    return ray.data.range(source.num_docs, override_num_blocks=blocks).map_batches(
        _synthetic_batch,
        fn_kwargs={"seed": source.seed, "source_id": source_id, "label": source.label},
        batch_size=1000,
    )


def hf_dataset(source: SourceConfig, source_id: int) -> ray.data.Dataset:
    """A Hugging Face dataset: local files through a builder (json/parquet/text) or a hub name when
    the machine is online. Loaded on the driver by `datasets`, then handed to Ray Data."""
    import datasets

    try:
        ds = datasets.load_dataset(
            source.dataset, source.subset, data_files=source.data_files, split=source.split
        )
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        raise CorpusError(f"source '{source.label}': cannot load dataset '{source.dataset}': {exc}") from None
    if source.text_column not in ds.column_names:
        raise CorpusError(
            f"source '{source.label}': dataset has no column '{source.text_column}' "
            f"(columns: {', '.join(ds.column_names)}); set text_column"
        )
    texts = ds[source.text_column]
    table = pa.table(
        {
            "text": [t if isinstance(t, str) else "" for t in texts],
            "key": [make_key(source_id, 0, i) for i in range(len(texts))],
            "source": [source.label] * len(texts),
            "logprob": [math.nan] * len(texts),
            "drop": ["" if isinstance(t, str) else "empty" for t in texts],
            "note": [""] * len(texts),
        }
    )
    return ray.data.from_arrow(table)


def source_dataset(source: SourceConfig, source_id: int, max_line_bytes: int) -> ray.data.Dataset:
    if source.kind == "synthetic":
        return synthetic_dataset(source, source_id)
    if source.kind == "files":
        return file_dataset(source, source_id, max_line_bytes)
    return hf_dataset(source, source_id)
