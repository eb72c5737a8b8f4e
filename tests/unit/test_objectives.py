"""Batch builders for BERT-family objectives: MLM masking statistics, whole-word masking, mask
seeding, NSP/SOP pair construction and layout. Statistical checks use > 100k tokens (or a few
thousand pairs) and 4-sigma binomial bounds, so each would fail by chance with probability ~1e-4;
the seeds are fixed, so they do not flake."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cluster.data.tokenizer import TokenizerConfig, train_tokenizer
from cluster.objectives.masking import (
    IGNORE_INDEX,
    SpecialTokens,
    dynamic_mask_generator,
    mask_tokens,
    mlm_accuracy,
    static_mask_generator,
    word_start_table,
)
from cluster.objectives.pairs import build_pairs, build_single

WORD_RNG = np.random.default_rng(7)
# Pseudo-words of 2-12 letters: with a 600-token vocabulary most split into several pieces.
WORDS = [
    "".join(WORD_RNG.choice(list("abcdefghijklmnopqrstuvwxyz"), WORD_RNG.integers(2, 13))) for _ in range(400)
]
TEXTS = [" ".join(WORD_RNG.choice(WORDS, 12)) + "." for _ in range(1500)]
BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}

# Synthetic ids for pair tests: content ids are drawn from a large range, so a run of a few ids
# identifies the row it came from.
PAIR_SPECIAL = SpecialTokens(
    pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=50_000, special_ids=frozenset({4})
)


def sigma_bound(n: int, p: float) -> float:
    return 4 * math.sqrt(n * p * (1 - p))


def wordpiece_backend(texts: list[str], vocab_size: int) -> Tokenizer:
    """A BERT-style WordPiece tokenizer with [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4)."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = [*BERT_SPECIALS.values(), "[MASK]"]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return backend


