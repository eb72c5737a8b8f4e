"""Batch builders for BERT-family objectives: MLM masking statistics, whole-word masking, mask
seeding, NSP/SOP pair construction and layout. Statistical checks use > 100k tokens and 4-sigma
binomial bounds, so they fail by chance with probability ~1e-4 each (and the seeds are fixed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from cluster.objectives import (
    IGNORE_INDEX,
    SpecialTokens,
    build_pairs,
    build_single,
    dynamic_mask_generator,
    mask_tokens,
    mlm_accuracy,
    static_mask_generator,
    word_start_table,
)
from cluster.tokenizer import TokenizerConfig, train_tokenizer

WORD_RNG = np.random.default_rng(7)
# Pseudo-words of 2-12 letters: with a 600-token vocabulary most split into several pieces.
WORDS = [
    "".join(WORD_RNG.choice(list("abcdefghijklmnopqrstuvwxyz"), WORD_RNG.integers(2, 13))) for _ in range(400)
]
TEXTS = [" ".join(WORD_RNG.choice(WORDS, 12)) + "." for _ in range(1500)]

# Synthetic ids for pair tests: content ids are drawn from a large range, so a run of a few ids
# identifies the row it came from.
PAIR_SPECIAL = SpecialTokens(
    pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=50_000, special_ids=frozenset({4})
)


def sigma_bound(n: int, p: float) -> float:
    return 4 * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS, TokenizerConfig(kind="wordpiece", vocab_size=600, min_frequency=1))


@pytest.fixture(scope="module")
def special(wordpiece) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(wordpiece)


@pytest.fixture(scope="module")
def batch(wordpiece) -> torch.Tensor:
    """(B, 128) rows of `[CLS] text [SEP] pad...`, > 100k real tokens, with padding in every row."""
    encoded = wordpiece(TEXTS * 4, add_special_tokens=True, truncation=True, max_length=100).input_ids
    out = torch.full((len(encoded), 128), wordpiece.pad_token_id, dtype=torch.long)
    for i, ids in enumerate(encoded):
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def candidates(ids: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    return ~torch.isin(ids, torch.tensor(sorted(special.special_ids)))


# ---------------------------------------------------------------------------------------------
# SpecialTokens and the word-start table


def test_special_tokens_from_wordpiece(wordpiece, special):
    assert (special.pad_id, special.cls_id, special.sep_id, special.mask_id) == (
        wordpiece.pad_token_id,
        wordpiece.cls_token_id,
        wordpiece.sep_token_id,
        wordpiece.mask_token_id,
    )
    assert special.vocab_size == len(wordpiece)
    assert special.special_ids == frozenset(wordpiece.all_special_ids)  # [UNK] included


def test_from_tokenizer_names_the_missing_mask_token(wordpiece):
    no_mask = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece.backend_tokenizer,
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
    )
    with pytest.raises(ValueError, match="tokenizer has no mask token"):
        SpecialTokens.from_tokenizer(no_mask)


def test_from_tokenizer_lists_every_missing_token_of_a_causal_tokenizer():
    bpe = train_tokenizer(TEXTS[:50], TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))
    with pytest.raises(ValueError, match="no cls, sep or mask token"):
        SpecialTokens.from_tokenizer(bpe)
    table = word_start_table(bpe)
    for token, token_id in bpe.get_vocab().items():
        assert table[token_id] == (token.startswith("Ġ") or token_id in bpe.all_special_ids)


def test_word_start_table_for_wordpiece(wordpiece):
    table = word_start_table(wordpiece)
    assert table.dtype == bool and len(table) == len(wordpiece)
    for token, token_id in wordpiece.get_vocab().items():
        assert table[token_id] == (not token.startswith("##")), token
    assert table[wordpiece.all_special_ids].all()


# ---------------------------------------------------------------------------------------------
# Token-level masking


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_selection_rate_is_binomial(batch, special, rate):
    masked, labels = mask_tokens(batch, special, rate=rate, generator=torch.Generator().manual_seed(1))
    n = int(candidates(batch, special).sum())
    assert n > 100_000
    selected = int((labels != IGNORE_INDEX).sum())
    assert abs(selected - rate * n) < sigma_bound(n, rate)
    assert masked.shape == batch.shape and masked.dtype == torch.long


def test_replacements_split_80_10_10(batch, special):
    masked, labels = mask_tokens(batch, special, rate=0.5, generator=torch.Generator().manual_seed(2))
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    assert torch.equal(labels[selected], batch[selected])  # labels carry the original ids
    as_mask = int((masked[selected] == special.mask_id).sum())
    unchanged = int((masked[selected] == batch[selected]).sum())
    # A random replacement equals the original with probability 1/pool.
    p_collide = 0.1 / (special.vocab_size - len(special.special_ids))
    p_unchanged = 0.1 + p_collide
    assert abs(as_mask - 0.8 * n) < sigma_bound(n, 0.8)
    assert abs(unchanged - p_unchanged * n) < sigma_bound(n, p_unchanged)
    assert abs((n - as_mask - unchanged) - (0.1 - p_collide) * n) < sigma_bound(n, 0.1)
    assert torch.equal(masked[~selected], batch[~selected])  # unselected positions untouched


def test_specials_and_padding_are_never_selected_nor_drawn(batch, special):
    # Every selected token is replaced at random, so the replacement pool is fully exercised.
    gen = torch.Generator().manual_seed(3)
    masked, labels = mask_tokens(batch, special, rate=0.9, generator=gen, random_ratio=1.0, keep_ratio=0.0)
    protected = ~candidates(batch, special)
    assert (batch == special.pad_id).any() and (batch == special.cls_id).any()
    assert (labels[protected] == IGNORE_INDEX).all()
    assert torch.equal(masked[protected], batch[protected])
    drawn = masked[labels != IGNORE_INDEX]
    assert not torch.isin(drawn, torch.tensor(sorted(special.special_ids))).any()
    assert len(drawn.unique()) > 0.9 * (special.vocab_size - len(special.special_ids))


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_rate_outside_open_unit_interval_is_rejected(batch, special, rate):
    with pytest.raises(ValueError, match="rate"):
        mask_tokens(batch[:2], special, rate=rate)


def test_ratios_that_exceed_one_are_rejected(batch, special):
    with pytest.raises(ValueError, match="random_ratio"):
        mask_tokens(batch[:2], special, random_ratio=0.6, keep_ratio=0.5)


# ---------------------------------------------------------------------------------------------
# Seeding: dynamic vs static masks


def test_dynamic_masks_differ_between_epochs_and_repeat_for_the_same_step(batch, special):
    rows = batch[:64]
    epoch0 = mask_tokens(rows, special, generator=dynamic_mask_generator(0, epoch=0, step=5, rank=0))
    again = mask_tokens(rows, special, generator=dynamic_mask_generator(0, epoch=0, step=5, rank=0))
    epoch1 = mask_tokens(rows, special, generator=dynamic_mask_generator(0, epoch=1, step=5, rank=0))
    rank1 = mask_tokens(rows, special, generator=dynamic_mask_generator(0, epoch=0, step=5, rank=1))
    assert torch.equal(epoch0[0], again[0]) and torch.equal(epoch0[1], again[1])
    assert not torch.equal(epoch0[1], epoch1[1])
    assert not torch.equal(epoch0[1], rank1[1])


def test_static_masks_are_identical_every_epoch(batch, special):
    def epoch_masks() -> list[torch.Tensor]:
        # Static masking masks each row with its own generator, whatever batch it lands in.
        return [
            mask_tokens(batch[i : i + 1], special, generator=static_mask_generator(9, i))[1]
            for i in range(32)
        ]

    first, second = epoch_masks(), epoch_masks()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(first[0], m) for m in first[1:])  # keys give different masks


# ---------------------------------------------------------------------------------------------
# Whole-word masking


def word_spans(ids: list[int], starts: np.ndarray, protected: set[int]) -> list[range]:
    """Word spans of one row, computed independently of the implementation."""
    spans: list[range] = []
    begin = None
    for t, token_id in enumerate([*ids, None]):
        ends_word = token_id is None or token_id in protected or starts[token_id]
        if ends_word and begin is not None:
            spans.append(range(begin, t))
            begin = None
        if token_id is not None and token_id not in protected and begin is None:
            begin = t
    return spans


def test_whole_word_masking_selects_whole_words_at_the_token_rate(wordpiece, batch, special):
    table = word_start_table(wordpiece)
    gen = torch.Generator().manual_seed(4)
    _, labels = mask_tokens(batch, special, rate=0.15, generator=gen, word_starts=torch.from_numpy(table))
    selected = (labels != IGNORE_INDEX).numpy()
    n_words = n_chosen = multi_piece_chosen = 0
    for row, row_selected in zip(batch.tolist(), selected, strict=True):
        spans = word_spans(row, table, set(special.special_ids))
        for span in spans:
            flags = row_selected[span.start : span.stop]
            assert flags.all() or not flags.any(), "a word was partly selected"
            n_chosen += int(flags[0])
            multi_piece_chosen += int(flags[0] and len(span) > 1)
        covered = sum(len(s) for s in spans)
        assert covered == int(candidates(torch.tensor(row), special).sum())
        n_words += len(spans)
    assert multi_piece_chosen > 1000  # the test exercises real multi-piece words
    assert abs(n_chosen - 0.15 * n_words) < sigma_bound(n_words, 0.15)
    n_tokens = int(candidates(batch, special).sum())
    assert abs(selected.sum() / n_tokens - 0.15) < 0.01


def test_whole_word_masking_handles_a_row_starting_mid_word(special):
    # (continuation, continuation, start, continuation): the leading orphans form one word.
    table = torch.zeros(special.vocab_size, dtype=torch.bool)
    table[[10, special.cls_id, special.sep_id, special.pad_id]] = True
    row = torch.tensor([[11, 12, 10, 13, special.sep_id, 14]])
    seen = set()
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        _, labels = mask_tokens(row, special, rate=0.5, generator=gen, word_starts=table)
        chosen = tuple((labels[0] != IGNORE_INDEX).tolist())
        seen.add(chosen)
        assert chosen[0] == chosen[1] and chosen[2] == chosen[3] and not chosen[4]
    assert len(seen) == 8  # three independent words: (11 12), (10 13), (14)


def test_mlm_accuracy_counts_only_labelled_positions():
    labels = torch.tensor([[5, IGNORE_INDEX, 7], [IGNORE_INDEX, 2, 3]])
    predicted = torch.tensor([[5, 0, 1], [2, 2, 3]])
    logits = torch.nn.functional.one_hot(predicted, num_classes=8).float()  # (2, 3, 8)
    assert mlm_accuracy(logits, labels) == (3, 4)


# ---------------------------------------------------------------------------------------------
# Sentence pairs


def make_rows(n_docs: int, seed: int, min_sentences: int = 2) -> list[dict]:
    """Segments-layout rows: each doc has 1-3 chunks of min_sentences-6 sentences of 3-20 tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for doc in range(n_docs):
        for _ in range(rng.integers(1, 4)):
            lengths = rng.integers(3, 21, rng.integers(min_sentences, 7))
            rows.append(
                {
                    "input_ids": rng.integers(5, PAIR_SPECIAL.vocab_size, int(lengths.sum())),
                    "sentence_starts": np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                    "doc_id": doc,
                }
            )
    return rows


