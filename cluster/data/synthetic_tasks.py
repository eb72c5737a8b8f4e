"""Labelled tasks drawn from the synthetic grammar, so fine-tuning and its tests need no download:
topic classification (single texts and pairs), BIO entity tagging and prompt -> completion.
"""

from __future__ import annotations

import random

from cluster.data.synthetic import TOPICS, Document, compose, seeded_rng


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
    order = _balanced_topics(num, seeded_rng("cls-order", seed, 0))
    out = []
    for i, topic in enumerate(order):
        rng = seeded_rng("cls", seed, i)
        out.append({"text": compose(rng, topic, 1 + rng.randrange(3)).text, "label": topic})
    return out


def topic_pairs(num: int, seed: int = 0) -> list[dict]:
    """`num` pairs of short texts labelled "same" or "different" topic, half of each."""
    labels = ["same" if i % 2 == 0 else "different" for i in range(num)]
    seeded_rng("pairs-order", seed, 0).shuffle(labels)
    out = []
    for i, label in enumerate(labels):
        rng = seeded_rng("pairs", seed, i)
        a = rng.randrange(len(TOPICS))
        b = a if label == "same" else (a + 1 + rng.randrange(len(TOPICS) - 1)) % len(TOPICS)
        text_a = compose(rng, TOPICS[a], 1 + rng.randrange(2)).text
        text_b = compose(rng, TOPICS[b], 1 + rng.randrange(2)).text
        out.append({"text_a": text_a, "text_b": text_b, "label": label})
    return out


def entity_tagging(num: int, seed: int = 0) -> list[dict]:
    """`num` short documents (2-3 sentences) with tokens, BIO tags and entity char spans."""
    order = _balanced_topics(num, seeded_rng("ner-order", seed, 0))
    out = []
    for i, topic in enumerate(order):
        rng = seeded_rng("ner", seed, i)
        doc = compose(rng, topic, 2 + rng.randrange(2))
        tokens, tags, _ = bio_tokens(doc)
        entities = [{"start": e.start, "end": e.end, "label": e.label} for e in doc.entities]
        out.append({"text": doc.text, "tokens": tokens, "tags": tags, "entities": entities})
    return out


def topic_completion(num: int, seed: int = 0) -> list[dict]:
    """`num` prompt/completion pairs: a short document (1-2 sentences) and, after it, its topic and
    named entities in order of appearance: prompt "<text>\nTopic and names:", completion
    " travel: Ada Okafor, Port Elwin." (" travel: none." when the text names no one)."""
    order = _balanced_topics(num, seeded_rng("completion-order", seed, 0))
    out = []
    for i, topic in enumerate(order):
        rng = seeded_rng("completion", seed, i)
        doc = compose(rng, topic, 1 + rng.randrange(2))
        names = list(dict.fromkeys(doc.text[e.start : e.end] for e in doc.entities))
        out.append({"prompt": f"{doc.text}\nTopic and names:",
                    "completion": f" {topic}: {', '.join(names) if names else 'none'}."})
    return out
