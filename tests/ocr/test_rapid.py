"""ocr.rapid: RapidOCR with its bundled PP-OCR models, run for real on samples/."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from core.errors import BadRequest, Cancelled, ModelUnavailable
from core.types import CancelToken, Capability, OcrBlock
from models.adapter import ModelSpec, OcrOptions, adapter_class
from ocr.rapid import RapidOcrAdapter, group_lines
from tests.ocr import SAMPLES, assert_blocks_sane, expected, load_rgb, similarity


def _spec(tmp: Path, **options) -> ModelSpec:
    return ModelSpec(id="rapidocr", name="RapidOCR", kind="rapidocr", data_dir=tmp, options=options)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    a = RapidOcrAdapter(_spec(tmp_path_factory.mktemp("rapid_data")))
    a.load()
    yield a
    a.unload()


def _ocr(adapter, name_or_image, language=None, cancel=None):
    image = load_rgb(name_or_image) if isinstance(name_or_image, str) else name_or_image
    return adapter.ocr(image, OcrOptions(language=language), cancel or CancelToken())


def test_registered_and_installed(tmp_path) -> None:
    assert adapter_class("rapidocr") is RapidOcrAdapter
    assert RapidOcrAdapter.capabilities == frozenset({Capability.OCR})
    state = RapidOcrAdapter.check_installed(_spec(tmp_path))
    assert state.installed, state.reason


def test_samples_match_their_generator(tmp_path) -> None:
    """samples/ is what scripts/make_samples.py writes (texts exactly; images by size)."""
    from scripts.make_samples import write_samples

    regenerated = write_samples(tmp_path)
    assert regenerated == expected()
    for name in regenerated:
        with Image.open(SAMPLES / name) as committed, Image.open(tmp_path / name) as fresh:
            assert committed.size == fresh.size, name
            assert max(committed.size) <= 1200, name
        assert (SAMPLES / name).stat().st_size < 200_000, name


def test_english_receipt(adapter) -> None:
    image = load_rgb("receipt_en.png")
    result = _ocr(adapter, image, "English")
    want = expected()["receipt_en.png"]["text"]
    assert similarity(result.text, want) >= 0.95, result.text
    assert result.model == "rapidocr"
    assert_blocks_sane(result, image)
    lines = result.text.split("\n")
    # Reading order: top to bottom, and an item and its right-aligned price on one line.
    assert lines[0] == "CORNER MARKET"
    assert "Milk 2L 1.45" in lines
    assert lines[-1].startswith("Thank you")
    assert len(lines) == len(want.split("\n"))
    centres = [(b.box[1] + b.box[3]) / 2 for b in result.blocks]
    assert all(b >= a - 10 for a, b in zip(centres, centres[1:])), centres


@pytest.mark.parametrize("name, language", [("line_zh.png", "Chinese"), ("doc_zh.png", "zh"),
                                            ("line_zh.png", None)])
def test_chinese(adapter, name: str, language) -> None:
    image = load_rgb(name)
    result = _ocr(adapter, image, language)
    want = expected()[name]["text"]
    assert similarity(result.text, want, drop_spaces=True) >= 0.9, result.text
    assert_blocks_sane(result, image)
    assert len(result.text.split("\n")) == len(want.split("\n"))


def test_exif_sample_reads_once_orientation_is_applied(adapter) -> None:
    with Image.open(SAMPLES / "exif_rotated_en.jpg") as im:
        assert im.getexif().get(0x0112) == 6
        stored_size = im.size
        upright = ImageOps.exif_transpose(im).convert("RGB")
    assert upright.size == stored_size[::-1] and upright.width > upright.height
    result = _ocr(adapter, upright, "en")
    assert similarity(result.text, expected()["exif_rotated_en.jpg"]["text"]) >= 0.9, result.text


@pytest.mark.parametrize("size", [(200, 80), (1, 1), (3000, 20), (5, 2000)])
def test_blank_and_odd_sized_images_give_empty_result(adapter, size) -> None:
    result = _ocr(adapter, Image.new("RGB", size, "white"))
    assert result.text == "" and result.blocks == []


def test_thin_line_keeps_its_coordinates(adapter) -> None:
    line = load_rgb("line_zh.png")
    thin = Image.new("RGB", (line.width, 30), "white")
    thin.paste(line.resize((line.width * 30 // line.height, 30)), (0, 0))
    wide = Image.new("RGB", (2600, 30), "white")  # > 50:1, padded before detection
    wide.paste(thin, (0, 0))
    result = _ocr(adapter, wide, "zh")
    assert similarity(result.text, expected()["line_zh.png"]["text"], drop_spaces=True) >= 0.8
    assert_blocks_sane(result, wide)


def test_other_modes_are_accepted(adapter) -> None:
    with Image.open(SAMPLES / "line_zh.png") as im:
        gray = im.convert("L")
    result = _ocr(adapter, gray)
    assert similarity(result.text, expected()["line_zh.png"]["text"], drop_spaces=True) >= 0.9


@pytest.mark.parametrize("language, ok", [
    (None, True), ("", True), ("English", True), ("en", True), ("eng", True), ("Chinese", True),
    ("zh", True), ("chi_sim", True), ("中文", True), ("zh-TW", True), ("Japanese", True),
    ("ja", True), ("German", True), ("fr", True), ("Vietnamese", True), ("en+zh", True),
    ("Russian", False), ("ru", False), ("rus", False), ("русский", False), ("RUSSIAN", False),
    ("uk", False), ("be", False), ("bg", False), ("sr", False), ("kk", False), ("Korean", False),
    ("Greek", False), ("Klingon", False), ("en+ru", False),
])
def test_supports_language(language, ok: bool, tmp_path) -> None:
    assert RapidOcrAdapter(_spec(tmp_path)).supports_language(language) is ok


def test_unsupported_language_is_refused(adapter) -> None:
    with pytest.raises(BadRequest) as err:
        _ocr(adapter, "line_ru.png", "Russian")
    assert err.value.param == "language"


def test_cancelled_before_start(adapter) -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        _ocr(adapter, "line_zh.png", cancel=token)
    with pytest.raises(Cancelled):
        _ocr(adapter, "line_zh.png", cancel=CancelToken(deadline=time.monotonic() - 1))


def test_one_engine_from_two_threads(adapter) -> None:
    """The same loaded engine, called from two threads at once, gives the sequential results."""
    names = ["receipt_en.png", "doc_zh.png", "line_zh.png"]
    images = {n: load_rgb(n) for n in names}
    reference = {n: _ocr(adapter, images[n]) for n in names}
    failures: list[str] = []
    barrier = threading.Barrier(2)

    def worker(order: list[str]) -> None:
        barrier.wait()
        for n in order:
            r = _ocr(adapter, images[n])
            if r.text != reference[n].text or r.blocks != reference[n].blocks:
                failures.append(n)

    threads = [threading.Thread(target=worker, args=(o,)) for o in (names, names[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures


@pytest.mark.parametrize("workers", ["thread", "process"])
def test_no_network_and_no_writes_outside_data_dir(tmp_path, monkeypatch, workers) -> None:
    """Load and read with HOME pointing at a missing folder: nothing of ours is written outside
    the data dir (no model download, no rapidocr cache), onnxruntime's device id aside. With
    sockets refused too; that patch reaches this process only, so in thread mode."""
    if workers == "thread":
        def refuse(*args, **kwargs):
            raise AssertionError("rapidocr tried to open a network connection")

        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HOME", str(tmp_path / "no-home"))
    data_dir = tmp_path / "data"
    a = RapidOcrAdapter(_spec(data_dir, limit_side_len=960, intra_op_threads=1, workers=workers))
    a.load()
    try:
        result = _ocr(a, "line_zh.png")
        assert similarity(result.text, expected()["line_zh.png"]["text"], drop_spaces=True) >= 0.9
    finally:
        a.unload()
    _assert_only_onnxruntime_telemetry(tmp_path / "no-home")
    assert not data_dir.exists() or not any(data_dir.rglob("*"))


def _assert_only_onnxruntime_telemetry(home: Path) -> None:
    """The first import of onnxruntime in a process writes its telemetry device id under
    $HOME/.cache (onnxruntime's doing, in either mode); nothing else may appear there."""
    ort_dir = home / ".cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime"
    written = {p for p in home.rglob("*") if p.is_file()} if home.exists() else set()
    assert all(p.parent == ort_dir for p in written), written


def test_memory_and_unload(tmp_path) -> None:
    a = RapidOcrAdapter(_spec(tmp_path))
    assert a.memory_bytes() == 0
    a.load()
    assert a.memory_bytes() > 30 * 2**20  # at least the .onnx files
    a.unload()
    assert a.memory_bytes() == 0
    with pytest.raises(ModelUnavailable):
        _ocr(a, "line_zh.png")


def test_group_lines_orders_and_joins() -> None:
    blocks = [
        OcrBlock("1.45", (500, 101, 560, 131), 0.9),
        OcrBlock("Total", (20, 200, 120, 230), 0.9),
        OcrBlock("Milk", (20, 100, 90, 128), 0.9),
        OcrBlock("Title", (20, 10, 300, 60), 0.9),
        OcrBlock("9.76", (500, 205, 560, 232), 0.9),
    ]
    lines = group_lines(blocks)
    assert [[b.text for b in line] for line in lines] == [["Title"], ["Milk", "1.45"], ["Total", "9.76"]]
    assert group_lines([]) == []
