"""A corpus of hostile uploads, sent to a running server over raw loopback sockets.

Each case is one raw HTTP/1.1 request (so multipart framing can be as broken as we like)
to ``/ocr``, ``/batch/ocr`` or ``/chat``. The runner reports cases tried, the 5xx count
(goal 0), hangs (goal 0), the slowest answer and the server's RSS growth (psutil on its pid).

    python scripts/hostile_uploads.py --url http://127.0.0.1:8000 [--pid PID] [--quick]
    python scripts/hostile_uploads.py --start [--quick]   # starts a server on the tiny models

Every request has a timeout, every loop a fixed count; only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
CRLF = b"\r\n"
BOUNDARY = "hostileBoundary7MA4YWxkTrZu0gW"


@dataclass
class Case:
    name: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    quick: bool = True            # part of the quick subset run in `make test`
    send_len: int | None = None   # send only this many body bytes, then half-close


@dataclass
class Result:
    case: str
    path: str
    status: int | None            # None: no answer (hang or reset)
    latency: float
    error: str | None = None
    code: str | None = None


# --------------------------------------------------------------------------- images


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_huge_ihdr(width: int, height: int, payload: bytes = b"\x00" * 64) -> bytes:
    """A valid-CRC PNG whose header claims width x height, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(payload)) + _png_chunk(b"IEND", b""))


