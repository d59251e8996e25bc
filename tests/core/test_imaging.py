"""core.imaging: format sniffing, bomb guards, mode normalisation, EXIF, TIFF pages, draft scaling.

Every input is generated in memory; a few are hand-crafted byte for byte (PNG/BMP headers).
"""
from __future__ import annotations

import io
import random
import re
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFile, JpegImagePlugin

from core.errors import BadRequest, ChatVLMError, PayloadTooLarge, UnsupportedMediaType
from core.imaging import SUPPORTED, DecodedImage, decode_image, sniff_format

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- builders

def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def document(size=(120, 80), mode="RGB") -> Image.Image:
    """White page, black 'text' bar, red square top-left (to track orientation)."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, size[0] // 4, size[1] // 4), fill=(255, 0, 0))
    d.rectangle((size[0] // 3, size[1] // 2, size[0] - 5, size[1] // 2 + 6), fill=(0, 0, 0))
    return im.convert(mode)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def crafted_png(width: int, height: int, idat: bytes = b"") -> bytes:
    """8-bit greyscale PNG whose IHDR claims width x height; IDAT as given."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def compressed_zero_png(width: int, height: int) -> bytes:
    """A real, valid, all-black PNG of width x height in a few hundred KB: a zip bomb."""
    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + zero pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return crafted_png(width, height, idat)


