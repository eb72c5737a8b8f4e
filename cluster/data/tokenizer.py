"""Tokenizers trained on the corpus with the `tokenizers` library, saved as Hugging Face tokenizers.

- byte-level BPE (GPT-2/Llama style) for causal LMs: every byte is in the alphabet, so no
  character is ever unknown and decode(encode(text)) == text.
- WordPiece with BERT special tokens for encoders. Each CJK ideograph is a word of its own (as
  BERT's BasicTokenizer makes it), so an unspaced Chinese run is one token per character and whole-
  word masking masks characters. Words are mapped to byte-level characters before WordPiece, and
  every byte exists as a word-initial and a `##` piece, so no character is unknown either; decoding
  re-inserts spaces the BERT way (around punctuation and ideographs), so it is not exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from cluster.config import Section

if TYPE_CHECKING:  # imported where used: a job's driver often needs none of transformers
    from transformers import PreTrainedTokenizerFast



BPE_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|pad|>"}


BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}


class TokenizerConfig(Section):
    kind: Literal["bpe", "wordpiece"] = Field("bpe", description="bpe for causal LMs, wordpiece for BERT family")
    vocab_size: int = Field(4096, ge=300, le=262144, description="target vocabulary size, specials included")
    train_docs: int = Field(20000, ge=1, description="documents to train on: a seeded sample across every source, "
                            "in proportion to its weight (a corpus this small or smaller is taken whole)")
    train_bytes: int = Field(256 * 2**20, ge=1, description="stop reading the sample after this many bytes of text")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a merge")
    model_max_length: int = Field(2048, ge=8, description="context length recorded in the tokenizer")
    path: str | None = Field(None, description="reuse this saved tokenizer directory (a path or URI) instead of training")


def _train_bpe(texts: Iterable[str], cfg: TokenizerConfig) -> tuple[Tokenizer, dict[str, str]]:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[BPE_SPECIALS["eos_token"], BPE_SPECIALS["pad_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok, dict(BPE_SPECIALS)


# The code points BERT's BasicTokenizer (_is_chinese_char) splits into single-character words.
CJK_IDEOGRAPHS = ("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f"
                  "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f]")


def _train_wordpiece(texts: Iterable[str], cfg: TokenizerConfig) -> tuple[Tokenizer, dict[str, str]]:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=400))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_IDEOGRAPHS), behavior="isolated"),
        pre_tokenizers.BertPreTokenizer(),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    specials = list(BERT_SPECIALS.values())
    # Every byte as a continuation piece ("##<byte>"), registered before training in a fixed order.
    # tokenizers' WordPiece trainer (BPE underneath) otherwise gives these pieces ids in the order it
    # walks a hash map, different in every process, and breaks ties between equally frequent merges
    # by those ids: the same sample trained a different vocabulary each run (tokenizers #1794, 0.23.3).
    # Handed in as special tokens they take fixed ids; they are made ordinary vocabulary below. Having
    # every byte as a piece is also the byte fallback: every word can be split, so [UNK] never appears.
    pieces = ["##" + ch for ch in sorted(alphabet)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials + pieces,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    vocab = spec["model"]["vocab"]
    for ch in alphabet:  # bytes the sample never held
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    # WordPiece joins words with a literal space, which is not a byte-level character: map it to
    # the byte-level space so the ByteLevel decoder turns every piece back into bytes.
    tok.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" ", "Ġ"), decoders.ByteLevel()]
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tok, dict(BERT_SPECIALS)


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    return wrap_tokenizer(train_tokenizer_json(texts, cfg), cfg)


def train_tokenizer_json(texts: Iterable[str], cfg: TokenizerConfig) -> str:
    """The trained tokenizer as the `tokenizers` library's JSON (what a Ray task sends back)."""
    tok, _ = (_train_bpe if cfg.kind == "bpe" else _train_wordpiece)(texts, cfg)
    return tok.to_str()


def wrap_tokenizer(body: str, cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer around `train_tokenizer_json`'s JSON, with the kind's special tokens."""
    from transformers import PreTrainedTokenizerFast

    specials = BPE_SPECIALS if cfg.kind == "bpe" else BERT_SPECIALS
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(body), model_max_length=cfg.model_max_length,
                                  **specials)


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)
    return tokenizer_hash(tok)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer directory '{path}' has no tokenizer.json")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    """Hash of the vocabulary and merges: two tokenizers with the same hash encode identically."""
    body = tok.backend_tokenizer.to_str()
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def end_of_document_id(tok: PreTrainedTokenizerFast) -> int:
    """Token appended after each document when packing: EOS for BPE, SEP for WordPiece."""
    token_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if token_id is None:
        raise ValueError("tokenizer has neither an eos nor a sep token to mark document ends")
    return int(token_id)
