"""Generation engine behaviour on a tiny random-init GPT (no Ray)."""

from __future__ import annotations

import pytest

from cluster import registry
from serve import engines, tiny


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpt")
    path = tiny.save_gpt(str(base / "ckpt"))
    registry.publish(path, "g", "generation", root=str(base / "reg"))
    return engines.load(registry.load_entry("g", str(base / "reg")))


def test_stop_prefix_len_holds_only_a_possible_start_of_a_stop():
    assert engines._stop_prefix_len("the cat sat\nUs", ["\nUser:"]) == 3
    assert engines._stop_prefix_len("the cat sat", ["\nUser:"]) == 0
    assert engines._stop_prefix_len("a b", ["b c", "xb"]) == 1
    assert engines._stop_prefix_len("ab", ["abab"]) == 2
    assert engines._stop_prefix_len("x", []) == 0


def test_a_stream_with_a_stop_string_sends_each_token_as_it_comes(gpt):
    # A chat stream (stop "\nUser:") held back the last len(stop)-1 characters at every step,
    # so its chunks lagged the tokens by a few characters, whatever the text.
    params = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": None}
    prompt = gpt.encode("the cat sat on", 12)
    plain = list(gpt.stream(prompt, {**params, "stop": None}))
    held = list(gpt.stream(prompt, {**params, "stop": ["\nUser:"]}))
    text = "".join(c["text"] for c in plain)
    assert "\nU" not in text and len(plain) > 3
    assert [(c["text"], c["tokens"]) for c in held] == [(c["text"], c["tokens"]) for c in plain]
    # A stop string that the text ends with the start of is held until it can be told apart.
    words = text.split(" ")
    stop = " " + words[-1] + "\u2603"  # never completed: the last word then a snowman
    chunks = list(gpt.stream(prompt, {**params, "stop": [stop]}))
    assert "".join(c["text"] for c in chunks) == text
    assert chunks[-2]["text"].endswith(words[-1]) and chunks[-1]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def bpe_tagger(tmp_path_factory):
    """A GPT-2 (byte-level BPE) token classifier whose head says B-PER for every token."""
    import torch
    from transformers import AutoTokenizer, GPT2ForTokenClassification

    base = tmp_path_factory.mktemp("tagger")
    gpt_dir = tiny.save_gpt(str(base / "gpt"))
    labels = tiny.TAG_LABELS
    model = GPT2ForTokenClassification.from_pretrained(
        gpt_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)})
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[labels.index("B-PER")] = 10.0
    model.save_pretrained(str(base / "ckpt"))
    AutoTokenizer.from_pretrained(gpt_dir).save_pretrained(str(base / "ckpt"))
    registry.publish(str(base / "ckpt"), "t", "tagging", root=str(base / "reg"))
    return engines.load(registry.load_entry("t", str(base / "reg")))


def test_tagged_spans_of_a_byte_level_tokenizer_hold_the_word_only(bpe_tagger):
    """Byte-level BPE words carry the whitespace before them: served entities read " Ito" with a
    start one character early. A run of spaces, a word of its own, is no entity at all."""
    text = "Alice and   Bob\tsat."
    entities = bpe_tagger.tag([text])[0]
    assert [(e["text"], e["start"], e["end"]) for e in entities] == [
        ("Alice", 0, 5), ("and", 6, 9), ("Bob", 12, 15), ("sat", 16, 19), (".", 19, 20)]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)


def test_greedy_decoding_answers_n_identical_choices(gpt):
    """temperature 0 with n=2 was a 500: transformers refuses num_return_sequences > 1 without sampling."""
    prompts = [gpt.encode("the cat sat", 6), gpt.encode("a dog", 6)]
    params = {"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": None}
    one = gpt.generate(prompts, {**params, "n": 1})
    three = gpt.generate(prompts, {**params, "n": 3})
    assert three == [choices * 3 for choices in one]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    base = tmp_path_factory.mktemp("cls")
    path = tiny.save_bert(str(base / "ckpt"), "classification", max_len=32)
    registry.publish(path, "c", "classification", root=str(base / "reg"))
    return engines.load(registry.load_entry("c", str(base / "reg")))


def test_an_input_longer_than_the_context_is_a_400_before_the_model_runs(classifier):
    """Called directly (as jobs and benchmarks do, without the replica's per-request check), the
    engine refuses a batch whose longest input, single or pair, exceeds the 32-token context."""
    long = "the cat sat " * 10
    for texts, pairs in (([long], [None]), (["a dog", long], [None, None]), (["a dog", "a cat"], ["ok", long])):
        with pytest.raises(engines.ApiError) as err:
            classifier.classify(texts, pairs)
        assert err.value.status == 400 and "context length of 32 tokens" in str(err.value.body())
    assert len(classifier.classify(["a dog", "a cat"], ["ok", None])) == 2


def test_batched_inputs_score_as_they_do_alone(classifier):
    """Inputs of different lengths in one padded batch, singles and pairs mixed, get the scores
    each gets alone."""
    texts, pairs = ["a dog", "the cat sat on the mat", "rain"], [None, None, "in Paris"]
    batched = classifier.classify(texts, pairs)
    for text, pair, got in zip(texts, pairs, batched, strict=True):
        alone = classifier.classify([text], [pair])[0]
        assert got["label"] == alone["label"]
        assert [s["score"] for s in got["scores"]] == pytest.approx([s["score"] for s in alone["scores"]], abs=1e-5)
    singles = classifier.classify(texts[:2], [None, None])
    assert [s["score"] for s in singles[1]["scores"]] == pytest.approx(
        [s["score"] for s in batched[1]["scores"]], abs=1e-5)