def byte_level_bpe_backend(texts: list[str]) -> Tokenizer:
    """A RoBERTa-style byte-level BPE: a word's first piece carries the byte-level space "Ġ"."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return backend


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    backend = wordpiece_backend(TEXTS, vocab_size=600)
    return PreTrainedTokenizerFast(tokenizer_object=backend, mask_token="[MASK]", **BERT_SPECIALS)


@pytest.fixture(scope="module")
def bpe_backend() -> Tokenizer:
    return byte_level_bpe_backend(TEXTS[:200])


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
    assert special.special_ids == frozenset(wordpiece.all_special_ids) == frozenset(range(5))  # [UNK] too


def test_special_tokens_from_roberta_style_bpe(bpe_backend):
    roberta = PreTrainedTokenizerFast(
        tokenizer_object=bpe_backend,
        bos_token="<s>",
        cls_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    special = SpecialTokens.from_tokenizer(roberta)
    assert (special.cls_id, special.pad_id, special.sep_id, special.mask_id) == (0, 1, 2, 4)
    table = word_start_table(roberta)
    assert len(table) == len(roberta)
    for token, token_id in roberta.get_vocab().items():
        assert table[token_id] == (token.startswith("Ġ") or token_id in roberta.all_special_ids), token
    assert (~table).sum() > 50  # plenty of continuation pieces, so the check above means something


def test_hand_built_special_tokens_always_protect_pad_cls_sep_mask():
    special = SpecialTokens(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=10)
    assert special.special_ids == frozenset({0, 1, 2, 3})
    assert special.replacement_ids().tolist() == list(range(4, 10))
    with pytest.raises(ValueError, match="vocab_size"):
        SpecialTokens(pad_id=0, cls_id=1, sep_id=2, mask_id=30, vocab_size=10)


def test_from_tokenizer_names_the_missing_mask_token(wordpiece):
    no_mask = PreTrainedTokenizerFast(tokenizer_object=wordpiece.backend_tokenizer, **BERT_SPECIALS)
    with pytest.raises(ValueError, match="tokenizer has no mask token"):
        SpecialTokens.from_tokenizer(no_mask)


def test_from_tokenizer_lists_every_missing_token_of_a_causal_tokenizer(bpe_backend):
    causal = PreTrainedTokenizerFast(tokenizer_object=bpe_backend, eos_token="</s>", pad_token="<pad>")
    with pytest.raises(ValueError, match="tokenizer has no cls, sep or mask token"):
        SpecialTokens.from_tokenizer(causal)


def test_word_start_table_for_wordpiece(wordpiece):
    table = word_start_table(wordpiece)
    assert table.dtype == bool and len(table) == len(wordpiece)
    for token, token_id in wordpiece.get_vocab().items():
        assert table[token_id] == (not token.startswith("##")), token
    assert table[wordpiece.all_special_ids].all()
    assert (~table).sum() > 100


def test_word_start_table_rejects_a_bpe_without_byte_level_spaces():
    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXTS[:50], trainers.BpeTrainer(vocab_size=100, show_progress=False))
    with pytest.raises(ValueError, match="byte-level"):
        word_start_table(PreTrainedTokenizerFast(tokenizer_object=backend))


def test_the_project_wordpiece_tokenizer_is_supported():
    # The tokenizer jobs.prepare trains (byte-level characters under WordPiece) is what the
    # training workers hand to these functions.
    tok = train_tokenizer(TEXTS[:300], TokenizerConfig(kind="wordpiece", vocab_size=600, min_frequency=1))
    special = SpecialTokens.from_tokenizer(tok)
    assert special.mask_id == tok.mask_token_id and special.vocab_size == len(tok)
    table = word_start_table(tok)
    ids = tok("abcdefghijk lmnopqrstu", add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert [bool(table[i]) for i in ids] == [not p.startswith("##") for p in pieces]
    assert sum(table[i] for i in ids) == 2 < len(ids)  # two words, several pieces each


# ---------------------------------------------------------------------------------------------
# Token-level masking


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_selection_rate_is_binomial(batch, special, rate):
    masked, labels = mask_tokens(batch, special, rate=rate, generator=torch.Generator().manual_seed(1))
    n = int(candidates(batch, special).sum())
    assert n > 100_000
    selected = int((labels != IGNORE_INDEX).sum())
    assert abs(selected - rate * n) < sigma_bound(n, rate)
    assert masked.shape == labels.shape == batch.shape
    assert masked.dtype == labels.dtype == torch.long


def test_replacements_split_80_10_10(batch, special):
    masked, labels = mask_tokens(batch, special, rate=0.5, generator=torch.Generator().manual_seed(2))
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    assert torch.equal(labels[selected], batch[selected])  # labels carry the original ids
    as_mask = int((masked[selected] == special.mask_id).sum())
    unchanged = int((masked[selected] == batch[selected]).sum())
    # A random replacement equals the original with probability 1/pool.
    pool = special.vocab_size - len(special.special_ids)
    p_unchanged = 0.1 + 0.1 / pool
    assert abs(as_mask - 0.8 * n) < sigma_bound(n, 0.8)
    assert abs(unchanged - p_unchanged * n) < sigma_bound(n, p_unchanged)
    assert abs((n - as_mask - unchanged) - (0.1 - 0.1 / pool) * n) < sigma_bound(n, 0.1)
    assert torch.equal(masked[~selected], batch[~selected])  # unselected positions untouched


def random_batch(special: SpecialTokens, rows: int, length: int, seed: int) -> torch.Tensor:
    """(rows, length) uniform ids over the whole vocabulary, so special ids sit anywhere in a row,
    then a padded tail of random length in each row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(special.vocab_size, (rows, length), generator=gen)
    lengths = torch.randint(length // 2, length, (rows, 1), generator=gen)
    return torch.where(torch.arange(length) < lengths, ids, special.pad_id)


def test_specials_and_padding_are_never_selected_nor_drawn(special):
    ids = random_batch(special, rows=1200, length=128, seed=3)
    protected = ~candidates(ids, special)
    assert int((~protected).sum()) > 100_000
    assert int(protected[:, :64].sum()) > 500  # specials inside the text, not just at the ends
    # Every selected token is replaced at random, so the replacement pool is fully exercised.
    gen = torch.Generator().manual_seed(3)
    masked, labels = mask_tokens(ids, special, rate=0.9, generator=gen, random_ratio=1.0, keep_ratio=0.0)
    assert (labels[protected] == IGNORE_INDEX).all()
    assert torch.equal(masked[protected], ids[protected])
    drawn = masked[labels != IGNORE_INDEX]
    assert not torch.isin(drawn, torch.tensor(sorted(special.special_ids))).any()
    assert len(drawn.unique()) == special.vocab_size - len(special.special_ids)  # the whole pool


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_rate_outside_open_unit_interval_is_rejected(batch, special, rate):
    with pytest.raises(ValueError, match="rate"):
        mask_tokens(batch[:2], special, rate=rate)


def test_bad_ratios_and_shapes_are_rejected(batch, special):
    with pytest.raises(ValueError, match="random_ratio"):
        mask_tokens(batch[:2], special, random_ratio=0.6, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        mask_tokens(batch[0], special)


# ---------------------------------------------------------------------------------------------
# Seeding: dynamic vs static masks


def test_dynamic_masks_differ_between_epochs_and_repeat_for_the_same_step(batch, special):
    rows = batch[:64]

    def labels(epoch: int, rank: int = 0) -> torch.Tensor:
        return mask_tokens(rows, special, generator=dynamic_mask_generator(0, epoch, step=5, rank=rank))[1]

    assert torch.equal(labels(0), labels(0))
    assert not torch.equal(labels(0), labels(1))
    assert not torch.equal(labels(0), labels(0, rank=1))
    # Evaluation passes epoch=-1: a valid seed, its own masks, the same at every evaluation.
    assert torch.equal(labels(-1), labels(-1)) and not torch.equal(labels(-1), labels(1))


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
    other_seed = mask_tokens(batch[:1], special, generator=static_mask_generator(10, 0))[1]
    assert not torch.equal(first[0], other_seed)


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
    masked, labels = mask_tokens(
        batch, special, rate=0.15, generator=gen, word_starts=torch.from_numpy(table)
    )
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
        assert covered == int(candidates(torch.tensor(row), special).sum())  # spans cover every candidate
        n_words += len(spans)
    assert multi_piece_chosen > 1000  # the test exercises real multi-piece words
    assert abs(n_chosen - 0.15 * n_words) < sigma_bound(n_words, 0.15)
    n_tokens = int(candidates(batch, special).sum())
    assert abs(selected.sum() / n_tokens - 0.15) < 0.01
    assert not (masked[~candidates(batch, special)] != batch[~candidates(batch, special)]).any()


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
    with pytest.raises(ValueError, match="do not match"):
        mlm_accuracy(logits[:, :2], labels)


# ---------------------------------------------------------------------------------------------
# Sentence pairs


def make_rows(n_docs: int, seed: int, sentences: tuple[int, int] = (2, 7), lengths=(3, 21)) -> list[dict]:
    """Segments-layout rows: each doc has 1-3 chunks of `sentences` sentences of `lengths` tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for doc in range(n_docs):
        for _ in range(rng.integers(1, 4)):
            sizes = rng.integers(*lengths, rng.integers(*sentences))
            rows.append(
                {
                    "input_ids": rng.integers(5, PAIR_SPECIAL.vocab_size, int(sizes.sum())),
                    "sentence_starts": np.concatenate([[0], np.cumsum(sizes)[:-1]]),
                    "doc_id": doc,
                }
            )
    return rows


def split_example(out: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray]:
    """Check example i's [CLS] A [SEP] B [SEP] pad layout, segment ids and lengths; return (A, B)."""
    ids, types, mask = out["input_ids"][i], out["token_type_ids"][i], out["attention_mask"][i]
    sep = np.flatnonzero(ids == PAIR_SPECIAL.sep_id)
    assert ids[0] == PAIR_SPECIAL.cls_id and len(sep) == 2
    first, second = sep
    assert (first - 1, second - first - 1) == (out["a_len"][i], out["b_len"][i])
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
    at = find(np.concatenate([first, second]), row["input_ids"])
    assert at >= 0, "segments are not consecutive text of their row"
    assert at + len(first) in set(row["sentence_starts"].tolist())


@pytest.fixture(scope="module")
def pair_rows() -> list[dict]:
    return make_rows(n_docs=1500, seed=11)  # ~3000 rows


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
    assert n > 2500
    assert out["input_ids"].shape == (n, 64) and out["input_ids"].dtype == np.int64
    labels = out["pair_label"]
    assert labels.shape == (n,) and set(np.unique(labels)) == {0, 1}
    assert abs(int(labels.sum()) - n / 2) < sigma_bound(n, 0.5)
    for i, row in enumerate(pair_rows):
        a, b = split_example(out, i)
        assert len(a) > 0 and len(b) > 0 and len(a) + len(b) <= 64 - 3
        assert find(a, row["input_ids"]) >= 0  # A always comes from the example's own row
        if labels[i] == 0:
            check_in_order(a, b, row)  # B is the text right after A, in A's own row
        else:
            holders = index.get(int(b[0]), set())
            sources = [pair_rows[j]["doc_id"] for j in holders if find(b, pair_rows[j]["input_ids"]) >= 0]
            assert sources and all(doc != row["doc_id"] for doc in sources)


def test_sop_swaps_exactly_the_negatives(pair_rows):
    out = build_pairs(pair_rows, "sop", max_len=64, rng=np.random.default_rng(1), special=PAIR_SPECIAL)
    labels = out["pair_label"]
    assert set(np.unique(labels)) == {0, 1}
    assert abs(int(labels.sum()) - len(pair_rows) / 2) < sigma_bound(len(pair_rows), 0.5)
    for i, row in enumerate(pair_rows):
        first, second = split_example(out, i)
        assert len(first) + len(second) <= 64 - 3
        if labels[i] == 0:
            check_in_order(first, second, row)
        else:
            check_in_order(second, first, row)


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_truncation_keeps_the_budget_and_the_junction(pair_rows, objective):
    # max_len 12 forces truncation of nearly every pair; A is cut at its start and B at its end,
    # so the text around the A|B junction is still consecutive in the row.
    rng = np.random.default_rng(2)
    out = build_pairs(pair_rows[:600], objective, max_len=12, rng=rng, special=PAIR_SPECIAL, short_seq_prob=0)
    for i, row in enumerate(pair_rows[:600]):
        a, b = split_example(out, i)
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= 9
        if out["pair_label"][i] == 0:
            check_in_order(a, b, row)
        elif objective == "sop":
            check_in_order(b, a, row)
    assert (out["attention_mask"].sum(axis=1) == 12).mean() > 0.9


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_short_seq_prob_shortens_that_share_of_pairs(objective):
    # Sentences of 40-59 tokens: every pair would fill max_len=64 (61 content tokens) unless shortened.
    rows = make_rows(n_docs=1000, seed=5, sentences=(2, 4), lengths=(40, 60))
    full = 64 - 3

    def used(short_seq_prob: float) -> np.ndarray:
        out = build_pairs(rows, objective, 64, np.random.default_rng(6), PAIR_SPECIAL, short_seq_prob)
        return out["a_len"] + out["b_len"]

    assert (used(0.0) == full).all()
    lengths = used(0.3)
    n, p_short = len(rows), 0.3 * (1 - 1 / (full - 1))  # a random budget of 2..61 may still be 61
    assert abs(int((lengths < full).sum()) - p_short * n) < sigma_bound(n, p_short)
    assert lengths.min() >= 2 and lengths.max() == full
    assert lengths[lengths < full].std() > 10  # spread over the range, not one short length


def test_one_sentence_rows():
    single = [
        {"input_ids": np.arange(100, 110), "sentence_starts": np.array([0]), "doc_id": 1000},
        {"input_ids": np.arange(200, 207), "sentence_starts": np.array([0]), "doc_id": 1001},
    ]
    rows = single + make_rows(n_docs=10, seed=3)
    for seed in range(10):
        nsp = build_pairs(rows, "nsp", 64, np.random.default_rng(seed), PAIR_SPECIAL, short_seq_prob=0)
        sop = build_pairs(rows, "sop", 64, np.random.default_rng(seed), PAIR_SPECIAL, short_seq_prob=0)
        for i, row in enumerate(single):
            # NSP: never a positive cut mid-sentence; a negative with the whole row as A.
            a, _ = split_example(nsp, i)
            assert nsp["pair_label"][i] == 1 and np.array_equal(a, row["input_ids"])
            # SOP: split at the token midpoint, swapped for label 1.
            first, second = split_example(sop, i)
            halves = np.split(row["input_ids"], [len(row["input_ids"]) // 2])
            expected = halves if sop["pair_label"][i] == 0 else halves[::-1]
            assert np.array_equal(first, expected[0]) and np.array_equal(second, expected[1])


def test_nsp_labels_stay_balanced_when_some_rows_have_one_sentence():
    # About a third of the rows have one sentence and so are always negatives; multi-sentence rows
    # become positives more often to make up for them.
    rows = make_rows(n_docs=1500, seed=8, sentences=(1, 4))
    one_sentence = np.array([len(r["sentence_starts"]) == 1 for r in rows])
    assert 0.25 < one_sentence.mean() < 0.45
    labels = build_pairs(rows, "nsp", 64, np.random.default_rng(4), PAIR_SPECIAL)["pair_label"]
    assert (labels[one_sentence] == 1).all()
    assert abs(int(labels.sum()) - len(rows) / 2) < sigma_bound(len(rows), 0.5)


def test_rows_without_a_valid_pair_get_no_pair_label():
    # One document only: no NSP negative is possible. Multi-sentence rows are positives; a
    # one-sentence row cannot be a positive either, so it trains MLM only (label -100).
    doc = [
        {"input_ids": np.arange(10, 30), "sentence_starts": np.array([0, 8]), "doc_id": 7},
        {"input_ids": np.arange(30, 45), "sentence_starts": np.array([0]), "doc_id": 7},
        {"input_ids": np.array([50]), "sentence_starts": np.array([0]), "doc_id": 7},
    ]
    nsp = build_pairs(doc, "nsp", 32, np.random.default_rng(0), PAIR_SPECIAL)
    assert nsp["pair_label"].tolist() == [0, IGNORE_INDEX, IGNORE_INDEX]
    split_example(nsp, 1)  # still a well-formed example for the MLM loss
    # SOP: a one-token row has no order to predict: [CLS] x [SEP] [SEP].
    sop = build_pairs(doc, "sop", 32, np.random.default_rng(0), PAIR_SPECIAL)
    assert sop["pair_label"][2] == IGNORE_INDEX and sop["input_ids"][2, :4].tolist() == [1, 50, 2, 2]


def test_pair_builder_reports_every_bad_argument_at_once(pair_rows):
    with pytest.raises(ValueError, match="objective.*max_len.*short_seq_prob"):
        build_pairs(pair_rows[:2], "mlm", 4, np.random.default_rng(0), PAIR_SPECIAL, 1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("starts", [[1, 5], [0, 5, 5], [0, 20], []])
def test_bad_sentence_starts_are_rejected(starts):
    row = {"input_ids": np.arange(10, 30), "sentence_starts": np.array(starts, dtype=np.int64), "doc_id": 3}
    with pytest.raises(ValueError, match="doc_id 3: sentence_starts"):
        build_pairs([row], "sop", 32, np.random.default_rng(0), PAIR_SPECIAL)


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


# ---------------------------------------------------------------------------------------------
# The MLM objective's batches (cluster.objectives.lm.MaskedLM)


def segment_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as Ray Data hands them over: list columns as object arrays of 1-D arrays."""
    def column(key: str) -> np.ndarray:
        out = np.empty(len(rows), dtype=object)
        out[:] = [np.asarray(r[key]) for r in rows]
        return out

    return {"input_ids": column("input_ids"), "sentence_starts": column("sentence_starts"),
            "doc_id": np.array([r["doc_id"] for r in rows])}


@pytest.mark.parametrize("pair, static", [(None, False), ("nsp", False), ("sop", True)])
def test_mlm_batches_are_as_wide_as_their_longest_row_not_max_len(wordpiece, pair, static):
    """Segments far shorter than max_len must not cost max_len columns: padding columns would be
    most of the model's work (and of the MLM head's logits). Trimming happens after masking, so
    a static mask does not depend on which rows share the batch."""
    from cluster.objectives.lm import MaskedLM

    objective = MaskedLM(wordpiece, pair, max_len=128, rate=0.3, whole_word=False, static=static, seed=0)
    rng = np.random.default_rng(3)
    lengths = rng.integers(4, 20, (8, 2))  # two sentences per row: rows of 8-38 tokens
    rows = [{"input_ids": rng.integers(len(wordpiece.all_special_ids), len(wordpiece), int(a + b)),
             "sentence_starts": [0, int(a)], "doc_id": i} for i, (a, b) in enumerate(lengths)]
    out = objective.collate(segment_batch(rows), (0, 0, 0, 0))
    longest = int(out["attention_mask"].sum(1).max())
    assert longest <= 2 * max(len(r["input_ids"]) for r in rows) + 3 < 128  # an NSP B may come from another row
    assert all(v.shape == (len(rows), longest) for k, v in out.items() if k != "pair_label")
    assert (out["labels"] != IGNORE_INDEX).any()
    if static:
        alone = objective.collate(segment_batch(rows[:1]), (0, 0, 0, 0))
        width = alone["input_ids"].shape[1]
        assert torch.equal(alone["labels"][0], out["labels"][0, :width])
