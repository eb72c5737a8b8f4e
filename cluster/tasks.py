"""Labelled data for fine-tuning: load a task's train/validation splits, check them, infer the label
set, tokenize with the base checkpoint's tokenizer (Ray Data `map_batches`) and compute the trivial
baseline a fine-tuned model must beat.

Sources: CSV / JSONL / Parquet files (Ray Data readers), a Hugging Face dataset (`datasets`, local
files through a builder or a hub name when online), or the synthetic generator's tasks. Every
problem (missing file or column, rows without labels, validation labels the training split never
shows) is a TaskDataError naming the split, the column and what was found, raised before training.
"""

from __future__ import annotations

import collections
import csv
import functools
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray
import ray.data
from pydantic import Field, model_validator

from cluster import synthetic
from cluster.config import Section, StrList
from cluster.sources import (
    CorpusError,
    base_suffix,
    expand_paths,
    first_json_record,
    open_binary,
    read_parquet,
)

Task = Literal["classification", "tagging", "completion"]
IGNORE_INDEX = -100
ROWS_PER_BLOCK = 64  # small blocks: block-order shuffling then mixes rows finely

# synthetic task -> (task it serves, generator, columns it emits)
SYNTHETIC: dict[str, tuple[str, Any, dict[str, str]]] = {
    "topic": ("classification", synthetic.topic_classification, {"text_column": "text", "label_column": "label"}),
    "topic_pairs": ("classification", synthetic.topic_pairs,
                    {"text_column": "text_a", "text_pair_column": "text_b", "label_column": "label"}),
    "entities": ("tagging", synthetic.entity_tagging, {"tokens_column": "tokens", "tags_column": "tags"}),
    "topic_completion": ("completion", synthetic.topic_completion,
                         {"prompt_column": "prompt", "completion_column": "completion"}),
}
DEFAULT_SYNTHETIC = {"classification": "topic", "tagging": "entities", "completion": "topic_completion"}


class TaskDataError(CorpusError):
    """Labelled data that cannot be used; the message names the split, column or file."""


class TaskData(Section):
    kind: Literal["synthetic", "files", "hf"] = Field("synthetic", description="where the labelled rows come from")
    synthetic: Literal["topic", "topic_pairs", "entities", "topic_completion"] | None = Field(
        None, description="synthetic: which built-in task (default: topic / entities / topic_completion by task)"
    )
    train_examples: int = Field(2000, ge=1, description="synthetic: training rows")
    validation_examples: int = Field(400, ge=1, description="synthetic: validation rows")
    seed: int = Field(0, description="synthetic rows, and the split when validation is carved from train")
    train: StrList = Field(default_factory=list, description="files: CSV/JSONL/Parquet paths or globs, local or URIs (s3://...)")
    validation: StrList = Field(default_factory=list, description="files: validation paths (else a split)")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="share of train held out when no validation")
    dataset: str | None = Field(None, description="hf: dataset name, or a builder (json, csv, parquet) for files")
    subset: str | None = Field(None, description="hf: configuration name")
    data_files: dict[str, StrList] | None = Field(None, description="hf: split name -> local files")
    train_split: str = Field("train", description="hf: training split")
    validation_split: str | None = Field("validation", description="hf: validation split (null: carve from train)")
    text_column: str = Field("text", description="classification: the text")
    text_pair_column: str | None = Field(None, description="classification: second text of a pair")
    label_column: str = Field("label", description="classification: the label")
    tokens_column: str = Field("tokens", description="tagging: list of words (or a space-separated string)")
    tags_column: str = Field("tags", description="tagging: list of BIO tags, one per word")
    prompt_column: str = Field("prompt", description="completion: the prompt")
    completion_column: str = Field("completion", description="completion: the target text")
    max_length: int = Field(128, ge=8, description="tokens per example; longer rows are truncated (counted)")

    @model_validator(mode="after")
    def _sources(self) -> TaskData:
        if self.kind == "files" and not self.train:
            raise ValueError("data.kind 'files' needs data.train (paths or globs)")
        if self.kind == "hf" and not self.dataset:
            raise ValueError("data.kind 'hf' needs data.dataset")
        return self

    def resolved(self, task: str) -> TaskData:
        """For synthetic data: the built-in task's name and column names filled in."""
        if self.kind != "synthetic":
            return self
        name = self.synthetic or DEFAULT_SYNTHETIC[task]
        serves, _, columns = SYNTHETIC[name]
        if serves != task:
            raise TaskDataError(f"data.synthetic '{name}' is a {serves} task, not {task}")
        return self.model_copy(update={"synthetic": name, **columns})


