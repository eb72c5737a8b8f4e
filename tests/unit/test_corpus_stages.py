"""jobs.prepare's Ray Data stage functions on Arrow batches, without Ray: what each keeps, drops,
counts and passes through."""

import json
import math

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from cluster.data.duplicates import duplicated_in_block, merge_duplicated
from cluster.data.files import DOC_SCHEMA
from cluster.data.packing import pack_blocks
from cluster.data.pipeline import clean_batch, pack_batch, select_batch, tokenize_batch, weight_copies
from cluster.data.tally import validation_top_up
from cluster.data.text import content_hash
from cluster.data.tokenizer import TokenizerConfig, train_tokenizer

CLEAN = {"min_chars": 3, "max_chars": 1000, "charsets": None, "min_charset_fraction": 0.9}
SPLIT = {"validation_fraction": 0.5, "seed": 0}


def docs(texts, drops=None, source="s"):
    n = len(texts)
    return pa.table({"text": texts, "key": np.arange(n, dtype=np.int64), "source": [source] * n,
                     "logprob": np.full(n, math.nan), "drop": drops or [""] * n, "note": [""] * n}, schema=DOC_SCHEMA)


def test_clean_keeps_other_columns_and_types_new_ones():
    out = clean_batch(docs(["  Caf\u0065\u0301 au lait  ", "ab", "x" * 5, "kept text"], ["", "", "undecodable", ""]),
                       CLEAN, SPLIT)
    assert out.column("text").to_pylist() == ["Café au lait", "ab", "", "kept text"]
    assert out.column("drop").to_pylist() == ["", "too_short", "undecodable", ""]
    assert out.column("key").to_pylist() == [0, 1, 2, 3]
    assert out.schema.field("hash").type == pa.binary(16)
    assert out.column("hash").to_pylist()[0] == content_hash("Café au lait")
    assert set(out.column("split").to_pylist()) <= {"train", "validation"}


def test_tokenize_counts_utf8_bytes_of_kept_documents_only():
    texts = ["héllo wörld", "日本語のテキスト", "a filtered document"]
    tok = train_tokenizer(texts * 20, TokenizerConfig(vocab_size=300))
    batch = clean_batch(docs(texts), CLEAN, SPLIT)
    batch = batch.set_column(batch.schema.get_field_index("drop"), "drop", pa.array(["", "", "too_long"]))
    out = tokenize_batch(batch, tok.backend_tokenizer.to_str(), "blocks", 128)
    assert out.column("n_bytes").to_pylist() == [len(texts[0].encode()), len(texts[1].encode()), 0]
    ids = out.column("ids").to_pylist()
    assert ids[2] == [] and out.column("n_tokens").to_pylist() == [len(i) for i in ids]
    rust = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    assert ids[1] == rust.encode(texts[1], add_special_tokens=False).ids
    assert out.column("key").to_pylist() == [0, 1, 2]


def first_keys(lowest: dict[bytes, int]):
    """The duplicated texts' lowest keys as `cluster.data.duplicates` holds them."""
    return merge_duplicated(pa.table({"hash": pa.array(list(lowest), pa.binary(16)), "key_min": list(lowest.values()),
                                      "key_count": [2] * len(lowest)}))


def test_select_drops_filtered_duplicates_and_other_splits():
    batch = pa.table({"key": pa.array([10, 11, 12, 13], pa.int64()), "source": ["s"] * 4,
                      "hash": pa.array([bytes([i]) * 16 for i in range(4)], pa.binary(16)),
                      "drop": ["", "too_short", "", ""], "split": ["train", "train", "validation", "train"]})
    assert select_batch(batch, None, {"s": 1.0}).column("key").to_pylist() == [10, 12, 13]
    # 13's text was first seen at key 5 (another block); 10's text is duplicated, and 10 is its first copy
    first = first_keys({bytes([3]) * 16: 5, bytes([0]) * 16: 10})
    assert select_batch(batch, first, {"s": 1.0}, "train").column("key").to_pylist() == [10]
    assert select_batch(batch, first, {"s": 1.0}, "validation").column("key").to_pylist() == [12]