def png_zero_bomb(width: int, height: int) -> bytes:
    """A real, complete grayscale PNG of zeros: tiny on the wire, huge once decoded."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    out = [comp.compress(row) for _ in range(height)]
    idat = b"".join(out) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def jpeg_huge_sof(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 dimensions patched to width x height."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), "white"), "JPEG"))
    i = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def bmp_huge_header(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("RGB", (4, 4), "white"), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def _text_img(mode: str = "RGB", size=(320, 96)) -> Image.Image:
    from PIL import ImageDraw
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((10, 30), "HOSTILE 123", fill="black")
    return img if mode == "RGB" else img.convert(mode)


def image_cases() -> list[tuple[str, str, bytes, str, bool]]:
    """(name, filename, bytes, content type, quick) for single-file cases."""
    png = _encode(_text_img(), "PNG")
    jpg = _encode(_text_img(), "JPEG")
    tif = _encode(_text_img(), "TIFF")
    out: list[tuple[str, str, bytes, str, bool]] = []
    add = lambda name, fn, data, ct="application/octet-stream", quick=True: out.append((name, fn, data, ct, quick))  # noqa: E731

    # truncated, zero-byte, wrong magic
    add("zero_byte", "empty.png", b"", "image/png")
    add("truncated_png_half", "t.png", png[: len(png) // 2], "image/png")
    add("truncated_png_header_only", "t.png", png[:33], "image/png")
    add("truncated_jpeg_half", "t.jpg", jpg[: len(jpg) // 2], "image/jpeg")
    add("truncated_jpeg_soi_only", "t.jpg", jpg[:2], "image/jpeg")
    add("truncated_tiff", "t.tif", tif[: len(tif) // 3], "image/tiff")
    add("magic_only_png", "m.png", b"\x89PNG\r\n\x1a\n", "image/png")
    add("text_named_png", "note.png", b"hello, I am not an image\n" * 10, "image/png")
    add("html_named_jpg", "x.jpg", b"<html><script>alert(1)</script></html>", "image/jpeg")
    add("elf_binary", "a.out", b"\x7fELF" + b"\x00" * 200)
    add("png_named_jpg", "really_png.jpg", png, "image/jpeg")
    add("gif_unsupported", "a.gif", _encode(_text_img(), "GIF"), "image/gif")
    add("webp_unsupported", "a.webp", _encode(_text_img(), "WEBP"), "image/webp")
    add("ico_unsupported", "a.ico", _encode(_text_img(size=(64, 64)), "ICO"), "image/x-icon")
    add("pdf_magic_garbage", "x.pdf", b"%PDF-1.7\n" + b"\xff" * 500, "application/pdf")
    add("pdf_truncated", "x.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\nendobj\n", "application/pdf")
    add("png_bad_crc", "crc.png", png[:29] + b"\x00\x00\x00\x00" + png[33:], "image/png")
    add("random_bytes", "r.bin", bytes((i * 73 + 11) % 256 for i in range(4096)))

    # decompression bombs and huge dimensions
    add("png_ihdr_100k_x_100k", "bomb.png", png_huge_ihdr(100_000, 100_000), "image/png")
    add("png_ihdr_2pow31", "bomb2.png", png_huge_ihdr(2**31 - 1, 2**31 - 1), "image/png")
    add("png_ihdr_zero_width", "zero.png", png_huge_ihdr(0, 10), "image/png")
    add("png_zero_bomb_9000sq", "z.png", png_zero_bomb(9000, 9000), "image/png")   # 81 MP, ~80 KB
    add("png_1x60000", "thin.png", png_zero_bomb(1, 60000), "image/png")
    add("png_60000x1", "wide.png", png_zero_bomb(60000, 1), "image/png")
    add("png_1x1", "dot.png", _encode(Image.new("RGB", (1, 1), "white"), "PNG"), "image/png")
    add("jpeg_sof_65000sq", "big.jpg", jpeg_huge_sof(65000, 65000), "image/jpeg")
    add("bmp_header_50000sq", "big.bmp", bmp_huge_header(50000, 50000), "image/bmp")
    add("bmp_negative_height", "neg.bmp", bmp_huge_header(4, -4), "image/bmp")
    add("png_zero_bomb_7000sq_under_cap", "z7.png", png_zero_bomb(7000, 7000), "image/png", False)

    # modes
    add("cmyk_jpeg", "cmyk.jpg", _encode(_text_img("CMYK"), "JPEG"), "image/jpeg")
    add("cmyk_tiff", "cmyk.tif", _encode(_text_img("CMYK"), "TIFF"), "image/tiff")
    add("png_16bit_gray", "i16.png", _encode(_text_img("L").convert("I;16"), "PNG"), "image/png")
    add("tiff_32bit_int", "i32.tif", _encode(_text_img("L").convert("I"), "TIFF"), "image/tiff")
    add("tiff_float32", "f.tif", _encode(_text_img("L").convert("F"), "TIFF"), "image/tiff")
    add("palette_png_transparency", "p.png",
        _encode(_text_img().convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0), "image/png")
    add("rgba_png", "a.png", _encode(_text_img("RGBA"), "PNG"), "image/png")
    add("la_png", "la.png", _encode(_text_img("LA"), "PNG"), "image/png")
    add("bilevel_png", "1.png", _encode(_text_img("1"), "PNG"), "image/png")
    add("lab_tiff", "lab.tif", _encode(_text_img("LAB"), "TIFF"), "image/tiff")
    add("ycbcr_jpeg_progressive", "prog.jpg", _encode(_text_img(), "JPEG", progressive=True), "image/jpeg")
    exif = Image.Exif()
    exif[0x0112] = 9  # orientation out of range
    add("jpeg_bad_exif_orientation", "o.jpg", _encode(_text_img(), "JPEG", exif=exif), "image/jpeg")

    # multi-frame TIFF
    frames = [_text_img(), _text_img("L"), _text_img("CMYK", size=(200, 50))]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    add("tiff_3_frames_mixed_modes", "multi.tif", buf.getvalue(), "image/tiff")
    buf = io.BytesIO()
    small = Image.new("L", (32, 32), 255)
    small.save(buf, "TIFF", save_all=True, append_images=[small] * 59)
    add("tiff_60_frames_over_cap", "many.tif", buf.getvalue(), "image/tiff")
    return out


# --------------------------------------------------------------------------- multipart


def multipart(parts: list[tuple[str, str | None, bytes, str | None]], boundary: str = BOUNDARY,
              preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    """parts: (field name, filename or None, data, content type or None)."""
    b = boundary.encode("latin-1")
    out = [preamble]
    for name, filename, data, ctype in parts:
        disp = f'form-data; name="{name}"'
        if filename is not None:
            disp += f'; filename="{filename}"'
        out.append(b"--" + b + CRLF + b"Content-Disposition: " + disp.encode("utf-8") + CRLF)
        if ctype:
            out.append(b"Content-Type: " + ctype.encode() + CRLF)
        out.append(CRLF + data + CRLF)
    out.append(b"--" + b + b"--" + CRLF + epilogue)
    return b"".join(out)


def _mp_headers(boundary: str = BOUNDARY) -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _fields(path: str) -> list[tuple[str, None, bytes, None]]:
    """Form fields that keep each endpoint cheap: the CPU OCR engine, a 4-token chat."""
    if path == "/chat":
        return [("prompt", None, b"What is written?", None), ("max_tokens", None, b"4", None),
                ("temperature", None, b"0", None)]
    return [("model", None, b"rapidocr", None)]


def _file_field(path: str) -> str:
    return "files" if path == "/batch/ocr" else "file"


def multipart_cases(png: bytes) -> list[Case]:
    cases: list[Case] = []
    f = [("file", "ok.png", png, "image/png")] + _fields("/ocr")

    # python-multipart advisory GHSA-2jv5-9r88-3w3p: quadratic parse of backslashes in the boundary
    bs = "\\" * 5000
    cases.append(Case("boundary_backslashes_quoted", "/ocr", multipart(f, boundary="a"),
                      {"Content-Type": f'multipart/form-data; boundary="{bs}'}))
    cases.append(Case("boundary_backslash_escaped_match", "/ocr",
                      multipart(f, boundary="ab\\cd"), {"Content-Type": 'multipart/form-data; boundary="ab\\\\cd"'}))
    # CVE-2024-53981: data before the first / after the last boundary was logged byte by byte
    cases.append(Case("preamble_1mb_crlf", "/ocr", multipart(f, preamble=b"\r\n" * 500_000), _mp_headers()))
    cases.append(Case("preamble_4mb_junk", "/ocr", multipart(f, preamble=b"x" * 4_000_000), _mp_headers(), quick=False))
    cases.append(Case("epilogue_1mb_crlf", "/ocr", multipart(f, epilogue=b"\r\n" * 500_000), _mp_headers()))
    # endless part headers: one header line of 2 MB, then 50k header lines, never a blank line
    b = BOUNDARY.encode()
    long_hdr = (b"--" + b + CRLF + b'Content-Disposition: form-data; name="file"; filename="x.png"' + CRLF
                + b"X-Junk: " + b"a" * 2_000_000 + CRLF + CRLF + png + CRLF + b"--" + b + b"--" + CRLF)
    cases.append(Case("part_header_line_2mb", "/ocr", long_hdr, _mp_headers()))
    many_hdr = (b"--" + b + CRLF + b"".join(b"X-H%d: v" % i + CRLF for i in range(50_000)))
    cases.append(Case("part_headers_50k_no_end", "/ocr", many_hdr, _mp_headers()))
    no_colon = b"--" + b + CRLF + b"A" * 1_000_000
    cases.append(Case("part_header_no_colon_1mb", "/ocr", no_colon, _mp_headers()))
    # over-long boundaries
    lb = "B" * 8000
    cases.append(Case("boundary_8000_chars", "/ocr", multipart(f, boundary=lb), _mp_headers(lb)))
    cases.append(Case("boundary_mismatch", "/ocr", multipart(f, boundary="other"), _mp_headers("expected")))
    cases.append(Case("boundary_missing", "/ocr", multipart(f), {"Content-Type": "multipart/form-data"}))
    cases.append(Case("boundary_empty", "/ocr", multipart(f), {"Content-Type": "multipart/form-data; boundary="}))
    # filename tricks
    def disp_case(name: str, disposition: bytes, quick: bool = True) -> Case:
        body = (b"--" + b + CRLF + b"Content-Disposition: " + disposition + CRLF + b"Content-Type: image/png"
                + CRLF + CRLF + png + CRLF + b"--" + b + CRLF
                + b'Content-Disposition: form-data; name="model"' + CRLF + CRLF + b"rapidocr" + CRLF
                + b"--" + b + b"--" + CRLF)
        return Case(name, "/ocr", body, _mp_headers(), quick=quick)
    cases.append(disp_case("filename_star_traversal",
                           b"form-data; name=\"file\"; filename*=UTF-8''..%2F..%2F..%2Fetc%2Fpasswd"))
    cases.append(disp_case("filename_star_and_plain",
                           b"form-data; name=\"file\"; filename=\"a.png\"; filename*=UTF-8''%00%0D%0Aevil.png"))
    cases.append(disp_case("filename_star_bad_charset",
                           b"form-data; name=\"file\"; filename*=X-NOPE'zz'%FF%FE%FD.png"))
    cases.append(disp_case("filename_traversal_plain", b'form-data; name="file"; filename="../../../../tmp/x.png"'))
    cases.append(disp_case("filename_backslash_path", b'form-data; name="file"; filename="C:\\\\windows\\\\x.png"'))
    cases.append(disp_case("filename_nul", b'form-data; name="file"; filename="a\x00.png"'))
    cases.append(disp_case("filename_100k", b'form-data; name="file"; filename="' + b"n" * 100_000 + b'.png"'))
    cases.append(disp_case("filename_non_utf8", b'form-data; name="file"; filename="\xff\xfe\xc3(.png"'))
    cases.append(disp_case("name_star_field", b"form-data; name*=UTF-8''file; filename=\"a.png\""))
    cases.append(disp_case("disposition_unterminated_quote", b'form-data; name="file; filename="a.png'))
    # truncated bodies, wrong encodings, caps
    full = multipart(f)
    cases.append(Case("multipart_no_final_boundary", "/ocr", full[: -len(BOUNDARY) - 6], _mp_headers()))
    cases.append(Case("body_shorter_than_content_length", "/ocr", full, _mp_headers(), send_len=len(full) // 2))
    cases.append(Case("urlencoded_body", "/ocr", b"file=abc&model=rapidocr",
                      {"Content-Type": "application/x-www-form-urlencoded"}))
    cases.append(Case("json_body", "/ocr", b'{"file": "abc"}', {"Content-Type": "application/json"}))
    cases.append(Case("no_content_type", "/ocr", full, {}))
    cases.append(Case("content_length_1tb", "/ocr", b"", {**_mp_headers(), "Content-Length": str(10**12)}))
    cases.append(Case("content_length_negative", "/ocr", b"", {**_mp_headers(), "Content-Length": "-1"}))
    big = png + b"\x00" * (11 * 1024 * 1024)
    cases.append(Case("file_over_10mb", "/ocr", multipart([("file", "big.png", big, "image/png")]), _mp_headers(),
                      quick=False))
    cases.append(Case("body_over_cap_60mb", "/ocr", multipart([("file", "big.png", b"\x00" * (60 << 20), "image/png")]),
                      _mp_headers(), quick=False))
    # more parts than allowed
    cases.append(Case("two_files_on_ocr", "/ocr", multipart([("file", "a.png", png, "image/png")] * 2 + _fields("/ocr")),
                      _mp_headers()))
    cases.append(Case("fields_5000", "/ocr", multipart([(f"f{i}", None, b"v", None) for i in range(5000)]
                                                      + [("file", "a.png", png, "image/png")]), _mp_headers()))
    cases.append(Case("files_1500_tiny", "/batch/ocr",
                      multipart([("files", f"{i}.png", b"x", "image/png") for i in range(1500)]), _mp_headers()))
    cases.append(Case("batch_11_files", "/batch/ocr",
                      multipart([("files", f"{i}.png", png, "image/png") for i in range(11)] + _fields("/batch/ocr")),
                      _mp_headers()))
    cases.append(Case("batch_0_files", "/batch/ocr", multipart(_fields("/batch/ocr")), _mp_headers()))
    cases.append(Case("chat_two_files", "/chat", multipart([("file", "a.png", png, "image/png")] * 2 + _fields("/chat")),
                      _mp_headers()))
    cases.append(Case("chat_prompt_1mb", "/chat", multipart([("file", "a.png", png, "image/png"),
                                                             ("prompt", None, b"p" * 1_000_000, None),
                                                             ("max_tokens", None, b"4", None)]), _mp_headers()))
    cases.append(Case("chat_max_tokens_huge", "/chat", multipart([("file", "a.png", png, "image/png"),
                                                                  ("max_tokens", None, b"99999999999999999999", None)]),
                      _mp_headers()))
    cases.append(Case("nested_multipart_mixed", "/ocr",
                      multipart([("file", None, multipart([("x", "a.png", png, "image/png")], boundary="inner"),
                                  "multipart/mixed; boundary=inner")]), _mp_headers()))
    return cases


def build_corpus(quick: bool = False) -> list[Case]:
    """Every image case against /ocr (and a sample against /batch/ocr and /chat), plus the multipart cases."""
    png = _encode(_text_img(), "PNG")
    cases: list[Case] = []
    for name, fn, data, ct, q in image_cases():
        cases.append(Case(name, "/ocr", multipart([("file", fn, data, ct)] + _fields("/ocr")), _mp_headers(), quick=q))
        # the batch path decodes each file on its own; mixing one hostile file with a good one
        cases.append(Case("batch_" + name, "/batch/ocr",
                          multipart([("files", fn, data, ct), ("files", "ok.png", png, "image/png")]
                                    + _fields("/batch/ocr")), _mp_headers(), quick=False))
        cases.append(Case("chat_" + name, "/chat", multipart([("file", fn, data, ct)] + _fields("/chat")),
                          _mp_headers(), quick=q and not name.startswith(("truncated", "magic", "text", "html"))))
    cases += multipart_cases(png)
    return [c for c in cases if c.quick] if quick else cases


def build_jobs_corpus(quick: bool = False) -> list[Case]:
    """The same corpus against POST /jobs/ocr: every image case, and every multipart case re-aimed."""
    from dataclasses import replace

    cases = [replace(c, name="jobs_" + c.name, path="/jobs/ocr") for c in build_corpus(quick)
             if c.path == "/ocr"]
    return cases


# --------------------------------------------------------------------------- runner


def send_raw(host: str, port: int, case: Case, timeout: float) -> Result:
    """One request on its own connection; the status line and body are read until close or timeout."""
    headers = {"Host": f"{host}:{port}", "Connection": "close", "User-Agent": "hostile-uploads/1"}
    headers.update(case.headers)
    headers.setdefault("Content-Length", str(len(case.body)))
    head = f"POST {case.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    body = case.body if case.send_len is None else case.body[: case.send_len]
    t0 = time.monotonic()
    deadline = t0 + timeout
    data = b""
    error = None
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(head.encode("latin-1"))
        try:
            for i in range(0, len(body), 256 * 1024):
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.sendall(body[i:i + 256 * 1024])
            if case.send_len is not None:
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the server may answer (413) and close before the body is sent
            error = f"send: {type(exc).__name__}"
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except OSError as exc:
                error = f"recv: {type(exc).__name__}"
                break
            if not chunk:
                break
            data += chunk
            if len(data) > 4 << 20:
                break
    finally:
        sock.close()
    latency = time.monotonic() - t0
    status = None
    code = None
    if data.startswith(b"HTTP/1."):
        try:
            status = int(data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = None
        body_part = data.split(b"\r\n\r\n", 1)[-1]
        try:
            code = json.loads(body_part).get("code")
        except (ValueError, AttributeError):
            code = None
    elif latency >= timeout - 0.01:
        error = "timeout"
    elif case.send_len is not None and not data:
        # the client half-closed mid-body: closing without an answer is the right outcome
        error = "closed"
    return Result(case.name, case.path, status, round(latency, 3), error if status is None else None, code)


def acceptable(r: Result) -> bool:
    """200 or 4xx; or, for a client that gave up mid-body, a prompt close."""
    if r.status is None:
        return r.error == "closed"
    return r.status < 500


def rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    import psutil
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def healthy(host: str, port: int, timeout: float = 5.0) -> bool:
    import httpx
    try:
        return httpx.get(f"http://{host}:{port}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def run(url: str, cases: list[Case], *, pid: int | None = None, timeout: float = 30.0,
        passes: int = 1, log=print) -> dict:
    """Send every case ``passes`` times; RSS growth is measured over the passes after the
    first (the first one loads the models), so it shows what the cases themselves keep."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("hostile uploads go to loopback only")
    rss_start = rss_mb(pid)
    rss0 = rss_start
    results = []
    for n in range(passes):
        if n == 1:
            rss0 = rss_mb(pid)
        for case in cases:
            r = send_raw(host, port, case, timeout)
            results.append(r)
            log(f"[{n + 1}/{passes}] " + f"{r.status or '---'} {r.latency:7.3f}s {case.path:11s} {case.name}"
                + (f" [{r.code}]" if r.code else "") + (f" ({r.error})" if r.error else ""))
    rss1 = rss_mb(pid)
    bad = [r for r in results if not acceptable(r)]
    summary = {
        "cases": len(cases),
        "requests": len(results),
        "passes": passes,
        "by_status": _count(str(r.status) for r in results),
        "server_errors_5xx": sum(1 for r in results if r.status and r.status >= 500),
        "no_answer": sum(1 for r in results if r.status is None and r.error != "closed"),
        "max_latency_s": max((r.latency for r in results), default=0.0),
        "slowest_case": max(results, key=lambda r: r.latency).case if results else None,
        "rss_at_start_mb": round(rss_start, 1) if rss_start else None,
        "rss_after_first_pass_mb": round(rss0, 1) if rss0 and passes > 1 else None,
        "rss_after_mb": round(rss1, 1) if rss1 else None,
        "rss_growth_mb": round(rss1 - rss0, 1) if rss0 and rss1 else None,
        "rss_growth_scope": "after first pass to end" if passes > 1 else "whole run (includes model loads)",
        "healthy_after": healthy(host, port),
        "failures": [r.__dict__ for r in bad],
    }
    return {"summary": summary, "results": [r.__dict__ for r in results]}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (loopback)")
    p.add_argument("--pid", type=int, help="the server's pid, for RSS")
    p.add_argument("--start", action="store_true", help="start a server on freshly built tiny models")
    p.add_argument("--quick", action="store_true", help="only the quick subset")
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--passes", type=int, default=3, help="times the corpus is sent (RSS growth: passes 2..N)")
    p.add_argument("--json", type=Path, help="write the full results here")
    args = p.parse_args(argv)
    cases = build_corpus(quick=args.quick)
    server = None
    if args.start:
        import tempfile
        sys.path.insert(0, str(ROOT))
        from scripts.make_tiny_models import build_tiny_models
        from tests.server_process import RemoteServer
        tiny = Path(tempfile.mkdtemp(prefix="hostile-tiny-"))
        build_tiny_models(tiny, ["qwen3_vl_2b", "qwen_vl_2b"])
        server = RemoteServer(models_dir=tiny)
        url, pid = server.url, server.proc.pid
    else:
        if not args.url:
            p.error("--url or --start")
        url, pid = args.url, args.pid
    try:
        t0 = time.monotonic()
        report = run(url, cases, pid=pid, timeout=args.timeout, passes=max(1, min(args.passes, 20)))
        report["summary"]["wall_s"] = round(time.monotonic() - t0, 1)
    finally:
        if server:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    s = report["summary"]
    return 0 if s["server_errors_5xx"] == 0 and s["no_answer"] == 0 and s["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