@dataclass
class Prepared:
    """What the driver hands to training: tokenized datasets, labels and the numbers behind them."""

    train: ray.data.Dataset
    validation: ray.data.Dataset
    labels: list[str] | None
    rows: dict[str, int]
    stats: dict[str, Any]
    baseline: dict[str, float]
    token_types: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- loading


def _read_files(patterns: list[str], where: str) -> ray.data.Dataset:
    try:
        files = expand_paths(patterns, where)
    except CorpusError as exc:
        raise TaskDataError(str(exc)) from None
    by_kind: dict[str, list[str]] = collections.defaultdict(list)
    for f in files:
        kind = base_suffix(f)
        if kind not in (".csv", ".jsonl", ".json", ".parquet"):
            raise TaskDataError(f"{where}: '{f}' is not CSV, JSONL/JSON or Parquet")
        by_kind[kind].append(f)
    parts = []
    for kind, paths in sorted(by_kind.items()):
        if kind == ".csv":
            parts.append(ray.data.read_csv(paths))
        elif kind in (".json", ".jsonl"):
            parts.append(ray.data.read_json(paths, lines=kind == ".jsonl"))
        else:
            parts.append(read_parquet(paths))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _hf_split(cfg: TaskData, split: str) -> ray.data.Dataset:
    import datasets

    from cluster import hub

    with hub.offline_if_unreachable() as unresolved:
        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.subset, data_files=cfg.data_files, split=split)
        except Exception as exc:  # datasets raises many types; its message is what the user needs
            note = f" ({hub.offline_note(unresolved)})" if unresolved else ""
            raise TaskDataError(f"data: cannot load split '{split}' of dataset '{cfg.dataset}': {exc}{note}") from None
    # The split is loaded already. Not ray.data.from_huggingface: it first looks for the same
    # dataset on the Hub by re-running load_dataset(<builder name>) with no data files, which for a
    # local builder (json, csv, parquet) globs and reads every data file under the working
    # directory (minutes in a job's working dir, unrelated files read); from_arrow is its fallback.
    return ray.data.from_arrow(ds.with_format("arrow")[:])


def load_splits(cfg: TaskData) -> tuple[ray.data.Dataset, ray.data.Dataset, str]:
    """(train, validation, how validation was made) as raw Ray Datasets."""
    if cfg.kind == "synthetic":
        _, make, _ = SYNTHETIC[cfg.synthetic]
        # few blocks: per-task overhead dominates small data; tokenize_split re-blocks the output
        train = ray.data.from_items(make(cfg.train_examples, seed=cfg.seed), override_num_blocks=2)
        val = ray.data.from_items(make(cfg.validation_examples, seed=cfg.seed + 1_000_003), override_num_blocks=2)
        return train, val, "synthetic"
    if cfg.kind == "files":
        train = _read_files(cfg.train, "data.train")
        if cfg.validation:
            return train, _read_files(cfg.validation, "data.validation"), "files"
    else:
        train = _hf_split(cfg, cfg.train_split)
        if cfg.validation_split:
            return train, _hf_split(cfg, cfg.validation_split), f"split '{cfg.validation_split}'"
    train, val = train.train_test_split(test_size=cfg.validation_fraction, shuffle=True, seed=cfg.seed)
    return train, val, f"{cfg.validation_fraction:.0%} of train (seed {cfg.seed})"


def load_split(cfg: TaskData, split: str) -> ray.data.Dataset:
    """One split as `load_splits` makes it, reading only that split where it has its own source:
    files given only as data.validation (a held-out test file) are that split; a validation split
    carved from train is the same rows jobs.finetune held out (same fraction and seed)."""
    if cfg.kind == "files" and not cfg.train:
        if split == "train":
            raise TaskDataError("data.train: no files given, so there is no train split to read")
        return _read_files(cfg.validation, "data.validation")
    if cfg.kind == "files" and cfg.validation:
        return _read_files(cfg.train if split == "train" else cfg.validation, f"data.{split}")
    if cfg.kind == "hf" and cfg.validation_split:
        return _hf_split(cfg, cfg.train_split if split == "train" else cfg.validation_split)
    train, val, _ = load_splits(cfg)
    return train if split == "train" else val


