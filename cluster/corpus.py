"""jobs.prepare's pipeline (raw text -> sharded token blocks) and the Corpus that later stages open.

Ray Data stages: read (files in parts) -> clean + split -> tokenize -> [driver: counts, duplicates,
per-split statistics] -> select (drop, de-duplicate, weight) + pack -> write Parquet. A tokenizer to
train is trained on the cleaned text between cleaning and tokenizing; a reused one lets reading,
cleaning and tokenizing run fused, one task per part of the input.
A corpus directory holds `shards/*.parquet`, `tokenizer/`, `config.yaml` and `manifest.json`; the
manifest is written last, so a directory without one is an unfinished or failed corpus.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from pydantic import Field, field_validator
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider

from cluster import runtime, storage
from cluster.config import Section, StrList
from cluster.packing import chunk_sentences, pack_flat, split_of, split_sentences
from cluster.runs import RunDir, check_name
from cluster.sources import CorpusError, SourceConfig, check_files, expand_paths, source_dataset
from cluster.text import CHARSETS, DROP_DUPLICATE, clean, content_hash, hash_unit
from cluster.tokenizer import (
    TokenizerConfig,
    end_of_document_id,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"


class CleanConfig(Section):
    min_chars: int = Field(20, ge=0, description="drop documents shorter than this after normalising")
    max_chars: int = Field(1_000_000, ge=1, description="drop documents longer than this")
    dedup: bool = Field(True, description="exact de-duplication by content hash across all sources")
    charsets: StrList | None = Field(None, description=f"keep only text mostly in these: {sorted(CHARSETS)}")
    min_charset_fraction: float = Field(0.9, gt=0, le=1, description="fraction of letters in `charsets`")
    max_line_mb: float = Field(16, gt=0, description="a longer line in a source file is an error")

    @field_validator("charsets")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if name not in CHARSETS:
                raise ValueError(f"unknown charset '{name}' (known: {', '.join(sorted(CHARSETS))})")
        return value


class PackConfig(Section):
    layout: Literal["blocks", "segments"] = Field(
        "blocks", description="blocks: fixed-length packed rows; segments: sentence-aware chunks (NSP/SOP)"
    )
    block_size: int = Field(256, ge=8, le=65536, description="tokens per packed row (blocks layout)")
    max_segment_tokens: int = Field(
        253, ge=8, description="tokens per chunk of whole sentences (segments layout)"
    )


class SplitConfig(Section):
    validation_fraction: float = Field(0.02, ge=0, lt=1, description="share of documents held out")
    seed: int = Field(0, description="salt of the hash that assigns documents to splits")


class OutputConfig(Section):
    shard_mb: float = Field(64.0, gt=0, description="target size of one Parquet shard (uncompressed)")


class PrepareConfig(Section):
    name: str = Field("corpus", description="corpus name: written to <RAYLM_STORAGE>/prepare/<name>/")
    sources: list[SourceConfig] = Field(min_length=1, description="where documents come from, mixed by weight")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)


# ---------------------------------------------------------------- Ray Data stage functions


def _clean_batch(batch: pa.Table, clean_cfg: dict, split_cfg: dict) -> pa.Table:
    """Cleaned text, drop reason, content hash and split per document; the other columns pass
    through as Arrow (batch_format="pyarrow": no conversion of the columns this stage leaves alone)."""
    texts, drops, hashes, splits = [], [], [], []
    for text, drop in zip(batch.column("text").to_pylist(), batch.column("drop").to_pylist(), strict=True):
        if drop:
            cleaned, reason = "", drop
        else:
            cleaned, reason = clean(
                text,
                clean_cfg["min_chars"],
                clean_cfg["max_chars"],
                clean_cfg["charsets"],
                clean_cfg["min_charset_fraction"],
            )
        digest = content_hash(cleaned)
        texts.append(cleaned)
        drops.append(reason)
        hashes.append(digest)
        splits.append(split_of(digest, split_cfg["validation_fraction"], split_cfg["seed"]))
    out = batch.drop_columns(["text", "drop"])
    for name, values, type_ in (("text", texts, pa.string()), ("drop", drops, pa.string()),
                                ("hash", hashes, pa.binary(16)), ("split", splits, pa.string())):
        out = out.append_column(pa.field(name, type_), pa.array(values, type=type_))
    return out


def _copies(digest: bytes, weight: float) -> int:
    """How many times a kept document enters the corpus under its source's weight: floor(w), plus
    one more for a deterministic fraction w - floor(w) of documents (drawn from the content hash)."""
    whole = math.floor(weight)
    return int(whole) + int(weight > whole and hash_unit(digest, salt=7) < weight - whole)


def _select_batch(batch: pa.Table, duplicates: set[int], weights: dict[str, float], split: str | None = None,
                  to_validation: set[int] | frozenset[int] = frozenset()) -> pa.Table:
    """Drop filtered rows and duplicates (and rows of other splits when `split` is given, the keys in
    `to_validation` counting as validation); apply each source's weight as a deterministic number of copies."""
    keep = pc.equal(batch.column("drop"), "")
    if duplicates:
        keep = pc.and_(keep, pc.invert(pc.is_in(batch.column("key"), pa.array(list(duplicates), pa.int64()))))
    if split is not None:
        in_split = pc.equal(batch.column("split"), split)
        if to_validation:
            moved = pc.is_in(batch.column("key"), pa.array(list(to_validation), pa.int64()))
            in_split = pc.or_(in_split, moved) if split == "validation" else pc.and_(in_split, pc.invert(moved))
        keep = pc.and_(keep, in_split)
    rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
    if any(w != 1.0 for w in weights.values()):  # copies per row, from the content hash
        digests, sources = batch.column("hash").take(rows).to_pylist(), batch.column("source").take(rows).to_pylist()
        rows = np.repeat(rows, [_copies(h, weights[src]) for h, src in zip(digests, sources, strict=True)])
    return batch.take(pa.array(rows, type=pa.int64()))