def test_select_counts_documents_moved_to_validation_there():
    batch = pa.table({"key": pa.array([10, 11, 12, 13], pa.int64()), "source": ["s"] * 4,
                      "hash": pa.array([bytes([i]) * 16 for i in range(4)], pa.binary(16)),
                      "drop": [""] * 4, "split": ["train", "train", "validation", "train"]})
    assert select_batch(batch, None, {"s": 1.0}, "validation", {13}).column("key").to_pylist() == [12, 13]
    assert select_batch(batch, None, {"s": 1.0}, "train", {13}).column("key").to_pylist() == [10, 11]
    assert select_batch(batch, None, {"s": 1.0}, None, {13}).column("key").to_pylist() == [10, 11, 12, 13]


TRAIN, VAL = 0, 1


def test_top_up_moves_the_next_documents_by_split_hash_until_validation_holds_a_row():
    split = np.array([TRAIN] * 5)
    units = np.array([0.5, 0.1, 0.9, 0.05, 0.3])  # the order a growing validation_fraction takes them: 3, 1, 4, 0, 2
    cost = np.array([10, 10, 10, 10, 10])
    by_unit = lambda idx: units[idx]  # noqa: E731
    assert validation_top_up(split, np.ones(5, np.int64), by_unit, cost, need=10).tolist() == [3]
    assert validation_top_up(split, np.ones(5, np.int64), by_unit, cost, need=11).tolist() == [3, 1]
    # a duplicate (no copies) is never moved; a document copied twice by its weight counts twice
    assert validation_top_up(split, np.array([0, 1, 1, 1, 1]), by_unit, cost, need=11).tolist() == [3, 1]
    assert validation_top_up(split, np.array([1, 1, 1, 2, 1]), by_unit, cost, need=20).tolist() == [3]
    assert validation_top_up(split, np.ones(5, np.int64), by_unit, np.array([10, 0, 10, 10, 10]), need=11).tolist() == [3, 4]


def test_top_up_leaves_a_validation_split_that_holds_a_row_and_a_train_split_that_cannot_spare_one():
    by_index = lambda idx: idx / 10  # noqa: E731
    ones = np.ones(4, np.int64)
    assert validation_top_up(np.array([TRAIN, VAL, TRAIN, TRAIN]), ones, by_index, np.full(4, 10), need=10).tolist() == []
    # validation weighs 5 of 10: one more document; train keeps 20
    assert validation_top_up(np.array([TRAIN, VAL, TRAIN, TRAIN]), ones, by_index, np.array([10, 5, 10, 10]), 10).tolist() == [0]
    # moving enough would leave train less than a row: nothing moves (pretraining then says why)
    assert validation_top_up(np.array([TRAIN, TRAIN]), ones[:2], by_index, np.array([10, 5]), need=10).tolist() == []
    assert validation_top_up(np.array([TRAIN]), ones[:1], by_index, np.array([100]), need=10).tolist() == []
    assert validation_top_up(np.zeros(0, np.int64), ones[:0], by_index, np.zeros(0, np.int64), need=10).tolist() == []


def test_select_applies_source_weights_as_copies_in_order():
    rng = np.random.default_rng(0)
    n = 2000
    hashes = [rng.bytes(16) for _ in range(n)]
    sources = ["a" if i % 2 else "b" for i in range(n)]
    batch = pa.table({"key": pa.array(np.arange(n), pa.int64()), "source": sources,
                      "hash": pa.array(hashes, pa.binary(16)), "drop": [""] * n, "split": ["train"] * n})
    weights = {"a": 2.0, "b": 0.25}
    keys = select_batch(batch, None, weights).column("key").to_pylist()
    expected = [i for i in range(n) for _ in range(weight_copies(hashes[i], weights[sources[i]]))]
    assert keys == expected
    assert keys.count(1) == 2  # weight 2: every document twice
    assert abs(sum(1 for k in set(keys) if k % 2 == 0) / (n / 2) - 0.25) < 0.05  # weight 0.25: about a quarter


def test_pack_blocks_the_selected_documents_of_a_tokenized_batch():
    texts = [f"document {i} says {'word ' * (i % 7)}end" for i in range(60)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300))
    tokenized = tokenize_batch(clean_batch(docs(texts), CLEAN, SPLIT), tok.backend_tokenizer.to_str(), "blocks", 128)
    # selection takes rows out of the middle of the list column (and repeats some): offsets no longer start at 0
    hashes = tokenized.column("hash").to_pylist()
    part = select_batch(tokenized.slice(5), first_keys({hashes[7]: -1, hashes[8]: -1}), {"s": 1.5}, "train")
    selected = [np.asarray(ids, dtype=np.int32) for ids in part.column("ids").to_pylist()]
    blocks = pack_batch(part, 16, eod_id=1)["input_ids"]
    np.testing.assert_array_equal(blocks, pack_blocks(selected, 16, eod_id=1)[0])
    assert blocks.dtype == np.int32 and blocks.shape[1] == 16 and len(blocks) > 3


