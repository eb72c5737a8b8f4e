"""The Chinese synthetic corpus: one derivation per text, an exact log-probability by parsing,
Chinese written as Chinese (no spaces, 。), and the WordPiece and sentence handling BERT needs."""

from __future__ import annotations

import pytest

from cluster.data import synthetic_zh as zh
from cluster.data.packing import split_sentences

CJK = range(0x4E00, 0xA000)


def test_every_text_has_one_derivation_and_its_exact_log_probability():
    for doc in zh.documents(150, seed=5):
        assert zh.count_derivations(doc.text) == 1
        assert zh.log_prob(doc.text) == pytest.approx(doc.logprob, abs=1e-9)
    assert all(sum(c.probs) == 1 for c in zh.all_choices())
    floor = zh.entropy_bits_per_byte(list(zh.documents(300)))
    assert 0.3 < floor < 2.0


def test_texts_not_from_the_grammar_have_no_derivation():
    text = zh.document(0, 1).text
    assert zh.count_derivations(text.replace("。", "", 1)) == 0  # two sentences run together
    assert zh.count_derivations(text[:-1]) == 0  # no final 。
    assert zh.count_derivations(text[1:]) == 0
    with pytest.raises(ValueError, match="not in the synthetic Chinese language"):
        zh.log_prob("你好。")


def test_chinese_as_written_and_word_lists_that_share_no_character():
    doc = zh.document(0, 7)
    assert " " not in doc.text and doc.text.endswith("。")
    assert all(doc.text[b - 1] == "。" for _, b in doc.sentences)
    slots = [*zh.SHARED_SLOTS.values(), *(s for own in zh.TOPIC_SLOTS.values() for s in own.values())]
    lists = [part for slot in slots for part in slot.parts if not part.options[0][0].isdigit()]
    chars = [set("".join(c.options)) for c in lists]
    assert all(ord(ch) in CJK for s in chars for ch in s)
    assert sum(len(s) for s in chars) == len(set().union(*chars))  # pairwise disjoint
    assert not set().union(*chars) & zh._literal_chars()
    assert zh.document(3, 4) == zh.document(3, 4) and zh.document(3, 4).text != zh.document(4, 4).text


def test_sentences_split_at_the_chinese_full_stop_as_generated():
    for doc in zh.documents(20, seed=2):
        assert split_sentences(doc.text) == [doc.text[a:b] for a, b in doc.sentences]


def test_wordpiece_gives_every_ideograph_its_own_token_and_no_unk():
    from cluster.data.tokenizer import TokenizerConfig, train_tokenizer

    texts = [d.text for d in zh.documents(400, seed=1)]
    tok = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=3000, min_frequency=1))
    doc = zh.document(9, 9).text
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    pieces = [tok.decode([i]) for i in ids]  # each token alone: one ideograph, or digits
    assert [p for p in pieces if any(ord(ch) in CJK for ch in p)] == [ch for ch in doc if ord(ch) in CJK]
