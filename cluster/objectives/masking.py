"""Masked-LM masking for the BERT family: token-level or whole-word selection at the configured
rate, BERT's 80/10/10 replacement, and seeded generators so that masks are reproducible (static:
per example; dynamic: per epoch, step and rank).

Whole words come from the tokenizer (a token starts a word or continues one), so an unspaced
Chinese run is one word per character. With a word segmenter (`CJKWords`, jieba) the characters of
each CJK run are regrouped into the segmenter's words, as Chinese BERT-wwm masks them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


_BYTE_LEVEL_SPACE = "Ġ"  # the byte-level character a leading space is mapped to


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the objectives need. `special_ids` is never masked nor drawn as a random replacement;
    pad/cls/sep/mask are always added to it, so a hand-built instance cannot forget them."""

    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int
    special_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        ids = {int(i) for i in self.special_ids} | {self.pad_id, self.cls_id, self.sep_id, self.mask_id}
        object.__setattr__(self, "special_ids", frozenset(ids))  # frozen: normalise once here
        if self.vocab_size <= len(ids):
            raise ValueError(f"vocab_size {self.vocab_size} leaves no ordinary token besides the specials")
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise ValueError(f"special ids {sorted(ids)} must lie in [0, vocab_size={self.vocab_size})")

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialTokens:
        """From a Hugging Face tokenizer; ValueError naming every missing token (pad, cls, sep, mask)."""
        found = {name: getattr(tok, f"{name}_token_id", None) for name in ("pad", "cls", "sep", "mask")}
        missing = [name for name, token_id in found.items() if token_id is None]
        if missing:
            names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " or " + missing[-1]
            raise ValueError(f"tokenizer has no {names} token")
        return cls(
            pad_id=int(found["pad"]),
            cls_id=int(found["cls"]),
            sep_id=int(found["sep"]),
            mask_id=int(found["mask"]),
            vocab_size=len(tok),  # includes added tokens, unlike tok.vocab_size
            special_ids=frozenset(int(i) for i in tok.all_special_ids),
        )

    def replacement_ids(self) -> torch.Tensor:
        """Ids a selected token may be randomly replaced with: every non-special id. # (V',)"""
        ids = torch.arange(self.vocab_size)
        return ids[~torch.isin(ids, torch.tensor(sorted(self.special_ids)))]


def word_start_table(tok) -> np.ndarray:
    """bool[vocab]: True where a token begins a word, for whole-word masking.

    WordPiece: pieces without the continuation prefix ("##"). Byte-level BPE: pieces starting with
    the byte-level space "Ġ", so punctuation glued to a word (and the first word of a text, which
    has no leading space) joins the preceding word: words are whitespace-delimited. Specials are
    True so they never extend a neighbouring word.
    """
    model = tok.backend_tokenizer.model
    kind = type(model).__name__
    if kind == "WordPiece":
        prefix = model.continuing_subword_prefix

        def starts(token: str) -> bool:
            return not token.startswith(prefix)
    elif kind == "BPE":

        def starts(token: str) -> bool:
            return token.startswith(_BYTE_LEVEL_SPACE)
    else:
        raise ValueError(f"whole-word masking supports WordPiece and byte-level BPE, not {kind}")
    vocab = tok.get_vocab()
    table = np.zeros(max(len(tok), max(vocab.values()) + 1), dtype=bool)
    for token, token_id in vocab.items():
        table[token_id] = starts(token)
    if kind == "BPE" and not table.any():
        # A BPE without byte-level spaces (e.g. SentencePiece's "▁") would make each row one "word".
        raise ValueError(f"no token starts with {_BYTE_LEVEL_SPACE!r}: not a byte-level BPE tokenizer")
    table[list(tok.all_special_ids)] = True
    return table


# the word segmenters whole-word masking can use for CJK runs (ObjectiveConfig.word_segmenter)
SEGMENTERS = ("jieba",)


def segmenter(name: str) -> Callable[[str], list[str]]:
    """A function cutting a run of CJK characters into words. Raises ImportError naming the package."""
    if name not in SEGMENTERS:
        raise ValueError(f"unknown word segmenter '{name}' (known: {', '.join(SEGMENTERS)})")
    try:
        import jieba
    except ImportError:
        raise ImportError("word segmenter 'jieba' needs the jieba package: pip install jieba") from None
    jieba.setLogLevel(logging.WARNING)  # else it logs its dictionary's loading from every process
    return lambda text: jieba.lcut(text, HMM=True)