def split_example(ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check the [CLS] A [SEP] B [SEP] pad layout and segment ids; return (A, B)."""
    sep = np.flatnonzero(ids == PAIR_SPECIAL.sep_id)
    assert ids[0] == PAIR_SPECIAL.cls_id and len(sep) == 2
    first, second = sep
    assert (ids[second + 1 :] == PAIR_SPECIAL.pad_id).all()
    assert (mask[: second + 1] == 1).all() and (mask[second + 1 :] == 0).all()
    assert (types[: first + 1] == 0).all() and (types[first + 1 : second + 1] == 1).all()
    assert (types[second + 1 :] == 0).all()
    return ids[1:first], ids[first + 1 : second]


def find(needle: np.ndarray, haystack: np.ndarray) -> int:
    """Start offset of needle in haystack, or -1."""
    if len(needle) == 0 or len(needle) > len(haystack):
        return -1
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    hits = np.flatnonzero((windows == needle).all(axis=1))
    return int(hits[0]) if len(hits) else -1


def check_in_order(first: np.ndarray, second: np.ndarray, row: dict) -> None:
    """first then second are contiguous in the row, joined at a sentence boundary."""
    ids = np.asarray(row["input_ids"])
    at = find(np.concatenate([first, second]), ids)
    assert at >= 0, "segments are not consecutive text of their row"
    assert at + len(first) in set(row["sentence_starts"].tolist())


@pytest.fixture(scope="module")
def pair_rows() -> list[dict]:
    return make_rows(n_docs=800, seed=11)


def rows_by_token(rows: list[dict]) -> dict[int, set[int]]:
    """token id -> indices of the rows containing it, to find a segment's source row quickly."""
    index: dict[int, set[int]] = {}
    for i, row in enumerate(rows):
        for token_id in set(row["input_ids"].tolist()):
            index.setdefault(token_id, set()).add(i)
    return index


def test_nsp_pairs_layout_labels_and_sources(pair_rows):
    index = rows_by_token(pair_rows)
    out = build_pairs(pair_rows, "nsp", max_len=64, rng=np.random.default_rng(0), special=PAIR_SPECIAL)
    n = len(pair_rows)
    assert out["input_ids"].shape == (n, 64) and out["input_ids"].dtype == np.int64
    assert out["pair_label"].shape == (n,)
    labels = out["pair_label"]
    assert set(np.unique(labels)) == {0, 1}
    assert abs(int(labels.sum()) - n / 2) < sigma_bound(n, 0.5)
    for i, row in enumerate(pair_rows):
        a, b = split_example(out["input_ids"][i], out["token_type_ids"][i], out["attention_mask"][i])
        assert len(a) > 0 and len(b) > 0 and len(a) + len(b) <= 64 - 3
        assert find(a, row["input_ids"]) >= 0  # A always comes from the example's own row
        if labels[i] == 0:
            check_in_order(a, b, row)
        else:
            holders = index.get(int(b[0]), set())
            sources = [pair_rows[j]["doc_id"] for j in holders if find(b, pair_rows[j]["input_ids"]) >= 0]
            assert sources and all(doc != row["doc_id"] for doc in sources)


def test_sop_swaps_exactly_the_negatives(pair_rows):
    out = build_pairs(pair_rows, "sop", max_len=64, rng=np.random.default_rng(1), special=PAIR_SPECIAL)
    labels = out["pair_label"]
    assert abs(int(labels.sum()) - len(pair_rows) / 2) < sigma_bound(len(pair_rows), 0.5)
    for i, row in enumerate(pair_rows):
        first, second = split_example(out["input_ids"][i], out["token_type_ids"][i], out["attention_mask"][i])
        assert len(first) + len(second) <= 64 - 3
        if labels[i] == 0:
            check_in_order(first, second, row)
        else:
            check_in_order(second, first, row)


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_truncation_keeps_the_budget_and_the_junction(pair_rows, objective):
    # max_len 12 forces truncation of nearly every pair; A is cut at its start and B at its end,
    # so the text around the A|B junction is still consecutive in the row.
    out = build_pairs(pair_rows, objective, max_len=12, rng=np.random.default_rng(2), special=PAIR_SPECIAL)
    for i, row in enumerate(pair_rows):
        a, b = split_example(out["input_ids"][i], out["token_type_ids"][i], out["attention_mask"][i])
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= 9
        if out["pair_label"][i] == 0:
            check_in_order(a, b, row)
        elif objective == "sop":
            check_in_order(b, a, row)
    assert (out["attention_mask"].sum(axis=1) == 12).mean() > 0.9


def test_one_sentence_rows(pair_rows):
    single = [
        {"input_ids": np.arange(100, 110), "sentence_starts": np.array([0]), "doc_id": 1000},
        {"input_ids": np.arange(200, 207), "sentence_starts": np.array([0]), "doc_id": 1001},
    ]
    rows = single + pair_rows[:20]
    for seed in range(10):
        nsp = build_pairs(rows, "nsp", max_len=64, rng=np.random.default_rng(seed), special=PAIR_SPECIAL)
        sop = build_pairs(rows, "sop", max_len=64, rng=np.random.default_rng(seed), special=PAIR_SPECIAL)
        for i, row in enumerate(single):
            # NSP: always a negative, with the whole row as A.
            a, b = split_example(nsp["input_ids"][i], nsp["token_type_ids"][i], nsp["attention_mask"][i])
            assert nsp["pair_label"][i] == 1 and np.array_equal(a, row["input_ids"])
            # SOP: split at the token midpoint, swapped for label 1.
            first, second = split_example(
                sop["input_ids"][i], sop["token_type_ids"][i], sop["attention_mask"][i]
            )
            halves = np.split(row["input_ids"], [len(row["input_ids"]) // 2])
            expected = halves if sop["pair_label"][i] == 0 else halves[::-1]
            assert np.array_equal(first, expected[0]) and np.array_equal(second, expected[1])


def test_nsp_falls_back_to_positives_when_the_batch_holds_one_document(pair_rows):
    one_doc = [r for r in pair_rows if r["doc_id"] == pair_rows[0]["doc_id"]]
    out = build_pairs(one_doc, "nsp", max_len=64, rng=np.random.default_rng(3), special=PAIR_SPECIAL)
    assert (out["pair_label"] == 0).all()


def test_pair_builder_rejects_unknown_objective_and_tiny_max_len(pair_rows):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="objective"):
        build_pairs(pair_rows[:2], "mlm", max_len=64, rng=rng, special=PAIR_SPECIAL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_len"):
        build_pairs(pair_rows[:2], "nsp", max_len=4, rng=rng, special=PAIR_SPECIAL)


def test_build_single_truncates_and_pads():
    rows = [{"input_ids": np.arange(10, 30)}, {"input_ids": np.arange(50, 53)}]
    out = build_single(rows, max_len=8, special=PAIR_SPECIAL)
    cls, sep, pad = PAIR_SPECIAL.cls_id, PAIR_SPECIAL.sep_id, PAIR_SPECIAL.pad_id
    assert out["input_ids"].tolist() == [
        [cls, 10, 11, 12, 13, 14, 15, sep],
        [cls, 50, 51, 52, sep, pad, pad, pad],
    ]
    assert out["attention_mask"].tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert not out["token_type_ids"].any() and out["token_type_ids"].shape == (2, 8)