@lru_cache(maxsize=2)
def _rust_tokenizer(tokenizer_json: str) -> Any:
    """One parsed tokenizer per worker process and tokenizer, not one per batch."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


_PASS_THROUGH = ("key", "source", "hash", "drop", "note", "split", "logprob")


def _tokenize_batch(batch: pa.Table, tokenizer_json: str, layout: str, max_segment_tokens: int) -> Any:
    """Every kept document's tokens (a filtered one gets none: it may be a huge line) and the
    columns that selection, counting and the manifest need; the text is not carried further."""
    tok = _rust_tokenizer(tokenizer_json)
    texts = ["" if drop else t for t, drop in zip(batch.column("text").to_pylist(), batch.column("drop").to_pylist(),
                                                    strict=True)]
    # UTF-8 bytes of the kept documents' text, counted by Arrow (a filtered document counts none)
    n_bytes = pc.if_else(pc.equal(batch.column("drop"), ""), pc.binary_length(batch.column("text")), 0
                         ).to_numpy(zero_copy_only=False).astype(np.int64)
    passed = batch.select(list(_PASS_THROUGH))  # as Arrow columns, untouched
    if layout == "blocks":
        encs = tok.encode_batch_fast(texts, add_special_tokens=False)
        lens = np.fromiter((len(e) for e in encs), dtype=np.int32, count=len(encs))
        offsets = np.zeros(len(encs) + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        # One flat array and offsets make the Arrow list column directly (no array per document).
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=int(offsets[-1]))
        return pa.table({**{c: passed.column(c) for c in _PASS_THROUGH}, "n_bytes": n_bytes, "n_tokens": lens,
                         "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))})
    out: dict[str, Any] = {c: passed.column(c).to_numpy(zero_copy_only=False) for c in _PASS_THROUGH}
    out["n_bytes"] = n_bytes
    # segments: tokenise sentence by sentence so chunk boundaries fall between sentences
    sentences = [split_sentences(t) for t in texts]
    flat_sents = [s for doc in sentences for s in doc]
    encs = iter(tok.encode_batch_fast(flat_sents, add_special_tokens=False))
    chunks, n_tokens = [], []
    for doc in sentences:
        ids = [np.asarray(next(encs).ids, dtype=np.int32) for _ in doc]
        n_tokens.append(int(sum(len(x) for x in ids)))
        chunks.append(chunk_sentences(ids, max_segment_tokens))
    out["ids"] = [np.concatenate([c[0] for c in ch]) if ch else np.zeros(0, np.int32) for ch in chunks]
    out["chunk_lens"] = [np.asarray([len(c[0]) for c in ch], dtype=np.int32) for ch in chunks]
    out["chunk_sents"] = [np.asarray([len(c[1]) for c in ch], dtype=np.int32) for ch in chunks]
    out["sent_starts"] = [
        np.concatenate([c[1] for c in ch]).astype(np.int32) if ch else np.zeros(0, np.int32) for ch in chunks
    ]
    out["n_tokens"] = n_tokens
    return out


def _pack_batch(batch: pa.Table, block_size: int, eod_id: int) -> dict[str, Any]:
    """Blocks straight from the Arrow list column's flat tokens and offsets: converting it to one
    NumPy array per document and back cost more than the packing itself."""
    ids = batch.column("ids").combine_chunks()
    blocks, _tail = pack_flat(ids.flatten().to_numpy(), ids.offsets.to_numpy(), block_size, eod_id)
    return {"input_ids": blocks}


def _segment_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """One row per chunk of whole sentences, from the per-document encoding of `_tokenize_batch`."""
    rows_ids, rows_starts, rows_doc = [], [], []
    cols = ("ids", "chunk_lens", "chunk_sents", "sent_starts", "key")
    for ids, lens, n_sents, starts, key in zip(*(batch[c] for c in cols), strict=True):
        tok_off = sent_off = 0
        for length, n_sent in zip(lens, n_sents, strict=True):
            rows_ids.append(np.asarray(ids[tok_off : tok_off + length], dtype=np.int32))
            rows_starts.append(np.asarray(starts[sent_off : sent_off + n_sent], dtype=np.int32))
            rows_doc.append(int(key))
            tok_off += int(length)
            sent_off += int(n_sent)
    return {"input_ids": rows_ids, "sentence_starts": rows_starts, "doc_id": rows_doc}


class _ShardNames(FilenameProvider):
    """Deterministic shard names: `<split>-<task>.parquet` (Ray's default has a random id)."""

    def __init__(self, split: str):
        super().__init__(file_format="parquet")
        self.split = split

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.split}-{task_index:05d}.parquet"