def _tally_blocks(table: pa.Table, cuts: list[int], top_up: tuple[str, int, int]):
    """tally's per-block sums and top-up over `table` cut at `cuts`, without Ray; the duplicate
    texts' lowest keys computed here as the group-by computes them."""
    from cluster.data.tally import Counts, _block_sums, _top_up

    seen: dict[bytes, list[int]] = {}
    for k, h, d in zip(*(table.column(c).to_pylist() for c in ("key", "hash", "drop")), strict=True):
        if not d:
            seen.setdefault(h, []).append(k)
    first = first_keys({h: min(ks) for h, ks in seen.items() if len(ks) > 1})
    bounds = [0, *cuts, table.num_rows]
    blocks = [_block_sums(table.slice(a, b - a), {"s": 1.5}, True, 3, first, top_up).to_pylist()[0]
              for a, b in zip(bounds, bounds[1:], strict=False)]
    counts = Counts(0, {}, [])
    counts.dropped["duplicate"] = sum(b["duplicates"] for b in blocks)
    for b in blocks:
        counts.problems += json.loads(b["problems"])[: 3 - len(counts.problems)]
    stats = {s: {k: sum(json.loads(b["stats"])[s][k] for b in blocks)
                 for k in ("documents", "tokens", "bytes", "logprob", "synthetic_docs")} for s in ("train", "validation")}
    _top_up(blocks, top_up, counts, stats)
    return counts, stats


def test_tally_is_the_same_whatever_the_blocks():
    # The counts are summed per block across the cluster: cutting the corpus into other blocks
    # must change no count, no duplicate kept, no problem note and no top-up choice.
    rng = np.random.default_rng(0)
    n = 400
    texts = [f"document {i % 300}" for i in range(n)]  # 100 exact duplicates
    drops = ["too_short" if i % 37 == 0 else "" for i in range(n)]
    table = pa.table({
        "key": np.arange(n, dtype=np.int64), "hash": pa.array([content_hash(t) for t in texts], pa.binary(16)),
        "drop": drops, "note": [f"note {i}" if d else "" for i, d in enumerate(drops)], "source": ["s"] * n,
        "split": ["validation" if i == 5 else "train" for i in range(n)],
        "n_tokens": rng.integers(1, 50, n), "n_bytes": rng.integers(5, 200, n), "logprob": rng.normal(-50, 5, n),
    })
    whole = _tally_blocks(table, [], ("blocks", 256, 0))
    for cuts in ([1], [50, 51, 333], list(range(7, n, 13))):
        counts, stats = _tally_blocks(table, cuts, ("blocks", 256, 0))
        assert counts.dropped == whole[0].dropped and counts.to_validation == whole[0].to_validation
        assert counts.problems == whole[0].problems == ["note 0 (too_short)", "note 37 (too_short)", "note 74 (too_short)"]
        assert {s: {k: round(v, 6) for k, v in d.items()} for s, d in stats.items()} == \
               {s: {k: round(v, 6) for k, v in d.items()} for s, d in whole[1].items()}
    assert whole[0].dropped["duplicate"] == 100 - sum(1 for i in range(300, n) if drops[i] or drops[i - 300])
    assert whole[0].to_validation  # one validation document of < 50 tokens is short of a 256-token row
    validation = whole[1]["validation"]
    assert validation["tokens"] + validation["documents"] >= 256  # it now weighs a row (tokens + end of document)


def test_a_hash_sorted_block_sends_its_duplicated_texts_and_its_edges():

    block = pa.table({"hash": pa.array([b"a", b"a", b"b", b"c", b"c", b"c", b"d"], pa.binary()),
                      "key": [5, 1, 2, 7, 3, 9, 4]})
    assert sorted(duplicated_in_block(block).to_pylist(), key=lambda r: r["hash"]) == [
        {"hash": b"a", "key_min": 1, "key_count": 2}, {"hash": b"c", "key_min": 3, "key_count": 3},
        {"hash": b"d", "key_min": 4, "key_count": 1}]  # b is alone inside; d may go on in the next block
