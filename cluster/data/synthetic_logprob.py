"""The exact log-probability of a text under the synthetic grammar (cluster.data.synthetic), by
parsing it: `log_prob` recomputes `Document.logprob`, and `count_derivations` checks that every text
has exactly one derivation, which makes the corpus's entropy floor exact.
"""

from __future__ import annotations

import math

from cluster.data.synthetic import (
    COUNT_RANGE,
    GRAMMAR,
    MAX_SENTENCES,
    MIN_SENTENCES,
    SENTENCE_COUNT,
    SHARED_SLOTS,
    TOPIC_CHOICE,
    TOPICS,
    Choice,
    Template,
)


def _logsumexp(values: list[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _flatten(template: Template) -> tuple[str | Choice, ...]:
    units: list[str | Choice] = []
    for unit in template.units[:-1]:  # the final "." is split off before matching
        units.extend([unit] if isinstance(unit, str) else unit.parts)
    return tuple(units)


_FLAT: dict[str, list[tuple[float, tuple[str | Choice, ...]]]] = {
    name: [(lp, _flatten(t)) for t, lp in zip(g.templates.options, g.templates.logps, strict=True)]
    for name, g in GRAMMAR.items()
}


_WORD_CHOICES = [part for slot in SHARED_SLOTS.values() for part in slot.parts] + [
    part for g in GRAMMAR.values() for slot in g.slots.values() for part in slot.parts
]


# option words -> log-probability, per word choice, for O(1) matching of a word run
_INDEX: dict[int, dict[tuple[str, ...], float]] = {
    id(c): dict(zip(c.options, c.logps, strict=True)) for c in _WORD_CHOICES
}


_MAX_WORDS = {id(c): max(len(o) for o in c.options) for c in _WORD_CHOICES}


def _match(units: tuple[str | Choice, ...], words: list[str]) -> tuple[int, float]:
    """(number of derivations, ln of their total probability) of `words` from `units`."""
    memo: dict[tuple[int, int], tuple[int, float]] = {}

    def go(u: int, w: int) -> tuple[int, float]:
        if u == len(units):
            return (1, 0.0) if w == len(words) else (0, -math.inf)
        key = (u, w)
        if key in memo:
            return memo[key]
        unit = units[u]
        count, logps = 0, []
        if isinstance(unit, str):
            if w < len(words) and words[w] == unit:
                count, lp = go(u + 1, w + 1)
                logps.append(lp)
        else:
            index = _INDEX[id(unit)]
            for k in range(1, min(_MAX_WORDS[id(unit)], len(words) - w) + 1):
                lp_option = index.get(tuple(words[w : w + k]))
                if lp_option is None:
                    continue
                c, lp = go(u + 1, w + k)
                if c:
                    count += c
                    logps.append(lp_option + lp)
        memo[key] = result = (count, _logsumexp(logps))
        return result

    return go(0, 0)


def _sentence_under(topic: str, words: list[str]) -> tuple[int, float]:
    count, logps = 0, []
    for lp_template, units in _FLAT[topic]:
        c, lp = _match(units, words)
        if c:
            count += c
            logps.append(lp_template + lp)
    return count, _logsumexp(logps)


def _split(text: str) -> list[list[str]]:
    """Sentences as word lists; raises ValueError for text not shaped like the language."""
    if not text.isascii():
        raise ValueError("text not in the synthetic language: non-ASCII characters")
    if not text.endswith("."):
        raise ValueError("text not in the synthetic language: does not end with '.'")
    sentences = [s.split(" ") for s in text[:-1].split(". ")]
    for i, words in enumerate(sentences):
        if any(not w or "." in w for w in words):
            raise ValueError(f"text not in the synthetic language: malformed spacing in sentence {i}")
    return sentences


def _parse_as(topic: str, sentences: list[list[str]]) -> tuple[int, float]:
    """(derivations, ln P(sentences | topic)) under one topic; stops at the first underivable sentence."""
    count, lp = 1, 0.0
    for words in sentences:
        c, lp_s = _sentence_under(topic, words)
        if not c:
            return 0, -math.inf
        count, lp = count * c, lp + lp_s
    return count, lp


def _why_not(sentences: list[list[str]]) -> str:
    # Blame the topic that derives the most sentences: its first failure is the likely typo.
    failures = {
        t: [i for i, words in enumerate(sentences) if not _sentence_under(t, words)[0]] for t in TOPICS
    }
    topic = min(TOPICS, key=lambda t: len(failures[t]))
    i = failures[topic][0]
    return f"sentence {i} ({' '.join(sentences[i])!r}) has no derivation as {topic}"


def _analyse(text: str) -> tuple[int, float, str]:
    """(derivations, ln P(text), why P is 0 when it is)."""
    sentences = _split(text)
    n = len(sentences)
    if n not in COUNT_RANGE:
        return 0, -math.inf, f"{n} sentences, outside {MIN_SENTENCES}..{MAX_SENTENCES}"
    lp_count = SENTENCE_COUNT.logps[n - MIN_SENTENCES]
    total, logps = 0, []
    for ti, topic in enumerate(TOPICS):
        count, lp = _parse_as(topic, sentences)
        if count:
            total += count
            logps.append(TOPIC_CHOICE.logps[ti] + lp_count + lp)
    return total, _logsumexp(logps), "" if total else _why_not(sentences)


def log_prob(text: str) -> float:
    """Exact ln P(text) under the grammar, by parsing; ValueError if P(text) = 0."""
    count, lp, reason = _analyse(text)
    if not count:
        raise ValueError(f"text not in the synthetic language: {reason}")
    return lp


def count_derivations(text: str) -> int:
    """How many distinct derivations produce `text` (0 if none; 1 for every generated document)."""
    try:
        return _analyse(text)[0]
    except ValueError:
        return 0
