"""Packing tokenized documents into training rows, and the deterministic train/validation split.

Two layouts, recorded in the manifest as `layout`:
- "blocks": documents joined with an end-of-document token and cut into fixed-length blocks, no
  padding (causal LMs, MLM-only encoders). The tail shorter than a block is dropped and counted.
- "segments": one row per document chunk of whole sentences, with token offsets of each sentence,
  for pair objectives (NSP, SOP) that need to know where sentences start.
"""

from __future__ import annotations

import re

import numpy as np

from cluster.data.text import hash_unit

_SENTENCE_END_RE = re.compile(r"(?<=[.!?。！？])\s+")
# Chinese and Japanese end a sentence without a space after it: at 。！？；…… (and the full-width
# and half-width forms of . ! ? ;), closing quotes and brackets staying with their sentence.
_CJK_END_RE = re.compile(r"((?:[。！？；．｡﹒﹗﹖]|…{2,})+[”’」』）》〉】〗\]\)\"']*)\s*(?=\S)")


def pack_blocks(docs: list[np.ndarray], block_size: int, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate docs, each followed by `eod_id`, into (N, block_size) blocks; returns the
    blocks and the leftover tail so callers can count every token."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
    return pack_flat(flat, offsets, block_size, eod_id)


def pack_flat(tokens: np.ndarray, offsets: np.ndarray, block_size: int, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`pack_blocks` for documents given as one token array and offsets (document i is
    tokens[offsets[i]:offsets[i + 1]], as in an Arrow list column): no array per document."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    offsets = np.asarray(offsets, dtype=np.int64) - offsets[0]
    n_docs = len(offsets) - 1
    stream = np.empty(len(tokens) + n_docs, dtype=np.int32)
    is_eod = np.zeros(len(stream), dtype=bool)
    is_eod[offsets[1:] + np.arange(n_docs)] = True  # document i's end, shifted by the i EODs before it
    stream[is_eod] = eod_id
    stream[~is_eod] = tokens
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size), stream[n * block_size :]


def split_of(digest: bytes, validation_fraction: float, seed: int) -> str:
    """'validation' or 'train' from the document's content hash: stable across runs and machines."""
    return "validation" if hash_unit(digest, salt=seed) < validation_fraction else "train"


def split_sentences(text: str) -> list[str]:
    """Sentences at ., ! or ? followed by whitespace, at the CJK sentence ends with or without it,
    and at newlines."""
    out: list[str] = []
    for para in text.split("\n"):
        para = _CJK_END_RE.sub("\\1\n", para.strip())  # a paragraph holds no newline: it marks the cuts
        for part in para.split("\n"):
            out.extend(s for s in _SENTENCE_END_RE.split(part) if s)
    return out


def chunk_sentences(
    sentence_ids: list[np.ndarray], max_tokens: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedily group whole sentences into chunks of <= max_tokens tokens.

    Returns (input_ids, sentence_starts) per chunk; a sentence longer than max_tokens is cut into
    max_tokens pieces, each its own "sentence", so no token is lost.
    """
    pieces: list[np.ndarray] = []
    for ids in sentence_ids:
        ids = np.asarray(ids, dtype=np.int32)
        for start in range(0, max(len(ids), 1), max_tokens):
            if len(ids[start : start + max_tokens]):
                pieces.append(ids[start : start + max_tokens])
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    cur: list[np.ndarray] = []
    cur_len = 0
    for piece in pieces:
        if cur and cur_len + len(piece) > max_tokens:
            chunks.append(_finish_chunk(cur))
            cur, cur_len = [], 0
        cur.append(piece)
        cur_len += len(piece)
    if cur:
        chunks.append(_finish_chunk(cur))
    return chunks


def _finish_chunk(sentences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in sentences], dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    return np.concatenate(sentences).astype(np.int32), starts
