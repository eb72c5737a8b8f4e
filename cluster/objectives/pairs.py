"""Sentence-pair batches for BERT-family pretraining: NSP (BERT: the next segment or one from another
document) and SOP (ALBERT: two consecutive segments, in order or swapped), built from the
sentence-aware rows a `segments` corpus holds, plus single-segment rows for MLM alone (RoBERTa).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from cluster.objectives.masking import IGNORE_INDEX, SpecialTokens


def _row_parts(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, sentence_starts) of a row, checked: a bad offset would silently misplace A|B."""
    ids = np.asarray(row["input_ids"], dtype=np.int64)
    starts = np.asarray(row["sentence_starts"], dtype=np.int64)
    ok = len(ids) > 0 and len(starts) > 0 and starts[0] == 0 and starts[-1] < len(ids)
    if not ok or (np.diff(starts) <= 0).any():
        raise ValueError(
            f"row of doc_id {row.get('doc_id')}: sentence_starts must start at 0, increase strictly and stay "
            f"below len(input_ids)={len(ids)}; got {starts[:8].tolist()}{'...' if len(starts) > 8 else ''}"
        )
    return ids, starts


def _split(ids: np.ndarray, starts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A = sentences[:k], B = sentences[k:] for a random boundary k. A one-sentence row is split at
    its token midpoint (B is empty for a one-token row)."""
    cut = int(starts[rng.integers(1, len(starts))]) if len(starts) >= 2 else max(1, len(ids) // 2)
    return ids[:cut], ids[cut:]


def _target_budget(full: int, short_seq_prob: float, rng: np.random.Generator) -> int:
    """BERT's short_seq_prob: now and then aim for a shorter pair (2 to `full` tokens, at least one
    per side) so pretraining also sees the short inputs that fine-tuning tasks bring."""
    return int(rng.integers(2, full + 1)) if rng.random() < short_seq_prob else full


def _truncate_pair(a: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Shorten the longer side, token by token, until len(a) + len(b) <= budget. A (the earlier
    text) loses tokens at its start and B at its end, so the A|B junction the pair objectives are
    about stays intact."""
    keep_b = min(len(b), max(budget - len(a), budget // 2))
    keep_a = min(len(a), budget - keep_b)
    return a[len(a) - keep_a :], b[:keep_b]


def _next_rate(parts: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Chance that a multi-sentence row becomes an NSP positive. One-sentence rows can only be
    negatives, so the rate rises above 0.5 to keep the batch's expected label mix at 50/50."""
    multi = sum(len(starts) >= 2 for _, starts in parts)
    return min(1.0, 0.5 * len(parts) / multi) if multi else 0.0


def _other_doc_tail(
    parts: list[tuple[np.ndarray, np.ndarray]], doc_ids: np.ndarray, i: int, rng: np.random.Generator
) -> np.ndarray | None:
    """A random row of another document, from a random sentence to its end; None if the batch
    holds only this row's document."""
    others = np.flatnonzero(doc_ids != doc_ids[i])
    if len(others) == 0:
        return None
    ids, starts = parts[int(rng.choice(others))]
    return ids[int(starts[rng.integers(len(starts))]) :]


def _nsp_pair(
    parts: list[tuple[np.ndarray, np.ndarray]],
    doc_ids: np.ndarray,
    i: int,
    next_rate: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B, label). Label 0: B is the rest of A's row after a sentence boundary. Label 1: B from
    another document. A one-sentence row has no boundary, so it is a negative with the whole row as
    A; if the batch also holds no other document it gets label -100 (no pair loss, MLM only) rather
    than a positive cut mid-sentence. A multi-sentence row with no other document is a positive."""
    ids, starts = parts[i]
    if len(starts) >= 2:
        a, b = _split(ids, starts, rng)
        other = None if rng.random() < next_rate else _other_doc_tail(parts, doc_ids, i, rng)
        return (a, b, 0) if other is None else (a, other, 1)
    other = _other_doc_tail(parts, doc_ids, i, rng)
    if other is None:
        return (*_split(ids, starts, rng), IGNORE_INDEX)
    return ids, other, 1


def _sop_pair(
    ids: np.ndarray, starts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B, label): consecutive A, B of one row (see `_split`); label 1 asks the caller to swap
    them, after truncation so the original junction survives in both orders. A one-token row has
    no order to predict: label -100."""
    a, b = _split(ids, starts, rng)
    return a, b, (IGNORE_INDEX if len(b) == 0 else int(rng.random() < 0.5))


def _check_pair_args(objective: str, max_len: int, short_seq_prob: float) -> None:
    problems = []
    if objective not in ("nsp", "sop"):
        problems.append(f"objective must be 'nsp' or 'sop', got {objective!r}")
    if max_len < 5:
        problems.append(f"max_len must be >= 5 to hold [CLS] A [SEP] B [SEP], got {max_len}")
    if not 0.0 <= short_seq_prob <= 1.0:
        problems.append(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
    if problems:
        raise ValueError("; ".join(problems))


def _place_pair(
    out: dict[str, np.ndarray], i: int, a: np.ndarray, b: np.ndarray, special: SpecialTokens
) -> None:
    """Write [CLS] A [SEP] B [SEP] into row i of the (pad-filled) output arrays."""
    seq = np.concatenate([[special.cls_id], a, [special.sep_id], b, [special.sep_id]])
    out["input_ids"][i, : len(seq)] = seq
    out["token_type_ids"][i, len(a) + 2 : len(seq)] = 1  # B and its [SEP]
    out["attention_mask"][i, : len(seq)] = 1


def build_pairs(
    rows: list[dict],
    objective: Literal["nsp", "sop"],
    max_len: int,
    rng: np.random.Generator,
    special: SpecialTokens,
    short_seq_prob: float = 0.1,
) -> dict[str, np.ndarray]:
    """One `[CLS] A [SEP] B [SEP]` example per row, padded to max_len.

    A and B split the row at a random sentence boundary. NSP (BERT): B follows A (pair_label 0) or,
    half the time, is a tail of another row of this batch with a different doc_id (pair_label 1).
    SOP (ALBERT): pair_label 1 when A and B are swapped. Rows that cannot make a valid pair get
    pair_label -100, which cross-entropy ignores (see `_nsp_pair`, `_sop_pair`).

    A+B is cut to max_len - 3 tokens, or with probability `short_seq_prob` to a random 2..max_len - 3,
    by shortening the longer side: A loses its start, B its end (BERT cuts either end at random;
    keeping the junction keeps "B follows A" true token for token).

    Returns input_ids (N, max_len) int64, token_type_ids (0 for [CLS] A [SEP], 1 for B [SEP], 0 on
    padding), attention_mask (N, max_len), pair_label (N,), and a_len, b_len (N,): the lengths of
    the first and second segment as placed.
    """
    _check_pair_args(objective, max_len, short_seq_prob)
    parts = [_row_parts(r) for r in rows]
    doc_ids = np.array([int(r["doc_id"]) for r in rows], dtype=np.int64) if objective == "nsp" else None
    next_rate = _next_rate(parts)
    n = len(rows)
    out = {
        "input_ids": np.full((n, max_len), special.pad_id, dtype=np.int64),  # (N, L)
        "token_type_ids": np.zeros((n, max_len), dtype=np.int64),  # (N, L)
        "attention_mask": np.zeros((n, max_len), dtype=np.int64),  # (N, L)
        "pair_label": np.zeros(n, dtype=np.int64),  # (N,)
        "a_len": np.zeros(n, dtype=np.int64),  # (N,)
        "b_len": np.zeros(n, dtype=np.int64),  # (N,)
    }
    for i in range(n):
        budget = _target_budget(max_len - 3, short_seq_prob, rng)
        if doc_ids is not None:
            a, b, label = _nsp_pair(parts, doc_ids, i, next_rate, rng)
        else:
            a, b, label = _sop_pair(*parts[i], rng)
        a, b = _truncate_pair(a, b, budget)
        if objective == "sop" and label == 1:
            a, b = b, a
        _place_pair(out, i, a, b, special)
        out["pair_label"][i], out["a_len"][i], out["b_len"][i] = label, len(a), len(b)
    return out


def build_single(rows: list[dict], max_len: int, special: SpecialTokens) -> dict[str, np.ndarray]:
    """MLM-only examples (RoBERTa): `[CLS] tokens [SEP]`, tokens cut at the end to fit, padded.
    Returns input_ids, attention_mask and token_type_ids (all zeros), each (N, max_len) int64."""
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 to hold [CLS] x [SEP], got {max_len}")
    input_ids = np.full((len(rows), max_len), special.pad_id, dtype=np.int64)  # (N, L)
    attention_mask = np.zeros((len(rows), max_len), dtype=np.int64)  # (N, L)
    for i, row in enumerate(rows):
        body = np.asarray(row["input_ids"], dtype=np.int64)[: max_len - 2]
        seq = np.concatenate([[special.cls_id], body, [special.sep_id]])
        input_ids[i, : len(seq)] = seq
        attention_mask[i, : len(seq)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": np.zeros_like(input_ids),
    }
