"""Safe, fast decoding of uploaded images into RGB pages.

This module owns the step from untrusted upload bytes to ``PIL.Image`` pages:

* the format comes from the magic bytes only, never from a file name or a
  client-supplied content type (:func:`sniff_format`);
* decompression bombs are refused from the header, before any pixel is decoded;
* EXIF orientation is applied, every mode is normalised to 8-bit RGB (alpha is
  composited onto white, 16/32-bit and float greyscale are rescaled, not clipped);
* with a pixel target, JPEGs are decoded at a reduced DCT scale (``draft``) and
  every page is resampled to fit the target, aspect ratio kept (at least 1 px a side).

Multi-frame rule: only TIFF is multi-frame here. Every TIFF frame is a page, in
file order, and a file with more than ``max_frames`` frames is refused
(413, ``TOO_MANY_FRAMES``). With ``all_frames=False`` only the first frame is
decoded and the frame limit does not apply (``n_frames`` still reports the count).
Each frame must fit ``max_pixels``; without a pixel target the frames must also
fit it together, since they are all returned at full size. JPEG (MPO), PNG (APNG)
and BMP give their first image only.

Errors are :mod:`core.errors` exceptions with client-safe messages; library
exception text is never put in a message. Nothing here changes Pillow's global
settings, so :func:`decode_image` may run in several worker threads at once.
"""
from __future__ import annotations

import io
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from PIL import Image, ImageOps

from core.errors import BadRequest, ChatVLMError, PayloadTooLarge, UnsupportedMediaType

SUPPORTED = ("JPEG", "PNG", "BMP", "TIFF")
MAX_SIDE = 65_535  # longest side accepted, whatever the pixel budget (JPEG's own limit)
_TIFF_WALK_LIMIT = 1_000  # frames counted at most when all_frames=False (IFD chains can be hostile)
_DISPLAY = {"JPEG": "JPG"}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "PA"}
# Python < 3.14: catch_warnings swaps the process-wide filter list, so concurrent
# users must not interleave. Only Image.open (header parsing, cheap) runs under it;
# later steps cannot warn: every frame is checked against a limit <= MAX_IMAGE_PIXELS.
_WARNINGS_LOCK = threading.Lock()


