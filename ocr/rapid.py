"""RapidOCR (PP-OCR models on onnxruntime): Chinese, English, Japanese and Latin-script text.

Only the detection/recognition models bundled in the rapidocr wheel are used, each passed
by file path, so the engine never reaches the network (a model it would have to fetch,
e.g. the Cyrillic one, is simply not offered: ``supports_language("ru")`` is False).

Tuning (measured in ENVIRONMENT.md, "Offline OCR engines"): the detector scales an image down
to ``limit_side_len`` on its longest side instead of up to 736 px on its shortest
(``limit_type=max``), and the angle classifier is off. Both can be changed through the
model's ``options`` in config.yaml:

    options:
      limit_side_len: 1216     # detector input, longest side (px)
      limit_type: max          # "max" (scale down only) or "min" (rapidocr's default)
      use_cls: false           # 180-degree text-line classifier
      intra_op_threads: 2      # onnxruntime threads per inference
      inter_op_threads: 1
      text_score: 0.5          # drop lines recognised with less confidence
      box_thresh: 0.5          # detector box score threshold
      unclip_ratio: 1.6        # detector box growth
      log_level: error         # rapidocr's own logger
      workers: process         # "process": each concurrent call in its own worker process
                               # (ocr/workers.py); "thread": threads sharing one engine
      worker_cancel_grace_s: 10   # a cancelled call's worker may finish its image this long

Thread safety: one loaded ``RapidOCR`` object may be called from several threads at once.
Its call path keeps no per-call state on shared objects as long as no per-call keyword
arguments are passed (it stores those on the engine; this adapter never passes any), the
lazy model loaders are double-checked under locks (and warmed here at load), and
onnxruntime's ``InferenceSession.run`` is thread-safe. Keep ``concurrency`` x
``intra_op_threads`` at or below the core count: on 2 cores, 2 concurrent calls with 2
onnxruntime threads each was the slowest setup measured (onnxruntime's threads spin).

Workers: with ``workers: process`` (the default) the adapter owns a pool of ``concurrency``
long-lived processes (ocr/workers.py), each holding its own engine; a call sends the page's
pixels to an idle one and gets the grouped blocks back. Two calls then share no GIL: the
decoding, numpy and OpenCV work around the ONNX sessions runs truly side by side. Both modes
run the same functions on the same pixels, so their blocks are identical.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core.errors import BadRequest, Cancelled, ModelLoadFailed, ModelNotInstalled, ModelUnavailable
from core.types import CancelToken, Capability, OcrBlock, OcrResult
from models.adapter import InstallState, ModelSpec, OcrOptions
from ocr.languages import parse_languages
from ocr.workers import WorkerPool

log = logging.getLogger("chatvlm.ocr.rapid")

# The PP-OCRv6 small models shipped inside the rapidocr 3.x wheel (rapidocr/models/).
BUNDLED_MODELS = {
    "det": "PP-OCRv6_det_small.onnx",
    "rec": "PP-OCRv6_rec_small.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
}

# Scripts the bundled multilingual recogniser reads (rapidocr's PP-OCRv6 language list:
# ch, chinese_cht, en, japan and ~50 Latin-script languages; no Cyrillic, Korean, ...).
SUPPORTED_SCRIPTS = frozenset({"latin", "han", "japanese"})

DEFAULT_OPTIONS: dict[str, Any] = {
    "limit_side_len": 1216,
    "limit_type": "max",
    "use_cls": False,
    "intra_op_threads": 2,
    "inter_op_threads": 1,
    "text_score": 0.5,
    "box_thresh": 0.5,
    "unclip_ratio": 1.6,
    "log_level": "error",
    "workers": "process",
    "worker_cancel_grace_s": 10.0,
}

# onnxruntime sessions, kernels and working buffers on top of the weights: the process
# grew by ~108 MB at load + warm-up and by ~255 MB after a few receipt-sized pages (the
# .onnx files being ~31 MB of that); the rest is counted here.
_RUNTIME_OVERHEAD_BYTES = 224 * 2**20


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _bundled_model_paths() -> dict[str, Path] | None:
    pkg = _package_dir("rapidocr")
    if pkg is None:
        return None
    return {task: pkg / "models" / fname for task, fname in BUNDLED_MODELS.items()}


class RapidOcrAdapter:
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.OCR})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._engine: Any = None  # workers: thread
        self._pool: WorkerPool | None = None  # workers: process
        self._model_bytes = 0
        self._lock = threading.Lock()  # load/unload only; inference runs unlocked

    # ---- installation ------------------------------------------------------------

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        if _package_dir("onnxruntime") is None:
            return InstallState(False, "onnxruntime is not installed; pip install onnxruntime")
        paths = _bundled_model_paths()
        if paths is None:
            return InstallState(False, "rapidocr is not installed; pip install 'rapidocr>=3.10,<4'")
        needed = ("det", "rec", "cls") if (spec.options or {}).get("use_cls") else ("det", "rec")
        missing = [BUNDLED_MODELS[t] for t in needed if not paths[t].is_file()]
        if missing:
            return InstallState(False, "the rapidocr package lacks its bundled models ("
                                + ", ".join(missing) + "); reinstall rapidocr>=3.10")
        return InstallState(True)

    # ---- lifecycle ---------------------------------------------------------------

    def load(self) -> None:
        with self._lock:
            if self._engine is not None or self._pool is not None:
                return
            state = self.check_installed(self.spec)
            if not state.installed:
                raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
            opts = _options(self.spec)
            paths = _bundled_model_paths()
            assert paths is not None
            cache_dir = Path(self.spec.data_dir) / "rapidocr"
            try:
                if opts["workers"] == "process":
                    pool = WorkerPool(self.spec.id, self.spec.concurrency, "ocr.rapid:_worker_init",
                                      "ocr.rapid:_worker_read", (opts, paths, cache_dir, True),
                                      cancel_grace_s=opts["worker_cancel_grace_s"])
                    pool.start()
                    self._pool = pool
                else:
                    self._engine = _worker_init(opts, paths, cache_dir)
            except ModelLoadFailed as exc:
                log.error("loading %s failed: %s", self.spec.id, exc.message)
                raise
            except Exception:
                log.exception("loading %s failed", self.spec.id)
                raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
            used = ("det", "rec", "cls") if opts["use_cls"] else ("det", "rec")
            self._model_bytes = sum(paths[t].stat().st_size for t in used)
            log.info("loaded %s (rapidocr, det limit %s=%s, cls %s, %s threads, %s workers)", self.spec.id,
                     opts["limit_type"], opts["limit_side_len"], "on" if opts["use_cls"] else "off",
                     opts["intra_op_threads"], opts["workers"])

    def unload(self) -> None:
        with self._lock:
            # Thread mode: calls in flight keep their own reference and finish; the sessions go
            # with the last one. Process mode: the worker processes are stopped now.
            pool, self._pool = self._pool, None
            self._engine = None
            self._model_bytes = 0
        if pool is not None:
            pool.close()

    @property
    def cpu_threads(self) -> int:
        """CPU threads one call keeps busy (ONNX Runtime's intra-op threads, in a worker process
        or here): held in the CPU share while it runs (models/runner.py)."""
        return int(_options(self.spec)["intra_op_threads"])

    @property
    def worker_pool(self) -> WorkerPool | None:
        """The worker processes (``workers: process``), None in thread mode or when unloaded."""
        return self._pool

    def memory_bytes(self) -> int:
        pool = self._pool
        if pool is not None:  # the engines live in the workers: their resident memory, measured
            return sum(pool.rss_bytes().values())
        if self._engine is None:
            return 0
        return self._model_bytes + _RUNTIME_OVERHEAD_BYTES

    def supports_language(self, language: str | None) -> bool:
        if language is None or not language.strip():
            return True
        langs = parse_languages(language)
        if not langs:  # unknown name
            return False
        return all(lang.script in SUPPORTED_SCRIPTS for lang in langs)

    # ---- inference ---------------------------------------------------------------

    def ocr(self, image: Image.Image, options: OcrOptions, cancel: CancelToken) -> OcrResult:
        engine, pool = self._engine, self._pool
        if engine is None and pool is None:
            raise ModelUnavailable(f"model '{self.spec.id}' is not loaded")
        if not self.supports_language(options.language):
            raise BadRequest(f"model '{self.spec.id}' cannot read {options.language!r} text",
                             param="language", code="LANGUAGE_NOT_SUPPORTED")
        if cancel.cancelled:
            raise Cancelled("request cancelled")
        rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        lines = pool.call(rgb, cancel) if pool is not None else _worker_read(engine, rgb)
        if cancel.cancelled:
            raise Cancelled("request cancelled")
        return OcrResult(text=_join_lines(lines), blocks=[b for line in lines for b in line],
                         model=self.spec.id)


# ---- helpers -------------------------------------------------------------------------

def _options(spec: ModelSpec) -> dict[str, Any]:
    opts = dict(DEFAULT_OPTIONS)
    given = dict(spec.options or {})
    if "threads" in given and "intra_op_threads" not in given:
        given["intra_op_threads"] = given.pop("threads")
    unknown = sorted(set(given) - set(DEFAULT_OPTIONS))
    if unknown:
        log.warning("model %s: ignoring unknown rapidocr options %s", spec.id, ", ".join(unknown))
    for key in DEFAULT_OPTIONS:
        if key in given and given[key] is not None:
            opts[key] = given[key]
    opts["limit_side_len"] = int(opts["limit_side_len"])
    opts["limit_type"] = str(opts["limit_type"]).lower()
    if opts["limit_type"] not in ("max", "min"):
        raise ModelLoadFailed(f"model '{spec.id}': option limit_type must be 'max' or 'min'")
    opts["use_cls"] = bool(opts["use_cls"])
    opts["intra_op_threads"] = int(opts["intra_op_threads"])
    opts["inter_op_threads"] = int(opts["inter_op_threads"])
    opts["workers"] = str(opts["workers"]).lower()
    if opts["workers"] not in ("process", "thread"):
        raise ModelLoadFailed(f"model '{spec.id}': option workers must be 'process' or 'thread'")
    opts["worker_cancel_grace_s"] = float(opts["worker_cancel_grace_s"])
    return opts


def _build_engine(opts: dict[str, Any], paths: dict[str, Path], cache_dir: Path) -> Any:
    from rapidocr import RapidOCR

    ort = "EngineConfig.onnxruntime."
    params: dict[str, Any] = {
        "Global.log_level": str(opts["log_level"]).lower(),
        "Global.use_cls": opts["use_cls"],
        "Global.text_score": float(opts["text_score"]),
        # Only consulted by code paths that would fetch a file (none with explicit model
        # paths); keeps anything rapidocr might write out of site-packages and $HOME.
        "Global.model_root_dir": str(cache_dir),
        "Det.model_path": str(paths["det"]),
        "Rec.model_path": str(paths["rec"]),
        "Cls.model_path": str(paths["cls"]),
        "Det.limit_type": opts["limit_type"],
        "Det.limit_side_len": opts["limit_side_len"],
        "Det.box_thresh": float(opts["box_thresh"]),
        "Det.unclip_ratio": float(opts["unclip_ratio"]),
        ort + "intra_op_num_threads": opts["intra_op_threads"],
        ort + "inter_op_num_threads": opts["inter_op_threads"],
        ort + "coreml_ep_cfg.ModelCacheDirectory": str(cache_dir / "coreml"),
    }
    return RapidOCR(params=params)


def _warm_up(engine: Any) -> None:
    """Run detection and recognition once: the first call builds onnxruntime's kernels."""
    img = Image.new("RGB", (320, 64), "white")
    draw = ImageDraw.Draw(img)
    try:
        font: Any = ImageFont.load_default(size=32)
    except (OSError, TypeError):
        font = ImageFont.load_default()
    draw.text((12, 12), "Warm up 123", font=font, fill="black")
    engine(np.ascontiguousarray(np.asarray(img)[:, :, ::-1]))


