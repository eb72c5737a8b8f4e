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
