"""Near-duplicate removal's parts, without Ray: signatures estimate Jaccard similarity, a bucket
pairs distinct texts only, components keep their lowest-keyed text, marking spares dropped rows."""

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from cluster.data.near_dedup import (
    _WORD_RE,
    DROP_NEAR_DUPLICATE,
    NearDedupConfig,
    _permutations,
    bucket_pairs,
    components_to_drop,
    mark_batch,
    signature,
)
from cluster.data.text import content_hash


def _shingles(text: str, n: int) -> set[str]:
    words = _WORD_RE.findall(text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def test_signatures_estimate_the_jaccard_similarity_of_word_ngrams():
    a, b = _permutations(256, seed=0)
    words = [f"w{i}" for i in range(120)]
    base = " ".join(words)
    for changed in (1, 4, 12, 40):
        other = " ".join(f"x{i}" if i % (120 // changed) == 0 else w for i, w in enumerate(words))
        s1, s2 = _shingles(base, 5), _shingles(other, 5)
        true = len(s1 & s2) / len(s1 | s2)
        est = float(np.mean(signature(base, 5, a, b) == signature(other, 5, a, b)))
        assert abs(est - true) < 0.1, (changed, true, est)
    assert (signature(base.upper(), 5, a, b) == signature(base, 5, a, b)).all()  # case folded


def test_each_cjk_ideograph_is_a_word():
    assert _WORD_RE.findall("今天天气 good day。") == ["今", "天", "天", "气", "good", "day。"]


def test_a_bucket_pairs_distinct_texts_with_its_lowest_keyed_one():
    h1, h2, h3 = (content_hash(t) for t in "abc")
    group = pa.table({"key": [5, 2, 9, 7], "hash": pa.array([h1, h1, h2, h3], pa.binary())})
    pairs = bucket_pairs(group)
    assert list(zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist(), strict=True)) == [(h1, h3), (h1, h2)]
    assert bucket_pairs(group.slice(0, 2)).num_rows == 0  # exact copies of one text are no pair


def test_components_keep_their_lowest_keyed_text_and_verify_each_pair():
    same = np.arange(64, dtype=np.uint32)
    half = np.where(np.arange(64) < 32, same, 1000 + same).astype(np.uint32)
    sigs = {b"a": (3, same), b"b": (1, same), b"c": (7, same), b"d": (2, half)}
    # a-c and c-b chain into one component whose lowest key is b; d agrees on only half its values
    assert components_to_drop([(b"a", b"c"), (b"c", b"b"), (b"a", b"d")], sigs, 0.8) == {b"a", b"c"}
    assert components_to_drop([(b"a", b"d")], sigs, 0.5) == {b"a"}


def test_marking_spares_rows_already_dropped():
    h1, h2 = content_hash("a"), content_hash("b")
    batch = pa.table({"key": [1, 2, 3], "hash": pa.array([h1, h1, h2], pa.binary()), "drop": ["", "too_short", ""]})
    assert mark_batch(batch, np.array([h1], dtype="S16")).column("drop").to_pylist() == \
        [DROP_NEAR_DUPLICATE, "too_short", ""]
    assert mark_batch(batch, np.zeros(0, dtype="S16")).column("drop").to_pylist() == ["", "too_short", ""]


def test_buckets_cut_across_blocks_pair_as_one_and_the_drop_set_is_sorted_for_lookup():
    # What the sorted blocks send: bucket (0, 7) straddles the first two parts; (1, 3) is alone.
    from cluster.data.near_dedup import candidate_pairs, texts_to_drop

    h = [content_hash(t) for t in "abcde"]

    def part(rows):
        return pa.table({"band": pa.array([r[0] for r in rows], pa.int32()), "bucket": pa.array([r[1] for r in rows]),
                         "key": [r[2] for r in rows], "hash": pa.array([h[r[3]] for r in rows], pa.binary())})

    parts = [part([(0, 5, 0, 0), (0, 5, 1, 1), (0, 7, 2, 2)]), part([(0, 7, 3, 3)]), part([(1, 3, 4, 4)]),
             part([(1, 9, 0, 0), (1, 9, 1, 1)])]  # band 1 repeats pair (a, b)
    pairs, involved = candidate_pairs(*parts)
    assert sorted(zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist(), strict=True)) == \
        sorted([(h[0], h[1]), (h[2], h[3])])
    assert list(involved) == sorted(h[:4])
    same = np.arange(64, dtype=np.uint32)
    sigs = pa.table({"key": [0, 1, 2, 3], "hash": pa.array(h[:4], pa.binary()),
                     "sig": pa.array([same.tobytes(), same.tobytes(), same.tobytes(), (same + 1).tobytes()], pa.binary())})
    drop, count = texts_to_drop(pairs, 0.8, sigs.slice(0, 2), sigs.slice(2))
    assert count == 1 and list(drop) == [h[1]]  # (c, d) disagree on every value: no near-duplicates
    assert candidate_pairs()[1].size == 0 and texts_to_drop(candidate_pairs()[0], 0.8)[1] == 0


def test_bands_must_divide_the_signature():
    with pytest.raises(ValidationError, match="num_perm 100 must be a multiple of bands 16"):
        NearDedupConfig(num_perm=100)


def test_a_sorted_block_keeps_its_shared_buckets_and_its_edges():
    from cluster.data.near_dedup import shared_in_block

    block = pa.table({"band": pa.array([0, 0, 0, 0, 1, 1, 1], pa.int32()), "bucket": pa.array([1, 2, 2, 3, 3, 4, 5]),
                      "key": list(range(7)), "hash": pa.array([bytes([i]) for i in range(7)], pa.binary())})
    # bucket (0, 2) is shared; (0, 1) and (1, 5) are the block's first and last, which may go on in
    # a neighbouring block; (0, 3), (1, 3) and (1, 4) are alone and dropped
    assert shared_in_block(block).column("key").to_pylist() == [0, 1, 2, 6]
