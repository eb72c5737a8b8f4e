"""BERT, RoBERTa and ALBERT pretraining through the same loop, data path and checkpoints."""

from __future__ import annotations

import json
import os

import pytest

from cluster.config import load_config
from cluster.stages.pretrain import PretrainConfig
from cluster.train.models import ModelConfig, build_model, count_parameters
from jobs import pretrain as pretrain_job
from tests.conftest import REPO


def run(family: str, *sets: str) -> dict:
    """The family's tiny recipe on 2 workers: its rows per step split between them."""
    path = os.path.join(REPO, "configs", f"{family}-tiny.yaml")
    per_worker = load_config(PretrainConfig, path, []).train.batch_size // 2
    cfg = load_config(PretrainConfig, path, [f"name=t-{family}", "corpus=t-bert", "scaling.num_workers=2",
                                             f"train.batch_size={per_worker}", "scaling.threads_per_worker=1", *sets])
    pretrain_job.run(cfg)
    with open(os.path.join(os.environ["RAYLM_STORAGE"], "pretrain", f"t-{family}", "summary.json")) as f:
        return json.load(f)


def unigram_top(corpus) -> int:
    """The most frequent non-special token of the training shards: the unigram baseline's guess."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus.local_tokenizer_dir())
    counts = np.zeros(len(tok), dtype=np.int64)
    for path in corpus.shard_paths("train"):
        for ids in pq.read_table(path, columns=["input_ids"]).column("input_ids").to_pylist():
            counts += np.bincount(np.asarray(ids), minlength=len(tok))
    counts[tok.all_special_ids] = 0
    return int(counts.argmax())


def fill_mask(ckpt: str, n_docs: int = 150) -> tuple[list[int], list[int]]:
    """(targets, top-1 predictions) for one word-initial token masked per held-out sentence."""
    import numpy as np
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from cluster.data import synthetic
    from cluster.data.packing import split_sentences
    from cluster.objectives.masking import word_start_table

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForMaskedLM.from_pretrained(ckpt).eval()
    starts, special = word_start_table(tok), set(tok.all_special_ids)
    rng = np.random.default_rng(0)
    rows, where, targets = [], [], []
    for doc in synthetic.documents(n_docs, seed=999):  # the corpus used seed 0: unseen sentences
        for sentence in split_sentences(doc.text):
            ids = tok(sentence)["input_ids"]
            pos = int(rng.choice([i for i, t in enumerate(ids) if t not in special and starts[t]]))
            targets.append(ids[pos])
            rows.append(ids[:pos] + [tok.mask_token_id] + ids[pos + 1 :])
            where.append(pos)
    enc = tok.pad({"input_ids": rows}, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits  # (N, T, V)
    return targets, logits[torch.arange(len(rows)), torch.tensor(where)].argmax(-1).tolist()


@pytest.mark.parametrize("family, pair", [("bert", "nsp"), ("roberta", None), ("albert", "sop")])
def test_encoder_family_learns_through_the_shared_loop(bert_corpus, family, pair):
    """Each family's tiny recipe, on 2 workers: validation MLM loss falls, and the checkpoint, loaded
    with transformers alone, fills masked words of unseen sentences far better than the unigram
    baseline (always the corpus's most frequent token)."""
    s = run(family)
    rows = [json.loads(line) for line in open(s["metrics"])]
    val = [r for r in rows if r.get("split") == "validation"]
    assert len(val) >= 2 and val[-1]["step"] == s["steps"]
    assert val[-1]["val_mlm_loss"] < val[0]["val_mlm_loss"] - 0.3, [r["val_mlm_loss"] for r in val]
    assert all(0 <= r["val_mlm_accuracy"] <= 1 for r in val)
    if pair:
        assert 0 <= val[-1][f"val_{pair}_accuracy"] <= 1
    else:
        assert not any(k.startswith(("val_nsp", "val_sop")) for k in val[-1])

    ckpt = s["final"]["checkpoint"]
    targets, predicted = fill_mask(ckpt)
    top = unigram_top(bert_corpus)
    accuracy = sum(p == t for p, t in zip(predicted, targets, strict=True)) / len(targets)
    baseline = sum(t == top for t in targets) / len(targets)
    print(f"{family}: val mlm loss {val[0]['val_mlm_loss']:.3f} -> {val[-1]['val_mlm_loss']:.3f}; "
          f"fill-mask top-1 {accuracy:.3f} vs unigram {baseline:.3f} on {len(targets)} sentences")
    assert accuracy > 1.5 * baseline and accuracy > baseline + 0.05, (accuracy, baseline)

    from transformers import AutoModel, pipeline

    AutoModel.from_pretrained(ckpt)  # the bare encoder loads too
    answers = pipeline("fill-mask", model=ckpt, tokenizer=ckpt)("Researchers in the lab [MASK] the results.")
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