# ---------------------------------------------------------------- the pipeline


@dataclass
class _Counts:
    docs_in: int
    dropped: dict[str, int]
    problems: list[str]
    duplicates: set[int]
    to_validation: set[int] = field(default_factory=set)  # train documents moved to validation (`_top_up`)

    @property
    def kept(self) -> int:
        """Documents that passed every filter (before source weights copy or drop them)."""
        return self.docs_in - sum(self.dropped.values())


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps errors raised in tasks (RayTaskError, UserCodeException); find our CorpusError."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CorpusError) and type(e) is CorpusError:
            # Ray Data appends its retry advice to errors raised in a UDF; ours are not transient.
            return CorpusError(str(e).split("\nFailed to ", 1)[0])
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    # Last resort: the remote traceback is flattened into the message.
    match = re.search(r"cluster\.sources\.CorpusError: (.+)", str(exc))
    return CorpusError(match.group(1).strip()) if match else exc


def _top_up(split: np.ndarray, copies: np.ndarray, units: Callable[[np.ndarray], np.ndarray],
            cost: np.ndarray, need: int) -> np.ndarray:
    """Indices of the train documents to move to validation so that it holds one row.

    A split drawn by hash holds out nothing, or less than a row, from a small corpus (54 files at
    validation_fraction 0.02 held out none), and pretraining then has nothing to evaluate on. Each
    document weighs `cost` x its copies (blocks: tokens + end of document, against block_size;
    segments: 1 per non-empty document, against 1). When validation weighs less than `need`, the
    train documents with the lowest split hash (`units(indices)`: those a larger fraction would
    hold out first, so the choice is as deterministic as the split) move over until it does, as
    long as train keeps `need` too; otherwise none move. The tokenizer, trained earlier on the
    train split, has seen the moved documents' text; the model has not."""
    weight = cost * copies
    short = need - int(weight[split == SPLITS.index("validation")].sum())
    train = np.flatnonzero((split == SPLITS.index("train")) & (weight > 0))
    if short <= 0 or not len(train):
        return np.zeros(0, dtype=np.int64)
    order = train[np.argsort(units(train), kind="stable")]
    taken = np.cumsum(weight[order])
    k = int(np.searchsorted(taken, short)) + 1  # documents until validation weighs `need`
    if k > len(order) or int(taken[-1]) - int(taken[k - 1]) < need:
        return np.zeros(0, dtype=np.int64)
    return order[:k]


