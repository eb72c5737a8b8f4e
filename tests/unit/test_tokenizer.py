import pytest

from cluster.data.tokenizer import (
    TokenizerConfig,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

ENGLISH = [f"The quick brown fox {i} jumps over the lazy dog near the river bank." for i in range(300)]
CHINESE = ["这是中文文本，测试一下。", "机器学习模型在集群上训练。"]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(ENGLISH, TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=1))


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer(ENGLISH, TokenizerConfig(kind="wordpiece", vocab_size=600, min_frequency=1))


@pytest.mark.parametrize("text", ["The quick brown fox.", *CHINESE, "emoji 🙂 and ünïcödé", "tabs\tand  spaces"])
def test_bpe_roundtrip_is_exact_even_for_unseen_scripts(bpe, text):
    ids = bpe(text, add_special_tokens=False).input_ids
    assert bpe.decode(ids) == text


def test_bpe_learned_merges_compress_english(bpe):
    text = ENGLISH[0]
    assert len(bpe(text).input_ids) < len(text.encode()) / 2


@pytest.mark.parametrize("text", ["The quick brown fox.", *CHINESE])
def test_wordpiece_never_emits_unknown(wordpiece, text):
    ids = wordpiece(text, add_special_tokens=False).input_ids
    assert wordpiece.unk_token_id not in ids
    assert wordpiece.decode(ids).replace(" ", "") == text.replace(" ", "")


def test_wordpiece_has_bert_special_tokens_and_template(wordpiece):
    for attr in ("cls_token", "sep_token", "mask_token", "pad_token", "unk_token"):
        assert getattr(wordpiece, attr) is not None
    ids = wordpiece("a b").input_ids
    assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id


def test_saved_tokenizer_loads_with_transformers_alone(bpe, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(bpe, str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again("hello world").input_ids == bpe("hello world").input_ids
    assert tokenizer_hash(load_tokenizer(str(tmp_path))) == tokenizer_hash(bpe)


def test_wordpiece_makes_each_ideograph_a_token_even_in_a_long_unspaced_run():
    # Regression: an unspaced Chinese run was one "word" of 3 bytes a character; past WordPiece's
    # 400-character word limit the whole run became a single [UNK].
    import random

    rnd = random.Random(0)
    chars = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
    texts = ENGLISH + ["".join(rnd.choice(chars) for _ in range(30)) + "。" for _ in range(300)]
    tok = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=1200, min_frequency=1))
    run = "".join(rnd.choice(chars) for _ in range(2000))
    ids = tok(run, add_special_tokens=False).input_ids
    assert len(ids) == 2000 and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[:3]) == [tok.convert_ids_to_tokens(tok(c, add_special_tokens=False).input_ids)[0]
                                                  for c in run[:3]]
    from cluster.objectives.masking import word_start_table

    assert word_start_table(tok)[ids].all()  # whole-word masking: each character is a word
    # an ideograph the vocabulary never saw falls back to its bytes, one word: never [UNK]
    unseen = tok("龘", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in unseen and tok.decode(unseen) == "龘"


def test_wordpiece_splits_english_as_before(wordpiece):
    from tokenizers import pre_tokenizers

    before = pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    text = "The quick-brown fox's 3.5 jumps, (over) naïve dogs!"
    assert wordpiece.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) == before.pre_tokenize_str(text)


def test_wordpiece_training_is_deterministic_whatever_the_order():
    # Regression: tokenizers' WordPiece trainer numbered its "##" pieces in hash-map order, so the same
    # sample trained a different vocabulary on every call (and a corpus's shards changed from run to run).
    import random

    from cluster.data.synthetic import documents

    texts = [d if isinstance(d, str) else d.text for d in documents(600, seed=0)]
    shuffled = random.Random(1).sample(texts, len(texts))
    cfg = TokenizerConfig(kind="wordpiece", vocab_size=900)
    trained = [train_tokenizer(t, cfg) for t in (texts, texts, texts, shuffled)]
    assert len({tokenizer_hash(t) for t in trained}) == 1
    assert len(trained[0]) == 900


def test_wordpiece_byte_pieces_are_vocabulary_not_special_tokens(wordpiece):
    assert sorted(wordpiece.all_special_tokens) == sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    ids = wordpiece("a ##b x")["input_ids"]
    assert wordpiece.convert_ids_to_tokens(ids)[1:-1] == ["a", "#", "#", "b", "x"]


def test_a_word_segmenter_masks_whole_chinese_words_and_english_words_as_before():
    # Chinese BERT-wwm: the characters of a CJK run are grouped into jieba's words, so a selected word
    # is masked with all its characters; without a segmenter each character is its own word.
    import numpy as np
    import torch

    from cluster.objectives.masking import CJKWords, SpecialTokens, mask_tokens, segmenter, word_start_table

    sentence = "我们喜欢自然语言处理和机器学习。"
    texts = ENGLISH + [sentence, "今天天气很好，我们去公园散步。"] * 50
    tok = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=1200, min_frequency=1))
    cut = segmenter("jieba")
    words = CJKWords(tok, cut)
    ids = torch.tensor([tok(sentence + " hello world")["input_ids"]])
    table = torch.from_numpy(word_start_table(tok))
    starts = words.starts(ids, table)[0].tolist()
    chars = [c for c in sentence if c != "。"]
    offsets, at = set(), 0
    for w in cut("".join(chars)):
        offsets.add(at)
        at += len(w)
    assert len(offsets) < len(chars)  # jieba found words of more than one character
    # position 0 is [CLS]; the characters follow one token each, then 。, hello, world, [SEP]
    assert [starts[1 + i] for i in range(len(chars))] == [i in offsets for i in range(len(chars))]
    assert starts[len(chars) + 1:] == table[ids[0, len(chars) + 1:]].tolist()

    special = SpecialTokens.from_tokenizer(tok)
    batch = ids.repeat(200, 1)
    masked, labels = mask_tokens(batch, special, 0.3, torch.Generator().manual_seed(0),
                                 words.starts(batch, table))
    selected = (labels != -100)[:, 1:1 + len(chars)].numpy()
    bounds = sorted(offsets) + [len(chars)]
    words_at = list(zip(bounds[:-1], bounds[1:], strict=True))
    for a, b in words_at:  # every word is selected whole or not at all
        assert np.all(selected[:, a:b].all(axis=1) | ~selected[:, a:b].any(axis=1))
    assert selected.any() and not selected.all()
    every_char, _ = mask_tokens(batch, special, 0.3, torch.Generator().manual_seed(0), table)
    split = (every_char != batch)[:, 1:1 + len(chars)].numpy()  # per-character words: some split
    assert any(split[:, a:b].any(axis=1).sum() > split[:, a:b].all(axis=1).sum() for a, b in words_at if b - a > 1)


def test_a_word_segmenter_needs_whole_word_masking_and_its_package(monkeypatch):
    import importlib.util

    from pydantic import ValidationError

    from cluster.objectives.lm import ObjectiveConfig

    with pytest.raises(ValidationError, match="set whole_word true as well"):
        ObjectiveConfig(word_segmenter="jieba")
    cfg = ObjectiveConfig(word_segmenter="jieba", whole_word=True)
    assert cfg.check_segmenter() is None and cfg.masking(None, 64)["word_segmenter"] == "jieba"
    assert ObjectiveConfig().masking(None, 64)["word_segmenter"] is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "the jieba package is not installed (pip install jieba" in cfg.check_segmenter()
