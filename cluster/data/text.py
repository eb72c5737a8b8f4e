"""Text cleaning used by jobs.prepare's Ray Data stages: pure functions on one document.

Every function either returns the cleaned text or a drop reason, so counts reconcile:
documents in = kept + dropped by each reason.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# ANSI/VT100 escape sequences (colours, cursor moves) that real logs and scraped text carry.
_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


# C0/C1 control characters except tab and newline (which whitespace normalisation handles).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


_SPACES_RE = re.compile(r"[^\S\n]+")  # runs of whitespace other than newline


_NEWLINES_RE = re.compile(r"\n{3,}")


DROP_EMPTY = "empty"


DROP_TOO_SHORT = "too_short"


DROP_TOO_LONG = "too_long"


DROP_CHARSET = "charset"


DROP_DUPLICATE = "duplicate"


DROP_UNDECODABLE = "undecodable"


DROP_WEIGHT = "weight_subsample"


# Unicode script ranges for the optional charset filter. CJK must survive intact by default.
CHARSETS: dict[str, list[tuple[int, int]]] = {
    "latin": [(0x0000, 0x024F), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x20A0, 0x20CF)],
    "cjk": [(0x3000, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xFF00, 0xFFEF)],
    "cyrillic": [(0x0400, 0x04FF)],
}


def is_normalized(text: str) -> bool:
    """True when `normalize(text)` is `text` itself, decided by C-speed string methods alone.

    Most documents of a prepared corpus are already clean, and the regular expressions in
    `normalize` cost ~15 us on a 300-character document (they test every character against a
    class) where these checks cost ~1 us. Why it is exact: str.isprintable() is False for every
    control character (escape sequences start with one, \r is one) and every whitespace character
    but the ASCII space (Unicode categories Cc and Z*), so, newlines aside, the only whitespace
    left is single spaces that no line starts or ends with. A False here only means "take the
    slow path": format characters such as a zero-width joiner are non-printable but kept."""
    return (
        text.replace("\n", "").isprintable()
        and unicodedata.is_normalized("NFC", text)
        and "  " not in text
        and " \n" not in text
        and "\n " not in text
        and "\n\n\n" not in text
        and text[:1] not in (" ", "\n")
        and text[-1:] not in (" ", "\n")
    )


def normalize(text: str) -> str:
    """NFC, escape/control characters removed, whitespace runs folded, lines stripped."""
    return text if is_normalized(text) else _normalize(text)


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = _ANSI_RE.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    text = _SPACES_RE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _NEWLINES_RE.sub("\n\n", text).strip()


# East Asian wide and full-width characters (CJK ideographs, kana, hangul, full-width forms): a
# complete Chinese sentence is often under 20 characters, so `min_chars` counts each of these as two.
_WIDE_RE = re.compile("[\u1100-\u115f\u2e80-\u303e\u3041-\u33ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f"
                      "\uac00-\ud7a3\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff60\uffe0-\uffe6"
                      "\U00020000-\U0002fffd\U00030000-\U0003fffd]")


def display_width(text: str) -> int:
    """Characters counted by script width: an East Asian wide or full-width character counts 2."""
    return len(text) if text.isascii() else len(text) + len(_WIDE_RE.findall(text))


def charset_fraction(text: str, charsets: list[str]) -> float:
    """Fraction of non-space, non-digit, non-punctuation characters inside the given charsets."""
    ranges = [r for name in charsets for r in CHARSETS[name]]
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    inside = sum(1 for c in letters if any(lo <= ord(c) <= hi for lo, hi in ranges))
    return inside / len(letters)


def clean(
    text: str,
    min_chars: int,
    max_chars: int,
    charsets: list[str] | None = None,
    min_charset_fraction: float = 0.9,
) -> tuple[str, str]:
    """(cleaned text, drop reason or ""). `min_chars` counts by script width (`display_width`),
    `max_chars` counts characters."""
    text = normalize(text)
    if not text:
        return text, DROP_EMPTY
    if len(text) < min_chars and display_width(text) < min_chars:
        return text, DROP_TOO_SHORT
    if len(text) > max_chars:
        return text, DROP_TOO_LONG
    if charsets and charset_fraction(text, charsets) < min_charset_fraction:
        return text, DROP_CHARSET
    return text, ""


def content_hash(text: str) -> bytes:
    """16-byte digest used for exact de-duplication and the train/validation split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def hash_unit(digest: bytes, salt: int = 0) -> float:
    """Map a content hash to [0, 1) deterministically; `salt` gives independent draws."""
    h = hashlib.blake2b(digest + salt.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64
