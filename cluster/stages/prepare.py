"""jobs.prepare's stage: raw text -> a corpus of sharded token blocks.

Ray Data steps: read (files in parts) -> clean + split -> tokenize -> counts, duplicates and
per-split statistics (cluster/data/tally.py: computed across the cluster, the driver holds one row
of sums per block and a reference to the duplicated texts) -> select (drop, de-duplicate, weight) +
pack -> write Parquet. A tokenizer to train is trained on the cleaned text between cleaning and
tokenizing; a reused one lets reading, cleaning and tokenizing run fused, one task per part of the
input. Everything is written into a build folder beside the corpus the name stands for, the
manifest last, and swapped in then (cluster/data/corpus.py: CorpusBuild), so a failed run leaves
the previous corpus as it was.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pyarrow.fs as pafs
import ray
from pydantic import Field, field_validator
from ray.data.context import ShuffleStrategy

from cluster import runtime, storage
from cluster.config import Section, StrList
from cluster.data.corpus import MANIFEST, SPLITS, CorpusBuild, resolve_corpus_path
from cluster.data.files import check_files
from cluster.data.near_dedup import NearDedupConfig, mark_batch, near_duplicates
from cluster.data.pipeline import (
    clean_batch,
    pack_batch,
    segment_rows,
    select_batch,
    tokenize_batch,
    write_split,
)
from cluster.data.sources import SourceConfig, expand_paths, source_dataset
from cluster.data.tally import Counts, tally, unwrap_error
from cluster.data.text import CHARSETS
from cluster.data.tokenizer import (
    TokenizerConfig,
    end_of_document_id,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
)
from cluster.data.tokenizer_sample import train_on_sample
from cluster.errors import CorpusError
from cluster.runs import check_name

log = logging.getLogger(__name__)


class CleanConfig(Section):
    min_chars: int = Field(20, ge=0, description="drop documents shorter than this after normalising; a CJK (wide) character counts 2")
    max_chars: int = Field(1_000_000, ge=1, description="drop documents longer than this")
    dedup: bool = Field(True, description="exact de-duplication by content hash across all sources")
    near_dedup: NearDedupConfig | None = Field(
        None, description="MinHash LSH near-duplicate removal, e.g. {threshold: 0.8, num_perm: 128, ngram: 5}; off when unset")
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


def _empty(cfg: PrepareConfig, counts: Counts) -> CorpusError:
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(counts.dropped.items()) if v) or "none"
    weighted = f"; the {counts.kept} kept were all weighted away (source weight)" if counts.kept else ""
    return CorpusError(
        f"corpus '{cfg.name}' is empty after filtering: {counts.docs_in} documents in, dropped {dropped}{weighted}"
    )


def corpus_tokenizer(cfg: PrepareConfig, kept: ray.data.Dataset | None, workdir: str,
                     n_train: int = 0, train_bytes: int = 0) -> tuple[Any, str, dict | None]:
    """(tokenizer, its local folder, what its training sample held or None when reused). `n_train`,
    `train_bytes`: the training documents `kept` holds (after weights and de-duplication) and
    their bytes of text."""
    sample = None
    if cfg.tokenizer.path:
        path = source = resolve_corpus_path(cfg.tokenizer.path)
        if storage.is_uri(path):  # e.g. the tokenizer of a corpus in S3: transformers loads local folders
            path = os.path.join(workdir, "reused-tokenizer")
            os.makedirs(path)
            pafs.copy_files(source, path, destination_filesystem=pafs.LocalFileSystem())
        tok = load_tokenizer(path)
        log.info("reusing tokenizer %s", cfg.tokenizer.path)
    else:
        assert kept is not None, "training a tokenizer needs the kept documents"
        log.info("training a %s tokenizer (vocab %d) on a sample of about %d documents", cfg.tokenizer.kind,
                 cfg.tokenizer.vocab_size, cfg.tokenizer.train_docs)
        tok, sample = train_on_sample(kept, cfg.tokenizer, cfg.split.seed, n_train, train_bytes)
        if tok is None:
            raise CorpusError(
                f"corpus '{cfg.name}': no training documents to train the tokenizer on (every kept document "
                "was held out for validation or weighted away by a source weight of 0)"
            )
        log.info("tokenizer sample: %d documents, %.1f MB (%s)", sample["documents"], sample["bytes"] / 1e6,
                 ", ".join(f"{k}: {v}" for k, v in sample["per_source"].items()))
    if cfg.pack.layout == "segments" and (tok.cls_token_id is None or tok.sep_token_id is None):
        raise CorpusError("pack.layout 'segments' needs a tokenizer with [CLS] and [SEP] (tokenizer.kind: wordpiece)")
    local = os.path.join(workdir, "tokenizer")
    save_tokenizer(tok, local)
    return tok, local, sample


def check_sources(cfg: PrepareConfig) -> None:
    """What the driver can check alone, before Ray starts: every file source's paths match files
    of a known kind (parquet files have the text column), and a reused tokenizer is there."""
    for source in cfg.sources:
        if source.kind == "files":
            check_files(expand_paths(source.paths, f"source '{source.label}'"), source.text_column)
    if cfg.tokenizer.path and not storage.exists(storage.join(resolve_corpus_path(cfg.tokenizer.path),
                                                               "tokenizer.json")):
        raise CorpusError(f"config key 'tokenizer.path': '{cfg.tokenizer.path}' is not a tokenizer "
                          "directory (no tokenizer.json in it)")


def prepare(cfg: PrepareConfig, root: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (also written as summary.json)."""
    t0 = time.time()
    check_sources(cfg)
    # Ray starts (or is joined) only now: a missing or unreadable input fails in seconds, and
    # leaves no run folder behind.
    runtime.connect()
    # The new corpus is built beside the one its name stands for, which stays whole and opens until
    # the new one's manifest is written and it is swapped in; a failed build is removed.
    build = CorpusBuild.start(cfg.name, cfg.to_yaml(), root)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # The counts' and near-duplicates' group-bys shuffle by content hash. Ray Data's default hash
    # shuffle starts aggregator actors for each one (6-10 s a group-by on 2 cores, most of a small
    # prepare); the sort-based shuffle runs as tasks (~0.6 s) and scales with the cluster as well.
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        corpus = build.commit(build_corpus(cfg, build))
    except BaseException as exc:
        build.abandon()
        if isinstance(exc, Exception):
            raise unwrap_error(exc) from None
        raise
    manifest = corpus.manifest
    return {
        "corpus": build.named,
        "manifest": storage.join(corpus.path, MANIFEST),
        "documents": manifest["documents"],
        "splits": manifest["splits"],
        "entropy_floor_bpb": manifest.get("entropy_floor_bpb"),
        "shards": len(manifest["shards"]),
        "seconds": round(time.time() - t0, 2),
    }


