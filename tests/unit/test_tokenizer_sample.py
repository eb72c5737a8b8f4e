"""The tokenizer's training sample: a seeded draw per document over every source's training rows."""

import pyarrow as pa

from cluster.data.text import content_hash
from cluster.data.tokenizer_sample import sample_batch, sample_fraction


def _batch(n: int, source: str, split: str = "train") -> pa.Table:
    texts = [f"{source} document {i}" for i in range(n)]
    return pa.table({"key": list(range(n)), "source": [source] * n, "text": texts,
                     "hash": pa.array([content_hash(t) for t in texts], pa.binary(16)), "split": [split] * n})


def test_a_small_corpus_is_taken_whole_in_order():
    assert sample_fraction(500, 20000) == 1.0 and sample_fraction(40000, 20000) == 0.5
    batch = _batch(50, "en")
    out = sample_batch(batch, 1.0, seed=0)
    assert out.column_names == ["source", "text"] and out.column("text").to_pylist() == batch.column("text").to_pylist()


def test_a_draw_larger_than_the_byte_cap_is_drawn_smaller():
    # Regression: the draw took train_docs of the documents and the byte cap cut it in corpus
    # order, so 20,000 books of 13 KB (260 MB > 256 MiB) lost the last-listed sources' documents.
    cap = 256 * 2**20
    fraction = sample_fraction(1_000_000, 20_000, 20_000 * 13 * 2**10 * 50, cap)
    assert 0.9 * cap < fraction * 20_000 * 13 * 2**10 * 50 < cap
    assert sample_fraction(1_000_000, 20_000, 10 * 2**20, cap) == 0.02  # under the cap: by documents
    assert sample_fraction(500, 20_000, 2 * cap, cap) == 0.5 * 0.95  # few documents but large


def test_every_source_is_drawn_in_proportion_whatever_its_place_or_batch():
    # Regression: the tokenizer trained on the first train_docs documents in corpus order, so a
    # source listed after a large one was never seen.
    en, zh = _batch(8000, "en"), _batch(2000, "zh")
    drawn = sample_batch(pa.concat_tables([en, zh]), 0.1, seed=0).column("source").to_pylist()
    assert 700 < drawn.count("en") < 900 and 150 < drawn.count("zh") < 250
    # decided per document: the same rows whatever the batches or their order
    again = sample_batch(zh, 0.1, seed=0).column("text").to_pylist() + sample_batch(en, 0.1, seed=0).column("text").to_pylist()
    assert sorted(again) == sorted(sample_batch(pa.concat_tables([en, zh]), 0.1, seed=0).column("text").to_pylist())
    assert sample_batch(en, 0.1, seed=1).column("text").to_pylist() != sample_batch(en, 0.1, seed=0).column("text").to_pylist()


def test_only_training_rows_are_drawn():
    out = sample_batch(pa.concat_tables([_batch(100, "en", "validation"), _batch(10, "en")]), 1.0, seed=0)
    assert out.num_rows == 10
