from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.data.text import (
    DROP_CHARSET,
    DROP_EMPTY,
    DROP_TOO_LONG,
    DROP_TOO_SHORT,
    clean,
    content_hash,
    hash_unit,
    is_normalized,
    normalize,
)


def test_ansi_codes_and_control_characters_removed():
    raw = "\x1b[31mred\x1b[0m text\x07 with\x00 bell\x1b]0;title\x07 done"
    assert normalize(raw) == "red text with bell done"


def test_whitespace_folded_and_nfc_applied():
    assert normalize("  a\t\tb  \r\n\r\n\r\n\n c  ") == "a b\n\nc"
    assert normalize("cafe\u0301") == "caf\u00e9"  # NFD -> NFC


def test_cjk_survives_intact():
    text = "这是中文文本，测试一下。日本語のテキスト。한국어 텍스트."
    assert normalize(text) == text
    assert clean(text, 1, 1000)[1] == ""


# Characters each rule of normalize() acts on, and look-alikes it must keep, drawn rarely enough
# among letters, spaces and newlines that many strings are clean or nearly so.
_TRICKY = list("\t\r\x0b\x0c\x1c\x1f\x00\x07\x1b[\x7f\x85\x9f\xa0\xad\u1680\u2003\u200b\u200d\u2028\u2029\u3000"
               "\u0301\ufeff\U0001f600")
_ALPHABET = list("abcé中") * 20 + [" "] * 30 + ["\n"] * 15 + _TRICKY


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_ALPHABET), max_size=40).map("".join))
def test_the_fast_path_agrees_with_the_full_normalisation(text):
    """normalize() skips its regular expressions when is_normalized() says nothing would change;
    on text built from every character class the rules touch, that must never be wrong."""
    from cluster.data.text import _normalize

    full = _normalize(text)
    assert normalize(text) == full
    if is_normalized(text):
        assert full == text


def test_synthetic_documents_take_the_fast_path():
    from cluster.data import synthetic

    docs = list(synthetic.documents(200, seed=1))
    assert all(is_normalized(d.text) for d in docs)
    assert not is_normalized("a  b") and not is_normalized("a\tb") and not is_normalized("cafe\u0301")


def test_drop_reasons():
    assert clean("   ", 1, 100)[1] == DROP_EMPTY
    assert clean("short", 10, 100)[1] == DROP_TOO_SHORT
    assert clean("x" * 101, 1, 100)[1] == DROP_TOO_LONG
    assert clean("Привет мир как дела", 1, 100, charsets=["latin"])[1] == DROP_CHARSET
    assert clean("Hello world 你好", 1, 100, charsets=["latin", "cjk"])[1] == ""


def test_min_chars_counts_a_wide_character_twice():
    # Regression: min_chars 20 dropped most short Chinese lines; a complete sentence is often shorter.
    assert clean("今天天气很好，我们去公园。", 20, 100)[1] == ""  # 13 characters, width 26
    assert clean("今天天气很好。", 20, 100)[1] == DROP_TOO_SHORT  # width 14
    assert clean("short English line", 20, 100)[1] == DROP_TOO_SHORT
    assert clean("x" * 60, 1, 50)[1] == DROP_TOO_LONG  # max_chars counts characters
    assert clean("中" * 30, 1, 50)[1] == ""


def test_hash_is_content_addressed_and_units_are_uniform():
    assert content_hash("a") == content_hash("a") != content_hash("b")
    units = [hash_unit(content_hash(str(i))) for i in range(20000)]
    assert all(0 <= u < 1 for u in units)
    assert abs(sum(u < 0.1 for u in units) / len(units) - 0.1) < 0.01