def build_corpus(cfg: PrepareConfig, build: CorpusBuild) -> dict[str, Any]:
    """Shards and tokenizer written into the build folder; returns the manifest to commit."""
    with tempfile.TemporaryDirectory(prefix="raylm-prepare-") as workdir:
        weights = {s.label: s.weight for s in cfg.sources}
        tokenized, tok, tok_local, sample, first = read_and_tokenize(cfg, weights, workdir)
        counts, stats, n_kept = count_documents(cfg, tokenized, weights, first)
        log.info("stage %s: select + pack + write shards", "2/2" if cfg.tokenizer.path else "4/4")
        eod = end_of_document_id(tok)
        shards = write_shards(cfg, tokenized, counts, weights, eod, build.file("shards"))
        check_training_rows(cfg, shards, stats)
        _upload_tokenizer(tok_local, build.file("tokenizer"))
    manifest = _manifest(cfg, counts, n_kept, stats, shards, tok, eod)
    if sample is not None:
        manifest["tokenizer"]["sample"] = sample
    return manifest


def read_and_tokenize(cfg: PrepareConfig, weights: dict[str, float],
                      workdir: str) -> tuple[Any, Any, str, dict | None, dict | None]:
    """Every source read and cleaned, the tokenizer reused or trained, and every document tokenized
    (materialised: the counts and both splits' writes read it). Returns (tokenized, tokenizer,
    the tokenizer's local folder, its training sample's counts or None, the duplicated texts'
    first keys when the counts found them already or None)."""
    max_line = int(cfg.clean.max_line_mb * 2**20)
    datasets = [source_dataset(s, i, max_line) for i, s in enumerate(cfg.sources)]
    raw = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    cleaned = raw.map_batches(
        clean_batch,
        fn_kwargs={"clean_cfg": cfg.clean.to_dict(), "split_cfg": cfg.split.to_dict()},
        batch_size=None,  # the batches the source yields (a batch size here would bundle whole parts)
        batch_format="pyarrow",
    )
    if cfg.clean.near_dedup is not None:
        cleaned = drop_near_duplicates(cfg, cleaned)
    first = None
    if cfg.tokenizer.path:
        # A reused tokenizer is known up front, so reading, cleaning and tokenizing run fused
        # in one task per part of the input: one pass, and no text held in the object store.
        # Duplicates are tokenized too and dropped at packing (they are few in real corpora).
        tok, tok_local, sample = corpus_tokenizer(cfg, None, workdir)
        log.info("stage 1/2: read + clean + tokenize")
    else:
        log.info("stage 1/4: read + clean")
        cleaned = cleaned.materialize()
        counts, stats = tally(cleaned, cfg.clean.dedup, weights, tokens=False)
        if counts.kept == 0:
            raise _empty(cfg, counts)
        first = counts.first
        log.info("stage 2/4: tokenizer")
        kept = cleaned.map_batches(
            select_batch, fn_kwargs={"first": counts.first, "weights": weights},
            batch_size=2048, batch_format="pyarrow",
        )
        tok, tok_local, sample = corpus_tokenizer(cfg, kept, workdir, stats["train"]["documents"],
                                                 stats["train"]["bytes"])
        log.info("stage 3/4: tokenize")
    tokenized = cleaned.map_batches(
        tokenize_batch,
        fn_kwargs={"tokenizer_json": tok.backend_tokenizer.to_str(), "layout": cfg.pack.layout,
                   "max_segment_tokens": cfg.pack.max_segment_tokens},
        # Fused behind the source: its batches. Over materialised blocks: bounded batches.
        batch_size=None if cfg.tokenizer.path else 4096,
        batch_format="pyarrow",
    ).materialize()
    return tokenized, tok, tok_local, sample, first