def _tally(ds: ray.data.Dataset, dedup: bool, weights: dict[str, float], tokens: bool, max_problems: int = 50,
           top_up: tuple[str, int, int] | None = None) -> tuple[_Counts, dict[str, dict[str, float]]]:
    """One pass over the small columns on the driver: drop counts, problem notes, the keys of
    duplicate documents and (with `tokens`) each split's documents, tokens, bytes and log-probability
    after source weights. Exact de-duplication needs a global view; holding 16-byte hashes on the
    driver costs far less than a shuffle by hash and keeps the corpus order (hence determinism).
    With `top_up` = (layout, block_size, split seed) and `tokens`, a validation split too small for
    one row is topped up from train (`_top_up`); the moved keys are in the counts."""
    names = ["key", "hash", "drop", "note", "source"] + (["split", "n_tokens", "n_bytes", "logprob"] if tokens else [])
    cols: dict[str, list] = {c: [] for c in ("key", "copies", "split", "n_tokens", "n_bytes", "logprob")}
    hashes: list[bytes] = []
    dropped: Counter[str] = Counter()
    problems: list[str] = []
    docs_in = 0
    for batch in ds.select_columns(names).iter_batches(batch_format="pyarrow", batch_size=None):
        docs_in += batch.num_rows
        drops = batch.column("drop").to_pylist()
        kept = np.flatnonzero(np.asarray([not d for d in drops], dtype=bool))
        for drop, note in zip(drops, batch.column("note").to_pylist(), strict=True):
            if drop:
                dropped[drop] += 1
                if note and len(problems) < max_problems:
                    problems.append(f"{note} ({drop})")
        batch = batch.take(pa.array(kept, type=pa.int64()))
        digests = batch.column("hash").to_pylist()
        hashes += digests
        cols["key"].append(batch.column("key").to_numpy())
        cols["copies"].append(np.fromiter((_copies(h, weights[src]) for h, src in zip(
            digests, batch.column("source").to_pylist(), strict=True)), dtype=np.int64, count=len(digests)))
        if tokens:
            cols["split"].append(np.asarray([SPLITS.index(x) for x in batch.column("split").to_pylist()]))
            for c in ("n_tokens", "n_bytes", "logprob"):
                cols[c].append(batch.column(c).to_numpy())
    arr = {c: np.concatenate(v) if v else np.zeros(0) for c, v in cols.items()}
    duplicates: set[int] = set()
    if dedup:
        seen: set[bytes] = set()
        for i in np.argsort(arr["key"], kind="stable"):  # the first document by key is the one kept
            if hashes[i] in seen:
                duplicates.add(int(arr["key"][i]))
            else:
                seen.add(hashes[i])
    dropped[DROP_DUPLICATE] = len(duplicates)
    counts = _Counts(docs_in, dict(dropped), problems, duplicates)
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0, "logprob": 0.0, "synthetic_docs": 0} for s in SPLITS}
    if tokens and len(arr["key"]):
        copies = arr["copies"] * ~np.isin(arr["key"], np.fromiter(duplicates, dtype=np.int64, count=len(duplicates)))
        if top_up is not None:
            layout, block_size, seed = top_up
            cost, need = (arr["n_tokens"] + 1, block_size) if layout == "blocks" else ((arr["n_tokens"] > 0), 1)
            moved = _top_up(arr["split"], copies, lambda idx: np.asarray([hash_unit(hashes[i], salt=seed) for i in idx]),
                            cost.astype(np.int64), need)
            if len(moved):
                arr["split"][moved] = SPLITS.index("validation")
                counts.to_validation = {int(k) for k in arr["key"][moved]}
        synthetic = ~np.isnan(arr["logprob"])
        for code, split in enumerate(SPLITS):
            c = copies * (arr["split"] == code)
            stats[split] = {
                "documents": int(c.sum()),
                "tokens": int((c * arr["n_tokens"]).sum()),
                "bytes": int((c * arr["n_bytes"]).sum()),
                "logprob": float((c * np.where(synthetic, arr["logprob"], 0.0)).sum()),
                "synthetic_docs": int((c * synthetic).sum()),
            }
    return counts, stats


