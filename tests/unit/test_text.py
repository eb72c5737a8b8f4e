from cluster.text import (
    DROP_CHARSET,
    DROP_EMPTY,
    DROP_TOO_LONG,
    DROP_TOO_SHORT,
    clean,
    content_hash,
    hash_unit,
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


def test_drop_reasons():
    assert clean("   ", 1, 100)[1] == DROP_EMPTY
    assert clean("short", 10, 100)[1] == DROP_TOO_SHORT
    assert clean("x" * 101, 1, 100)[1] == DROP_TOO_LONG
    assert clean("Привет мир как дела", 1, 100, charsets=["latin"])[1] == DROP_CHARSET
    assert clean("Hello world 你好", 1, 100, charsets=["latin", "cjk"])[1] == ""


def test_hash_is_content_addressed_and_units_are_uniform():
    assert content_hash("a") == content_hash("a") != content_hash("b")
    units = [hash_unit(content_hash(str(i))) for i in range(20000)]
    assert all(0 <= u < 1 for u in units)
    assert abs(sum(u < 0.1 for u in units) / len(units) - 0.1) < 0.01
