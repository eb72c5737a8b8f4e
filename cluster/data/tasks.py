"""Labelled data for fine-tuning and evaluation: the `data:` config section and the loading and
checking of a task's train/validation splits.

Sources: CSV / JSONL / Parquet files (Ray Data readers), a Hugging Face dataset (`datasets`, local
files through a builder or a hub name when online), or the synthetic generator's tasks. Every
problem (missing file or column, rows without labels, validation labels the training split never
shows) is a TaskDataError naming the split, the column and what was found, raised before training.
"""

from __future__ import annotations

import collections
import csv
import re
from typing import Any, Literal

import pyarrow.parquet as pq
import ray
import ray.data
from pydantic import Field, model_validator

from cluster.config import Section, StrList
from cluster.data import synthetic_tasks as synthetic
from cluster.data.files import base_suffix, first_json_record, open_binary
from cluster.data.ingest import read_parquet
from cluster.data.sources import expand_paths
from cluster.errors import CorpusError

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