def _file_sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_split(ds: ray.data.Dataset, out_dir: str, split: str, rows_per_shard: int) -> list[dict]:
    ds = ds.materialize()
    rows = ds.count()
    if rows == 0:
        return []
    split_dir = storage.join(out_dir, split)
    # OVERWRITE (the split's folder is ours alone) lets shard names carry no random write id.
    ds.repartition(max(1, math.ceil(rows / rows_per_shard))).write_parquet(
        split_dir, filename_provider=_ShardNames(split), mode=SaveMode.OVERWRITE
    )
    fs, base = storage.filesystem(split_dir)
    shards = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda i: i.path):
        name = os.path.basename(info.path)
        if name.startswith(split + "-") and name.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                n = pq.ParquetFile(f).metadata.num_rows
            shards.append({"file": f"shards/{split}/{name}", "split": split, "rows": n,
                           "sha256": _file_sha256(fs, info.path)})
    return shards


def _empty(cfg: PrepareConfig, counts: _Counts) -> CorpusError:
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(counts.dropped.items()) if v) or "none"
    weighted = f"; the {counts.kept} kept were all weighted away (source weight)" if counts.kept else ""
    return CorpusError(
        f"corpus '{cfg.name}' is empty after filtering: {counts.docs_in} documents in, dropped {dropped}{weighted}"
    )


def _tokenizer(cfg: PrepareConfig, kept: ray.data.Dataset | None, workdir: str):
    if cfg.tokenizer.path:
        path = cfg.tokenizer.path
        if storage.is_uri(path):  # e.g. the tokenizer of a corpus in S3: transformers loads local folders
            path = os.path.join(workdir, "reused-tokenizer")
            os.makedirs(path)
            pafs.copy_files(cfg.tokenizer.path, path, destination_filesystem=pafs.LocalFileSystem())
        tok = load_tokenizer(path)
        log.info("reusing tokenizer %s", cfg.tokenizer.path)
    else:
        assert kept is not None, "training a tokenizer needs the kept documents"
        sample = kept.filter(expr="split == 'train'").limit(cfg.tokenizer.train_docs).select_columns(["text"])
        texts = [r["text"] for r in sample.take_all()]
        if not texts:
            raise CorpusError(
                f"corpus '{cfg.name}': no training documents to train the tokenizer on (every kept document "
                "was held out for validation or weighted away by a source weight of 0)"
            )
        log.info("training a %s tokenizer (vocab %d) on %d documents", cfg.tokenizer.kind,
                 cfg.tokenizer.vocab_size, len(texts))
        tok = train_tokenizer(texts, cfg.tokenizer)
    if cfg.pack.layout == "segments" and (tok.cls_token_id is None or tok.sep_token_id is None):
        raise CorpusError("pack.layout 'segments' needs a tokenizer with [CLS] and [SEP] (tokenizer.kind: wordpiece)")
    local = os.path.join(workdir, "tokenizer")
    save_tokenizer(tok, local)
    return tok, local


