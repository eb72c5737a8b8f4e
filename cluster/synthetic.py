"""cluster.synthetic: a seeded, offline corpus of English-like documents with a known entropy.

Documents come from a small probabilistic grammar:

    document  = topic, number of sentences n (truncated geometric over 2..8), n sentences
    sentence  = a template of the topic (uniform), its slots filled by uniform word-list choices

Every word list is disjoint from every other list and from the templates' literal words, each
topic has its own vocabulary and templates, and no two templates of a topic share a shape, so each
text has exactly one derivation. Its probability is therefore the product of the choices that made
it, `Document.logprob` is that exact ln P(text), `log_prob` recomputes it by parsing, and
`entropy_bits_per_byte` over a sample is the floor a perfect language model reaches.

    python -m cluster.synthetic --docs 3 --seed 0
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

ENTITY_TYPES = ("PER", "LOC", "ORG")

# ---------------------------------------------------------------------------------------------
# Word lists. Shared slots (entities, numbers, dates) appear under every topic; topic slots do not.
# ---------------------------------------------------------------------------------------------

_FIRST = (
    "Ada Ben Cara Dev Eli Faye Gus Hana Ivo Jun Kai Lena Milo Nia Omar Pia Quin Rosa Sami Tess "
    "Umar Vera Wes Xena Yuki Zane Mara Theo Iris Leo Noor Ravi Suki Tomas Alma Bo Cyrus Dana Enzo Gia "
    "Hugo Ines Jana Kofi Luz Nadia Otto Rhea"
).split()
_LAST = (
    "Okafor Lind Varga Chen Moreau Sato Brandt Kowal Reyes Nakamura Haas Ibarra Quist Falk Dube Oduya "
    "Petrov Sousa Tran Ueda Voss Wren Yilmaz Zeller Abara Baptiste Costa Duarte Eklund Ferro Grieg Holm "
    "Ito Jansen Kerr Lowe Mbeki Novak Ortiz Pryce Acheson Bianchi Dahl Fonseca Hale Kaur Lam Mensah"
).split()
_PLACES = (
    "Port Elwin|Port Sable|Lake Orin|Lake Tamsin|Mount Carrow|Northgate|Ashford|Brevik|Calder|Dunmore|"
    "Estova|Fenwick|Galloway|Harrowby|Islay|Jorvik|Kestrel Bay|Lunden|Marrow|Nessa|Oldcastle|Pellan|"
    "Quarry Hill|Redhaven|Saltmarsh|Tarn|Ulverby|Valmont|Westreach|Yarrow|Zenda|Corvel|Bramley|Dovren|"
    "Elmstead|Halvard|Kirren|Lowmoor|Merrow|Tovar"
).split("|")
_ORG_NAMES = (
    "Northwind Vela Keel Orbis Halcyon Bluefin Cinder Driftwood Ember Foxglove Granite Helix Ironbark "
    "Juniper Kite Lumen Meridian Nimbus Onyx Pinnacle Quartz Riverstone Solace Tidewater Umbra Vantage "
    "Willow Zephyr Aster Beacon Cobalt Delta"
).split()
_ORG_KINDS = (
    "Labs Group Bank Works Media Trust Partners Systems Capital Energy Foods Motors Health Studios "
    "Logistics Holdings"
).split()
_MONTHS = ("January February March April May June July August September October November December").split()
_DAYS = [str(d) for d in range(1, 29)]
_YEARS = [str(y) for y in range(1950, 2050)]
_NUMBERS = [str(n) for n in range(2, 10000)]


@dataclass(frozen=True)
class _TopicSpec:
    """A topic's own vocabulary (space-separated words) and sentence templates. Slots are {name};
    every template starts with a capitalised word and ends with " ." so sentences read as English."""

    noun: str  # plural nouns
    verb: str  # past tense
    adj: str
    templates: tuple[str, ...]


_TOPIC_SPECS: dict[str, _TopicSpec] = {
    "sports": _TopicSpec(
        noun="matches games finals derbies leagues titles cups goals races relays sprints bouts sets "
        "rounds seasons trophies medals pitches courts squads rallies penalties corners headers "
        "tackles laps innings serves volleys replays fixtures marathons",
        verb="won lost drew claimed clinched chased blocked saved missed tied led trailed defended "
        "attacked passed kicked dribbled sprinted raced swam threw caught pitched hit volleyed tackled "
        "dunked boxed vaulted jumped rowed skated",
        adj="fierce tense gritty swift nimble rugged agile brave bold fast tough fit lively sharp "
        "steady sturdy wild hard rapid keen loud proud plucky spry deft burly fearless rowdy lanky "
        "unbeaten winless seeded",
        templates=(
            "{PER} scored {NUM} points as {ORG} {verb} {NUM} {adj} {noun} in {LOC} .",
            "On {DATE} {ORG} {verb} {adj} {noun} {NUM} to {NUM} .",
            "Coach {PER} said {NUM} {adj} {noun} brought {NUM} fans to {LOC} .",
            "Fans in {LOC} saw {PER} and {PER} {verb} {NUM} {adj} {noun} .",
            "{ORG} beat {ORG} {NUM} to {NUM} in {LOC} .",
            "{PER} {verb} {adj} {noun} for {ORG} .",
        ),
    ),
    "finance": _TopicSpec(
        noun="stocks bonds funds loans assets budgets deals mergers dividends rates yields indexes "
        "margins profits deficits audits ledgers equities hedges options futures quarters "
        "payrolls tariffs levies pensions mortgages invoices credits debts stakes portfolios",
        verb="bought sold raised cut priced hedged traded lent borrowed issued audited valued funded "
        "merged acquired divested taxed billed paid invested earned spent banked leased settled "
        "refinanced underwrote repaid shorted listed cleared rated",
        adj="bullish bearish volatile liquid solvent fiscal annual quarterly net gross fixed floating "
        "risky stable lean costly cheap lucrative modest weak strong flat soft firm taxable unpaid "
        "overdue secured hefty pricey frugal solid",
        templates=(
            "Shares of {ORG} rose {NUM} percent in {LOC} on {DATE} .",
            "{PER} of {ORG} {verb} {NUM} {adj} {noun} for {NUM} million .",
            "Analysts in {LOC} expect {NUM} {adj} {noun} to be {verb} by {ORG} .",
            "Traders {verb} {NUM} {adj} {noun} at {NUM} dollars on {DATE} .",
            "{ORG} owed {PER} {NUM} dollars .",
            "{PER} {verb} {adj} {noun} from {ORG} .",
        ),
    ),
    "science": _TopicSpec(
        noun="studies samples cells genes proteins enzymes molecules atoms crystals fossils comets "
        "galaxies neurons viruses microbes isotopes polymers catalysts spectra orbits magnets "
        "lasers reactors probes telescopes genomes vaccines compounds particles plasmas minerals "
        "alloys",
        verb="measured observed tested analyzed mapped cloned sequenced imaged modeled simulated "
        "synthesized isolated detected cataloged calibrated heated cooled froze dissolved filtered "
        "weighed scanned stained cultured mutated ionized replicated verified predicted classified "
        "extracted purified",
        adj="novel rare inert toxic dense porous acidic organic genetic thermal magnetic optical "
        "cellular molecular atomic chemical nuclear sterile viral ancient faint tiny crystalline polar "
        "benign mutant hybrid frozen soluble ionic salty cosmic",
        templates=(
            "Researchers at {ORG} {verb} {NUM} {adj} {noun} in {LOC} .",
            "{PER} published data on {NUM} {adj} {noun} from {LOC} on {DATE} .",
            "Lab teams {verb} {NUM} {adj} {noun} with {PER} in {NUM} trials .",
            "In {LOC} {PER} {verb} {NUM} {adj} {noun} {NUM} times .",
            "{PER} and {PER} {verb} {adj} {noun} at {ORG} .",
            "{ORG} {verb} {adj} {noun} in {LOC} .",
        ),
    ),
    "travel": _TopicSpec(
        noun="flights trains ferries hotels hostels cabins resorts beaches museums markets harbors "
        "castles temples bridges trails canyons islands villages cruises tours tickets passports "
        "suitcases villas lodges cafes gardens palaces plazas stations airports valleys",
        verb="booked visited toured explored hiked sailed cruised boarded photographed packed rented "
        "reserved cancelled delayed skipped crossed wandered climbed reached left recommended reviewed "
        "loved enjoyed praised sketched biked drove walked flew upgraded paddled",
        adj="scenic sunny quiet crowded cozy remote charming coastal rustic historic lush misty breezy "
        "sandy snowy lovely exotic busy hidden grand humble tropical alpine leafy famous seaside "
        "sleepy windy rainy serene quaint",
        templates=(
            "Tourists from {LOC} {verb} {NUM} {adj} {noun} near {LOC} on {DATE} .",
            "{PER} stayed {NUM} nights at {NUM} {adj} {noun} in {LOC} .",
            "Guides from {ORG} {verb} {NUM} {adj} {noun} with {PER} .",
            "A trip to {LOC} with {PER} and {NUM} friends cost {NUM} dollars .",
            "{PER} {verb} {adj} {noun} in {LOC} .",
            "{ORG} {verb} {adj} {noun} for {PER} .",
        ),
    ),
}

TOPICS: tuple[str, ...] = tuple(_TOPIC_SPECS)

MIN_SENTENCES, MAX_SENTENCES = 2, 8
# Each extra sentence is this much less likely than the one before (truncated geometric).
_SENTENCE_RATIO = Fraction(17, 20)


# ---------------------------------------------------------------------------------------------
# Grammar tables
# ---------------------------------------------------------------------------------------------


class Choice:
    """A finite distribution over options with exact (Fraction) probabilities.

    Sampling uses float cumulative weights; parsing and log-probabilities use the exact values, so
    the grammar tables can be checked to sum to exactly 1."""

    def __init__(self, options: Iterable[object], probs: Iterable[Fraction] | None = None) -> None:
        self.options: tuple = tuple(options)
        if probs is None:
            probs = [Fraction(1, len(self.options))] * len(self.options)
        self.probs: tuple[Fraction, ...] = tuple(probs)
        if len(self.probs) != len(self.options) or not self.options:
            raise ValueError("a choice needs one probability per option and at least one option")
        self.logps: tuple[float, ...] = tuple(math.log(p) for p in self.probs)
        self._uniform = len(set(self.probs)) == 1
        cum, total = [], 0.0
        for p in self.probs:
            total += float(p)
            cum.append(total)
        self._cum = cum

    def sample(self, rng: random.Random) -> int:
        """Index of a drawn option."""
        if self._uniform:
            return rng.randrange(len(self.options))
        return min(bisect.bisect_right(self._cum, rng.random() * self._cum[-1]), len(self.options) - 1)


@dataclass(frozen=True)
class Slot:
    """A slot filled by one draw from each part, words joined by spaces (PER = first + last)."""

    name: str
    parts: tuple[Choice, ...]  # options are tuples of words
    label: str | None = None  # entity label, for PER/LOC/ORG


def _words(options: Iterable[str]) -> Choice:
    return Choice(tuple(o.split()) for o in options)


_SHARED_SLOTS: dict[str, Slot] = {
    "PER": Slot("PER", (_words(_FIRST), _words(_LAST)), "PER"),
    "LOC": Slot("LOC", (_words(_PLACES),), "LOC"),
    "ORG": Slot("ORG", (_words(_ORG_NAMES), _words(_ORG_KINDS)), "ORG"),
    "NUM": Slot("NUM", (_words(_NUMBERS),)),
    "DATE": Slot("DATE", (_words(_MONTHS), _words(_DAYS), _words(_YEARS))),
}


@dataclass(frozen=True)
class Template:
    """A sentence shape: literal words and slots, the last unit being the literal "."."""

    source: str
    units: tuple[str | Slot, ...]


def _compile_template(source: str, slots: dict[str, Slot]) -> Template:
    units: list[str | Slot] = []
    for token in source.split():
        if token.startswith("{") and token.endswith("}"):
            units.append(slots[token[1:-1]])
        else:
            units.append(token)
    if units[-1] != ".":
        raise ValueError(f"template must end with ' .': {source!r}")
    return Template(source, tuple(units))


@dataclass(frozen=True)
class TopicGrammar:
    name: str
    slots: dict[str, Slot]  # the topic's own slots (noun, verb, adj)
    templates: Choice  # options are Templates


def _topic_grammar(name: str, spec: _TopicSpec) -> TopicGrammar:
    own = {key: Slot(key, (_words(getattr(spec, key).split()),)) for key in ("noun", "verb", "adj")}
    slots = {**_SHARED_SLOTS, **own}
    templates = Choice(_compile_template(t, slots) for t in spec.templates)
    return TopicGrammar(name, own, templates)


GRAMMAR: dict[str, TopicGrammar] = {name: _topic_grammar(name, spec) for name, spec in _TOPIC_SPECS.items()}
TOPIC_CHOICE = Choice(TOPICS)
_COUNTS = range(MIN_SENTENCES, MAX_SENTENCES + 1)
_RAW = [_SENTENCE_RATIO ** (n - MIN_SENTENCES) for n in _COUNTS]
SENTENCE_COUNT = Choice(_COUNTS, [w / sum(_RAW) for w in _RAW])


def all_choices() -> list[Choice]:
    """Every distribution in the grammar, for checks that each sums to 1."""
    out = [TOPIC_CHOICE, SENTENCE_COUNT]
    for slot in _SHARED_SLOTS.values():
        out.extend(slot.parts)
    for grammar in GRAMMAR.values():
        out.append(grammar.templates)
        for slot in grammar.slots.values():
            out.extend(slot.parts)
    return out


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    start: int  # char offsets in Document.text, end exclusive
    end: int
    label: str


@dataclass(frozen=True)
class Document:
    index: int
    text: str
    topic: str
    entities: tuple[Entity, ...]
    sentences: tuple[tuple[int, int], ...]  # (start, end) char spans of sentences, "." included
    logprob: float  # exact ln P(text)


@dataclass
class _Builder:
    """A text being generated: its pieces (words and separating spaces) and log-probability so far."""

    pieces: list[str]
    offset: int = 0  # char offset where the next word starts
    logprob: float = 0.0

    def add(self, word: str) -> tuple[int, int]:
        """Append `word`; returns its char span."""
        if word == ".":  # the period attaches to the previous word
            start = self.offset - 1
        else:
            start = self.offset
            if self.pieces:
                self.pieces.append(" ")
        self.pieces.append(word)
        self.offset = start + len(word) + 1
        return start, start + len(word)


def _sentence(
    b: _Builder, grammar: TopicGrammar, rng: random.Random, entities: list[Entity]
) -> tuple[int, int]:
    ti = grammar.templates.sample(rng)
    b.logprob += grammar.templates.logps[ti]
    start = end = -1
    for unit in grammar.templates.options[ti].units:
        if isinstance(unit, str):
            span = b.add(unit)
            start = span[0] if start < 0 else start
            end = span[1]
            continue
        slot_start = -1
        for part in unit.parts:
            oi = part.sample(rng)
            b.logprob += part.logps[oi]
            for word in part.options[oi]:
                span = b.add(word)
                slot_start = span[0] if slot_start < 0 else slot_start
                end = span[1]
        start = slot_start if start < 0 else start
        if unit.label is not None:
            entities.append(Entity(slot_start, end, unit.label))
    return start, end


def _compose(
    rng: random.Random, topic: str, n_sentences: int, index: int = 0, logprob: float = 0.0
) -> Document:
    """n sentences of `topic`; `logprob` is added to the sentences' (the topic and count terms)."""
    b = _Builder([], logprob=logprob)
    entities: list[Entity] = []
    grammar = GRAMMAR[topic]
    spans = tuple(_sentence(b, grammar, rng, entities) for _ in range(n_sentences))
    return Document(index, "".join(b.pieces), topic, tuple(entities), spans, b.logprob)


