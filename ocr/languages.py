"""Language hints as clients write them, reduced to one canonical entry.

A hint may be an English name ("Russian"), an ISO 639-1 code ("ru"), an ISO 639-2/3 or
Tesseract code ("rus", "chi_sim"), a native name ("русский", "中文") or a locale tag
("zh-CN", "en_US"). Matching ignores case, surrounding space and "-"/"_" differences.
Several languages may be given at once ("rus+eng", "ru, en").

The table is the only knowledge here; adapters decide what they can read from ``script``
(RapidOCR) or from ``tesseract`` plus the installed traineddata (Tesseract).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    code: str        # canonical: ISO 639-1 where one exists, plus a script subtag if needed
    name: str        # English name
    script: str      # "latin", "cyrillic", "han", "japanese", "hangul", "greek", "arabic", ...
    tesseract: str   # tessdata name (traineddata file stem)


# code, English name, script, tessdata, further aliases (ISO 639-2/B, 639-3, native names, ...)
_TABLE: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("en", "English", "latin", "eng", ("eng", "english", "en-us", "en-gb")),
    ("zh", "Chinese", "han", "chi_sim",
     ("zho", "chi", "chi_sim", "zh-cn", "zh-hans", "zh-sg", "cn", "ch", "chinese simplified",
      "simplified chinese", "mandarin", "中文", "汉语", "漢語", "简体中文", "普通话")),
    ("zh-Hant", "Traditional Chinese", "han", "chi_tra",
     ("chi_tra", "zh-tw", "zh-hk", "zh-mo", "zht", "chinese_cht", "chinese traditional",
      "繁體中文", "繁体中文", "正體中文")),
    ("ja", "Japanese", "japanese", "jpn", ("jpn", "jp", "japan", "日本語", "にほんご")),
    ("ko", "Korean", "hangul", "kor", ("kor", "korean", "한국어", "조선말")),
    ("ru", "Russian", "cyrillic", "rus", ("rus", "русский", "русский язык", "ru-ru")),
    ("uk", "Ukrainian", "cyrillic", "ukr", ("ukr", "українська", "ua")),
    ("be", "Belarusian", "cyrillic", "bel", ("bel", "беларуская", "belarusian", "byelorussian")),
    ("bg", "Bulgarian", "cyrillic", "bul", ("bul", "български")),
    ("sr", "Serbian", "cyrillic", "srp", ("srp", "scc", "српски", "sr-cyrl")),
    ("sr-Latn", "Serbian (Latin)", "latin", "srp_latn",
     ("srp_latn", "rs_latin", "srpski", "serbian latin")),
    ("mk", "Macedonian", "cyrillic", "mkd", ("mkd", "mac", "македонски")),
    ("kk", "Kazakh", "cyrillic", "kaz", ("kaz", "қазақ", "қазақша", "қазақ тілі")),
    ("ky", "Kyrgyz", "cyrillic", "kir", ("kir", "kirghiz", "кыргызча")),
    ("tg", "Tajik", "cyrillic", "tgk", ("tgk", "тоҷикӣ")),
    ("mn", "Mongolian", "cyrillic", "mon", ("mon", "монгол")),
    ("el", "Greek", "greek", "ell", ("ell", "gre", "ελληνικά")),
    ("ar", "Arabic", "arabic", "ara", ("ara", "العربية")),
    ("fa", "Persian", "arabic", "fas", ("fas", "per", "farsi", "فارسی")),
    ("he", "Hebrew", "hebrew", "heb", ("heb", "iw", "עברית")),
    ("hi", "Hindi", "devanagari", "hin", ("hin", "हिन्दी", "हिंदी")),
    ("th", "Thai", "thai", "tha", ("tha", "ไทย")),
    ("de", "German", "latin", "deu", ("deu", "ger", "deutsch")),
    ("fr", "French", "latin", "fra", ("fra", "fre", "français", "francais")),
    ("es", "Spanish", "latin", "spa", ("spa", "español", "espanol", "castellano")),
    ("it", "Italian", "latin", "ita", ("ita", "italiano")),
    ("pt", "Portuguese", "latin", "por", ("por", "português", "portugues", "pt-br")),
    ("nl", "Dutch", "latin", "nld", ("nld", "dut", "nederlands", "flemish")),
    ("pl", "Polish", "latin", "pol", ("pol", "polski")),
    ("cs", "Czech", "latin", "ces", ("ces", "cze", "čeština", "cestina")),
    ("sk", "Slovak", "latin", "slk", ("slk", "slo", "slovenčina", "slovencina")),
    ("sl", "Slovenian", "latin", "slv", ("slv", "slovene", "slovenščina")),
    ("hr", "Croatian", "latin", "hrv", ("hrv", "hrvatski")),
    ("bs", "Bosnian", "latin", "bos", ("bos", "bosanski")),
    ("hu", "Hungarian", "latin", "hun", ("hun", "magyar")),
    ("ro", "Romanian", "latin", "ron", ("ron", "rum", "română", "romana", "moldovan")),
    ("sq", "Albanian", "latin", "sqi", ("sqi", "alb", "shqip")),
    ("sv", "Swedish", "latin", "swe", ("swe", "svenska")),
    ("da", "Danish", "latin", "dan", ("dan", "dansk")),
    ("no", "Norwegian", "latin", "nor", ("nor", "nb", "nob", "nn", "norsk", "bokmål")),
    ("is", "Icelandic", "latin", "isl", ("isl", "ice", "íslenska")),
    ("fi", "Finnish", "latin", "fin", ("fin", "suomi")),
    ("et", "Estonian", "latin", "est", ("est", "eesti")),
    ("lv", "Latvian", "latin", "lav", ("lav", "latviešu")),
    ("lt", "Lithuanian", "latin", "lit", ("lit", "lietuvių")),
    ("tr", "Turkish", "latin", "tur", ("tur", "türkçe", "turkce")),
    ("az", "Azerbaijani", "latin", "aze", ("aze", "azərbaycan")),
    ("uz", "Uzbek", "latin", "uzb", ("uzb", "oʻzbek", "o'zbek")),
    ("vi", "Vietnamese", "latin", "vie", ("vie", "tiếng việt")),
    ("id", "Indonesian", "latin", "ind", ("ind", "bahasa indonesia")),
    ("ms", "Malay", "latin", "msa", ("msa", "may", "bahasa melayu")),
    ("tl", "Tagalog", "latin", "tgl", ("tgl", "filipino", "fil")),
    ("sw", "Swahili", "latin", "swa", ("swa", "kiswahili")),
    ("af", "Afrikaans", "latin", "afr", ("afr",)),
    ("ca", "Catalan", "latin", "cat", ("cat", "català")),
    ("eu", "Basque", "latin", "eus", ("eus", "baq", "euskara")),
    ("gl", "Galician", "latin", "glg", ("glg", "galego")),
    ("ga", "Irish", "latin", "gle", ("gle", "gaeilge")),
    ("cy", "Welsh", "latin", "cym", ("cym", "wel", "cymraeg")),
    ("mt", "Maltese", "latin", "mlt", ("mlt", "malti")),
    ("lb", "Luxembourgish", "latin", "ltz", ("ltz", "lëtzebuergesch")),
    ("la", "Latin", "latin", "lat", ("lat", "latina")),
    ("oc", "Occitan", "latin", "oci", ("oci",)),
    ("ku", "Kurdish", "latin", "kmr", ("kmr", "kur", "kurmanji")),
    ("mi", "Maori", "latin", "mri", ("mri", "mao", "māori")),
    ("qu", "Quechua", "latin", "que", ("que",)),
    ("rm", "Romansh", "latin", "roh", ("roh", "rumantsch")),
)

_SPLIT = re.compile(r"\s*[+,;/]\s*")


def _key(text: str) -> str:
    text = unicodedata.normalize("NFC", text).strip().casefold()
    return re.sub(r"[\s_-]+", "-", text)


def _build() -> tuple[dict[str, Language], dict[str, Language]]:
    by_alias: dict[str, Language] = {}
    by_code: dict[str, Language] = {}
    for code, name, script, tess, aliases in _TABLE:
        lang = Language(code, name, script, tess)
        by_code[code] = lang
        for alias in (code, name, tess, *aliases):
            k = _key(alias)
            if k in by_alias and by_alias[k] is not lang:
                raise AssertionError(f"language alias {alias!r} is ambiguous")
            by_alias[k] = lang
    return by_alias, by_code


_BY_ALIAS, _BY_CODE = _build()


def normalize_language(hint: str | None) -> Language | None:
    """One language hint -> its table entry, or None when the hint is empty or unknown.

    Unknown trailing subtags are dropped: "en-US" -> en, "zh-Hant-TW" -> zh-Hant.
    """
    if hint is None:
        return None
    k = _key(hint)
    if not k:
        return None
    while k:
        if k in _BY_ALIAS:
            return _BY_ALIAS[k]
        k = k.rpartition("-")[0]  # "zh-hant-tw" -> "zh-hant", "fr-ca" -> "fr"
    return None


def parse_languages(hint: str | None) -> tuple[Language, ...] | None:
    """A hint that may name several languages ("rus+eng", "ru, en") -> entries in order.

    Returns () for an empty/None hint and None when any part is unknown.
    """
    if hint is None or not hint.strip():
        return ()
    langs: list[Language] = []
    for part in _SPLIT.split(hint.strip()):
        if not part:
            continue
        lang = normalize_language(part)
        if lang is None:
            return None
        if lang not in langs:
            langs.append(lang)
    return tuple(langs)


def by_code(code: str) -> Language:
    """Table entry for a canonical code ("en", "ru", "zh", ...); KeyError if absent."""
    return _BY_CODE[code]


def script_of(hint: str | None) -> str | None:
    """Script family of a single-language hint, None when unknown or empty."""
    lang = normalize_language(hint)
    return lang.script if lang else None
