import numpy as np

from cluster.data.packing import chunk_sentences, pack_blocks, pack_flat, split_of, split_sentences
from cluster.data.text import content_hash


def test_every_token_appears_exactly_once_in_order():
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 1000, size=rng.integers(1, 300)).astype(np.int32) for _ in range(200)]
    blocks, tail = pack_blocks(docs, 64, eod_id=0)
    assert blocks.shape[1] == 64
    stream = np.concatenate([np.concatenate([d, [0]]) for d in docs])
    np.testing.assert_array_equal(np.concatenate([blocks.reshape(-1), tail]), stream)
    assert len(tail) < 64


def test_document_boundaries_marked_by_eod():
    blocks, tail = pack_blocks([np.array([5, 6, 7]), np.array([8, 9])], 3, eod_id=1)
    assert blocks.tolist() == [[5, 6, 7], [1, 8, 9]]
    assert tail.tolist() == [1]


def test_flat_tokens_and_offsets_pack_every_token_once_with_eod_after_each_document():
    rng = np.random.default_rng(1)
    docs = [rng.integers(5, 1000, size=rng.integers(0, 90)).astype(np.int32) for _ in range(120)]
    flat = np.concatenate(docs)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    for lo, hi in ((0, 120), (40, 80)):  # a slice of a larger list column: offsets start past 0
        blocks, tail = pack_flat(flat[offsets[lo]:offsets[hi]], offsets[lo:hi + 1], 32, eod_id=2)
        stream = np.concatenate([np.concatenate([d, [2]]) for d in docs[lo:hi]])
        assert blocks.shape[1] == 32 and len(tail) < 32
        np.testing.assert_array_equal(np.concatenate([blocks.reshape(-1), tail]), stream)


def test_split_is_deterministic_and_near_fraction():
    texts = [f"document {i}" for i in range(20000)]
    a = [split_of(content_hash(t), 0.05, seed=0) for t in texts]
    assert a == [split_of(content_hash(t), 0.05, seed=0) for t in texts]
    share = a.count("validation") / len(a)
    assert abs(share - 0.05) < 0.006
    b = [split_of(content_hash(t), 0.05, seed=1) for t in texts]
    assert a != b  # the seed salts the assignment


def test_chinese_sentences_end_without_a_space():
    # Regression: sentence ends needed whitespace after them, so a Chinese paragraph was one sentence
    # and NSP/SOP pairs from it were not sentence pairs.
    assert split_sentences("今天天气很好。我们去公园吧！你来吗？他说：“走吧！”然后走了……好；完") == [
        "今天天气很好。", "我们去公园吧！", "你来吗？", "他说：“走吧！”", "然后走了……", "好；", "完"]
    assert split_sentences("一。 二。\n三") == ["一。", "二。", "三"]
    # English as before: an end needs whitespace after it, a single ellipsis is no end
    assert split_sentences("It is 3.5 m. I think… maybe so!Yes") == ["It is 3.5 m.", "I think… maybe so!Yes"]


def test_sentences_and_chunks_keep_every_token():
    assert split_sentences("One. Two! Three?\nFour") == ["One.", "Two!", "Three?", "Four"]
    sents = [np.arange(n, dtype=np.int32) + 100 * i for i, n in enumerate([5, 7, 20, 3])]
    chunks = chunk_sentences(sents, max_tokens=12)
    assert all(len(ids) <= 12 for ids, _ in chunks)
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]),
                                  np.concatenate([s[:12] if len(s) <= 12 else s for s in sents]))
    for ids, starts in chunks:
        assert starts[0] == 0 and all(np.diff(starts) > 0) and starts[-1] < len(ids)
