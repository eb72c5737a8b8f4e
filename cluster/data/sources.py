"""Corpus sources as Ray Datasets with one schema: text, key, source, logprob, drop, note.

`key` orders documents deterministically (source, file, position) so a re-run reproduces the same
shards; `drop` holds a reason for documents that cannot be used (they are counted, never silently
lost); `note` says where (file and position) for the manifest's problem list. Files are read by
cluster.data.files, the synthetic corpus comes from cluster.data.synthetic.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Annotated, Any, Literal

import pyarrow as pa
import ray
from pydantic import Field, model_validator

from cluster import storage
from cluster.config import Section, StrList
from cluster.data.files import (
    _FILE_BITS,
    DOC_SCHEMA,
    TEXT_SUFFIXES,
    file_size,
    is_line_based,
    make_key,
    map_files,
    read_file_docs,
)
from cluster.errors import CorpusError

# part_mb: auto: about this many read parts per source, of a size within AUTO_PART_MB (MiB)
AUTO_PARTS = 64
AUTO_PART_MB = (8, 64)


class SourceConfig(Section):
    kind: Literal["synthetic", "files", "hf"] = Field(description="where documents come from")
    name: str | None = Field(None, description="label used in the manifest; defaults to the kind")
    weight: float = Field(
        1.0, ge=0, description="mixing weight: each kept document appears floor(w) or ceil(w) times"
    )
    # synthetic
    num_docs: int = Field(20000, ge=1, description="synthetic: number of documents")
    seed: int = Field(0, description="synthetic: generator seed")
    language: Literal["en", "zh"] = Field("en", description="synthetic: English (cluster.data.synthetic) or "
                                          "Chinese (cluster.data.synthetic_zh), each with its exact entropy floor")
    # files
    paths: StrList = Field(default_factory=list, description="files: paths, folders or globs, local or object-store URIs (s3://...)")
    text_column: str = Field("text", description="files/hf: column or JSON key holding the text")
    txt_mode: Literal["file", "paragraph", "line"] = Field(
        "file", description="files: what one document is in a .txt file"
    )
    part_mb: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="files/hf: read uncompressed line-based files (.jsonl, .txt in line mode) and hf "
        f"datasets in parts of about this many MiB, one task each; auto: the source's bytes / {AUTO_PARTS}, "
        f"between {AUTO_PART_MB[0]} and {AUTO_PART_MB[1]} MiB. The shards depend on it, not on the cluster"
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

    def part_bytes(self, total: int) -> int:
        """The read parts' size for a source of `total` splittable bytes. `auto` cuts a small source in
        parts of 8 MiB (enough parts for every core) and a larger one in about AUTO_PARTS parts of up
        to 64 MiB: the driver keeps ~25 KB of Ray's bookkeeping per block of every dataset a prepare
        makes, so at 8 MiB a 2 GB corpus cost it +14.5% of its memory over a 0.25 GB one, at 32 MiB
        +5.0% (BENCHMARKS.md, Prepare at scale), and a 69 MB corpus prepared 10% slower in 3 parts
        of 32 MiB on 2 cores than in 9 of 8 MiB."""
        if self.part_mb != "auto":
            return int(self.part_mb * 2**20)
        low, high = (mb * 2**20 for mb in AUTO_PART_MB)
        return int(min(max(total / AUTO_PARTS, low), high))


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


def file_parts(files: list[str], source: SourceConfig, source_id: int, part_bytes: int | None = None
               ) -> list[dict[str, Any]]:
    """One row per part of a file: line-based uncompressed files over `part_bytes` (default: the
    source's `part_bytes` for their total size) are read as byte ranges of about that size by
    several tasks (a single large JSONL file would otherwise be read, cleaned and tokenized by one
    core); other files are one part each. A line belongs to the part it starts in."""
    sizes = map_files(file_size, files)
    splittable = [not path.endswith(".gz") and is_line_based(path, source.txt_mode) for path in files]
    if part_bytes is None:
        part_bytes = source.part_bytes(sum(size for size, split in zip(sizes, splittable, strict=True) if split))
    parts = []
    for file_id, (path, size, split) in enumerate(zip(files, sizes, splittable, strict=True)):
        row = {"path": path, "source_id": source_id, "file_id": file_id, "source": source.label}
        if not split or size <= part_bytes:
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
    parts = file_parts(files, source, source_id)
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


def _synthetic_batch(batch: dict[str, Any], seed: int, source_id: int, label: str, language: str = "en") -> pa.Table:
    from cluster.data import synthetic, synthetic_zh

    generator = synthetic_zh if language == "zh" else synthetic
    docs = [generator.document(seed, int(i)) for i in batch["id"]]
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
        fn_kwargs={"seed": source.seed, "source_id": source_id, "label": source.label, "language": source.language},
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
    rows = max(1, int(len(table) * source.part_bytes(table.nbytes) / max(1, table.nbytes)))
    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, max(1, len(table)), rows)])


def source_dataset(source: SourceConfig, source_id: int, max_line_bytes: int) -> ray.data.Dataset:
    if source.kind == "synthetic":
        return synthetic_dataset(source, source_id)
    if source.kind == "files":
        return file_dataset(source, source_id, max_line_bytes)
    return hf_dataset(source, source_id)