def _rng(stream: str, seed: int, index: int) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so streams are stable across runs and
    # platforms, and (seed, index) pairs never collide the way seed * K + index can.
    return random.Random(f"raylm-synthetic:{stream}:{seed}:{index}")


def document(seed: int, index: int) -> Document:
    """Document `index` of the corpus `seed`; depends only on (seed, index)."""
    rng = _rng("doc", seed, index)
    ti = TOPIC_CHOICE.sample(rng)
    ni = SENTENCE_COUNT.sample(rng)
    logprob = TOPIC_CHOICE.logps[ti] + SENTENCE_COUNT.logps[ni]
    return _compose(rng, TOPICS[ti], SENTENCE_COUNT.options[ni], index, logprob)


def documents(num_docs: int, seed: int = 0, start: int = 0) -> Iterator[Document]:
    """Documents start .. start + num_docs - 1 of the corpus `seed`."""
    for index in range(start, start + num_docs):
        yield document(seed, index)


def entropy_bits_per_byte(docs: Iterable[Document]) -> float:
    """The corpus's true cross-entropy floor: -sum(ln P) / ln 2 over the total UTF-8 bytes."""
    nats, nbytes = 0.0, 0
    for doc in docs:
        nats -= doc.logprob
        nbytes += len(doc.text.encode("utf-8"))
    if nbytes == 0:
        raise ValueError("no text to measure")
    return nats / math.log(2) / nbytes


