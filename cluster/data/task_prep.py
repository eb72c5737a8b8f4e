"""Labelled task data made ready for training and evaluation: per-split statistics (rows, labels,
lengths) computed by Ray Data, the label set, tokenization with the base checkpoint's tokenizer
(`map_batches`, tags aligned to sub-tokens by character offsets), and the trivial baseline a
fine-tuned model must beat.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data

from cluster.data.tasks import (
    IGNORE_INDEX,
    ROWS_PER_BLOCK,
    TaskData,
    TaskDataError,
    check_columns,
    load_splits,
    user_error,
)


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


def baseline(task: str, stats: dict[str, SplitStats], sample_limit: int) -> dict[str, Any]:
    """The trivial predictor's validation scores: the training split's majority class, all-O
    tagging, or the most frequent training completion (among the sampled ones)."""
    from cluster.objectives import metrics as M

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
