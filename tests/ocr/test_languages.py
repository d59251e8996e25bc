"""ocr.languages: hint normalisation shared by the OCR adapters."""
from __future__ import annotations

import pytest

from ocr.languages import by_code, normalize_language, parse_languages, script_of


@pytest.mark.parametrize("hint, code", [
    ("English", "en"), ("english", "en"), ("en", "en"), ("eng", "en"), ("EN-us", "en"), ("en_GB", "en"),
    ("Russian", "ru"), ("ru", "ru"), ("rus", "ru"), ("RUS", "ru"), ("русский", "ru"), ("Русский", "ru"),
    ("ru_RU", "ru"),
    ("Chinese", "zh"), ("zh", "zh"), ("chi_sim", "zh"), ("chi-sim", "zh"), ("中文", "zh"), ("zh-CN", "zh"),
    ("zh-Hans-CN", "zh"), ("zho", "zh"),
    ("zh-TW", "zh-Hant"), ("chi_tra", "zh-Hant"), ("繁體中文", "zh-Hant"),
    ("Japanese", "ja"), ("ja", "ja"), ("jpn", "ja"), ("日本語", "ja"),
    ("Ukrainian", "uk"), ("українська", "uk"), ("Serbian", "sr"), ("sr-Latn", "sr-Latn"),
    ("German", "de"), ("ger", "de"), ("deu", "de"), ("Deutsch", "de"), ("fr-CA", "fr"), ("français", "fr"),
    ("  Spanish ", "es"), ("pt_BR", "pt"),
])
def test_known_hints(hint: str, code: str) -> None:
    lang = normalize_language(hint)
    assert lang is not None and lang.code == code


@pytest.mark.parametrize("hint", [None, "", "   ", "Klingon", "xx", "tlh", "-", "123"])
def test_empty_or_unknown(hint) -> None:
    assert normalize_language(hint) is None


@pytest.mark.parametrize("hint, script", [
    ("en", "latin"), ("vi", "latin"), ("ru", "cyrillic"), ("kk", "cyrillic"), ("bg", "cyrillic"),
    ("zh", "han"), ("ja", "japanese"), ("ko", "hangul"), ("el", "greek"), ("sr-Latn", "latin"),
    ("Klingon", None),
])
def test_script_family(hint: str, script) -> None:
    assert script_of(hint) == script


def test_tesseract_codes() -> None:
    assert by_code("en").tesseract == "eng"
    assert by_code("ru").tesseract == "rus"
    assert by_code("zh").tesseract == "chi_sim"
    assert by_code("zh-Hant").tesseract == "chi_tra"


def test_several_languages() -> None:
    assert [l.code for l in parse_languages("rus+eng")] == ["ru", "en"]
    assert [l.code for l in parse_languages("Russian, English")] == ["ru", "en"]
    assert [l.code for l in parse_languages("ru; en; ru")] == ["ru", "en"]  # duplicates dropped
    assert parse_languages(None) == ()
    assert parse_languages("  ") == ()
    assert parse_languages("ru+Klingon") is None