# ---------------------------------------------------------------------------------------------
# Parsing: exact probability and derivation count of any text
# ---------------------------------------------------------------------------------------------


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
_WORD_CHOICES = [part for slot in _SHARED_SLOTS.values() for part in slot.parts] + [
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
    if n not in _COUNTS:
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


# ---------------------------------------------------------------------------------------------
# Fine-tuning sets
# ---------------------------------------------------------------------------------------------


def bio_tokens(doc: Document) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Whitespace tokens with "." split off, their BIO tags and char spans."""
    tokens: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for word in doc.text.split(" "):
        core = word[:-1] if word.endswith(".") else word
        tokens.append(core)
        spans.append((pos, pos + len(core)))
        if core != word:
            tokens.append(".")
            spans.append((pos + len(core), pos + len(word)))
        pos += len(word) + 1
    tags = ["O"] * len(tokens)
    starts = {s[0]: i for i, s in enumerate(spans)}
    for ent in doc.entities:
        i = starts[ent.start]
        tags[i] = f"B-{ent.label}"
        i += 1
        while i < len(spans) and spans[i][1] <= ent.end:
            tags[i] = f"I-{ent.label}"
            i += 1
    return tokens, tags, spans


def _balanced_topics(num: int, rng: random.Random) -> list[str]:
    topics = [TOPICS[i % len(TOPICS)] for i in range(num)]
    rng.shuffle(topics)
    return topics


def topic_classification(num: int, seed: int = 0) -> list[dict]:
    """`num` short texts (1-3 sentences) labelled with their topic; topics as balanced as `num` allows."""
    order = _balanced_topics(num, _rng("cls-order", seed, 0))
    out = []
    for i, topic in enumerate(order):
        rng = _rng("cls", seed, i)
        out.append({"text": _compose(rng, topic, 1 + rng.randrange(3)).text, "label": topic})
    return out


def topic_pairs(num: int, seed: int = 0) -> list[dict]:
    """`num` pairs of short texts labelled "same" or "different" topic, half of each."""
    labels = ["same" if i % 2 == 0 else "different" for i in range(num)]
    _rng("pairs-order", seed, 0).shuffle(labels)
    out = []
    for i, label in enumerate(labels):
        rng = _rng("pairs", seed, i)
        a = rng.randrange(len(TOPICS))
        b = a if label == "same" else (a + 1 + rng.randrange(len(TOPICS) - 1)) % len(TOPICS)
        text_a = _compose(rng, TOPICS[a], 1 + rng.randrange(2)).text
        text_b = _compose(rng, TOPICS[b], 1 + rng.randrange(2)).text
        out.append({"text_a": text_a, "text_b": text_b, "label": label})
    return out


def entity_tagging(num: int, seed: int = 0) -> list[dict]:
    """`num` short documents (2-3 sentences) with tokens, BIO tags and entity char spans."""
    order = _balanced_topics(num, _rng("ner-order", seed, 0))
    out = []
    for i, topic in enumerate(order):
        rng = _rng("ner", seed, i)
        doc = _compose(rng, topic, 2 + rng.randrange(2))
        tokens, tags, _ = bio_tokens(doc)
        entities = [{"start": e.start, "end": e.end, "label": e.label} for e in doc.entities]
        out.append({"text": doc.text, "tokens": tokens, "tags": tags, "entities": entities})
    return out


def topic_completion(num: int, seed: int = 0) -> list[dict]:
    """`num` prompt/completion pairs: a short document (1-2 sentences) and, after it, its topic and
    named entities in order of appearance: prompt "<text>\nTopic and names:", completion
    " travel: Ada Okafor, Port Elwin." (" travel: none." when the text names no one)."""
    order = _balanced_topics(num, _rng("completion-order", seed, 0))
    out = []
    for i, topic in enumerate(order):
        rng = _rng("completion", seed, i)
        doc = _compose(rng, topic, 1 + rng.randrange(2))
        names = list(dict.fromkeys(doc.text[e.start : e.end] for e in doc.entities))
        out.append({"prompt": f"{doc.text}\nTopic and names:",
                    "completion": f" {topic}: {', '.join(names) if names else 'none'}."})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="print synthetic documents and the corpus entropy floor")
    p.add_argument("--docs", type=int, default=3, help="documents to print")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor-docs", type=int, default=2000, help="documents to measure the floor over")
    args = p.parse_args(argv)
    for doc in documents(args.docs, seed=args.seed):
        print(f"[{doc.index}] topic={doc.topic} logprob={doc.logprob:.3f} bytes={len(doc.text)}")
        print(doc.text)
        print("  entities:", ", ".join(f"{doc.text[e.start : e.end]}/{e.label}" for e in doc.entities))
    sample = list(documents(args.floor_docs, seed=args.seed))
    mean_bytes = sum(len(d.text) for d in sample) / len(sample)
    print(
        f"entropy floor over {len(sample)} docs: {entropy_bits_per_byte(sample):.4f} bits/byte, "
        f"mean {mean_bytes:.1f} bytes/doc"
    )


if __name__ == "__main__":
    main()