def user_error(exc: BaseException) -> str:
    """The error a reader or UDF raised, from inside Ray's wrappers (RayTaskError and
    UserCodeException keep only the remote traceback's text): "KeyError: 'label'"."""
    for line in str(exc).splitlines():
        m = re.match(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", line)
        if m and not m.group(1).endswith(("UserCodeException", "RayTaskError")):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"


def columns_of(ds: ray.data.Dataset, split: str) -> list[str]:
    try:
        schema = ds.schema()
    except Exception as exc:  # reading the first block failed: say which split, keep the reader's words
        raise TaskDataError(f"data: cannot read the {split} split: {user_error(exc)}") from None
    if schema is None:
        raise TaskDataError(f"data: the {split} split is empty")
    return list(schema.names)


def required_columns(cfg: TaskData, task: str) -> list[tuple[str, str]]:
    """(config key, column) pairs the task reads."""
    if task == "classification":
        cols = [("text_column", cfg.text_column), ("label_column", cfg.label_column)]
        return cols + ([("text_pair_column", cfg.text_pair_column)] if cfg.text_pair_column else [])
    if task == "tagging":
        return [("tokens_column", cfg.tokens_column), ("tags_column", cfg.tags_column)]
    return [("prompt_column", cfg.prompt_column), ("completion_column", cfg.completion_column)]


def check_columns(cfg: TaskData, task: str, splits: dict[str, ray.data.Dataset]) -> None:
    """Each missing column once, naming the splits that lack it (both, when validation is carved
    from train)."""
    missing: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
    for split, ds in splits.items():
        names = tuple(columns_of(ds, split))
        for key, col in required_columns(cfg, task):
            if col not in names:
                missing.setdefault((key, col, names), []).append(split)
    if missing:
        raise TaskDataError("; ".join(
            f"data.{key}: the {' and '.join(where)} split{'s have' if len(where) > 1 else ' has'} no column "
            f"'{col}' (columns: {', '.join(names)})" for (key, col, names), where in missing.items()))


def file_columns(path: str) -> list[str] | None:
    """A data file's column names from its first bytes (parquet schema, CSV header, first JSON
    object); None when they do not say (the read will)."""
    kind = base_suffix(path)
    try:
        if kind == ".parquet" and not path.endswith(".gz"):
            return list(pq.read_schema(path).names)
        with open_binary(path) as f:
            head = f.read(65536)
    except Exception:  # unreadable here: the Ray Data read names the file and the reason
        return None
    if kind == ".csv":
        lines = head.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
        return next(csv.reader(lines[:1]), None) if len(lines) > 1 or head.endswith(b"\n") else None
    first = first_json_record(path, head)
    return list(first[1]) if first and isinstance(first[1], dict) else None


def check_file_columns(cfg: TaskData, task: str) -> None:
    """Before Ray starts: every data file has the columns the task reads (checked again on the
    datasets Ray reads), so a wrong column name fails in seconds, once per file."""
    if cfg.kind != "files":
        return
    problems = []
    for key, patterns in (("data.train", cfg.train), ("data.validation", cfg.validation)):
        try:
            files = expand_paths(patterns, key) if patterns else []
        except CorpusError as exc:
            raise TaskDataError(str(exc)) from None
        for path in files:
            names = file_columns(path)
            problems += [f"data.{k}: {path} has no column '{col}' (columns: {', '.join(names)})"
                         for k, col in required_columns(cfg, task) if names is not None and col not in names]
    if problems:
        raise TaskDataError("; ".join(problems))


# ---------------------------------------------------------------- statistics (one pass over both splits)


def _words(value: Any) -> list[str] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value)


SAMPLES_PER_BATCH = 256  # completion texts kept per batch for the majority-completion baseline