class CountingDeadline:
    """A deadline that passes on its `after`-th check and counts the checks (one per decoding step)."""

    def __init__(self, after: int | None):
        self.after, self.checks = after, 0

    def passed(self) -> bool:
        self.checks += 1
        return self.after is not None and self.checks >= self.after


def test_a_deadline_stops_its_prompt_at_the_next_step_and_the_batch_goes_on(gpt):
    """Each prompt of a padded batch carries its request's deadline: one that passes stops that
    prompt's rows (answered None), the others finish; once every row is stopped, generate returns."""
    prompts = [gpt.encode("the cat sat", 40), gpt.encode("a dog", 40)]
    params = {"max_tokens": 40, "temperature": 0.0, "top_p": 1.0, "n": 1, "seed": None, "stop": None}
    whole = gpt.generate(prompts, params)
    cut, kept = CountingDeadline(after=3), CountingDeadline(after=None)
    results = gpt.generate(prompts, params, [cut, kept])
    assert results[0] is None and results[1] == whole[1]
    both = [CountingDeadline(after=3), CountingDeadline(after=3)]
    assert gpt.generate(prompts, params, both) == [None, None]
    assert both[0].checks == 3, "generation went on after every row was stopped"
    sampled = {**params, "temperature": 1.0, "n": 3, "seed": 5}  # n rows per prompt stop together
    assert gpt.generate(prompts[:1], sampled, [CountingDeadline(after=2)]) == [None]


def test_a_deadline_that_passes_after_a_prompt_ended_keeps_its_answer(gpt):
    """A row whose last token is EOS (or padding) had ended when its deadline passed: its prompt
    is answered, not counted as cut short."""
    import torch

    prompt = gpt.encode("the cat sat", 40)
    word = next(t for t in prompt if t not in (gpt.eos_id, gpt.pad_id))
    halt = engines._Halt([CountingDeadline(after=1)], runs=1, ended=(gpt.eos_id, gpt.pad_id))
    assert halt(torch.tensor([prompt + [gpt.eos_id]]), None).tolist() == [True] and halt.halted == set()
    assert halt(torch.tensor([prompt + [word]]), None).tolist() == [True] and halt.halted == {0}


@pytest.mark.parametrize("temperature", [1e-40, 1e-3, 0.0099])
def test_a_tiny_temperature_decodes_greedily_instead_of_dividing_into_nan(gpt, temperature):
    """temperature 1e-40 was a 500 ("probability tensor contains either inf, nan or element < 0"):
    below GREEDY_BELOW the answer is the greedy one, batched and streamed."""
    prompt = gpt.encode("the cat sat", 8)
    params = {"max_tokens": 8, "top_p": 1.0, "n": 2, "seed": None, "stop": None}
    greedy = gpt.generate([prompt], {**params, "temperature": 0.0})
    assert gpt.generate([prompt], {**params, "temperature": temperature}) == greedy
    streamed = "".join(c["text"] for c in gpt.stream(prompt, {**params, "temperature": temperature}))
    assert streamed == greedy[0][0]["text"]


def test_the_largest_seed_samples_reproducibly(gpt):
    """seed 2**63-1 is accepted by the schema; torch takes it, batched and streamed."""
    from serve.schemas import SEED_MAX

    prompt = gpt.encode("a dog", 6)
    params = {"max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "n": 2, "seed": SEED_MAX, "stop": None}
    assert gpt.generate([prompt], params) == gpt.generate([prompt], params)
    assert list(gpt.stream(prompt, params)) == list(gpt.stream(prompt, params))


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlm")
    path = tiny.save_bert(str(base / "ckpt"), "fill-mask", max_len=64)
    registry.publish(path, "m", "fill-mask", root=str(base / "reg"))
    return engines.load(registry.load_entry("m", str(base / "reg")))


def test_fill_mask_inputs_are_measured_and_their_masks_counted(mlm):
    """validate returns each input's tokens (the request's work) and refuses more masks than the
    server takes per input, naming the input and the limit."""
    lengths = mlm.validate(["the [MASK] sat.", "[MASK] " * 8], max_masks=8)
    assert lengths == [len(mlm.tokenizer("the [MASK] sat.")["input_ids"]), 10]
    with pytest.raises(engines.ApiError) as err:
        mlm.validate(["the [MASK] sat.", "[MASK] " * 9], max_masks=8)
    assert (err.value.status, err.value.param, err.value.code) == (400, "inputs", "too_many_masks")
    assert "input 1 holds 9 mask tokens" in err.value.message and "max_masks_per_input" in err.value.message
    assert len(mlm.fill_mask(["[MASK] " * 9], [2])[0]) == 9  # called directly (jobs, benchmarks): no limit


def test_a_top_p_that_underflows_float32_keeps_the_most_likely_token():
    """Found by the fuzz drill: top_p 2.2e-311 is 0 in float32, every token was dropped and sampling
    failed (a 500 on a stream). The most likely token is always kept."""
    import torch

    logits = torch.tensor([0.1, 3.0, -1.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    assert {engines._sample(logits, 1.0, 2.2e-311, gen) for _ in range(20)} == {1}
    assert {engines._sample(logits, 1.0, 1.0, gen) for _ in range(200)} >= {0, 1, 3}