def sniff_format(data: bytes) -> str | None:
    """Name the format from magic bytes: a SUPPORTED name, "GIF", "WEBP", "PDF", "HEIC", "AVIF" or None."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF
        return "TIFF"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"%PDF-"):
        return "PDF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC"
    return None


@dataclass
class DecodedImage:
    pages: list[Image.Image]        # RGB, EXIF orientation applied, scaled to the target if one was given
    format: str                     # "JPEG" | "PNG" | "BMP" | "TIFF"
    original_size: tuple[int, int]  # first page as displayed (after EXIF orientation), before scaling
    scale: float                    # original_size[0] / pages[0].width; multiply model boxes by it
    n_frames: int


def decode_image(data: bytes, *, allowed_formats: Sequence[str] = SUPPORTED, max_pixels: int = 50_000_000,
                 max_frames: int = 20, target_max_pixels: int | None = None,
                 all_frames: bool = True) -> DecodedImage:
    """Decode upload bytes into RGB pages; raise core.errors exceptions for bad input."""
    if target_max_pixels is not None and target_max_pixels < 1:
        raise ValueError("target_max_pixels must be >= 1")
    if not data:
        raise BadRequest("the file is empty", code="EMPTY_FILE")
    fmt = sniff_format(data)
    allowed = tuple(f for f in SUPPORTED if f in {a.upper() for a in allowed_formats})
    if fmt not in allowed:
        raise _unsupported(fmt, allowed)
    # Pillow itself refuses anything over MAX_IMAGE_PIXELS (the warning is made an error).
    limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, Image.MAX_IMAGE_PIXELS)
    try:
        with _bomb_guard():
            img = Image.open(io.BytesIO(data), formats=[fmt])
        sizes = _frame_sizes(img, fmt, max_frames if all_frames else _TIFF_WALK_LIMIT)
        n_frames = len(sizes)
        if not all_frames:
            sizes = sizes[:1]
        for size in sizes:
            _check_size(size, limit)
        total = sum(w * h for w, h in sizes)
        if target_max_pixels is None and total > limit:
            raise PayloadTooLarge(f"the {len(sizes)} pages hold {total:,} pixels together; "
                                  f"the limit is {limit:,}", code="IMAGE_TOO_LARGE")
        pages, original_size = [], (0, 0)
        for index in range(len(sizes)):
            if index:
                img.seek(index)
            page, shown = _render(img, fmt, target_max_pixels)
            if not index:
                original_size = shown
            pages.append(page)
    except ChatVLMError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"the image is larger than the limit of {limit:,} pixels",
                              code="IMAGE_TOO_LARGE") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise BadRequest(f"the file could not be decoded as a {_name(fmt)} image; it may be truncated or corrupt",
                         code="INVALID_IMAGE") from exc
    return DecodedImage(pages=pages, format=fmt, original_size=original_size,
                        scale=original_size[0] / pages[0].width, n_frames=n_frames)


def displayed_size(data: bytes) -> tuple[int, int] | None:
    """The first frame's size as displayed (EXIF orientation applied), read from the header
    alone: no pixels are decoded. None when the header cannot be read (decoding will say why)."""
    fmt = sniff_format(data)
    if fmt is None or fmt == "PDF":
        return None
    try:
        with _bomb_guard(), Image.open(io.BytesIO(data), formats=[fmt]) as img:
            w, h = img.size
            return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)
    except Exception:  # noqa: BLE001 - any unreadable header: the decoder reports it properly
        return None


@contextmanager
def _bomb_guard() -> Iterator[None]:
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _frame_sizes(img: Image.Image, fmt: str, walk_limit: int) -> list[tuple[int, int]]:
    """Header sizes of the frames, walking at most walk_limit + 1 TIFF IFDs (never the whole chain)."""
    sizes = [img.size]
    if fmt == "TIFF":
        while len(sizes) <= walk_limit:
            try:
                img.seek(len(sizes))
            except EOFError:
                break
            sizes.append(img.size)
        if len(sizes) > walk_limit:
            raise PayloadTooLarge(f"the file has more than {walk_limit} frames; at most {walk_limit} are accepted",
                                  code="TOO_MANY_FRAMES")
        img.seek(0)
    return sizes


def _check_size(size: tuple[int, int], limit: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise BadRequest("the image has no pixels (zero width or height)", code="INVALID_IMAGE")
    if w * h > limit:
        raise PayloadTooLarge(f"the image is {w} x {h} = {w * h:,} pixels; the limit is {limit:,} pixels",
                              code="IMAGE_TOO_LARGE")
    if max(w, h) > MAX_SIDE:
        raise PayloadTooLarge(f"the image is {w} x {h} pixels; sides over {MAX_SIDE} pixels are not accepted",
                              code="IMAGE_TOO_LARGE")


def _render(img: Image.Image, fmt: str, target: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode the current frame; return the RGB page and its displayed size before scaling."""
    stored = img.size
    fit = _fit(stored, target) if fmt == "JPEG" else None  # area, hence fit, is orientation-free
    if fit:
        img.draft("RGB", fit)  # libjpeg DCT scaling by 1/2, 1/4 or 1/8, staying >= fit
    img.load()  # (Pillow 13 applies a TIFF's orientation tag itself, here)
    frame = img
    if _orientation(img) != 1:
        try:
            frame = ImageOps.exif_transpose(img)
        except Exception:  # unreadable EXIF: keep the stored orientation rather than refuse the image
            frame = img
    shown = stored[::-1] if frame.size != img.size else stored
    page = _to_rgb(frame)
    fit = _fit(shown, target)
    if fit and page.size != fit:
        page = page.resize(fit, Image.Resampling.LANCZOS, reducing_gap=2.0)
    elif page is img:
        page = page.copy()  # detach from the file object (TIFF frames are reused by seek)
    return page, shown


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _fit(size: tuple[int, int], target: int | None) -> tuple[int, int] | None:
    """Largest size with the same aspect ratio holding at most target pixels, or None if size fits."""
    w, h = size
    if target is None or w * h <= target:
        return None
    f = math.sqrt(target / (w * h))
    nw, nh = max(1, int(w * f)), max(1, int(h * f))
    if nw * nh > target:  # float rounding at an exact boundary
        nw, nh = (max(1, nw - 1), nh) if nw >= nh else (nw, max(1, nh - 1))
    return nw, nh


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB; alpha (or a transparency key) composited onto white. May return ``im`` itself."""
    if im.mode in _HIGH_BIT_MODES:
        im = _high_bit_to_l(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        page = Image.new("RGB", rgba.size, (255, 255, 255))
        page.paste(rgba, mask=rgba.getchannel("A"))
        return page
    return im if im.mode == "RGB" else im.convert("RGB")


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit or float greyscale onto 0..255 by the source's range, not by clipping."""
    if im.mode.startswith("I;16"):
        im, lo, hi = im.convert("I"), 0, 65535
    else:
        lo, hi = im.getextrema()
        top = 1.0 if im.mode == "F" else 255
        if lo >= 0 and hi <= top:
            lo, hi = 0, top
        elif lo >= 0 and hi <= 65535:
            lo, hi = 0, 65535  # 16-bit data in a 32-bit container
    k = 255 / (hi - lo) if hi > lo else 0.0
    out = im.point(lambda v: v * k + (0.5 - lo * k)).convert("L")
    out.info.pop("transparency", None)  # a 16-bit transparency key has no 8-bit equivalent
    return out


def _name(fmt: str | None) -> str:
    return _DISPLAY.get(fmt or "", fmt or "")


def _unsupported(fmt: str | None, allowed: tuple[str, ...]) -> UnsupportedMediaType:
    names = [_name(f) for f in allowed] or ["nothing"]
    send = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    what = "the file is not a recognised image" if fmt is None else f"{_name(fmt)} images are not supported"
    if fmt == "PDF":
        what = "PDF documents are not supported here"
    return UnsupportedMediaType(f"{what}; send {send}", code="UNSUPPORTED_IMAGE_FORMAT",
                                details={"detected": fmt})