def _batch_stats(batch: pd.DataFrame, task: str, files_json: str, cols: dict[str, Any]) -> pd.DataFrame:
    """Per-batch counts as (split, key, value, n) rows: rows, empty, truncated, label:<x> (a label or
    tag), missing (no label), mismatch (tagging rows with different word and tag counts), and for
    completion a sample of completion texts."""
    counts: collections.Counter = collections.Counter()
    texts: list[str] = []
    split = batch["__split"].iloc[0] if len(batch) else ""
    tokenized = _tokenize(batch, task, files_json, cols, None, False, keep_empty=True)
    counts["rows"] = len(batch)
    counts["empty"] = int(np.sum(tokenized["empty"]))
    counts["truncated"] = int(np.sum(tokenized["truncated"]))
    if task == "classification":
        for v in batch[cols["label_column"]]:
            counts["missing" if _missing(v) else f"label:{v}"] += 1
    elif task == "tagging":
        for words, tags in zip(batch[cols["tokens_column"]], batch[cols["tags_column"]], strict=True):
            w, t = _words(words), _words(tags)
            if t is None or w is None or not t:
                counts["missing"] += 1
            elif len(w) != len(t):
                counts["mismatch"] += 1
            else:
                counts.update(f"label:{x}" for x in t)
    else:
        texts = [str(c) for c in batch[cols["completion_column"]][:SAMPLES_PER_BATCH] if not _missing(c)]
    rows = [(split, key, "", n) for key, n in counts.items()] + [(split, "completion", t, 1) for t in texts]
    return pd.DataFrame(rows, columns=["split", "key", "value", "n"])


@dataclass
class SplitStats:
    rows: int = 0
    empty: int = 0
    truncated: int = 0
    missing: int = 0
    mismatch: int = 0
    labels: collections.Counter = field(default_factory=collections.Counter)
    completions: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"rows": self.rows, "kept": self.rows - self.empty, "empty": self.empty, "truncated": self.truncated}


def split_stats(splits: dict[str, ray.data.Dataset], task: str, files: dict[str, str], cfg: TaskData) -> dict[str, SplitStats]:
    tagged = [ds.map_batches(_with_split, batch_format="pandas", fn_kwargs={"split": name}) for name, ds in splits.items()]
    kwargs = {"task": task, "files_json": json.dumps(files), "cols": cfg.model_dump()}
    try:
        # Ray Data refuses a union of one dataset (a planner assertion)
        both = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
        rows = both.map_batches(_batch_stats, batch_format="pandas", fn_kwargs=kwargs).take_all()
    except Exception as exc:
        raise TaskDataError(f"data: cannot read the labelled rows: {user_error(exc)}") from None
    out = {name: SplitStats() for name in splits}
    for r in rows:
        st, key = out[r["split"]], r["key"]
        if key.startswith("label:"):
            st.labels[key[6:]] += int(r["n"])
        elif key == "completion":
            st.completions.append(r["value"])
        else:
            setattr(st, key, getattr(st, key) + int(r["n"]))
    for name, st in out.items():
        if st.rows == st.empty:
            raise TaskDataError(f"data: the {name} split has no usable rows ({st.rows} read, all empty)")
    return out


def _with_split(batch: pd.DataFrame, split: str) -> pd.DataFrame:
    return batch.assign(__split=split)


def row_label_problems(task: str, cfg: TaskData, stats: dict[str, SplitStats]) -> list[str]:
    """Rows without a label, and tagging rows whose tags and words differ in number, per split."""
    column = cfg.label_column if task == "classification" else cfg.tags_column
    key = "label_column" if task == "classification" else "tags_column"
    problems = []
    for split, st in stats.items():
        if st.missing:
            problems.append(f"data.{key}: {st.missing} row(s) of the {split} split have no label in '{column}'")
        if st.mismatch:
            problems.append(f"data.{key}: {st.mismatch} row(s) of the {split} split have a different number "
                            f"of tags ('{column}') than words ('{cfg.tokens_column}')")
    return problems


def infer_labels(task: str, cfg: TaskData, stats: dict[str, SplitStats]) -> list[str]:
    """The label set from the training split, checked against every split."""
    key = "label_column" if task == "classification" else "tags_column"
    problems = row_label_problems(task, cfg, stats)
    train = set(stats["train"].labels)
    unseen = sorted(set(stats["validation"].labels) - train)
    if unseen:
        problems.append(f"data.{key}: validation labels {unseen} never occur in the training split "
                        f"(training labels: {sorted(train)})")
    if task == "classification" and len(train) < 2:
        problems.append(f"data.{key}: the training split has {len(train)} distinct label(s); classification needs 2+")
    if task == "tagging":
        bad = sorted(t for t in train if t != "O" and t[:2] not in ("B-", "I-"))
        if bad:
            problems.append(f"data.{key}: tags {bad[:5]} are not BIO (O, B-TYPE, I-TYPE)")
    if problems:
        raise TaskDataError("; ".join(problems))
    if task == "tagging":  # O first, then by entity type with B before I
        return sorted(train, key=lambda t: (t != "O", t[2:], t[:2]))
    return sorted(train)


