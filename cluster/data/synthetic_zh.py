"""cluster.data.synthetic_zh: the synthetic corpus in Chinese, with its own grammar and exact entropy.

The same shape as the English grammar (cluster.data.synthetic): a topic, a truncated-geometric
number of sentences, each a template of the topic filled by uniform choices. Written as Chinese is
written: no spaces, sentences end with 。, numbers in Arabic digits. Template literals are Chinese
phrases; the slot words (names, places, organisations, each topic's nouns, verbs and adjectives) are
fixed-length words of CJK ideographs, each list drawn from its own block of characters that no other
list and no literal uses. So a text has exactly one derivation (`count_derivations` checks it by
parsing), `Document.logprob` is the exact ln P(text) and the entropy floor in bits per UTF-8 byte is
exact, as for English. The words are not Chinese words; what a model can learn from them (which
characters follow which inside a word, which words fit which template) is all in the grammar.

    python -m cluster.data.synthetic_zh --docs 3 --seed 0
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from cluster.data.synthetic import (
    COUNT_RANGE,
    MAX_SENTENCES,
    MIN_SENTENCES,
    SENTENCE_COUNT,
    TOPIC_CHOICE,
    TOPICS,
    Choice,
    Document,
    Entity,
    entropy_bits_per_byte,
    seeded_rng,
)

END = "。"

# topic -> templates; {PER} {LOC} {ORG} {NUM} {DATE} are shared, {noun} {verb} {adj} the topic's own
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "sports": (
        "{PER}为{ORG}在{LOC}拿下{NUM}分。",
        "{DATE}，{ORG}以{NUM}比{NUM}击败{ORG}。",
        "教练{PER}说，{NUM}场{adj}{noun}吸引了{NUM}名球迷来到{LOC}。",
        "{LOC}的球迷看到{PER}和{PER}{verb}了{NUM}场{adj}{noun}。",
        "{PER}替{ORG}{verb}了{adj}{noun}。",
    ),
    "finance": (
        "{ORG}的股价{DATE}在{LOC}上涨了百分之{NUM}。",
        "{ORG}的{PER}以{NUM}万元{verb}了{NUM}笔{adj}{noun}。",
        "{LOC}的分析师预计{ORG}将{verb}{NUM}笔{adj}{noun}。",
        "{ORG}欠{PER}{NUM}元。",
        "{PER}从{ORG}{verb}了{adj}{noun}。",
    ),
    "science": (
        "{ORG}的研究人员在{LOC}{verb}了{NUM}种{adj}{noun}。",
        "{PER}于{DATE}发表了关于{NUM}种{adj}{noun}的数据。",
        "实验室和{PER}在{NUM}次试验中{verb}了{adj}{noun}。",
        "{PER}与{PER}在{ORG}{verb}了{adj}{noun}。",
        "{ORG}在{LOC}{verb}了{adj}{noun}。",
    ),
    "travel": (
        "来自{LOC}的游客{DATE}在{LOC}附近{verb}了{NUM}处{adj}{noun}。",
        "{PER}在{LOC}的{adj}{noun}住了{NUM}晚。",
        "{ORG}的导游带{PER}{verb}了{NUM}处{adj}{noun}。",
        "{PER}和{NUM}位朋友去{LOC}旅行花了{NUM}元。",
        "{PER}在{LOC}{verb}了{adj}{noun}。",
    ),
}

# slot -> (words in the list, characters per word); PER is a one-character surname then a
# two-character given name, ORG a name then a kind
_WORD_LISTS: dict[str, tuple[int, int]] = {
    "surname": (40, 1), "given": (60, 2), "LOC": (40, 2), "org_name": (30, 2), "org_kind": (12, 2),
    "noun": (30, 2), "verb": (30, 2), "adj": (30, 2),
}
_LIST_CHARS = 24  # each list's own block of characters (a surname list uses all 40 of its own)

_NUMBERS = [str(n) for n in range(2, 10000)]
_YEARS = [f"{y}年" for y in range(1950, 2050)]
_MONTHS = [f"{m}月" for m in range(1, 13)]
_DAYS = [f"{d}日" for d in range(1, 29)]


def _literal_chars() -> set[str]:
    chars = set("年月日" + END + "0123456789")
    for templates in _TEMPLATES.values():
        for t in templates:
            text = t
            for slot in ("PER", "LOC", "ORG", "NUM", "DATE", "noun", "verb", "adj"):
                text = text.replace("{" + slot + "}", "")
            chars.update(text)
    return chars


def _blocks() -> Iterator[list[str]]:
    """Consecutive blocks of CJK Unified Ideographs, none holding a character of any literal."""
    used = _literal_chars()
    code = 0x4E00
    while True:
        block: list[str] = []
        while len(block) < _LIST_CHARS:
            ch = chr(code)
            code += 1
            if ch not in used:
                block.append(ch)
        yield block


def _word_list(chars: list[str], count: int, length: int, seed: str) -> Choice:
    """`count` distinct words of `length` characters from `chars`, in a fixed (seeded) order."""
    rng = random.Random(f"raylm-synthetic-zh:{seed}")
    if length == 1:
        words = chars[:count] if count <= len(chars) else None
        if words is None:
            raise ValueError(f"{seed}: {count} one-character words need {count} characters")
        return Choice(words)
    seen: list[str] = []
    while len(seen) < count:
        word = "".join(rng.choice(chars) for _ in range(length))
        if word not in seen:
            seen.append(word)
    return Choice(seen)


@dataclass(frozen=True)
class ZhSlot:
    name: str
    parts: tuple[Choice, ...]  # options are strings, joined without spaces
    label: str | None = None


def _build_slots() -> tuple[dict[str, ZhSlot], dict[str, dict[str, ZhSlot]]]:
    blocks = _blocks()
    lists: dict[str, Choice] = {}
    for name in ("surname", "given", "LOC", "org_name", "org_kind"):
        count, length = _WORD_LISTS[name]
        chars = next(blocks) + (next(blocks) if count > _LIST_CHARS and length == 1 else [])
        lists[name] = _word_list(chars, count, length, name)
    shared = {
        "PER": ZhSlot("PER", (lists["surname"], lists["given"]), "PER"),
        "LOC": ZhSlot("LOC", (lists["LOC"],), "LOC"),
        "ORG": ZhSlot("ORG", (lists["org_name"], lists["org_kind"]), "ORG"),
        "NUM": ZhSlot("NUM", (Choice(_NUMBERS),)),
        "DATE": ZhSlot("DATE", (Choice(_YEARS), Choice(_MONTHS), Choice(_DAYS))),
    }
    own = {}
    for topic in TOPICS:
        own[topic] = {key: ZhSlot(key, (_word_list(next(blocks), *_WORD_LISTS[key], f"{topic}-{key}"),))
                      for key in ("noun", "verb", "adj")}
    return shared, own


SHARED_SLOTS, TOPIC_SLOTS = _build_slots()


@dataclass(frozen=True)
class ZhTemplate:
    source: str
    units: tuple[str | ZhSlot, ...]  # literal strings and slots; the last unit is the literal "。"


def _compile(source: str, slots: dict[str, ZhSlot]) -> ZhTemplate:
    units: list[str | ZhSlot] = []
    rest = source
    while rest:
        if rest.startswith("{"):
            name, rest = rest[1:].split("}", 1)
            units.append(slots[name])
        else:
            literal = rest.split("{", 1)[0]
            units.append(literal)
            rest = rest[len(literal):]
    if not (isinstance(units[-1], str) and units[-1].endswith(END)):
        raise ValueError(f"template must end with {END}: {source!r}")
    return ZhTemplate(source, tuple(units))


GRAMMAR: dict[str, Choice] = {
    topic: Choice(_compile(t, {**SHARED_SLOTS, **TOPIC_SLOTS[topic]}) for t in templates)
    for topic, templates in _TEMPLATES.items()
}


def all_choices() -> list[Choice]:
    out = [TOPIC_CHOICE, SENTENCE_COUNT]
    for slot in SHARED_SLOTS.values():
        out.extend(slot.parts)
    for topic in TOPICS:
        out.append(GRAMMAR[topic])
        for slot in TOPIC_SLOTS[topic].values():
            out.extend(slot.parts)
    return out


def compose(rng: random.Random, topic: str, n_sentences: int, index: int = 0, logprob: float = 0.0) -> Document:
    """n sentences of `topic`; `logprob` is added to the sentences' (the topic and count terms)."""
    pieces: list[str] = []
    offset = 0
    entities: list[Entity] = []
    spans = []
    templates = GRAMMAR[topic]
    for _ in range(n_sentences):
        start = offset
        ti = templates.sample(rng)
        logprob += templates.logps[ti]
        for unit in templates.options[ti].units:
            if isinstance(unit, str):
                pieces.append(unit)
                offset += len(unit)
                continue
            slot_start = offset
            for part in unit.parts:
                oi = part.sample(rng)
                logprob += part.logps[oi]
                pieces.append(part.options[oi])
                offset += len(part.options[oi])
            if unit.label is not None:
                entities.append(Entity(slot_start, offset, unit.label))
        spans.append((start, offset))
    return Document(index, "".join(pieces), topic, tuple(entities), tuple(spans), logprob)


