"""cluster.data.synthetic: a seeded, offline corpus of English-like documents with a known entropy.

Documents come from a small probabilistic grammar:

    document  = topic, number of sentences n (truncated geometric over 2..8), n sentences
    sentence  = a template of the topic (uniform), its slots filled by uniform word-list choices

Every word list is disjoint from every other list and from the templates' literal words, each
topic has its own vocabulary and templates, and no two templates of a topic share a shape, so each
text has exactly one derivation. Its probability is therefore the product of the choices that made
it, `Document.logprob` is that exact ln P(text), `log_prob` recomputes it by parsing, and
`entropy_bits_per_byte` over a sample is the floor a perfect language model reaches.

    python -m cluster.data.synthetic --docs 3 --seed 0
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


SHARED_SLOTS: dict[str, Slot] = {
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
    slots = {**SHARED_SLOTS, **own}
    templates = Choice(_compile_template(t, slots) for t in spec.templates)
    return TopicGrammar(name, own, templates)


GRAMMAR: dict[str, TopicGrammar] = {name: _topic_grammar(name, spec) for name, spec in _TOPIC_SPECS.items()}


TOPIC_CHOICE = Choice(TOPICS)


COUNT_RANGE = range(MIN_SENTENCES, MAX_SENTENCES + 1)


_RAW = [_SENTENCE_RATIO ** (n - MIN_SENTENCES) for n in COUNT_RANGE]


SENTENCE_COUNT = Choice(COUNT_RANGE, [w / sum(_RAW) for w in _RAW])


def all_choices() -> list[Choice]:
    """Every distribution in the grammar, for checks that each sums to 1."""
    out = [TOPIC_CHOICE, SENTENCE_COUNT]
    for slot in SHARED_SLOTS.values():
        out.extend(slot.parts)
    for grammar in GRAMMAR.values():
        out.append(grammar.templates)
        for slot in grammar.slots.values():
            out.extend(slot.parts)
    return out


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


def compose(
    rng: random.Random, topic: str, n_sentences: int, index: int = 0, logprob: float = 0.0
) -> Document:
    """n sentences of `topic`; `logprob` is added to the sentences' (the topic and count terms)."""
    b = _Builder([], logprob=logprob)
    entities: list[Entity] = []
    grammar = GRAMMAR[topic]
    spans = tuple(_sentence(b, grammar, rng, entities) for _ in range(n_sentences))
    return Document(index, "".join(b.pieces), topic, tuple(entities), spans, b.logprob)


def seeded_rng(stream: str, seed: int, index: int) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so streams are stable across runs and
    # platforms, and (seed, index) pairs never collide the way seed * K + index can.
    return random.Random(f"raylm-synthetic:{stream}:{seed}:{index}")


def document(seed: int, index: int) -> Document:
    """Document `index` of the corpus `seed`; depends only on (seed, index)."""
    rng = seeded_rng("doc", seed, index)
    ti = TOPIC_CHOICE.sample(rng)
    ni = SENTENCE_COUNT.sample(rng)
    logprob = TOPIC_CHOICE.logps[ti] + SENTENCE_COUNT.logps[ni]
    return compose(rng, TOPICS[ti], SENTENCE_COUNT.options[ni], index, logprob)


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