class CJKWords:
    """Word starts inside runs of CJK characters from a word segmenter. A token counts as a CJK
    character when it decodes to exactly one ideograph (WordPiece here keeps each ideograph whole);
    every maximal run of such tokens in a row is joined into text, cut by the segmenter, and only
    its words' first characters start a word. Other tokens keep the tokenizer's word starts."""

    def __init__(self, tok, segment: Callable[[str], list[str]]):
        from cluster.data.tokenizer import CJK_IDEOGRAPHS

        ideograph = re.compile(CJK_IDEOGRAPHS)
        size = max(len(tok), max(tok.get_vocab().values()) + 1)
        self.chars = np.full(size, "", dtype=object)  # token id -> its ideograph, "" for others
        special = set(tok.all_special_ids)
        for token, token_id in tok.get_vocab().items():
            if token_id in special:
                continue
            text = tok.convert_tokens_to_string([token]).strip()
            if len(text) == 1 and ideograph.fullmatch(text):
                self.chars[token_id] = text
        self.is_cjk = self.chars != ""
        self.segment = segment

    def starts(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: where a word begins, for (B, T) `ids` and the tokenizer's bool[vocab] `table`."""
        arr = ids.detach().cpu().numpy()
        starts = table.cpu().numpy()[arr].copy()
        cjk = self.is_cjk[arr]
        for row in range(arr.shape[0]):
            edges = np.flatnonzero(np.diff(np.concatenate([[0], cjk[row].astype(np.int8), [0]])))
            for a, b in zip(edges[::2], edges[1::2], strict=True):
                if b - a < 2:
                    continue
                lengths = [len(w) for w in self.segment("".join(self.chars[arr[row, a:b]]))]
                if sum(lengths) != b - a:  # a segmenter that changed the text: each character a word
                    continue
                starts[row, a:b] = False
                starts[row, a + np.cumsum([0, *lengths[:-1]])] = True
        return torch.from_numpy(starts)


def _check_mask_args(input_ids: torch.Tensor, rate: float, random_ratio: float, keep_ratio: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    if random_ratio < 0 or keep_ratio < 0 or random_ratio + keep_ratio > 1:
        raise ValueError(
            f"random_ratio {random_ratio} and keep_ratio {keep_ratio} must be >= 0 and sum to <= 1"
        )
    if input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"input_ids must be a (B, T) integer tensor, got {input_ids.dtype} {tuple(input_ids.shape)}"
        )


def _select_words(
    ids: torch.Tensor,
    candidate: torch.Tensor,
    word_starts: torch.Tensor,
    rate: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Select each whole word with probability `rate`, so each token is selected with probability
    `rate` too. A word is a start token plus the non-start tokens after it; a continuation token
    with no start before it (row begins mid-word, or after a special) begins its own word.
    `word_starts`: bool[vocab], or (B, T) where a word segmenter placed the starts."""
    prev_candidate = torch.nn.functional.pad(candidate[:, :-1], (1, 0), value=False)  # (B, T)
    at = word_starts.to(torch.bool) if word_starts.dim() == 2 else word_starts.to(torch.bool)[ids]
    begins = candidate & (at | ~prev_candidate)  # (B, T)
    word_index = torch.cumsum(begins.flatten(), 0) - 1  # (B*T,) word of each position, row-major
    chosen = torch.rand(int(begins.sum()), generator=generator) < rate  # (W,)
    if chosen.numel() == 0:
        return torch.zeros_like(candidate)
    return candidate & chosen[word_index.clamp(min=0)].view_as(candidate)


def mask_tokens(
    input_ids: torch.Tensor,
    special: SpecialTokens,
    rate: float = 0.15,
    generator: torch.Generator | None = None,
    word_starts: torch.Tensor | None = None,
    random_ratio: float = 0.1,
    keep_ratio: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a (B, T) batch; returns (masked_ids, labels), both (B, T) long.

    Each non-special token is selected independently with probability `rate` (with `word_starts`,
    a bool[vocab] tensor or the (B, T) starts `CJKWords` gives, whole words are selected instead). Of the selected, `random_ratio` become
    a random non-special id, `keep_ratio` stay unchanged and the rest become `mask_id`. labels hold
    the original id at selected positions and -100 elsewhere; a row may have none selected.

    All draws come from `generator` on the CPU (the result is moved back to input_ids' device), so
    a batch masked with a generator from `dynamic_mask_generator` is reproducible. For static
    masking call it per row, input_ids[i:i + 1], with `static_mask_generator(seed, key_i)`.
    """
    _check_mask_args(input_ids, rate, random_ratio, keep_ratio)
    ids = input_ids.detach().to("cpu", torch.long)  # (B, T)
    candidate = ~torch.isin(ids, torch.tensor(sorted(special.special_ids)))  # (B, T)
    if word_starts is None:
        selected = candidate & (torch.rand(ids.shape, generator=generator) < rate)
    else:
        selected = _select_words(ids, candidate, word_starts.cpu(), rate, generator)

    # One uniform draw per position splits the selected into [mask | random | keep].
    action = torch.rand(ids.shape, generator=generator)  # (B, T)
    to_random = selected & (action >= 1.0 - random_ratio - keep_ratio) & (action < 1.0 - keep_ratio)
    to_mask = selected & (action < 1.0 - random_ratio - keep_ratio)
    pool = special.replacement_ids()  # (V',)
    random_ids = pool[torch.randint(len(pool), ids.shape, generator=generator)]  # (B, T)

    masked = torch.where(to_mask, special.mask_id, torch.where(to_random, random_ids, ids))
    labels = torch.where(selected, ids, IGNORE_INDEX)
    return masked.to(input_ids.device), labels.to(input_ids.device)


def _seeded(*entropy: int) -> torch.Generator:
    # SeedSequence mixes the integers so nearby (seed, epoch, step) give unrelated streams. It takes
    # only non-negative words, so zigzag-map each int (0, -1, 1, -2 -> 0, 1, 2, 3): evaluation passes
    # epoch=-1, and the map is one-to-one so no two tuples share a stream.
    words = [2 * x if x >= 0 else -2 * x - 1 for x in map(int, entropy)]
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def static_mask_generator(seed: int, example_key: int) -> torch.Generator:
    """Generator for static masking (original BERT): same stream for an example in every epoch.
    `example_key` is a stable id of the example, e.g. its row index or content hash."""
    return _seeded(seed, 0, example_key)  # the 0/1 tag keeps static and dynamic streams apart


def dynamic_mask_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """Generator for dynamic masking (RoBERTa): a fresh stream per (epoch, step, worker rank).
    Any ints are accepted, e.g. epoch=-1 for evaluation, whose masks then repeat every evaluation."""
    return _seeded(seed, 1, epoch, step, rank)


def mlm_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, count) of argmax predictions at positions whose label is not -100.
    logits (..., V), labels (...); summing both over batches gives the exact accuracy."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    scored = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1)[scored] == labels[scored]).sum()
    return int(correct), int(scored.sum())