def document(seed: int, index: int) -> Document:
    """Document `index` of the Chinese corpus `seed`; depends only on (seed, index)."""
    rng = seeded_rng("doc-zh", seed, index)
    ti = TOPIC_CHOICE.sample(rng)
    ni = SENTENCE_COUNT.sample(rng)
    logprob = TOPIC_CHOICE.logps[ti] + SENTENCE_COUNT.logps[ni]
    return compose(rng, TOPICS[ti], SENTENCE_COUNT.options[ni], index, logprob)


def documents(num_docs: int, seed: int = 0, start: int = 0) -> Iterator[Document]:
    for index in range(start, start + num_docs):
        yield document(seed, index)


# -- parsing: the exact ln P(text) and the number of derivations

def _logsumexp(values: list[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


_INDEX = {id(c): dict(zip(c.options, c.logps, strict=True)) for c in all_choices() if isinstance(c.options[0], str)}
_LENGTHS = {key: sorted({len(o) for o in (c for c in all_choices() if id(c) == key).__next__().options})
            for key in _INDEX}


def _flat(template: ZhTemplate) -> tuple[str | Choice, ...]:
    units: list[str | Choice] = []
    for unit in template.units:
        units.extend([unit] if isinstance(unit, str) else unit.parts)
    return tuple(units)


_FLAT = {topic: [(lp, _flat(t)) for t, lp in zip(GRAMMAR[topic].options, GRAMMAR[topic].logps, strict=True)]
         for topic in TOPICS}


def _match(units: tuple[str | Choice, ...], text: str) -> tuple[int, float]:
    memo: dict[tuple[int, int], tuple[int, float]] = {}

    def go(u: int, i: int) -> tuple[int, float]:
        if u == len(units):
            return (1, 0.0) if i == len(text) else (0, -math.inf)
        if (u, i) in memo:
            return memo[(u, i)]
        unit, count, logps = units[u], 0, []
        if isinstance(unit, str):
            if text.startswith(unit, i):
                count, lp = go(u + 1, i + len(unit))
                logps.append(lp)
        else:
            for n in _LENGTHS[id(unit)]:
                lp_option = _INDEX[id(unit)].get(text[i: i + n])
                if lp_option is not None:
                    c, lp = go(u + 1, i + n)
                    if c:
                        count += c
                        logps.append(lp_option + lp)
        memo[(u, i)] = result = (count, _logsumexp(logps))
        return result

    return go(0, 0)


def _analyse(text: str) -> tuple[int, float]:
    if not text.endswith(END):
        return 0, -math.inf
    sentences = [s + END for s in text[:-1].split(END)]
    if len(sentences) not in COUNT_RANGE:
        return 0, -math.inf
    total, logps = 0, []
    for ti, topic in enumerate(TOPICS):
        count, lp = 1, TOPIC_CHOICE.logps[ti] + SENTENCE_COUNT.logps[len(sentences) - MIN_SENTENCES]
        for sentence in sentences:
            c, lps = 0, []
            for lp_template, units in _FLAT[topic]:
                n, lp_s = _match(units, sentence)
                if n:
                    c += n
                    lps.append(lp_template + lp_s)
            if not c:
                count = 0
                break
            count, lp = count * c, lp + _logsumexp(lps)
        if count:
            total += count
            logps.append(lp)
    return total, _logsumexp(logps)


def log_prob(text: str) -> float:
    """Exact ln P(text) under the Chinese grammar, by parsing; ValueError if P(text) = 0."""
    count, lp = _analyse(text)
    if not count:
        raise ValueError(f"text not in the synthetic Chinese language ({MIN_SENTENCES}..{MAX_SENTENCES} sentences)")
    return lp


def count_derivations(text: str) -> int:
    return _analyse(text)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="print synthetic Chinese documents and the corpus entropy floor")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor-docs", type=int, default=2000)
    args = p.parse_args(argv)
    for doc in documents(args.docs, seed=args.seed):
        print(f"[{doc.index}] topic={doc.topic} logprob={doc.logprob:.3f} chars={len(doc.text)}")
        print(doc.text)
    sample = list(documents(args.floor_docs, seed=args.seed))
    print(f"entropy floor over {len(sample)} docs: {entropy_bits_per_byte(sample):.4f} bits/byte")


if __name__ == "__main__":
    main()
