"""Every worker evaluates an equal share of the validation rows and the remainder is dropped
(RankSlice, streaming_split(equal=True)). A split with fewer rows than workers left every worker
none, and the run failed at its first evaluation (KeyError 'nats' in the loss summary, retried
max_failures times, ~80 s). Both jobs now refuse it before Ray starts training. No Ray here."""

from __future__ import annotations

import os

import pytest

from cluster.config import load_config
from cluster.corpus import Corpus
from cluster.entry import JobError
from cluster.finetune import FinetuneConfig, plan_run
from cluster.pretrain import PretrainConfig, check_inputs
from cluster.sources import RankSlice
from tests.conftest import REPO


def corpus(validation_rows: int) -> Corpus:
    split = lambda rows, docs: {"documents": docs, "tokens": rows * 128, "bytes": rows * 500, "rows": rows,  # noqa: E731
                                "tokens_packed": rows * 128}
    return Corpus("/data/prepare/small", {"layout": "blocks", "block_size": 128, "columns": ["input_ids"],
                                          "splits": {"train": split(400, 90), "validation": split(validation_rows, 1)}})


def pretrain_cfg(workers: int) -> PretrainConfig:
    return load_config(PretrainConfig, os.path.join(REPO, "configs", "gpt-tiny.yaml"),
                       ["corpus=small", f"scaling.num_workers={workers}"])


def test_rank_slices_of_fewer_rows_than_ranks_are_all_empty():
    shards = [{"path": "/nowhere.parquet", "rows": 1}]
    assert [RankSlice(shards, None, r, 2).stop for r in (0, 1)] == [0, 0]


def test_pretraining_refuses_fewer_validation_rows_than_workers():
    check_inputs(pretrain_cfg(2), corpus(2))
    check_inputs(pretrain_cfg(1), corpus(1))
    with pytest.raises(JobError, match=r"1 validation row\(s\) from 1 document\(s\), fewer than the 2 worker\(s\) "
                                       r"\(scaling.num_workers\).*split.validation_fraction or train on fewer workers"):
        check_inputs(pretrain_cfg(2), corpus(1))
    with pytest.raises(JobError, match=r"0 validation row\(s\).*larger split.validation_fraction$"):
        check_inputs(pretrain_cfg(1), corpus(0))


def test_finetuning_refuses_fewer_validation_rows_than_workers():
    cfg = load_config(FinetuneConfig, os.path.join(REPO, "configs", "finetune-topic-tiny.yaml"), [])
    meta = lambda val: {"rows": {"train": 400, "validation": val}, "max_length": 64, "tokenizer_hash": "x"}  # noqa: E731
    assert plan_run(cfg, meta(2), "/runs/x", 2).steps_per_epoch >= 1
    with pytest.raises(JobError, match=r"data: 1 validation row\(s\) are fewer than the 2 worker\(s\)"):
        plan_run(cfg, meta(1), "/runs/x", 2)
