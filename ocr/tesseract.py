"""Tesseract 5 through tesserocr: the CPU engine for Russian (and the other installed languages).

The tessdata folder is, in order: ``options.tessdata`` in config.yaml, ``$TESSDATA_PREFIX``,
then Debian's ``/usr/share/tesseract-ocr/5/tessdata/``
(``apt-get install tesseract-ocr tesseract-ocr-rus tesseract-ocr-chi-sim``). Only languages
whose ``.traineddata`` is in that folder are offered.

Options (config.yaml, ``models.<id>.options``):

    tessdata: /usr/share/tesseract-ocr/5/tessdata/
    psm: 6                   # page segmentation mode; 6 = one uniform block of text
    default_language: eng+rus   # used when a request gives no language hint

Choices, measured on samples/ (difflib ratio of whitespace-normalised text, tessdata_fast
models of Debian): PSM 6 reads single lines and multi-line receipts alike (PSM 3, the
default layout analysis, moves a receipt's right-hand price column below the item
names and reorders Chinese lines; PSM 7 returns nothing for more than one line).
Russian is read as ``rus+eng`` (0.998 on receipt_ru.png; ``rus`` alone reads "USB-C" as
"Ц$В-С", 0.982). With no hint ``eng+rus`` reads both English (1.000) and Russian (0.998)
receipts; ``rus+eng`` would turn "CORNER MARKET" into Cyrillic look-alikes. An explicit
English hint uses ``eng`` alone.

Threads: a ``PyTessBaseAPI`` must never be used by two threads at once, but separate
instances recognise in parallel (tesserocr releases the GIL). Instances are therefore
pooled per language set: a call checks one out, creates it only when none is idle, and
puts it back. So there are at most as many instances per language set as calls that ran
at once, none is created per request once warm, and ``unload()`` can end every instance
safely (one in use is ended when it comes back). The wheel's libtesseract is built
without OpenMP, so ``OMP_THREAD_LIMIT`` has no effect on it (it does matter for the
``tesseract`` command line program); nothing here sets environment variables.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from core.errors import (BadRequest, Cancelled, ModelLoadFailed, ModelNotInstalled, ModelUnavailable,
                         ServerError)
from core.types import CancelToken, Capability, OcrBlock, OcrResult
from models.adapter import InstallState, ModelSpec, OcrOptions
from ocr.languages import Language, parse_languages

log = logging.getLogger("chatvlm.ocr.tesseract")

DEFAULT_TESSDATA = Path("/usr/share/tesseract-ocr/5/tessdata")
DEFAULT_PSM = 6  # PSM.SINGLE_BLOCK
DEFAULT_LANGUAGE = "eng+rus"
INSTALL_HINT = "apt-get install tesseract-ocr"

# Scripts whose documents usually carry Latin words too (brands, units, "USB-C"): the
# hint's language is loaded first and English after it.
LATIN_COMPANION_SCRIPTS = frozenset({"cyrillic"})

# tessdata files that are not reading languages.
_NOT_LANGUAGES = frozenset({"osd", "equ"})

# Resident memory of one initialised instance, measured per tessdata_fast language (MiB);
# others are estimated from the file size. Plus working memory per instance.
_MEASURED_MIB = {"eng": 16, "rus": 12, "chi_sim": 44}
_INSTANCE_OVERHEAD = 8 * 2**20

_PSM_NAMES = {
    "osd_only": 0, "auto_osd": 1, "auto_only": 2, "auto": 3, "single_column": 4,
    "single_block_vert_text": 5, "single_block": 6, "single_line": 7, "single_word": 8,
    "circle_word": 9, "single_char": 10, "sparse_text": 11, "sparse_text_osd": 12, "raw_line": 13,
}


def tessdata_dir(spec: ModelSpec) -> Path:
    """The tessdata folder this model uses (options.tessdata > $TESSDATA_PREFIX > Debian's)."""
    configured = (spec.options or {}).get("tessdata") or os.environ.get("TESSDATA_PREFIX")
    if not configured:
        return DEFAULT_TESSDATA
    path = Path(str(configured)).expanduser()
    # TESSDATA_PREFIX is the tessdata folder itself since Tesseract 4; older setups name its parent.
    if not (path / "eng.traineddata").is_file() and (path / "tessdata" / "eng.traineddata").is_file():
        return path / "tessdata"
    return path


def installed_languages(path: Path) -> frozenset[str]:
    try:
        return frozenset(p.name[: -len(".traineddata")] for p in path.iterdir()
                         if p.name.endswith(".traineddata") and p.is_file()) - _NOT_LANGUAGES
    except OSError:
        return frozenset()


def _psm(value: Any) -> int:
    if isinstance(value, str) and not value.strip().isdigit():
        key = value.strip().lower().replace("-", "_").removeprefix("psm.")
        if key not in _PSM_NAMES:
            raise ValueError(f"unknown page segmentation mode {value!r}")
        return _PSM_NAMES[key]
    psm = int(value)
    if not 0 <= psm <= 13:
        raise ValueError(f"page segmentation mode {psm} is out of range 0..13")
    return psm


class _ApiPool:
    """Idle PyTessBaseAPI instances per language set; each is used by one thread at a time."""

    def __init__(self, path: Path, psm: int, max_idle: int) -> None:
        self.path = path
        self.psm = psm
        self.max_idle = max(1, max_idle)
        self._idle: dict[str, list[Any]] = {}
        self._live: dict[int, str] = {}  # id(api) -> language set, every instance not yet ended
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._closed = False

    def acquire(self, lang: str) -> Any:
        with self._lock:
            if self._closed:
                raise ModelUnavailable("the Tesseract model was unloaded")
            idle = self._idle.get(lang)
            if idle:
                return idle.pop()
        import tesserocr

        # Creation is rare; doing one at a time keeps Init's file reading and any
        # process-wide parameter set-up from overlapping.
        with self._create_lock:
            try:
                api = tesserocr.PyTessBaseAPI(path=str(self.path) + os.sep, lang=lang, psm=self.psm)
            except RuntimeError:
                log.exception("Tesseract could not initialise %s from %s", lang, self.path)
                raise ServerError("Tesseract could not load its language data") from None
        with self._lock:
            self._live[id(api)] = lang
            closed = self._closed
        if closed:
            self._end(api)
            raise ModelUnavailable("the Tesseract model was unloaded")
        return api

    def release(self, lang: str, api: Any) -> None:
        with self._lock:
            if not self._closed:
                idle = self._idle.setdefault(lang, [])
                if len(idle) < self.max_idle:
                    idle.append(api)
                    return
        self._end(api)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [api for apis in self._idle.values() for api in apis]
            self._idle.clear()
        for api in idle:
            self._end(api)

    def live_languages(self) -> list[str]:
        with self._lock:
            return list(self._live.values())

    def _end(self, api: Any) -> None:
        with self._lock:
            self._live.pop(id(api), None)
        try:
            api.End()
        except Exception:  # pragma: no cover - End() does not fail in practice
            log.debug("PyTessBaseAPI.End failed", exc_info=True)


class TesseractAdapter:
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.OCR})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.path = tessdata_dir(spec)
        self._languages: frozenset[str] | None = None
        self._pool: _ApiPool | None = None
        self._lock = threading.Lock()

    cpu_threads = 1  # a call recognises on its own thread (the wheel's libtesseract has no OpenMP)

    # ---- installation ------------------------------------------------------------

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        try:
            found = importlib.util.find_spec("tesserocr") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return InstallState(False, "tesserocr is not installed; pip install tesserocr")
        path = tessdata_dir(spec)
        if not (path / "eng.traineddata").is_file():
            return InstallState(False, f"Tesseract data not found at {path.as_posix()}; {INSTALL_HINT}")
        return InstallState(True)

    # ---- lifecycle ---------------------------------------------------------------

    def load(self) -> None:
        with self._lock:
            if self._pool is not None:
                return
            if not self.check_installed(self.spec).installed:
                raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
            self._languages = installed_languages(self.path)
            try:
                psm = _psm((self.spec.options or {}).get("psm", DEFAULT_PSM))
                pool = _ApiPool(self.path, psm, self.spec.concurrency)
                # Warm one instance for requests without a hint; it also proves Init works.
                lang = self.resolve_language(None)
                assert lang is not None
                pool.release(lang, pool.acquire(lang))
            except Exception:
                log.exception("loading %s from %s failed", self.spec.id, self.path)
                raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
            self._pool = pool
            log.info("loaded %s (tesseract %s, psm %d, languages %s)", self.spec.id,
                     self.path.as_posix(), psm, "+".join(sorted(self._languages)))

    def unload(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def memory_bytes(self) -> int:
        pool = self._pool
        if pool is None:
            return 0
        total = 0
        for lang in pool.live_languages():
            total += _INSTANCE_OVERHEAD
            for code in lang.split("+"):
                if code in _MEASURED_MIB:
                    total += _MEASURED_MIB[code] * 2**20
                else:
                    f = self.path / f"{code}.traineddata"
                    total += 4 * f.stat().st_size if f.is_file() else 0
        return total

    # ---- languages ---------------------------------------------------------------

    def available_languages(self) -> frozenset[str]:
        if self._languages is None:
            self._languages = installed_languages(self.path)
        return self._languages

    def resolve_language(self, hint: str | None) -> str | None:
        """A client's hint -> the Tesseract language string ("rus+eng"), None if not installed."""
        have = self.available_languages()
        if hint is None or not hint.strip():
            default = str((self.spec.options or {}).get("default_language", DEFAULT_LANGUAGE))
            codes = [c for c in default.split("+") if c in have]
            return "+".join(codes) or ("eng" if "eng" in have else None)
        langs = parse_languages(hint)
        if langs is None:  # not a language name we know: maybe a raw tessdata name ("chi_sim_vert")
            raw = [c.strip() for c in hint.split("+")]
            return "+".join(raw) if raw and all(c in have for c in raw) else None
        return self._codes(langs, have)

    @staticmethod
    def _codes(langs: tuple[Language, ...], have: frozenset[str]) -> str | None:
        codes = [lang.tesseract for lang in langs]
        if any(c not in have for c in codes):
            return None
        if len(langs) == 1 and langs[0].script in LATIN_COMPANION_SCRIPTS and "eng" in have:
            codes.append("eng")
        return "+".join(codes)

    def supports_language(self, language: str | None) -> bool:
        if language is None:
            return True
        return self.resolve_language(language) is not None

    # ---- inference ---------------------------------------------------------------

    def ocr(self, image: Image.Image, options: OcrOptions, cancel: CancelToken) -> OcrResult:
        pool = self._pool
        if pool is None:
            raise ModelUnavailable(f"model '{self.spec.id}' is not loaded")
        lang = self.resolve_language(options.language)
        if lang is None:
            raise BadRequest(f"model '{self.spec.id}' has no Tesseract data for {options.language!r}",
                             param="language", code="LANGUAGE_NOT_SUPPORTED")
        if cancel.cancelled:
            raise Cancelled("request cancelled")
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        api = pool.acquire(lang)
        try:
            api.SetImage(rgb)
            ok = api.Recognize(timeout=_remaining_ms(cancel))
            if cancel.cancelled:
                raise Cancelled("request cancelled")
            if not ok:
                raise ServerError(f"model '{self.spec.id}' could not read the image")
            blocks = _lines(api, rgb.width, rgb.height)
        finally:
            try:
                api.Clear()  # drop the image and results now rather than at the next call
            finally:
                pool.release(lang, api)
        return OcrResult(text="\n".join(b.text for b in blocks), blocks=blocks, model=self.spec.id)


def _remaining_ms(cancel: CancelToken) -> int:
    """Tesseract's own timeout (ms) from the token's deadline; 0 means none."""
    if cancel.deadline is None:
        return 0
    return max(1, int((cancel.deadline - time.monotonic()) * 1000))


# Han, kana, CJK punctuation and full-width forms: scripts written without spaces.
_CJK = ("\u2e80-\u2fdf\u3000-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
        "\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef")
_CJK_GAP = re.compile(f"(?<=[{_CJK}])[ \t]+|[ \t]+(?=[{_CJK}])")


def _close_cjk_gaps(text: str) -> str:
    """Tesseract's iterator puts a space after every Chinese "word" ("今天 天 气"); the
    page text honours chi_sim's preserve_interword_spaces, the line iterator does not."""
    return _CJK_GAP.sub("", text)


def _lines(api: Any, width: int, height: int) -> list[OcrBlock]:
    """Text lines in Tesseract's reading order, with their boxes and confidences (0..1)."""
    from tesserocr import RIL, iterate_level

    level = RIL.TEXTLINE
    iterator = api.GetIterator()
    if iterator is None:
        return []
    blocks: list[OcrBlock] = []
    for it in iterate_level(iterator, level):
        if it.Empty(level):
            continue
        text = _close_cjk_gaps((it.GetUTF8Text(level) or "").strip())
        if not text:
            continue
        bbox = it.BoundingBox(level)
        box = None
        if bbox is not None:
            x1, y1, x2, y2 = (int(v) for v in bbox)
            box = (min(max(x1, 0), width), min(max(y1, 0), height),
                   min(max(x2, 0), width), min(max(y2, 0), height))
        conf = min(max(float(it.Confidence(level)) / 100.0, 0.0), 1.0)
        blocks.append(OcrBlock(text=text, box=box, confidence=conf))
    return blocks
