"""Corpus sources as Ray Datasets with one schema: text, key, source, logprob, drop, note.

`key` orders documents deterministically (source, file, position) so a re-run reproduces the same
shards; `drop` holds a reason for documents that cannot be used (they are counted, never silently
lost); `note` says where (file and position) for the manifest's problem list.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import logging
import math
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field, model_validator

from cluster import storage
from cluster.config import Section, StrList
from cluster.text import DROP_EMPTY, DROP_UNDECODABLE

log = logging.getLogger(__name__)

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
    paths: StrList = Field(default_factory=list, description="files: paths, folders or globs, local or object-store URIs (s3://...)")
    text_column: str = Field("text", description="files/hf: column or JSON key holding the text")
    txt_mode: Literal["file", "paragraph", "line"] = Field(
        "file", description="files: what one document is in a .txt file"
    )
    part_mb: float = Field(
        8, gt=0, description="files/hf: read uncompressed line-based files (.jsonl, .txt in line mode) and hf "
        "datasets in parts of about this many MiB, one task each; the shards depend on it, not on the cluster"
    )
    # hf
    dataset: str | None = Field(None, description="hf: dataset name or local builder (json, parquet, text)")
    data_files: StrList | None = Field(None, description="hf: local data files for a builder")
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


def quiet_data_logs() -> None:
    """For training jobs, whose console has a progress line per log interval: no Ray Data progress
    bars (a line per step in a job log) and no "Starting execution ... / Execution plan ..." pair
    per epoch and per evaluation; each execution still logs its "execution finished in" line, and
    ray-data.log in the session's logs has everything. Datasets made after this call carry it to
    the actors that run them (Ray Train's split coordinators)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def start_data_actors() -> threading.Thread:
    """Run a one-row dataset in a background thread, so that Ray Data's per-cluster actors (its
    stats actor and autoscaling coordinator, made at a cluster's first execution) are made while Ray
    Train starts its controller. Otherwise the first execution is the train split coordinator's, and
    their processes start in the window where the worker waits for its first batch. Made from the
    driver's job, the coordinator also takes a worker Ray prestarted for the driver (none matches the
    controller's runtime environment). Time to first step on 2 cores: BENCHMARKS.md, Ray Train
    overhead, 2026-12-05. The caller joins it before returning; a failure is only logged (the job's
    own executions report real errors)."""

    def run() -> None:
        try:
            ray.data.range(1).materialize()
        except Exception as exc:  # noqa: BLE001 - a head start only
            log.debug("starting Ray Data's actors ahead failed: %s", exc)

    thread = threading.Thread(target=run, name="raylm-data-actors", daemon=True)
    thread.start()
    return thread


def read_parquet(paths: list[str], columns: list[str] | None = None) -> ray.data.Dataset:
    """`ray.data.read_parquet` through Ray Data's first Parquet datasource (V1). Ray 2.60 routes
    Parquet through DataSourceV2 by default, which lists the files on every execution with a pool
    of `FooterReader` actors (up to 32, each a fresh worker process): each training epoch, being its
    own execution, paid that again. On 2 cores, reading the 1-shard benchmark corpus took 1.5-4.0 s
    with V2 against 0.2 s with V1, 300 small files 23 s against 1.2-2.1 s, and an epoch boundary
    stalled 2-worker training ~7 s against ~2 s. V1 reads the footers once, when the dataset is made.
    The switch is read when the read is built, so it is set only around this call.

    `columns` become `select_columns` (read_parquet's `columns=` is deprecated): Ray's optimizer
    pushes the projection into the read, whose plan stays one ReadParquet of those columns."""
    ctx = ray.data.DataContext.get_current()
    if not hasattr(ctx, "use_datasource_v2"):  # a Ray without V2
        ds = ray.data.read_parquet(paths)
    else:
        previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(paths)
        finally:
            ctx.use_datasource_v2 = previous
    return ds.select_columns(columns) if columns is not None else ds


class RankSlice:
    """One rank's equal share of a small split's Parquet shards, read by the worker itself with
    pyarrow at its first `iter_batches` and kept for the later ones. Made for the validation split,
    which every evaluation reads again: as a Ray Dataset, materialised by the driver, every
    evaluation was a Ray Data execution through a split coordinator actor of its own, started at the
    first evaluation (which took 2.2-2.7 s instead of ~0.3 s on 2 cores) and idle the rest of the run.

    Like `streaming_split(equal=True)`, every rank gets `total // world` rows, in order, and the
    remainder (fewer than `world` rows) is dropped: ranks evaluate the same number of batches, which
    FSDP's collective forward needs. Only the shards that overlap this rank's rows are read. Batches
    are converted by Ray Data's own `BlockAccessor`, so they look exactly like `iter_batches`' own.

    `shards` are `{"path", "rows"}` in split order, the rows as the corpus manifest records them."""

    def __init__(self, shards: list[dict], columns: list[str] | None, rank: int, world: int) -> None:
        self.shards, self.columns = shards, columns
        per = sum(s["rows"] for s in shards) // world
        self.start, self.stop = rank * per, (rank + 1) * per
        self._table: pa.Table | None = None

    def table(self) -> pa.Table | None:
        if self._table is None:
            from cluster import storage

            parts, offset = [], 0
            for shard in self.shards:
                lo, hi = max(self.start - offset, 0), min(self.stop - offset, shard["rows"])
                if lo < hi:
                    fs, path = storage.filesystem(shard["path"])
                    table = pq.read_table(path, columns=self.columns, filesystem=fs)
                    if table.num_rows != shard["rows"]:
                        raise ValueError(f"{shard['path']}: {table.num_rows} rows, but the corpus manifest "
                                         f"records {shard['rows']}: the shard changed after prepare")
                    parts.append(table.slice(lo, hi - lo))
                offset += shard["rows"]
            self._table = pa.concat_tables(parts).combine_chunks() if parts else None
        return self._table

    def iter_batches(self, batch_size: int, batch_format: str = "numpy") -> Iterator[Any]:
        from ray.data.block import BlockAccessor

        table = self.table()
        for i in range(0, table.num_rows if table is not None else 0, batch_size):
            yield BlockAccessor.for_block(table.slice(i, batch_size)).to_batch_format(batch_format)


def make_key(source: int, file: int, position: int) -> int:
    return (source << (_FILE_BITS + _POS_BITS)) | (file << _POS_BITS) | position


def expand_paths(patterns: list[str], where: str) -> list[str]:
    """Patterns -> sorted files. A pattern that matches nothing is an error naming it. Patterns
    are local paths (made absolute) or object-store URIs (`s3://bucket/raw/*.jsonl.gz`), which
    stay URIs: every node of a cluster can read those, and only those a local path on a shared
    volume (or inside the job's working_dir)."""
    files: list[str] = []
    for pattern in patterns:
        if storage.is_uri(pattern):
            matched = _expand_uri(pattern, where)
        else:
            matched = _expand_local(pattern.removeprefix("file://"), where)
        files.extend(matched)
    return sorted(dict.fromkeys(files))


def _is_text_file(name: str) -> bool:
    return name.endswith(TEXT_SUFFIXES) or name.endswith(tuple(s + ".gz" for s in TEXT_SUFFIXES))


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _expand_local(pattern: str, where: str) -> list[str]:
    if _has_glob(pattern):
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise CorpusError(f"{where}: '{pattern}' matches no file")
    elif os.path.isdir(pattern):
        matched = sorted(os.path.join(root, f) for root, _, names in os.walk(pattern) for f in names if _is_text_file(f))
        if not matched:
            raise CorpusError(f"{where}: folder '{pattern}' holds no .txt/.jsonl/.json/.parquet file")
    elif os.path.exists(pattern):
        matched = [pattern]
    else:
        raise CorpusError(f"{where}: '{pattern}' does not exist")
    return [os.path.abspath(m) for m in matched if os.path.isfile(m)]


def _expand_uri(pattern: str, where: str) -> list[str]:
    """A URI, a URI prefix ("folder") or a URI glob, listed through pyarrow. Globs go through
    fsspec's wrapper of the pyarrow filesystem, for the same `*`/`**`/`?`/`[...]` rules as local
    globs (pyarrow's listings have no pattern matching; fsspec's matches dot-names too)."""
    import pyarrow.fs as pafs

    scheme_end = pattern.index("://") + 3
    try:
        if _has_glob(pattern):
            first = min(pattern.index(ch) for ch in "*?[" if ch in pattern)
            base = pattern[: pattern.rfind("/", scheme_end, first)] if "/" in pattern[scheme_end:first] else ""
            if not base:
                raise CorpusError(f"{where}: '{pattern}': a glob must come after the bucket name")
            fs, base_path = storage.filesystem(base)
            from fsspec.implementations.arrow import ArrowFSWrapper

            rest = pattern[len(base):]
            found = ArrowFSWrapper(fs).glob(base_path + rest, detail=True)
            # As local globs: a wildcard does not match a name that starts with a dot.
            matched = sorted(storage.location(fs, p) for p, info in found.items() if info["type"] == "file"
                             and ("/." not in p[len(base_path):] or "/." in rest))
            if not matched:
                raise CorpusError(f"{where}: '{pattern}' matches no file")
            return matched
        fs, path = storage.filesystem(pattern)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [storage.location(fs, path)]
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"{where}: '{pattern}' does not exist")
        listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        matched = sorted(storage.location(fs, i.path) for i in listed
                         if i.type == pafs.FileType.File and _is_text_file(i.path))
        if not matched:
            raise CorpusError(f"{where}: folder '{pattern}' holds no .txt/.jsonl/.json/.parquet file")
        return matched
    except (OSError, ValueError) as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"{where}: cannot list '{pattern}' ({exc})") from None


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