def _worker_init(opts: dict[str, Any], paths: dict[str, Path], cache_dir: Path, own_process: bool = False) -> Any:
    """A warmed-up engine (in a worker process, or in this one in thread mode)."""
    if own_process:  # a worker is one of `concurrency` processes: OpenCV's own pool would oversubscribe
        import cv2

        cv2.setNumThreads(opts["intra_op_threads"])
    engine = _build_engine(opts, paths, cache_dir)
    _warm_up(engine)
    return engine


def _worker_read(engine: Any, rgb: np.ndarray) -> list[list[OcrBlock]]:
    """One page's RGB pixels -> blocks grouped into lines (the same code in both modes)."""
    bgr = _pad_thin(np.ascontiguousarray(rgb[:, :, ::-1]))
    # No keyword arguments: rapidocr stores them on the shared engine (not thread-safe).
    return _to_blocks(engine(bgr), rgb.shape[1], rgb.shape[0])


# rapidocr rescales so that the longest side is <= 2000 px and rounds sides to multiples of
# 32; a side that rounds to 0 raises. Thin images get a border so the short side stays >= 32.
_MIN_SIDE = 32
_MAX_ASPECT = 50


def _pad_thin(bgr: np.ndarray) -> np.ndarray:
    """Pad the right/bottom of a very thin or tiny image (box coordinates do not move)."""
    h, w = bgr.shape[:2]
    need = max(_MIN_SIDE, -(-max(h, w) // _MAX_ASPECT))
    pad_h, pad_w = max(0, need - h), max(0, need - w)
    if not pad_h and not pad_w:
        return bgr
    border = np.concatenate([bgr[0], bgr[-1], bgr[:, 0], bgr[:, -1]]).reshape(-1, 3)
    colour = np.median(border, axis=0).astype(np.uint8)
    out = np.empty((h + pad_h, w + pad_w, 3), dtype=np.uint8)
    out[:] = colour
    out[:h, :w] = bgr
    return out


def _to_blocks(result: Any, width: int, height: int) -> list[list[OcrBlock]]:
    """rapidocr output -> blocks grouped into lines, lines top to bottom, blocks left to right."""
    boxes = getattr(result, "boxes", None)
    txts = getattr(result, "txts", None)
    scores = getattr(result, "scores", None)
    if boxes is None or txts is None or len(txts) == 0:
        return []
    if scores is None:
        scores = [None] * len(txts)
    items: list[OcrBlock] = []
    for poly, text, score in zip(boxes, txts, scores):
        text = str(text).strip()
        if not text:
            continue
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        x1 = min(max(int(math.floor(pts[:, 0].min())), 0), width)
        y1 = min(max(int(math.floor(pts[:, 1].min())), 0), height)
        x2 = min(max(int(math.ceil(pts[:, 0].max())), 0), width)
        y2 = min(max(int(math.ceil(pts[:, 1].max())), 0), height)
        conf = None if score is None else min(max(float(score), 0.0), 1.0)
        items.append(OcrBlock(text=text, box=(x1, y1, x2, y2), confidence=conf))
    return group_lines(items)


def group_lines(blocks: list[OcrBlock]) -> list[list[OcrBlock]]:
    """Reading order: boxes whose vertical centres lie within half a box height of a
    line's centre belong to that line; lines top to bottom, boxes left to right."""
    def centre(b: OcrBlock) -> float:
        assert b.box is not None
        return (b.box[1] + b.box[3]) / 2

    def height(b: OcrBlock) -> float:
        assert b.box is not None
        return max(b.box[3] - b.box[1], 1)

    lines: list[list[OcrBlock]] = []
    line_centre = line_height = 0.0
    for b in sorted(blocks, key=centre):
        if lines and abs(centre(b) - line_centre) <= 0.5 * min(height(b), line_height):
            lines[-1].append(b)
            n = len(lines[-1])
            line_centre += (centre(b) - line_centre) / n
            line_height += (height(b) - line_height) / n
        else:
            lines.append([b])
            line_centre, line_height = centre(b), height(b)
    return [sorted(line, key=lambda b: b.box[0]) for line in lines]  # type: ignore[index]


def _join_lines(lines: list[list[OcrBlock]]) -> str:
    return "\n".join(" ".join(b.text for b in line) for line in lines)
