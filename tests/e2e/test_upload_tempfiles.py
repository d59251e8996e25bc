"""Uploads never leave temporary files behind: completed, refused, too large, or aborted by the
client half-way through the body. File parts over 1 MB spool to disk (Starlette's
SpooledTemporaryFile), so these uploads do create temp files in the server's TMPDIR."""
from __future__ import annotations

import io
import os
import socket
import time

import httpx
from PIL import Image

from tests.server_process import RemoteServer

BOUNDARY = "tmpfiletestboundary"


def big_png() -> bytes:
    """A valid PNG of about 3 MB (noise does not compress)."""
    img = Image.frombytes("RGB", (1000, 1000), os.urandom(1000 * 1000 * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def multipart(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def leftovers(tmp: str) -> list[str]:
    return sorted(os.listdir(tmp))


def open_temp_files(pid: int, tmp: str) -> list[str]:
    """The server's open file descriptors into its TMPDIR (spooled uploads are unlinked at once,
    so they show only here, as '<dir>/#123 (deleted)')."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tmp):
            found.append(target)
    return found


def test_no_temp_file_survives_any_upload(tmp_path):
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    with RemoteServer(models_dir=tmp_path / "weights", env={"TMPDIR": str(server_tmp)}) as srv:
        headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
        small = io.BytesIO()
        Image.new("RGB", (64, 32), "white").save(small, "PNG")
        r = httpx.post(srv.url + "/ocr?model=rapidocr", content=multipart(small.getvalue()), headers=headers,
                       timeout=120)  # loads the engine, which keeps its own files (not an upload's)
        baseline = leftovers(str(server_tmp))
        pid, tmp = srv.proc.pid, str(server_tmp)
        assert open_temp_files(pid, tmp) == []
        image = big_png()
        assert len(image) > 2 * 1024 * 1024
        # completed (OCR by the CPU engine), refused (bad bytes), too large (over the 10 MB file cap)
        r = httpx.post(srv.url + "/ocr?model=rapidocr", content=multipart(image), headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(srv.url + "/ocr", content=multipart(b"\0" * (3 * 1024 * 1024)), headers=headers, timeout=60)
        assert r.status_code == 415
        r = httpx.post(srv.url + "/ocr", content=multipart(os.urandom(11 * 1024 * 1024)), headers=headers, timeout=60)
        assert r.status_code == 413
        # aborted: the client sends half of a 3 MB part, then closes the connection
        body = multipart(image)
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(f"POST /ocr HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
            time.sleep(0.5)
            assert open_temp_files(pid, tmp), "the half-sent part should be spooled to a temp file"
        deadline = time.monotonic() + 10
        while (open_temp_files(pid, tmp) or leftovers(tmp) != baseline) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert open_temp_files(pid, tmp) == [] and leftovers(tmp) == baseline
        assert httpx.get(srv.url + "/health").status_code == 200