def file_parts(files: list[str], source: SourceConfig, source_id: int, part_bytes: int) -> list[dict[str, Any]]:
    """One row per part of a file: line-based uncompressed files over `part_bytes` are read as
    byte ranges of about that size by several tasks (a single large JSONL file would otherwise be
    read, cleaned and tokenized by one core); other files are one part each. A line belongs to the
    part it starts in."""
    parts = []
    for file_id, (path, size) in enumerate(zip(files, map_files(file_size, files), strict=True)):
        row = {"path": path, "source_id": source_id, "file_id": file_id, "source": source.label}
        if path.endswith(".gz") or not is_line_based(path, source.txt_mode) or size <= part_bytes:
            parts.append({**row, "start": 0, "end": -1})
            continue
        n = math.ceil(size / part_bytes)
        bounds = [size * i // n for i in range(n + 1)]
        parts += [{**row, "start": a, "end": b} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return parts


def file_dataset(source: SourceConfig, source_id: int, max_line_bytes: int) -> ray.data.Dataset:
    """The source's files as documents; `check_files` has checked them (prepare does, before Ray starts)."""
    where = f"source '{source.label}'"
    files = expand_paths(source.paths, where)
    if len(files) >= 1 << _FILE_BITS:
        raise CorpusError(f"{where}: {len(files)} files; at most {(1 << _FILE_BITS) - 1} per source")
    parts = file_parts(files, source, source_id, int(source.part_mb * 2**20))
    # Parts of files are the unit of parallelism; errors name the file and line.
    return ray.data.from_items(parts, override_num_blocks=max(1, len(parts))).map_batches(
        read_file_docs,
        fn_kwargs={
            "text_column": source.text_column,
            "txt_mode": source.txt_mode,
            "max_line_bytes": max_line_bytes,
        },
        batch_size=1,
    )


def _synthetic_batch(batch: dict[str, Any], seed: int, source_id: int, label: str) -> pa.Table:
    from cluster import synthetic

    docs = [synthetic.document(seed, int(i)) for i in batch["id"]]
    n = len(docs)
    return pa.table({
        "text": [d.text for d in docs],
        "key": [make_key(source_id, 0, d.index) for d in docs],
        "source": [label] * n,
        "logprob": [d.logprob for d in docs],
        "drop": [""] * n,
        "note": [""] * n,
    }, schema=DOC_SCHEMA)


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

    from cluster import hub

    with hub.offline_if_unreachable() as unresolved:
        try:
            ds = datasets.load_dataset(
                source.dataset, source.subset, data_files=source.data_files, split=source.split
            )
        except Exception as exc:  # datasets raises many types; the message is what the user needs
            note = f" ({hub.offline_note(unresolved)})" if unresolved else ""
            raise CorpusError(f"source '{source.label}': cannot load dataset '{source.dataset}': {exc}{note}") from None
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
        },
        schema=DOC_SCHEMA,
    )
    # Blocks of about part_mb each, so cleaning and tokenizing spread over the cluster.
    rows = max(1, int(len(table) * source.part_mb * 2**20 / max(1, table.nbytes)))
    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, max(1, len(table)), rows)])


def source_dataset(source: SourceConfig, source_id: int, max_line_bytes: int) -> ray.data.Dataset:
    if source.kind == "synthetic":
        return synthetic_dataset(source, source_id)
    if source.kind == "files":
        return file_dataset(source, source_id, max_line_bytes)
    return hf_dataset(source, source_id)
