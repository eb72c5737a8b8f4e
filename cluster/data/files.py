"""Documents out of raw files: `.txt` (per file, paragraph or line), JSON lines or a JSON array,
Parquet, and `.gz` of these, local or in an object store. Files are checked on the driver before
Ray starts (kind, binary content, the text column) and read in parts by Ray tasks, each document
keyed by (source, file, position) so a re-run reproduces the same shards.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from cluster import storage
from cluster.data.text import DROP_EMPTY, DROP_UNDECODABLE
from cluster.errors import CorpusError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".md")


# key = source << 55 | file << 35 | position: 255 sources, 1M files each; position is a byte
# offset for line-based files (up to 32 GiB each), else the index of the document in its file.
_FILE_BITS = 20


_POS_BITS = 35


# The columns every source yields, typed up front: Ray Data infers the type of a list column by
# scanning it in Python (for strings, every length against the 2 GiB limit); with lists from the
# read and cleaning stages that was ~15% of a reused-tokenizer prepare's Python samples (py-spy).
DOC_SCHEMA = pa.schema([("text", pa.string()), ("key", pa.int64()), ("source", pa.string()),
                        ("logprob", pa.float64()), ("drop", pa.string()), ("note", pa.string())])


def make_key(source: int, file: int, position: int) -> int:
    return (source << (_FILE_BITS + _POS_BITS)) | (file << _POS_BITS) | position


def map_files(fn: Callable[[str], Any], paths: list[str]) -> list[Any]:
    """`fn` over files, results in order (an exception: the first in order). Object-store files from
    16 threads: each call is a request or two, so one file at a time costs a network round trip per
    file on the driver (~4-6 ms each against a local S3 server, more against a remote one)."""
    if len(paths) < 2 or not any(storage.is_uri(p) for p in paths):
        return [fn(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16, thread_name_prefix="raylm-source") as pool:
        return list(pool.map(fn, paths))


def file_size(path: str) -> int:
    if storage.is_uri(path):
        fs, p = storage.filesystem(path)
        return fs.get_file_info(p).size
    return os.path.getsize(path)


def base_suffix(path: str) -> str:
    """The suffix that says the format: '.jsonl' for both data.jsonl and data.jsonl.gz."""
    stem = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(stem)[1].lower()


def check_file(path: str, text_column: str) -> None:
    """Cheap checks on the driver before any task starts (parquet schema, unknown suffix)."""
    suffix = base_suffix(path)
    if suffix not in TEXT_SUFFIXES:
        raise CorpusError(f"{path}: unsupported file type '{suffix}' (use .txt, .jsonl, .json, .parquet, .gz)")
    if suffix == ".parquet" and not path.endswith(".gz"):
        try:
            with open_binary(path) as f:
                schema = pq.read_schema(f)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
        if text_column not in schema.names:
            raise CorpusError(
                f"{path}: parquet file has no column '{text_column}' (columns: {', '.join(schema.names)}); "
                "set the source's text_column"
            )
    elif suffix != ".parquet":
        head = _check_not_binary(path)
        if suffix in (".jsonl", ".json"):
            _check_first_json_object(path, head, text_column)


def check_files(files: list[str], text_column: str) -> None:
    """`check_file` for each file; the first problem in file order is raised."""
    map_files(lambda path: check_file(path, text_column), files)


def _open_raw(path: str) -> BinaryIO:
    """A seekable binary file: a local path, or an object-store URI read through pyarrow (ranged
    GETs, buffered here: pyarrow's files have no readline)."""
    if storage.is_uri(path):
        fs, p = storage.filesystem(path)
        return io.BufferedReader(fs.open_input_file(p), buffer_size=1 << 20)
    return open(path, "rb")  # noqa: SIM115


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[BinaryIO]:
    """The file's bytes (local path or URI), decompressed for .gz."""
    with _open_raw(path) as raw:
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        else:
            yield raw


# What reading a source file can raise besides CorpusError: a truncated .gz (EOFError), a corrupt
# one (gzip.BadGzipFile, an OSError, for its header or checksum; zlib.error inside the stream), a
# file that went away or cannot be opened (OSError), a store that does not answer (OSError).
READ_ERRORS = (EOFError, zlib.error, OSError)


def read_error(path: str, exc: BaseException) -> CorpusError:
    """What a failed read of a source file says. The driver listed every file before any task ran,
    so a file a read task cannot find is, on a multi-node cluster, a local path that exists on the
    driver's node and not on the task's."""
    if isinstance(exc, FileNotFoundError):
        if not ray.is_initialized():
            return CorpusError(f"{path}: does not exist")
        return CorpusError(
            f"{path}: not found on node {ray.util.get_node_ip_address()}: on a multi-node cluster every node "
            "reads source files, so give an object-store URI (s3://...), a path on a volume mounted on every "
            "node, or a path inside the job's --working-dir")
    if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and storage.is_uri(path):
        return CorpusError(f"{path}: cannot be read ({exc})")
    return CorpusError(f"{path}: truncated or corrupt file ({exc})")


def _check_not_binary(path: str) -> bytes:
    """NUL bytes in the first 8 KiB (decompressed for .gz): refuse the file by name. Checked on the
    driver, before a task reads any part of the file, so a split file fails with this reason.
    Returns those bytes."""
    try:
        with open_binary(path) as f:
            head = f.read(8192)
    except READ_ERRORS as exc:
        raise read_error(path, exc) from None
    if b"\x00" in head:
        raise CorpusError(f"{path}: looks like a binary file (NUL bytes in its first 8 KiB)")
    return head


def _missing_key(where: str, obj: Any, column: str) -> CorpusError:
    keys = f" (its keys: {', '.join(map(str, obj))})" if isinstance(obj, dict) else f" (a JSON {type(obj).__name__})"
    return CorpusError(f"{where}: JSON object has no key '{column}'{keys}; set the source's text_column "
                       "(raylm prepare --text-column)")


def is_json_array(path: str, head: bytes | None = None) -> bool:
    """A .json file holding one JSON array of documents (`[{"text": ...}, ...]`), not JSON lines."""
    if base_suffix(path) != ".json":
        return False
    if head is None:
        with open_binary(path) as f:
            head = f.read(4096)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def first_json_record(path: str, head: bytes) -> tuple[str, Any] | None:
    """(where, value) of the first document of a JSON lines file or JSON array, from the file's
    first bytes; None when they do not hold it whole or it is not valid JSON (the read reports
    that, naming its line)."""
    body = head.removeprefix(b"\xef\xbb\xbf")
    blank = body[: len(body) - len(body.lstrip(b" \t\r\n"))]
    text = body[len(blank):].decode("utf-8", errors="ignore")
    try:
        if is_json_array(path, head):
            return f"{path}: item 0", json.JSONDecoder().raw_decode(text[1:].lstrip())[0]
        lineno = 1 + blank.count(b"\n")
        return f"{path}:{lineno}", json.loads(text.split("\n", 1)[0])
    except ValueError:
        return None


def _check_first_json_object(path: str, head: bytes, column: str) -> None:
    """The file's first document lacks the text key: refuse it on the driver, with the keys it has,
    instead of failing the first read task inside Ray."""
    first = first_json_record(path, head)
    if first is None or (isinstance(first[1], str) and first[0].endswith("item 0")):
        return  # not whole in the head, or an array of strings (each string is a document)
    where, obj = first
    if not isinstance(obj, dict) or column not in obj:
        raise _missing_key(where, obj, column)


def is_line_based(path: str, txt_mode: str) -> bool:
    """One document per line (JSON lines, or .txt in line mode): a file that can be read in parts."""
    suffix = base_suffix(path)
    if suffix == ".json":
        return not is_json_array(path)
    return suffix == ".jsonl" or (suffix in (".txt", ".md") and txt_mode == "line")


class _LineNumbers:
    """Line numbers for messages about a part of a file that starts at byte `start`: the lines
    before the part are counted only when a message needs one (most parts never do)."""

    def __init__(self, path: str, start: int):
        self.path, self.start, self._before = path, start, None if start else 0

    def where(self, local_lineno: int) -> str:
        if self._before is None:
            # The part's first line is the one after the line holding byte start - 1.
            self._before = 1
            with _open_raw(self.path) as f:
                left = self.start - 1
                while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                    self._before += chunk.count(b"\n")
                    left -= len(chunk)
        return f"{self.path}:{self._before + local_lineno}"


def _lines(path: str, max_line_bytes: int, start: int = 0, end: int | None = None,
           lines: _LineNumbers | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(line number within the part, byte offset in the file, raw bytes) of the lines that start in
    [start, end), bounded in length so one huge line cannot exhaust memory. Offsets count
    decompressed bytes for .gz (which is always read whole)."""
    lines = lines or _LineNumbers(path, start)
    try:
        with open_binary(path) as f:
            offset = start
            if start:  # the line running over `start` belongs to the part before: skip to its end
                f.seek(offset := start - 1)
                while piece := f.readline(1 << 20):
                    offset += len(piece)
                    if piece.endswith(b"\n"):
                        break
            lineno = 0
            while end is None or offset < end:
                line = f.readline(max_line_bytes + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    raise CorpusError(
                        f"{lines.where(lineno)}: line longer than {max_line_bytes / 2**20:.0f} MiB "
                        "(raise clean.max_line_mb if this is intended)"
                    )
                yield lineno, offset, line
                offset += len(line)
    except READ_ERRORS as exc:
        if isinstance(exc, CorpusError):
            raise
        raise read_error(path, exc) from None


def _decode(raw: bytes, where: Callable[[], str]) -> tuple[str, str, str]:
    """(text, drop, note): undecodable bytes are a counted drop with the position named."""
    try:
        return raw.decode("utf-8"), "", ""
    except UnicodeDecodeError as exc:
        return "", DROP_UNDECODABLE, f"{where()}: invalid UTF-8 at byte {exc.start}"


def _txt_docs(path: str, mode: str, max_line_bytes: int, start: int, end: int | None
              ) -> Iterator[tuple[int, str, str, str]]:
    """(position, text, drop, note) of a .txt file's documents; position orders them in the file."""
    lines = _LineNumbers(path, start)
    if mode == "line":
        for lineno, offset, line in _lines(path, max_line_bytes, start, end, lines):
            yield (offset, *_decode(line, lambda lineno=lineno: lines.where(lineno)))
        return
    buf: list[bytes] = []
    first = 1
    index = 0
    for lineno, _, line in _lines(path, max_line_bytes, lines=lines):
        if mode == "paragraph" and not line.strip():
            if buf:
                yield (index, *_decode(b"".join(buf), lambda first=first: lines.where(first)))
                index += 1
            buf, first = [], lineno + 1
            continue
        buf.append(line)
    if buf:
        yield (index, *_decode(b"".join(buf), lambda: lines.where(first)))


def _json_doc(position: int, value: Any) -> tuple[int, str, str, str]:
    """A JSON value as a document: null is an empty one (counted, as a parquet null is), numbers
    and other values their JSON text."""
    if value is None:
        return position, "", DROP_EMPTY, ""
    return position, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), "", ""


def _json_array_docs(path: str, column: str) -> Iterator[tuple[int, str, str, str]]:
    """A .json file holding one array: read whole by one task (it has no line boundaries to split
    at); items are objects with the text key, or strings."""
    try:
        with open_binary(path) as f:
            raw = f.read()
    except READ_ERRORS as exc:
        raise read_error(path, exc) from None
    text, drop, note = _decode(raw.removeprefix(b"\xef\xbb\xbf"), lambda: path)
    if drop:
        yield 0, "", drop, note
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    for i, obj in enumerate(items):
        if isinstance(obj, str):
            yield i, obj, "", ""
            continue
        if not isinstance(obj, dict) or column not in obj:
            raise _missing_key(f"{path}: item {i}", obj, column)
        yield _json_doc(i, obj[column])


def _json_docs(path: str, column: str, max_line_bytes: int, start: int, end: int | None
               ) -> Iterator[tuple[int, str, str, str]]:
    if start == 0 and is_json_array(path):
        yield from _json_array_docs(path, column)
        return
    lines = _LineNumbers(path, start)
    for lineno, offset, line in _lines(path, max_line_bytes, start, end, lines):
        if not line.strip():
            continue
        text, drop, note = _decode(line, lambda lineno=lineno: lines.where(lineno))
        if drop:
            yield offset, "", drop, note
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{lines.where(lineno)}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or column not in obj:
            raise _missing_key(lines.where(lineno), obj, column)
        yield _json_doc(offset, obj[column])


def _file_docs(part: dict[str, Any], text_column: str, txt_mode: str, max_line_bytes: int
               ) -> Iterator[tuple[int, str, str, str]]:
    path, start, end = part["path"], int(part["start"]), part["end"]
    end = None if end is None or int(end) < 0 else int(end)
    suffix = base_suffix(path)
    if suffix == ".parquet":
        try:
            with open_binary(path) as f:
                table = pq.read_table(f, columns=[text_column])
        except (*READ_ERRORS, pa.ArrowException) as exc:  # ArrowInvalid: a corrupt page past the footer
            raise read_error(path, exc) from None
        for i, value in enumerate(table.column(text_column).to_pylist()):
            yield (i, value, "", "") if isinstance(value, str) else (i, "", "empty", "")
    elif suffix in (".jsonl", ".json"):
        yield from _json_docs(path, text_column, max_line_bytes, start, end)
    else:
        yield from _txt_docs(path, txt_mode, max_line_bytes, start, end)


def read_file_docs(parts: dict[str, Any], text_column: str, txt_mode: str, max_line_bytes: int,
                   batch_rows: int = 4096) -> Iterator[pa.Table]:
    """Ray Data map_batches (batch_size=1): one part of a file -> its documents, as tables of
    `batch_rows` (the cleaning and tokenizing stages fused behind it take them as they come)."""
    for i in range(len(parts["path"])):
        part = {k: v[i] for k, v in parts.items()}
        source_id, file_id, label = int(part["source_id"]), int(part["file_id"]), str(part["source"])
        out: dict[str, list] = {c: [] for c in ("text", "key", "drop", "note")}
        for position, text, drop, note in _file_docs(part, text_column, txt_mode, max_line_bytes):
            if position >= 1 << _POS_BITS:
                raise CorpusError(f"{part['path']}: larger than {2**_POS_BITS // 2**30} GiB; split the file")
            out["text"].append(text)
            out["key"].append(make_key(source_id, file_id, position))
            out["drop"].append(drop)
            out["note"].append(note)
            if len(out["key"]) == batch_rows:
                yield _doc_batch(out, label)
                out = {c: [] for c in out}
        if out["key"]:
            yield _doc_batch(out, label)


def _doc_batch(cols: dict[str, list], label: str) -> pa.Table:
    n = len(cols["key"])
    return pa.table({**cols, "source": [label] * n, "logprob": np.full(n, math.nan)}, schema=DOC_SCHEMA)
