"""Tiny random-init checkpoints for every served task (tests, benchmark, smoke runs).

Nothing is downloaded: tokenizers are trained on a few hundred synthetic sentences and models are
built from configs, then saved as Hugging Face directories with safetensors.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from cluster.data.tokenizer import TokenizerConfig, train_tokenizer
from cluster.train.models import SIZES, ModelConfig, build_model, special_ids

CLASS_LABELS = ["negative", "positive"]
TAG_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
_WORDS = ("the cat dog sat on a mat in Paris with Alice and Bob near London river house tree "
          "quick brown fox jumps over lazy happy sad good bad day night").split()


def sentences(n: int = 400, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 12, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (k,), generator=g).tolist()
        out.append(" ".join(_WORDS[i] for i in idx) + ".")
    return out


def save_gpt(path: str, max_len: int = 128) -> str:
    tok = train_tokenizer(sentences(), TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=1,
                                                       model_max_length=max_len))
    model = build_model(ModelConfig(family="gpt2", size="tiny", n_layer=2, d_model=64, n_head=2, d_ff=128,
                                    max_len=max_len), len(tok), special_ids(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_bert(path: str, task: str, max_len: int = 64, size: str | None = None) -> str:
    """task: fill-mask | classification | tagging. `size`: a cluster.train.models preset (mini, small,
    124m) for the layers, where the model's compute should weigh as in real use; default: 2 layers
    of width 32, for tests."""
    tok = train_tokenizer(sentences(), TokenizerConfig(kind="wordpiece", vocab_size=400, min_frequency=1,
                                                       model_max_length=max_len))
    torch.manual_seed(0)
    labels = {"classification": CLASS_LABELS, "tagging": TAG_LABELS}.get(task)
    extra = {"id2label": dict(enumerate(labels)), "label2id": {v: k for k, v in enumerate(labels)}} if labels else {}
    n_layer, n_head, d_model, d_ff = SIZES[size] if size else (2, 2, 32, 64)
    config = BertConfig(vocab_size=len(tok), hidden_size=d_model, num_hidden_layers=n_layer,
                        num_attention_heads=n_head, intermediate_size=d_ff, max_position_embeddings=max_len,
                        pad_token_id=tok.pad_token_id, **extra)
    cls = {"fill-mask": BertForMaskedLM, "classification": BertForSequenceClassification,
           "tagging": BertForTokenClassification}[task]
    model = cls(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def publish_all(base: str, root: str | None = None) -> dict[str, str]:
    """Build and publish one tiny model per task; returns name -> registry path."""
    from cluster import registry

    specs = {"gpt-tiny": ("generation", save_gpt), "bert-mlm": ("fill-mask", None),
             "bert-cls": ("classification", None), "bert-tag": ("tagging", None)}
    out = {}
    for name, (task, fn) in specs.items():
        ckpt = os.path.join(base, name)
        (fn(ckpt) if fn else save_bert(ckpt, task))
        out[name] = registry.publish(ckpt, name, task, metric={"name": "loss", "value": 1.0, "mode": "min"},
                                     force=True, root=root)
    return out
