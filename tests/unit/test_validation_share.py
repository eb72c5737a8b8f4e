"""What pretraining and fine-tuning refuse about their data before Ray starts training. No Ray here.

Every worker evaluates an equal share of the validation rows and the remainder is dropped
(RankSlice, streaming_split(equal=True)). A split with fewer rows than workers left every worker
none, and the run failed at its first evaluation (KeyError 'nats' in the loss summary, retried
max_failures times, ~80 s). Both jobs now refuse it before Ray starts training."""

from __future__ import annotations

import os

import pytest

from cluster.config import load_config
from cluster.data.corpus import Corpus
from cluster.data.ingest import RankSlice
from cluster.errors import JobError
from cluster.stages.finetune import FinetuneConfig, plan_run
from cluster.stages.pretrain import PretrainConfig, check_inputs
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


def test_an_encoder_too_short_for_the_corpus_segments_is_told_both_fixes(tmp_path):
    """The blocks case named both fixes; the segments case only said 'must hold max_segment_tokens
    + 3 special tokens' (bert-tiny, max_len 128, on a corpus prepared with the default 253)."""
    from cluster.data.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer
    from serve.tiny import sentences

    save_tokenizer(train_tokenizer(sentences(), TokenizerConfig(kind="wordpiece", vocab_size=300, min_frequency=1)),
                   str(tmp_path / "tokenizer"))
    seg = corpus(4)
    seg.path, seg.manifest = str(tmp_path), {**seg.manifest, "layout": "segments", "block_size": None,
                                             "max_segment_tokens": 253, "tokenizer": {"path": "tokenizer"}}
    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs", "bert-tiny.yaml"), ["corpus=small"])
    with pytest.raises(JobError, match=r"model.max_len \(128\) must hold the corpus's max_segment_tokens \(253\) \+ 3 "
                                       r"special tokens: --set model.max_len=256, or prepare the corpus with "
                                       r"--set pack.max_segment_tokens=125"):
        check_inputs(cfg, seg)
