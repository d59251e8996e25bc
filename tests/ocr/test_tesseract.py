"""ocr.tesseract: Tesseract through tesserocr, run for real on samples/.

Skipped only when tesserocr or the tessdata folder is really missing (CI installs both:
``apt-get install tesseract-ocr tesseract-ocr-rus tesseract-ocr-chi-sim``).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from core.errors import BadRequest, Cancelled, ModelLoadFailed, ModelUnavailable
from core.types import CancelToken, Capability
from models.adapter import ModelSpec, OcrOptions, adapter_class
from ocr.tesseract import DEFAULT_TESSDATA, TesseractAdapter, tessdata_dir
from tests.ocr import assert_blocks_sane, expected, load_rgb, similarity


def _spec(**options) -> ModelSpec:
    return ModelSpec(id="tesseract", name="Tesseract", kind="tesseract", options=options, concurrency=2)


_STATE = TesseractAdapter.check_installed(_spec())
TESSDATA = tessdata_dir(_spec())
needs_tesseract = pytest.mark.skipif(not _STATE.installed, reason=_STATE.reason)


def needs_lang(*codes: str):
    missing = [c for c in codes if not (TESSDATA / f"{c}.traineddata").is_file()]
    return pytest.mark.skipif(bool(missing) or not _STATE.installed,
                              reason=f"no {'+'.join(missing)} traineddata at {TESSDATA}")


@pytest.fixture(scope="module")
def adapter():
    if not _STATE.installed:
        pytest.skip(_STATE.reason)
    a = TesseractAdapter(_spec())
    a.load()
    yield a
    a.unload()


def _ocr(adapter, name_or_image, language=None, cancel=None):
    image = load_rgb(name_or_image) if isinstance(name_or_image, str) else name_or_image
    return adapter.ocr(image, OcrOptions(language=language), cancel or CancelToken())


# ---- installation ------------------------------------------------------------------

def test_registered() -> None:
    assert adapter_class("tesseract") is TesseractAdapter
    assert TesseractAdapter.capabilities == frozenset({Capability.OCR})


def test_bad_tessdata_path_is_not_installed(tmp_path) -> None:
    bad = tmp_path / "nowhere"
    state = TesseractAdapter.check_installed(_spec(tessdata=str(bad)))
    assert not state.installed
    assert "Tesseract data not found at" in state.reason and bad.as_posix() in state.reason
    assert "apt-get install tesseract-ocr" in state.reason
    with pytest.raises(Exception) as err:
        TesseractAdapter(_spec(tessdata=str(bad))).load()
    assert getattr(err.value, "code", "") == "MODEL_NOT_INSTALLED"


def test_tessdata_location(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TESSDATA_PREFIX", raising=False)
    assert tessdata_dir(_spec()) == DEFAULT_TESSDATA
    folder = tmp_path / "tessdata"
    folder.mkdir()
    (folder / "eng.traineddata").write_bytes(b"")
    monkeypatch.setenv("TESSDATA_PREFIX", str(folder))
    assert tessdata_dir(_spec()) == folder
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))  # the pre-4.0 style: its parent
    assert tessdata_dir(_spec()) == folder
    assert tessdata_dir(_spec(tessdata="/opt/td")) == Path("/opt/td")  # options win


# ---- reading -----------------------------------------------------------------------

@needs_lang("rus", "eng")
@pytest.mark.parametrize("language", ["Russian", "ru", "rus", "русский"])
def test_russian_receipt(adapter, language: str) -> None:
    image = load_rgb("receipt_ru.png")
    result = _ocr(adapter, image, language)
    assert similarity(result.text, expected()["receipt_ru.png"]["text"]) >= 0.95, result.text
    assert result.model == "tesseract"
    assert_blocks_sane(result, image)
    lines = result.text.split("\n")
    assert lines[0] == "ООО «Ромашка»"
    assert any("USB-C" in line for line in lines)  # Latin inside Russian: rus+eng
    assert len(lines) == len(expected()["receipt_ru.png"]["text"].split("\n"))
    tops = [b.box[1] for b in result.blocks]
    assert tops == sorted(tops)


@needs_tesseract
@pytest.mark.parametrize("language", [None, "English"])
def test_english_receipt(adapter, language) -> None:
    image = load_rgb("receipt_en.png")
    result = _ocr(adapter, image, language)
    assert similarity(result.text, expected()["receipt_en.png"]["text"]) >= 0.95, result.text
    assert_blocks_sane(result, image)
    assert "Milk 2L 1.45" in result.text.split("\n")  # PSM 6 keeps item and price together


@needs_lang("chi_sim")
@pytest.mark.parametrize("name", ["line_zh.png", "doc_zh.png"])
def test_chinese(adapter, name: str) -> None:
    image = load_rgb(name)
    result = _ocr(adapter, image, "Chinese")
    want = expected()[name]["text"]
    assert similarity(result.text, want, drop_spaces=True) >= 0.9, result.text
    assert " " not in result.text.split("\n")[0]  # no spaces between Chinese words
    assert len(result.text.split("\n")) == len(want.split("\n"))  # line order kept
    assert_blocks_sane(result, image)


@needs_lang("rus")
def test_russian_line_without_hint(adapter) -> None:
    result = _ocr(adapter, "line_ru.png")  # default eng+rus
    assert similarity(result.text, expected()["line_ru.png"]["text"]) >= 0.95, result.text


@needs_tesseract
def test_blank_image(adapter) -> None:
    result = _ocr(adapter, Image.new("RGB", (200, 80), "white"), "en")
    assert result.text == "" and result.blocks == []


# ---- languages -----------------------------------------------------------------------

@needs_lang("rus", "chi_sim", "eng")
@pytest.mark.parametrize("language, tess", [
    (None, "eng+rus"), ("", "eng+rus"),
    ("Russian", "rus+eng"), ("ru", "rus+eng"), ("rus", "rus+eng"), ("русский", "rus+eng"),
    ("RUSSIAN", "rus+eng"),
    ("Chinese", "chi_sim"), ("zh", "chi_sim"), ("chi_sim", "chi_sim"), ("中文", "chi_sim"),
    ("English", "eng"), ("en", "eng"), ("eng", "eng"),
    ("rus+eng", "rus+eng"), ("en, ru", "eng+rus"),
    ("Japanese", None), ("Klingon", None), ("Ukrainian", None), ("chi_tra", None), ("osd", None),
])
def test_language_mapping(language, tess) -> None:
    a = TesseractAdapter(_spec())
    assert a.resolve_language(language) == tess
    assert a.supports_language(language) is (tess is not None or language is None)


@needs_tesseract
def test_only_installed_languages_are_offered(tmp_path) -> None:
    td = tmp_path / "tessdata"
    td.mkdir()
    (td / "eng.traineddata").symlink_to(TESSDATA / "eng.traineddata")
    a = TesseractAdapter(_spec(tessdata=str(td)))
    assert a.check_installed(a.spec).installed
    assert a.supports_language(None) and a.supports_language("English")
    assert not a.supports_language("Russian") and not a.supports_language("Chinese")
    assert a.resolve_language(None) == "eng"  # default eng+rus, without the missing rus
    a.load()
    try:
        result = _ocr(a, "receipt_en.png")
        assert similarity(result.text, expected()["receipt_en.png"]["text"]) >= 0.95
        with pytest.raises(BadRequest) as err:
            _ocr(a, "receipt_ru.png", "Russian")
        assert err.value.param == "language"
    finally:
        a.unload()


# ---- instances, threads, lifecycle -----------------------------------------------------

@needs_tesseract
def test_instances_are_reused_and_threads_get_their_own() -> None:
    a = TesseractAdapter(_spec())
    a.load()
    try:
        pool = a._pool
        warm = sorted(pool.live_languages())
        for _ in range(3):
            _ocr(a, "receipt_en.png", "English")
        assert sorted(pool.live_languages()) == sorted(warm + ["eng"])  # one more, not three

        image = load_rgb("receipt_en.png")
        reference = _ocr(a, image, "English").text
        outputs: list[str] = []
        barrier = threading.Barrier(2)

        def worker() -> None:
            barrier.wait()
            for _ in range(3):
                outputs.append(_ocr(a, image, "English").text)

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outputs == [reference] * 6
        assert 1 <= pool.live_languages().count("eng") <= 2
        assert a.memory_bytes() > 0
    finally:
        a.unload()
    assert a.memory_bytes() == 0
    assert a._pool is None and pool.live_languages() == []
    with pytest.raises(ModelUnavailable):
        _ocr(a, "receipt_en.png")


@needs_tesseract
def test_cancel(adapter) -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        _ocr(adapter, "receipt_en.png", cancel=token)
    with pytest.raises(Cancelled):
        _ocr(adapter, "receipt_en.png", cancel=CancelToken(deadline=time.monotonic() - 1))
    # A deadline that passes during recognition stops Tesseract through its own timeout.
    big = load_rgb("receipt_en.png").resize((1920, 2124))
    with pytest.raises(Cancelled):
        _ocr(adapter, big, "en", cancel=CancelToken(deadline=time.monotonic() + 0.02))
    # ...and the instance is still good afterwards.
    result = _ocr(adapter, "receipt_en.png", "en")
    assert similarity(result.text, expected()["receipt_en.png"]["text"]) >= 0.95


@needs_tesseract
def test_bad_psm_option_fails_load() -> None:
    with pytest.raises(ModelLoadFailed):
        TesseractAdapter(_spec(psm="diagonal")).load()


@needs_lang("rus", "eng")
def test_psm_option_by_name() -> None:
    a = TesseractAdapter(_spec(psm="single_line"))
    a.load()
    try:
        result = _ocr(a, "line_ru.png", "ru")
        assert similarity(result.text, expected()["line_ru.png"]["text"]) >= 0.95
    finally:
        a.unload()