def check_sources(cfg: PrepareConfig) -> None:
    """What the driver can check alone, before Ray starts: every file source's paths match files
    of a known kind (parquet files have the text column), and a reused tokenizer is there."""
    for source in cfg.sources:
        if source.kind == "files":
            check_files(expand_paths(source.paths, f"source '{source.label}'"), source.text_column)
    if cfg.tokenizer.path and not storage.exists(storage.join(cfg.tokenizer.path, "tokenizer.json")):
        raise CorpusError(f"config key 'tokenizer.path': '{cfg.tokenizer.path}' is not a tokenizer "
                          "directory (no tokenizer.json in it)")


def prepare(cfg: PrepareConfig, root: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (also written as summary.json)."""
    t0 = time.time()
    check_sources(cfg)
    # Ray starts (or is joined) only now: a missing or unreadable input fails in seconds, and
    # leaves no run folder behind.
    runtime.connect()
    # A re-run replaces the corpus: its completion marker goes first, so that nothing half-written
    # ever looks complete.
    run = RunDir("prepare", cfg.name, root).begin(cfg, MANIFEST, "shards")
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    try:
        max_line = int(cfg.clean.max_line_mb * 2**20)
        datasets = [source_dataset(s, i, max_line) for i, s in enumerate(cfg.sources)]
        raw = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        weights = {s.label: s.weight for s in cfg.sources}
        cleaned = raw.map_batches(
            _clean_batch,
            fn_kwargs={"clean_cfg": cfg.clean.to_dict(), "split_cfg": cfg.split.to_dict()},
            batch_size=None,  # the batches the source yields (a batch size here would bundle whole parts)
            batch_format="pyarrow",
        )
        with tempfile.TemporaryDirectory(prefix="raylm-prepare-") as workdir:
            if cfg.tokenizer.path:
                # A reused tokenizer is known up front, so reading, cleaning and tokenizing run fused
                # in one task per part of the input: one pass, and no text held in the object store.
                # Duplicates are tokenized too and dropped at packing (they are few in real corpora).
                tok, tok_local = _tokenizer(cfg, None, workdir)
                log.info("stage 1/2: read + clean + tokenize")
            else:
                log.info("stage 1/4: read + clean")
                cleaned = cleaned.materialize()
                counts, _ = _tally(cleaned, cfg.clean.dedup, weights, tokens=False)
                if counts.kept == 0:
                    raise _empty(cfg, counts)
                log.info("stage 2/4: tokenizer")
                kept = cleaned.map_batches(
                    _select_batch, fn_kwargs={"duplicates": counts.duplicates, "weights": weights},
                    batch_size=2048, batch_format="pyarrow",
                )
                tok, tok_local = _tokenizer(cfg, kept, workdir)
                log.info("stage 3/4: tokenize")
            eod = end_of_document_id(tok)
            tokenized = cleaned.map_batches(
                _tokenize_batch,
                fn_kwargs={"tokenizer_json": tok.backend_tokenizer.to_str(), "layout": cfg.pack.layout,
                           "max_segment_tokens": cfg.pack.max_segment_tokens},
                # Fused behind the source: its batches. Over materialised blocks: bounded batches.
                batch_size=None if cfg.tokenizer.path else 4096,
                batch_format="pyarrow",
            ).materialize()
            top_up = (cfg.pack.layout, cfg.pack.block_size, cfg.split.seed) if cfg.split.validation_fraction else None
            counts, stats = _tally(tokenized, cfg.clean.dedup, weights, tokens=True, top_up=top_up)
            n_kept = sum(int(s["documents"]) for s in stats.values())
            if n_kept == 0:  # every document was filtered out or weighted away
                raise _empty(cfg, counts)
            if counts.to_validation:
                log.warning("split.validation_fraction %g held out less than one row of %d documents: moved %d "
                            "train document(s) to validation (the next ones by split hash)",
                            cfg.split.validation_fraction, n_kept, len(counts.to_validation))

            log.info("stage %s: select + pack + write shards", "2/2" if cfg.tokenizer.path else "4/4")
            shards_dir = run.file("shards")

            def write(split: str) -> list[dict]:
                part = tokenized.map_batches(
                    _select_batch, batch_size=4096, batch_format="pyarrow",
                    fn_kwargs={"duplicates": counts.duplicates, "weights": weights, "split": split,
                               "to_validation": counts.to_validation},
                )
                if cfg.pack.layout == "blocks":
                    rows = part.map_batches(
                        _pack_batch, fn_kwargs={"block_size": cfg.pack.block_size, "eod_id": eod},
                        batch_size=4096, batch_format="pyarrow",
                    )
                    row_bytes = cfg.pack.block_size * 4
                else:
                    rows = part.map_batches(_segment_rows, batch_size=1024)
                    row_bytes = cfg.pack.max_segment_tokens * 8
                rows_per_shard = max(1, int(cfg.output.shard_mb * 2**20 // row_bytes))
                return _write_split(rows, shards_dir, split, rows_per_shard)

            # The splits are written concurrently: each is a few short Ray Data executions (pack,
            # count, repartition + write) whose cost is mostly scheduling latency, not CPU. Shards do
            # not depend on it (each split's executions keep their own order).
            with ThreadPoolExecutor(len(SPLITS), thread_name_prefix="raylm-write") as pool:
                shards = [shard for written in pool.map(write, SPLITS) for shard in written]
            if not any(sh["rows"] for sh in shards if sh["split"] == "train"):
                # A corpus no training job can read is a failure, not a finished corpus.
                train = stats["train"]
                unit = (f"one block of {cfg.pack.block_size} tokens (pack.block_size)" if cfg.pack.layout == "blocks"
                        else "one segment")
                raise CorpusError(
                    f"corpus '{cfg.name}' has no training row: its {train['documents']} train document(s) hold "
                    f"{train['tokens']} tokens, less than {unit}; add documents or lower pack.block_size"
                )
            _upload_tokenizer(tok_local, run.file("tokenizer"))
    except Exception as exc:
        raise _unwrap(exc) from None

    manifest = _manifest(cfg, counts, n_kept, stats, shards, tok, eod)
    storage.write_json_atomic(run.file(MANIFEST), manifest)
    return {
        "corpus": run.path,
        "manifest": run.file(MANIFEST),
        "documents": manifest["documents"],
        "splits": manifest["splits"],
        "entropy_floor_bpb": manifest.get("entropy_floor_bpb"),
        "shards": len(shards),
        "seconds": round(time.time() - t0, 2),
    }


def _upload_tokenizer(local: str, dest: str) -> None:
    if storage.is_uri(dest):
        storage.delete_dir(dest)
        pafs.copy_files(local, dest, source_filesystem=pafs.LocalFileSystem())
    else:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(local, dest)


def _manifest(cfg, counts: _Counts, n_kept, stats, shards, tok, eod) -> dict[str, Any]:
    splits = {}
    for split, s in stats.items():
        rows = sum(sh["rows"] for sh in shards if sh["split"] == split)
        packed = rows * cfg.pack.block_size if cfg.pack.layout == "blocks" else s["tokens"]
        splits[split] = {
            "documents": s["documents"],
            "tokens": s["tokens"] + (s["documents"] if cfg.pack.layout == "blocks" else 0),  # + end-of-doc
            "bytes": s["bytes"],
            "rows": rows,
            "tokens_packed": packed,
        }
    manifest: dict[str, Any] = {
        "format": "raylm-corpus/1",
        "name": cfg.name,
        "layout": cfg.pack.layout,
        "block_size": cfg.pack.block_size if cfg.pack.layout == "blocks" else None,
        "max_segment_tokens": cfg.pack.max_segment_tokens if cfg.pack.layout == "segments" else None,
        "columns": ["input_ids"] if cfg.pack.layout == "blocks" else ["input_ids", "sentence_starts", "doc_id"],
        "documents": {
            "in": counts.docs_in,
            "kept": counts.kept,
            "dropped": counts.dropped,
            "after_weighting": n_kept,
        },
        "problems": counts.problems,
        "splits": splits,
        "sources": [s.to_dict() for s in cfg.sources],
        "tokenizer": {
            "path": "tokenizer",
            "kind": cfg.tokenizer.kind if not cfg.tokenizer.path else "reused",
            "vocab_size": len(tok),
            "hash": tokenizer_hash(tok),
            "eod_id": eod,
        },
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # The exact entropy floor is known only when every document came from the synthetic generator.
    floor = {}
    for split, s in stats.items():
        if s["documents"] and s["synthetic_docs"] == s["documents"]:
            floor[split] = -s["logprob"] / math.log(2) / s["bytes"]
    if floor:
        manifest["entropy_floor_bpb"] = floor
    return manifest


# ---------------------------------------------------------------- opening a prepared corpus


@dataclass
class Corpus:
    """A prepared corpus directory, opened by name (under RAYLM_STORAGE/prepare/) or by path."""

    path: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, name_or_path: str, root: str | None = None) -> Corpus:
        candidates = [name_or_path]
        if "/" not in name_or_path and not storage.is_uri(name_or_path):
            candidates.insert(0, storage.join(root or storage.storage_root(), "prepare", name_or_path))
        for path in candidates:
            if storage.exists(storage.join(path, MANIFEST)):
                return cls(path, storage.read_json(storage.join(path, MANIFEST)))
        for path in candidates:
            if storage.exists(path):
                raise CorpusError(
                    f"corpus '{path}' has no {MANIFEST}: its prepare run did not finish; re-run jobs.prepare"
                )
        raise CorpusError(
            f"corpus '{name_or_path}' not found (looked in: {', '.join(candidates)}); "
            "prepare it with `raylm prepare` or jobs.prepare"
        )

    @property
    def layout(self) -> str:
        return self.manifest["layout"]

    @property
    def tokenizer_path(self) -> str:
        return storage.join(self.path, self.manifest["tokenizer"]["path"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        """The split's shards in manifest order: {"path", "rows"} each."""
        return [{"path": storage.join(self.path, s["file"]), "rows": s["rows"]}
                for s in self.manifest["shards"] if s["split"] == split]

    def shard_paths(self, split: str) -> list[str]:
        return [s["path"] for s in self.shards(split)]

    def split_info(self, split: str) -> dict[str, Any]:
        return self.manifest["splits"][split]

    def bytes_per_token(self, split: str) -> float:
        """Raw bytes represented by one packed token, for bits-per-byte from summed nats."""
        info = self.split_info(split)
        return info["bytes"] / max(1, info["tokens"])

    def entropy_floor(self, split: str = "validation") -> float | None:
        return (self.manifest.get("entropy_floor_bpb") or {}).get(split)

    def local_tokenizer_dir(self) -> str:
        """A local directory holding the tokenizer (downloaded once from a URI corpus)."""
        if not storage.is_uri(self.path):
            return self.tokenizer_path
        local = os.path.join(tempfile.gettempdir(), "raylm-tokenizers", self.manifest["tokenizer"]["hash"])
        if os.path.exists(os.path.join(local, "tokenizer.json")):
            return local
        # Copied into a fresh folder beside it, then renamed: pyarrow writes files only into folders
        # that exist, and every worker of a node may get here at once (the first rename wins).
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(local), prefix=".copy-")
        try:
            pafs.copy_files(self.tokenizer_path, tmp, destination_filesystem=pafs.LocalFileSystem())
            try:
                os.rename(tmp, local)
            except OSError:
                if not os.path.exists(os.path.join(local, "tokenizer.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local