# ---------------------------------------------------------------- tokenization


@functools.lru_cache(maxsize=4)
def _tokenizer(files_json: str) -> Any:
    return tokenizer_from_files(json.loads(files_json))


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """A tokenizer as {file name: text}: small, and travels to any worker without shared storage."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {name: open(os.path.join(d, name), encoding="utf-8").read() for name in sorted(os.listdir(d))}


def tokenizer_from_files(files: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    d = tempfile.mkdtemp(prefix="raylm-tok-")
    for name, text in files.items():
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write(text)
    return AutoTokenizer.from_pretrained(d)


def _texts(column: Any) -> list[str]:
    return ["" if _missing(t) else str(t) for t in column]


def _tokenize_classification(batch: pd.DataFrame, tok: Any, cfg: dict, label2id: dict | None,
                             token_types: bool) -> dict:
    texts = _texts(batch[cfg["text_column"]])
    pairs = _texts(batch[cfg["text_pair_column"]]) if cfg["text_pair_column"] else None
    args = (texts, pairs) if pairs is not None else (texts,)
    enc = tok(*args, truncation=True, max_length=cfg["max_length"], return_token_type_ids=token_types)
    full = tok(*args)["input_ids"]  # untruncated, only to count truncation
    out = {
        "input_ids": [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]],
        "truncated": np.array([len(a) > len(b) for a, b in zip(full, enc["input_ids"], strict=True)]),
        "empty": np.array([not t.strip() for t in texts]),
    }
    if label2id is not None:
        out["label"] = np.array([label2id.get(str(v), IGNORE_INDEX) for v in batch[cfg["label_column"]]], dtype=np.int64)
    if token_types:
        out["token_type_ids"] = [np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]]
    return out


def align_word_labels(words: list[str], tag_ids: list[int] | None, tok: Any, max_length: int) -> tuple:
    """Tokenize " ".join(words) and give each word's tag id to its first sub-token (others -100).

    Alignment goes through character offsets, not the tokenizer's own word ids, so it holds for
    byte-level BPE (whose tokens carry the leading space) and WordPiece alike. Returns
    (input_ids, labels, truncated): truncated when words fell past max_length."""
    text = " ".join(words)
    owner = np.full(len(text), -1, dtype=np.int64)  # char -> word index (-1 on spaces)
    pos = 0
    for w, word in enumerate(words):
        owner[pos : pos + len(word)] = w
        pos += len(word) + 1
    enc = tok(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    labels = np.full(len(enc["input_ids"]), IGNORE_INDEX, dtype=np.int64)
    seen: set[int] = set()
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        chars = owner[start:end]
        chars = chars[chars >= 0]
        if len(chars) and int(chars[0]) not in seen:
            seen.add(int(chars[0]))
            labels[t] = tag_ids[int(chars[0])] if tag_ids is not None else IGNORE_INDEX
    return np.asarray(enc["input_ids"], dtype=np.int32), labels, len(seen) < len(words)


def _tokenize_tagging(batch: pd.DataFrame, tok: Any, cfg: dict, label2id: dict | None) -> dict:
    ids, labels, truncated, empty = [], [], [], []
    for words, tags in zip(batch[cfg["tokens_column"]], batch[cfg["tags_column"]], strict=True):
        w, t = _words(words) or [], _words(tags) or []
        tag_ids = [label2id.get(x, IGNORE_INDEX) for x in t] if label2id is not None and len(t) == len(w) else None
        i, lab, cut = align_word_labels(w, tag_ids, tok, cfg["max_length"])
        ids.append(i)
        labels.append(lab)
        truncated.append(cut)
        empty.append(not w)
    return {"input_ids": ids, "labels": labels, "truncated": np.array(truncated), "empty": np.array(empty)}


def _tokenize_completion(batch: pd.DataFrame, tok: Any, cfg: dict) -> dict:
    eos = tok.eos_token_id
    budget = cfg["max_length"]
    ids, prompt_len, truncated, empty = [], [], [], []
    for prompt, completion in zip(_texts(batch[cfg["prompt_column"]]), _texts(batch[cfg["completion_column"]]),
                                  strict=True):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        c = c[: budget - 2] + [eos]  # at least one prompt token stays
        cut = len(p) + len(c) > budget
        p = p[len(p) - (budget - len(c)) :] if cut else p  # keep the end of the prompt, next to the answer
        ids.append(np.asarray(p + c, dtype=np.int32))
        prompt_len.append(len(p))
        truncated.append(cut)
        empty.append(not p or len(c) == 1)
    return {"input_ids": ids, "prompt_len": np.array(prompt_len, dtype=np.int64),
            "truncated": np.array(truncated), "empty": np.array(empty)}


def _tokenize(batch: pd.DataFrame, task: str, files_json: str, cfg: dict, label2id: dict | None,
              token_types: bool, keep_empty: bool = False) -> dict:
    """Tokenized columns for a batch of raw rows. With label2id None (the statistics pass) labels
    are not mapped; without keep_empty, rows with no text are dropped (the statistics count them)."""
    tok = _tokenizer(files_json)
    if task == "classification":
        out = _tokenize_classification(batch, tok, cfg, label2id, token_types)
    elif task == "tagging":
        out = _tokenize_tagging(batch, tok, cfg, label2id)
    else:
        out = _tokenize_completion(batch, tok, cfg)
    if keep_empty:
        return out
    keep = ~out.pop("empty")
    out.pop("truncated")
    return {k: [v[i] for i in np.flatnonzero(keep)] if isinstance(v, list) else v[keep] for k, v in out.items()}


def tokenize_split(ds: ray.data.Dataset, task: str, files: dict[str, str], cfg: TaskData, labels: list[str] | None,
                   token_types: bool, split: str) -> ray.data.Dataset:
    """Tokenized, materialized rows (empty ones dropped) in blocks of about ROWS_PER_BLOCK rows."""
    kwargs = {"task": task, "files_json": json.dumps(files), "cfg": cfg.model_dump(),
              "label2id": {label: i for i, label in enumerate(labels or [])}, "token_types": token_types}
    try:
        tokenized = ds.map_batches(_tokenize, batch_format="pandas", fn_kwargs=kwargs)
        return tokenized.repartition(target_num_rows_per_block=ROWS_PER_BLOCK).materialize()
    except Exception as exc:
        raise TaskDataError(f"data: cannot tokenize the {split} split: {user_error(exc)}") from None


# ---------------------------------------------------------------- baselines


def baseline(task: str, stats: dict[str, SplitStats], sample_limit: int) -> dict[str, Any]:
    """The trivial predictor's validation scores: the training split's majority class, all-O
    tagging, or the most frequent training completion (among the sampled ones)."""
    from cluster import metrics as M

    val = stats["validation"]
    if task == "classification":
        major = stats["train"].labels.most_common(1)[0][0]
        n, tp = sum(val.labels.values()), val.labels.get(major, 0)
        present = set(val.labels) | {major}
        return {"accuracy": tp / n, "macro_f1": M.f1(tp, n - tp, 0) / len(present), "majority": major}
    if task == "tagging":
        return {"token_accuracy": val.labels.get("O", 0) / max(sum(val.labels.values()), 1), "entity_f1": 0.0}
    major = collections.Counter(stats["train"].completions).most_common(1)[0][0]
    refs = [c.strip() for c in val.completions[:sample_limit]]
    return {**M.generation_scores([major.strip()] * len(refs), refs), "majority": major}


def prepare_data(task: str, cfg: TaskData, tokenizer: Any, token_types: bool, sample_limit: int = 64) -> Prepared:
    """Load, check, label, tokenize and baseline a task's data: three Ray Data executions (statistics
    over both splits, then each split tokenized), so the driver never holds the rows."""
    cfg = cfg.resolved(task)
    train, val, how = load_splits(cfg)
    splits = {"train": train, "validation": val}
    check_columns(cfg, task, splits)
    files = tokenizer_files(tokenizer)
    stats = split_stats(splits, task, files, cfg)
    labels = infer_labels(task, cfg, stats) if task != "completion" else None
    tokenized = {split: tokenize_split(ds, task, files, cfg, labels, token_types, split) for split, ds in splits.items()}
    return Prepared(
        train=tokenized["train"], validation=tokenized["validation"], labels=labels,
        rows={s: stats[s].rows - stats[s].empty for s in splits},
        stats={"validation_from": how, **{s: st.summary() for s, st in stats.items()}},
        baseline=baseline(task, stats, sample_limit), token_types=token_types,
        extra={"tokenizer_files": files},
    )