def crafted_bmp(width: int, height: int) -> bytes:
    """BITMAPINFOHEADER, 24 bpp, claiming width x height, with no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def multi_tiff(colours, size=(30, 20), sizes=None) -> bytes:
    frames = [Image.new("RGB", (sizes[i] if sizes else size), c) for i, c in enumerate(colours)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def close(pixel, expected, tol=8) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


def expect(exc_type, code, data, **kw) -> ChatVLMError:
    with pytest.raises(exc_type) as info:
        decode_image(data, **kw)
    assert info.value.code == code, info.value.message
    return info.value


# ---------------------------------------------------------------- sniffing

@pytest.mark.parametrize("fmt", SUPPORTED)
def test_sniff_supported(fmt):
    assert sniff_format(encode(document(), fmt)) == fmt


@pytest.mark.parametrize("data, name", [
    (encode(document(), "GIF"), "GIF"),
    (encode(document(), "WEBP"), "WEBP"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "AVIF"),
    (b"II+\x00\x08\x00\x00\x00", "TIFF"),  # BigTIFF
    (b"hello, I am a text file called scan.png\n", None),
    (b"BM but only text after the two letters", None),
    (b"\xff\xd8", None),
    (b"", None),
])
def test_sniff_others(data, name):
    assert sniff_format(data) == name


# ---------------------------------------------------------------- happy path

@pytest.mark.parametrize("fmt", SUPPORTED)
def test_each_supported_format_decodes(fmt):
    out = decode_image(encode(document(), fmt))
    assert isinstance(out, DecodedImage)
    assert out.format == fmt and out.n_frames == 1
    assert len(out.pages) == 1
    page = out.pages[0]
    assert page.mode == "RGB" and page.size == (120, 80)
    assert out.original_size == (120, 80) and out.scale == 1.0
    assert close(page.getpixel((2, 2)), (255, 0, 0), tol=30)
    assert close(page.getpixel((119, 0)), (255, 255, 255), tol=30)
    assert not isinstance(page, ImageFile.ImageFile)  # detached from the upload


def test_target_larger_than_image_does_not_scale():
    out = decode_image(encode(document(), "PNG"), target_max_pixels=10**6)
    assert out.pages[0].size == (120, 80) and out.scale == 1.0


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("data, detected", [
    (encode(document(), "GIF"), "GIF"),
    (encode(document(), "WEBP"), "WEBP"),
    (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "PDF"),
    (random.Random(7).randbytes(4096), None),
    (b"Meeting notes\nThis text file was renamed to notes.png\n", None),
])
def test_unsupported_is_415(data, detected):
    err = expect(UnsupportedMediaType, "UNSUPPORTED_IMAGE_FORMAT", data)
    assert err.status_code == 415
    assert err.message.endswith("send JPG, PNG, BMP or TIFF")
    if detected:
        assert detected in err.message
    assert err.details == {"detected": detected}


def test_gif_message_exact():
    err = expect(UnsupportedMediaType, "UNSUPPORTED_IMAGE_FORMAT", encode(document(), "GIF"))
    assert err.message == "GIF images are not supported; send JPG, PNG, BMP or TIFF"


def test_format_not_in_allowed_list_is_415():
    err = expect(UnsupportedMediaType, "UNSUPPORTED_IMAGE_FORMAT", encode(document(), "BMP"),
                 allowed_formats=["JPEG", "PNG"])
    assert err.message == "BMP images are not supported; send JPG or PNG"


def test_empty_is_400():
    err = expect(BadRequest, "EMPTY_FILE", b"")
    assert err.status_code == 400


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_truncated_is_400(fmt):
    data = encode(Image.effect_noise((200, 150), 60).convert("RGB"), fmt)
    for cut in (len(data) // 2, 60):
        err = expect(BadRequest, "INVALID_IMAGE", data[:cut])
        assert err.status_code == 400
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_crc_is_400():
    data = bytearray(encode(document(), "PNG"))
    data[40] ^= 0xFF  # inside IDAT
    expect(BadRequest, "INVALID_IMAGE", bytes(data))


def test_garbage_after_valid_magic_is_400():
    for magic in (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*"):
        expect(BadRequest, "INVALID_IMAGE", magic + random.Random(1).randbytes(300))


@pytest.mark.parametrize("w, h", [(0, 10), (10, 0)])
def test_zero_dimensions_are_400(w, h):
    expect(BadRequest, "INVALID_IMAGE", crafted_png(w, h))
    expect(BadRequest, "INVALID_IMAGE", crafted_bmp(w, h))


# ---------------------------------------------------------------- bombs

@pytest.mark.parametrize("data", [
    crafted_png(100_000, 100_000),  # beyond Pillow's own hard limit
    crafted_png(9_000, 9_000),      # under Pillow's limit, over ours
    crafted_bmp(100_000, 100_000),
    crafted_bmp(9_000, -9_000),     # top-down BMP
], ids=["png-1e10", "png-81M", "bmp-1e10", "bmp-81M-topdown"])
@pytest.mark.parametrize("target", [None, 1_000_000])
def test_bomb_headers_are_413_fast(data, target):
    start = time.perf_counter()
    err = expect(PayloadTooLarge, "IMAGE_TOO_LARGE", data, target_max_pixels=target)
    assert time.perf_counter() - start < 0.5
    assert err.status_code == 413
    assert "50,000,000" in err.message


def test_bomb_message_names_pixel_count_and_limit():
    err = expect(PayloadTooLarge, "IMAGE_TOO_LARGE", crafted_png(3000, 2000), max_pixels=1_000_000)
    assert "6,000,000" in err.message and "1,000,000" in err.message


def test_absurd_side_is_413():
    err = expect(PayloadTooLarge, "IMAGE_TOO_LARGE", crafted_png(70_000, 1))
    assert "65535" in err.message


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_real_zip_bomb_png_is_refused_without_allocating():
    """A valid 9000x9000 PNG (81 Mpx, ~80 KB) must be refused before Pillow allocates its buffer.

    Pillow allocates pixel buffers with malloc, invisible to tracemalloc, so the check runs in a
    fresh interpreter and reads its peak RSS (VmHWM; ru_maxrss would inherit pytest's peak).
    """
    code = textwrap.dedent("""
        import sys, time
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        from test_imaging import compressed_zero_png
        from core.imaging import decode_image
        from core.errors import PayloadTooLarge

        def peak_kb():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

        data = compressed_zero_png(9000, 9000)
        assert len(data) < 200_000, len(data)
        mode = sys.argv[3]
        before = peak_kb()
        start = time.perf_counter()
        try:
            decode_image(data, target_max_pixels=1_000_000,
                         max_pixels=100_000_000 if mode == "allowed" else 50_000_000)
        except PayloadTooLarge as exc:
            assert exc.code == "IMAGE_TOO_LARGE" and mode == "refused"
        print(f"{time.perf_counter() - start:.4f} {(peak_kb() - before) / 1024:.1f}")
    """)

    def run(mode):
        proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(Path(__file__).parent), mode],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return map(float, proc.stdout.split())

    elapsed, grown_mb = run("refused")
    print(f"bomb refused in {elapsed:.4f} s, peak RSS grew by {grown_mb:.1f} MB")
    assert elapsed < 0.2
    assert grown_mb < 10
    # Control: the same file, allowed, really does cost its 81 MB (so the probe can see it).
    _, control_mb = run("allowed")
    assert control_mb > 70


def test_bomb_does_not_allocate_python_memory():
    import tracemalloc
    data = crafted_png(60_000, 60_000)
    tracemalloc.start()
    try:
        expect(PayloadTooLarge, "IMAGE_TOO_LARGE", data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_pillow_globals_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    for data in (crafted_png(100_000, 100_000), encode(document(), "JPEG"), b"junk"):
        try:
            decode_image(data, max_pixels=10**9)
        except ChatVLMError:
            pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before


# ---------------------------------------------------------------- modes

def test_cmyk_jpeg():
    im = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # white
    im.paste((0, 255, 255, 0), (0, 0, 32, 32))      # red
    im.paste((0, 0, 0, 255), (32, 32, 64, 64))      # black
    page = decode_image(encode(im, "JPEG", quality=95)).pages[0]
    assert page.mode == "RGB"
    assert close(page.getpixel((48, 8)), (255, 255, 255), 12)
    assert close(page.getpixel((8, 8)), (255, 0, 0), 24)
    assert close(page.getpixel((48, 48)), (0, 0, 0), 24)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grey_keeps_contrast(fmt):
    im = Image.new("I;16", (30, 10), 32768)
    im.paste(0, (0, 0, 10, 10))
    im.paste(65535, (20, 0, 30, 10))
    data = encode(im, fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    page = decode_image(data).pages[0]
    assert page.getpixel((15, 5)) == (128, 128, 128)  # not clipped to 255
    assert page.getpixel((5, 5)) == (0, 0, 0)
    assert page.getpixel((25, 5)) == (255, 255, 255)


def test_16bit_big_endian_tiff():
    im = Image.new("I;16B", (8, 8), 16384)
    data = encode(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    assert decode_image(data).pages[0].getpixel((0, 0)) == (64, 64, 64)


def test_32bit_int_and_float_tiff():
    i32 = Image.new("I", (8, 8), 1_000_000)
    i32.paste(0, (0, 0, 4, 8))
    page = decode_image(encode(i32, "TIFF")).pages[0]
    assert page.getpixel((0, 0)) == (0, 0, 0) and page.getpixel((7, 0)) == (255, 255, 255)
    f = Image.new("F", (8, 8), 0.5)
    assert close(decode_image(encode(f, "TIFF")).pages[0].getpixel((0, 0)), (128, 128, 128), 1)


def test_palette_with_transparency_goes_on_white():
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 0, 0] * 2 + [0] * 762)  # index 0 and 1 both black
    im.paste(1, (5, 5, 15, 15))               # opaque black "text"
    data = encode(im, "PNG", transparency=0)  # background: transparent black
    page = decode_image(data).pages[0]
    assert page.getpixel((0, 0)) == (255, 255, 255)
    assert page.getpixel((10, 10)) == (0, 0, 0)


def test_la_transparent_black_text_is_not_black_on_black():
    im = Image.new("LA", (20, 20), (0, 0))
    im.paste((0, 255), (5, 5, 15, 15))
    page = decode_image(encode(im, "PNG")).pages[0]
    assert page.getpixel((0, 0)) == (255, 255, 255)
    assert page.getpixel((10, 10)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_rgba_transparent_background_becomes_white(fmt):
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    im.paste((0, 0, 0, 255), (5, 5, 15, 15))
    im.paste((255, 0, 0, 128), (0, 15, 5, 20))  # half-transparent red over white
    page = decode_image(encode(im, fmt)).pages[0]
    assert page.getpixel((0, 0)) == (255, 255, 255)
    assert page.getpixel((10, 10)) == (0, 0, 0)
    assert close(page.getpixel((2, 17)), (255, 127, 127), 2)


def test_rgb_png_with_transparency_key():
    im = Image.new("RGB", (10, 10), (0, 0, 0))
    im.paste((0, 0, 1), (0, 0, 5, 10))
    page = decode_image(encode(im, "PNG", transparency=(0, 0, 0))).pages[0]
    assert page.getpixel((8, 0)) == (255, 255, 255)
    assert page.getpixel((2, 0)) == (0, 0, 1)


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("1", "TIFF"), ("1", "BMP"), ("L", "JPEG"), ("L", "BMP"),
                                       ("P", "BMP"), ("RGB", "BMP")])
def test_other_modes_become_rgb(mode, fmt):
    page = decode_image(encode(document(mode=mode), fmt)).pages[0]
    assert page.mode == "RGB" and page.size == (120, 80)
    assert close(page.getpixel((119, 0)), (255, 255, 255), 30)
    assert close(page.getpixel((60, 43)), (0, 0, 0), 30)


# ---------------------------------------------------------------- EXIF orientation

@pytest.mark.parametrize("orientation, red_corner", [(6, "top-right"), (8, "bottom-left"), (3, "bottom-right"),
                                                      (1, "top-left")])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_exif_orientation(fmt, orientation, red_corner):
    data = encode(document((120, 80)), fmt, exif=exif_orientation(orientation))
    out = decode_image(data)
    page = out.pages[0]
    expected = (80, 120) if orientation in (6, 8) else (120, 80)
    assert page.size == expected and out.original_size == expected and out.scale == 1.0
    w, h = page.size
    corners = {"top-left": (3, 3), "top-right": (w - 4, 3), "bottom-left": (3, h - 4), "bottom-right": (w - 4, h - 4)}
    for name, xy in corners.items():
        assert close(page.getpixel(xy), (255, 0, 0), 40) == (name == red_corner), (name, page.getpixel(xy))


def test_exif_rotated_jpeg_with_draft():
    big = document((4000, 3000))
    out = decode_image(encode(big, "JPEG", quality=85, exif=exif_orientation(6)), target_max_pixels=1280 * 960)
    assert out.original_size == (3000, 4000)
    assert out.pages[0].size == (960, 1280)
    assert out.scale == pytest.approx(3000 / 960)
    assert close(out.pages[0].getpixel((950, 10)), (255, 0, 0), 40)


# ---------------------------------------------------------------- TIFF pages

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_multiframe_tiff_gives_every_page_in_order():
    out = decode_image(multi_tiff(COLOURS))
    assert out.n_frames == 3 and len(out.pages) == 3
    assert [p.getpixel((0, 0)) for p in out.pages] == COLOURS
    assert all(p.mode == "RGB" and p.size == (30, 20) for p in out.pages)


def test_too_many_frames_is_413():
    err = expect(PayloadTooLarge, "TOO_MANY_FRAMES", multi_tiff(COLOURS), max_frames=2)
    assert err.status_code == 413 and "2" in err.message


def test_first_frame_only():
    out = decode_image(multi_tiff(COLOURS), all_frames=False, max_frames=2)
    assert len(out.pages) == 1 and out.n_frames == 3
    assert out.pages[0].getpixel((0, 0)) == COLOURS[0]


def test_every_tiff_frame_size_is_checked():
    data = multi_tiff(COLOURS, sizes=[(10, 10), (10, 10), (100, 100)])
    expect(PayloadTooLarge, "IMAGE_TOO_LARGE", data, max_pixels=5_000)
    assert len(decode_image(data, max_pixels=5_000, all_frames=False).pages) == 1


def test_tiff_pages_together_must_fit_without_target():
    data = multi_tiff(COLOURS, size=(100, 100))
    expect(PayloadTooLarge, "IMAGE_TOO_LARGE", data, max_pixels=25_000)
    out = decode_image(data, max_pixels=25_000, target_max_pixels=2_500)
    assert [p.size for p in out.pages] == [(50, 50)] * 3 and out.scale == 2.0


def test_tiff_pages_scaled_each_and_original_size_is_first():
    data = multi_tiff(COLOURS, sizes=[(400, 200), (100, 100), (200, 400)])
    out = decode_image(data, target_max_pixels=20_000)
    assert out.original_size == (400, 200) and out.scale == 2.0
    assert [p.size for p in out.pages] == [(200, 100), (100, 100), (100, 200)]


# ---------------------------------------------------------------- scaling

def test_jpeg_draft_path(monkeypatch):
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append((mode, size, self.size))
        return real(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    target = 1280 * 960
    out = decode_image(encode(document((4000, 3000)), "JPEG", quality=90), target_max_pixels=target)
    page = out.pages[0]
    assert calls == [("RGB", (1280, 960), (4000, 3000))]
    assert page.width * page.height <= target and page.size == (1280, 960)
    assert out.original_size == (4000, 3000)
    assert out.scale == pytest.approx(4000 / 1280)
    assert close(page.getpixel((100, 100)), (255, 0, 0), 30)


def test_draft_size_never_below_target():
    for size in [(4000, 3000), (3001, 1999), (1300, 7000), (2600, 1950)]:
        data = encode(Image.new("RGB", size, "white"), "JPEG")
        out = decode_image(data, target_max_pixels=1_000_000)
        w, h = out.pages[0].size
        assert w * h <= 1_000_000 and w * h > 0.98 * 1_000_000 * min(1, size[0] * size[1] / 1e6)
        assert abs(w / h - size[0] / size[1]) < 0.01
        assert out.scale == pytest.approx(size[0] / w)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_non_jpeg_resize_fits_budget(fmt):
    out = decode_image(encode(document((2000, 1000)), fmt), target_max_pixels=500_000)
    assert out.pages[0].size == (1000, 500) and out.scale == 2.0
    assert out.original_size == (2000, 1000)


def test_target_validation():
    with pytest.raises(ValueError):
        decode_image(encode(document(), "PNG"), target_max_pixels=0)


# ---------------------------------------------------------------- messages and threads

FAILURES = {
    "empty": b"", "nul-bytes": b"\x00" * 10, "png-1e10": crafted_png(100_000, 100_000),
    "png-81M": crafted_png(9_000, 9_000), "png-zero-width": crafted_png(0, 1),
    "bmp-1e10": crafted_bmp(100_000, 100_000), "gif": encode(document(), "GIF"), "pdf": b"%PDF-1.5",
    "tiff-3-frames": multi_tiff(COLOURS), "png-cut": encode(document(), "PNG")[:100],
    "jpeg-cut": encode(document(), "JPEG")[:300], "png-magic-only": b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,
}


@pytest.mark.parametrize("data", FAILURES.values(), ids=FAILURES.keys())
def test_messages_are_client_safe(data):
    with pytest.raises(ChatVLMError) as info:
        decode_image(data, max_frames=2)
    msg = info.value.message
    assert msg and not re.search(r"0x[0-9a-fA-F]+", msg)
    assert "/" not in msg and "\\" not in msg and "Traceback" not in msg
    for pillow_text in ("cannot identify", "truncated (", "DOS attack", "PIL", "BytesIO", "Errno"):
        assert pillow_text not in msg
    assert isinstance(info.value.status_code, int) and 400 <= info.value.status_code < 500


def test_concurrent_decodes_are_independent():
    filters_before = list(warnings.filters)
    jobs = [(encode(document((800, 600)), "JPEG"), "ok"), (crafted_png(100_000, 100_000), "IMAGE_TOO_LARGE"),
            (multi_tiff(COLOURS), "ok"), (encode(document(), "GIF"), "UNSUPPORTED_IMAGE_FORMAT"),
            (encode(document(), "PNG")[:200], "INVALID_IMAGE"), (crafted_png(9_000, 9_000), "IMAGE_TOO_LARGE")]

    def run(job):
        data, want = job
        try:
            decode_image(data, target_max_pixels=100_000)
            return want == "ok", threading.get_ident()
        except ChatVLMError as exc:
            return exc.code == want, threading.get_ident()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs * 25))
    assert all(ok for ok, _ in results)
    assert len({tid for _, tid in results}) > 1
    assert list(warnings.filters) == filters_before


def test_allowed_formats_is_case_insensitive_and_limited_to_supported():
    assert decode_image(encode(document(), "PNG"), allowed_formats=["png"]).format == "PNG"
    expect(UnsupportedMediaType, "UNSUPPORTED_IMAGE_FORMAT", encode(document(), "GIF"), allowed_formats=["GIF", "PNG"])


def test_hostile_frame_count_is_bounded_even_for_first_frame_only():
    frames = [Image.new("L", (1, 1), i % 256) for i in range(1_100)]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    start = time.perf_counter()
    expect(PayloadTooLarge, "TOO_MANY_FRAMES", data, all_frames=False)
    expect(PayloadTooLarge, "TOO_MANY_FRAMES", data)
    assert time.perf_counter() - start < 2


def test_garbage_exif_does_not_reject_a_good_jpeg():
    data = encode(document(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    out = decode_image(data)
    assert out.pages[0].size == (120, 80) and out.original_size == (120, 80)


def test_displayed_size_reads_the_header_only():
    from core.imaging import displayed_size

    img = Image.new("RGB", (40, 30), "white")
    png = io.BytesIO()
    img.save(png, "PNG")
    assert displayed_size(png.getvalue()) == (40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 30 x 40
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert displayed_size(buf.getvalue()) == (30, 40)
    assert displayed_size(b"not an image") is None and displayed_size(b"") is None
    assert displayed_size(png.getvalue()[:20]) is None  # truncated header