def drop_near_duplicates(cfg: PrepareConfig, cleaned: Any) -> Any:
    """`cleaned` with the near-duplicates' drop reason set (clean.near_dedup)."""
    log.info("near-duplicates: MinHash LSH over every kept document")
    if not cfg.tokenizer.path:
        cleaned = cleaned.materialize()  # read and cleaned once for the signatures and the rest
    near, count = near_duplicates(cleaned, cfg.clean.near_dedup)
    log.info("near-duplicates: %d distinct text(s) to drop", count)
    return cleaned.map_batches(mark_batch, fn_kwargs={"hashes": near}, batch_format="pyarrow")


def count_documents(cfg: PrepareConfig, tokenized: Any, weights: dict[str, float],
                    first: Any = None) -> tuple[Counts, dict, int]:
    """Drop reasons, duplicates, per-split statistics and the validation top-up; the number of
    documents kept after weighting. An empty corpus is refused here."""
    top_up = (cfg.pack.layout, cfg.pack.block_size, cfg.split.seed) if cfg.split.validation_fraction else None
    counts, stats = tally(tokenized, cfg.clean.dedup, weights, tokens=True, top_up=top_up, first=first)
    n_kept = sum(int(s["documents"]) for s in stats.values())
    if n_kept == 0:  # every document was filtered out or weighted away
        raise _empty(cfg, counts)
    if counts.to_validation:
        log.warning("split.validation_fraction %g held out less than one row of %d documents: moved %d "
                    "train document(s) to validation (the next ones by split hash)",
                    cfg.split.validation_fraction, n_kept, len(counts.to_validation))
    return counts, stats, n_kept


def write_shards(cfg: PrepareConfig, tokenized: Any, counts: Counts, weights: dict[str, float], eod: int,
                 shards_dir: str) -> list[dict]:
    """Both splits selected (duplicates dropped, weights applied), packed and written as Parquet."""

    def write(split: str) -> list[dict]:
        part = tokenized.map_batches(
            select_batch, batch_size=4096, batch_format="pyarrow",
            fn_kwargs={"first": counts.first, "weights": weights, "split": split,
                       "to_validation": counts.to_validation},
        )
        if cfg.pack.layout == "blocks":
            rows = part.map_batches(
                pack_batch, fn_kwargs={"block_size": cfg.pack.block_size, "eod_id": eod},
                batch_size=4096, batch_format="pyarrow",
            )
            row_bytes = cfg.pack.block_size * 4
        else:
            rows = part.map_batches(segment_rows, batch_size=1024)
            row_bytes = cfg.pack.max_segment_tokens * 8
        rows_per_shard = max(1, int(cfg.output.shard_mb * 2**20 // row_bytes))
        return write_split(rows, shards_dir, split, rows_per_shard)

    # The splits are written concurrently: each is a few short Ray Data executions (pack,
    # count, repartition + write) whose cost is mostly scheduling latency, not CPU. Shards do
    # not depend on it (each split's executions keep their own order).
    with ThreadPoolExecutor(len(SPLITS), thread_name_prefix="raylm-write") as pool:
        return [shard for written in pool.map(write, SPLITS) for shard in written]


def check_training_rows(cfg: PrepareConfig, shards: list[dict], stats: dict) -> None:
    """A corpus no training job can read is a failure, not a finished corpus."""
    if any(sh["rows"] for sh in shards if sh["split"] == "train"):
        return
    train = stats["train"]
    unit = (f"one block of {cfg.pack.block_size} tokens (pack.block_size)" if cfg.pack.layout == "blocks"
            else "one segment")
    raise CorpusError(
        f"corpus '{cfg.name}' has no training row: its {train['documents']} train document(s) hold "
        f"{train['tokens']} tokens, less than {unit}; add documents or lower pack.block_size"
    )


def _upload_tokenizer(local: str, dest: str) -> None:
    if storage.is_uri(dest):
        pafs.copy_files(local, dest, source_filesystem=pafs.LocalFileSystem())
    else:
        shutil.copytree(local, dest)


def _manifest(cfg, counts: Counts, n_kept, stats, shards, tok, eod) -> dict[str, Any]:
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
    # With several synthetic sources (English and Chinese) each document counts under its own
    # generator; which source it came from (at most ln 2 nats a document for two equal sources,
    # told by its first characters) is not counted, so the floor is that much low.
    floor = {}
    for split, s in stats.items():
        if s["documents"] and s["synthetic_docs"] == s["documents"]:
            floor[split] = -s["logprob"] / math.log(2) / s["bytes"]
    if floor:
        manifest["entropy_floor_bpb"] = floor
    return manifest
