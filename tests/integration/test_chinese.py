"""Chinese text through the pipeline on the shared local Ray: configs/prepare-zh-bert.yaml (the
synthetic generator in Chinese and English), segments of whole Chinese sentences for NSP/SOP, and a
tiny BERT that fills masked Chinese characters better than the unigram baseline and answers
transformers' fill-mask pipeline with Chinese characters."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.config import load_config
from cluster.data import synthetic_zh
from cluster.stages.pretrain import PretrainConfig
from jobs import pretrain as pretrain_job
from tests.conftest import REPO, _prepare

CJK = range(0x4E00, 0xA000)


@pytest.fixture(scope="module")
def zh_corpus(ray_session):
    return _prepare("t-zh", "prepare-zh-bert.yaml",
                    ["sources.0.num_docs=4000", "sources.1.num_docs=1000", "output.shard_mb=0.2",
                     "split.validation_fraction=0.1"])


def test_chinese_documents_pack_into_segments_of_whole_sentences(zh_corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zh_corpus.local_tokenizer_dir())
    manifest = zh_corpus.manifest
    assert manifest["layout"] == "segments" and manifest["entropy_floor_bpb"]["validation"] > 0
    chinese = 0
    for path in zh_corpus.shard_paths("train")[:2]:
        table = pq.read_table(path, columns=["input_ids", "sentence_starts"]).to_pylist()
        for row in table:
            ids, starts = row["input_ids"], row["sentence_starts"]
            text = tok.decode(ids, skip_special_tokens=True).replace(" ", "")
            if not any(ord(ch) in CJK for ch in text):
                continue
            chinese += 1
            # every sentence of the segment (the units NSP/SOP pair up) is one whole Chinese sentence
            bounds = [*starts, len(ids)]
            for a, b in zip(bounds, bounds[1:], strict=False):
                sentence = tok.decode(ids[a:b], skip_special_tokens=True).replace(" ", "")
                if sentence:
                    assert sentence.endswith("。") and sentence.count("。") == 1, sentence
    assert chinese > 50


def test_a_bert_fills_masked_chinese_characters_above_the_unigram_baseline(zh_corpus):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs", "bert-tiny.yaml"),
                      ["name=t-zh-bert", "corpus=t-zh", "train.max_steps=150", "train.eval_every=75",
                       "train.checkpoint_every=150", "train.eval_batches=4", "scaling.threads_per_worker=2"])
    with open(pretrain_job.run(cfg)) as f:
        ckpt = json.load(f)["final"]["checkpoint"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForMaskedLM.from_pretrained(ckpt).eval()
    counts = np.zeros(len(tok), dtype=np.int64)
    for path in zh_corpus.shard_paths("train"):
        for ids in pq.read_table(path, columns=["input_ids"]).column("input_ids").to_pylist():
            counts += np.bincount(np.asarray(ids), minlength=len(tok))
    counts[tok.all_special_ids] = 0
    top = int(counts.argmax())
    rng = np.random.default_rng(0)
    rows, where, targets = [], [], []
    for doc in synthetic_zh.documents(60, seed=999):  # the corpus used seed 0: unseen sentences
        for a, b in doc.sentences:
            ids = tok(doc.text[a:b])["input_ids"]
            chars = [i for i, t in enumerate(ids) if any(ord(ch) in CJK for ch in tok.decode([t]))]
            pos = int(rng.choice(chars))
            targets.append(ids[pos])
            rows.append(ids[:pos] + [tok.mask_token_id] + ids[pos + 1:])
            where.append(pos)
    enc = tok.pad({"input_ids": rows}, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits[torch.arange(len(rows)), torch.tensor(where)].argmax(-1).tolist()
    accuracy = sum(p == t for p, t in zip(predicted, targets, strict=True)) / len(targets)
    baseline = sum(t == top for t in targets) / len(targets)
    assert accuracy > 1.5 * baseline and accuracy > baseline + 0.05, (accuracy, baseline, len(targets))

    sentence = synthetic_zh.document(999, 0).text.split("。")[0] + "。"
    masked = sentence[:3] + tok.mask_token + sentence[4:]
    answers = pipeline("fill-mask", model=ckpt, tokenizer=ckpt)(masked)
    assert len(answers) == 5 and any(ord(ch) in CJK for a in answers for ch in a["token_str"])


def test_whole_word_masking_with_jieba_masks_whole_chinese_words_on_the_workers(zh_corpus):
    # The corpus's own rows through pretraining's masking: every selected jieba word is selected
    # whole. Then a short run on Ray Train workers with the segmenter (jieba imported there).
    import torch
    from transformers import AutoTokenizer

    from cluster.objectives.lm import MaskedLM
    from cluster.objectives.masking import segmenter

    tok = AutoTokenizer.from_pretrained(zh_corpus.local_tokenizer_dir())
    objective = MaskedLM(tok, None, 128, 0.3, whole_word=True, static=False, seed=0, word_segmenter="jieba")
    table = pq.read_table(zh_corpus.shard_paths("train")[0], columns=["input_ids", "sentence_starts", "doc_id"])
    batch = {k: np.array(table.column(k).to_pylist()[:64], dtype=object) for k in table.column_names}
    inputs = objective.collate(batch, (0, 0, 0, 0))
    ids, selected = inputs["input_ids"], inputs["labels"] != -100
    original = torch.where(selected, inputs["labels"], ids)
    cjk, cut, whole, split = objective.cjk_words.is_cjk, segmenter("jieba"), 0, 0
    for row in range(ids.shape[0]):
        is_cjk = cjk[original[row].numpy()]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], is_cjk.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            at = a
            for word in cut("".join(objective.cjk_words.chars[original[row, a:b].numpy()])):
                chosen = selected[row, at:at + len(word)]
                whole += bool(chosen.all() and len(word) > 1)
                split += bool(chosen.any() and not chosen.all())
                at += len(word)
    assert whole > 20 and split == 0, (whole, split)

    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs", "bert-tiny.yaml"),
                      ["name=t-zh-wwm", "corpus=t-zh", "objective.whole_word=true", "objective.word_segmenter=jieba",
                       "train.max_steps=30", "train.eval_every=30", "train.checkpoint_every=30",
                       "train.eval_batches=4", "scaling.threads_per_worker=2"])
    with open(pretrain_job.run(cfg)) as f:
        summary = json.load(f)
    assert summary["steps"] == 30 and summary["final"]["metrics"]["val_mlm_loss"] > 0
