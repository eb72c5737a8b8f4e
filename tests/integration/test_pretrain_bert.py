"""BERT, RoBERTa and ALBERT pretraining through the same loop, data path and checkpoints."""

from __future__ import annotations

import json
import os

import pytest

from cluster.config import load_config
from cluster.models import ModelConfig, build_model, count_parameters
from cluster.pretrain import PretrainConfig
from jobs import pretrain as pretrain_job
from tests.conftest import REPO


def run(family: str, *sets: str) -> dict:
    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs", f"{family}-tiny.yaml"),
                      [f"name=t-{family}", "corpus=t-bert", "scaling.num_workers=2", "train.batch_size=16",
                       "scaling.threads_per_worker=1", *sets])
    pretrain_job.run(cfg)
    with open(os.path.join(os.environ["RAYLM_STORAGE"], "pretrain", f"t-{family}", "summary.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("family, pair", [("bert", "nsp"), ("roberta", None), ("albert", "sop")])
def test_encoder_family_trains_through_the_shared_loop(bert_corpus, family, pair):
    """Each family runs on 2 workers with its objective's metrics, and its checkpoint answers a
    transformers fill-mask pipeline with no raylm import. (Learning to beat the unigram baseline
    within a CPU test budget is not reached yet: see the issue notes.)"""
    s = run(family, "train.max_steps=20", "train.eval_every=10", "train.checkpoint_every=20")
    rows = [json.loads(line) for line in open(s["metrics"])]
    val = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in val] == [10, 20]
    assert all(0 <= r["val_mlm_accuracy"] <= 1 and r["val_mlm_loss"] > 0 for r in val)
    if pair:
        assert 0 <= val[-1][f"val_{pair}_accuracy"] <= 1
    else:
        assert not any(k.startswith(("val_nsp", "val_sop")) for k in val[-1])
    ckpt = s["final"]["checkpoint"]
    from transformers import AutoModel, AutoModelForMaskedLM, pipeline

    AutoModel.from_pretrained(ckpt)  # the bare encoder loads too
    AutoModelForMaskedLM.from_pretrained(ckpt)
    fill = pipeline("fill-mask", model=ckpt, tokenizer=ckpt)
    answers = fill("Researchers in the lab [MASK] the results.")
    assert len(answers) == 5 and all("token_str" in a for a in answers)


def test_albert_has_fewer_parameters_than_bert_of_the_same_shape():
    special = {"pad": 0, "bos": None, "eos": None}
    bert = build_model(ModelConfig(family="bert"), 2048, special)
    albert = build_model(ModelConfig(family="albert"), 2048, special)
    assert count_parameters(albert) < 0.7 * count_parameters(bert)


def test_pair_objective_on_a_corpus_without_segments_is_refused(gpt_corpus, capsys):
    rc = pretrain_job.main(["--config", os.path.join(REPO, "configs/bert-tiny.yaml"), "--set", "corpus=t-gpt",
                            "--set", "name=t-bad-bert"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "needs a corpus prepared with pack.layout 'segments'" in err
    assert "has no mask token" in err


def test_mask_rate_outside_unit_interval_names_the_key(capsys):
    rc = pretrain_job.main(["--config", os.path.join(REPO, "configs/bert-tiny.yaml"), "--set", "objective.mask_rate=1.5"])
    assert rc == 2
    assert "objective.mask_rate" in capsys.readouterr().err
