"""Fault injection against real servers on the tiny checkpoints, each fault with its figure.

    a  disconnect   a client closes a /v1/chat/completions stream (max_tokens 4000) after 5
                    chunks: time until the engine's active_requests for the model is 0 (goal < 1 s)
    b  sigterm      a long non-stream request and a long stream are in flight, SIGTERM arrives:
                    /readyz answers, the in-flight request's fate, the stream's ending, exit time
                    (goal: exit within uvicorn's 10 s graceful timeout plus the shutdown)
    c  bad_weights  qwen_vl_2b's model.safetensors is garbage: requests to it get 503
                    MODEL_LOAD_FAILED with Retry-After while qwen2_5_0_5b and rapidocr serve
    d  unload       DELETE /models/qwen2_5_0_5b during a stream: the stream ends with an error
                    event, then [DONE]
    e  auth         server with an API key: every /openapi.json operation and both WebSocket
                    routes without a key -> % answering 401 (goal 100%, probes excluded)

    python scripts/fault_injection.py                 # all of them
    python scripts/fault_injection.py --only a,c      # a subset

Every request goes to 127.0.0.1, every wait is bounded, every server is stopped.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.server_process import RemoteServer  # noqa: E402

TEXT_MODEL = "qwen2_5_0_5b"
VLM = "qwen_vl_2b"
SAMPLE = ROOT / "samples" / "receipt_en.png"
PROBES = ("/health", "/healthz", "/readyz")


def build_models(out: Path) -> Path:
    from scripts.make_tiny_models import build_tiny_models

    build_tiny_models(out, [TEXT_MODEL, VLM])
    return out


# --------------------------------------------------------------------------- raw SSE client


class RawStream:
    """A streaming POST over a plain socket, so closing it is a real disconnect."""

    def __init__(self, port: int, path: str, payload: dict, timeout: float = 30.0) -> None:
        body = json.dumps(payload).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                           f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        self.buf = b""
        self.status: int | None = None
        self.events: list[str] = []   # the data of each event, in order
        self.tail = b""               # the last bytes received (was the chunked body terminated?)
        self.eof = False

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        self.tail = (self.tail + chunk)[-16:]
        return True

    def read_headers(self) -> int:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before headers")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])
        self.chunked = b"transfer-encoding: chunked" in head.lower()
        return self.status

    def next_events(self, n: int, time_cap: float = 30.0) -> list[str]:
        """Read until ``n`` more data events arrived (or the stream ended / the cap passed)."""
        start = len(self.events)
        deadline = time.monotonic() + time_cap
        while len(self.events) - start < n and time.monotonic() < deadline:
            if not self._parse() and not self._fill():
                break
        return self.events[start:]

    def read_to_end(self, time_cap: float = 30.0) -> None:
        deadline = time.monotonic() + time_cap
        while time.monotonic() < deadline:
            if self.events and self.events[-1] == "[DONE]":
                return
            if not self._parse() and not self._fill():
                return

    def _parse(self) -> bool:
        """Take the complete lines of the buffer; keep a partial last line for the next read.
        uvicorn sends each event as its own chunk, so chunk-size lines sit between events."""
        cut = self.buf.rfind(b"\n")
        if cut < 0:
            return False
        text, self.buf = self.buf[:cut + 1].decode("utf-8", "replace"), self.buf[cut + 1:]
        found = False
        for m in re.finditer(r"(?m)^data: ?(.*)$", text):
            self.events.append(m.group(1).rstrip("\r"))
            found = True
        return found

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def stream_payload(max_tokens: int) -> dict:
    return {"model": TEXT_MODEL, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a very long story."}]}


def engine_counts(client: httpx.Client, model: str = TEXT_MODEL) -> tuple[int | None, int | None]:
    d = client.get(f"/api/v1/llm/models/{model}/", timeout=5).json()
    return d.get("active_requests"), d.get("queued_requests")


def _load(client: httpx.Client, model: str) -> None:
    r = client.post(f"/models/{model}/load", timeout=120)
    r.raise_for_status()


# --------------------------------------------------------------------------- a: disconnect


def fault_disconnect(models: Path, repeats: int = 3) -> dict:
    """Close a long stream after 5 chunks; time until active_requests and queued_requests are 0."""
    with RemoteServer(models_dir=models) as srv, httpx.Client(base_url=srv.url) as c:
        _load(c, TEXT_MODEL)
        runs = []
        for _ in range(max(1, min(repeats, 10))):
            s = RawStream(srv.port, "/v1/chat/completions", stream_payload(4000))
            try:
                status = s.read_headers()
                got = s.next_events(5, time_cap=30)
                active_before = engine_counts(c)[0]
            finally:
                closed_at = time.monotonic()
                s.close()
            zero_after = None
            deadline = closed_at + 10
            while time.monotonic() < deadline:
                active, queued = engine_counts(c)
                if (active or 0) == 0 and (queued or 0) == 0:
                    zero_after = time.monotonic() - closed_at
                    break
                time.sleep(0.01)
            runs.append({"status": status, "chunks_read": len(got), "active_before_close": active_before,
                         "seconds_to_idle": None if zero_after is None else round(zero_after, 3)})
        times = [r["seconds_to_idle"] for r in runs]
        ok = all(t is not None and t < 1.0 for t in times) and all(r["active_before_close"] == 1 for r in runs)
        return {"fault": "a disconnect mid-stream", "runs": runs,
                "max_seconds_to_idle": max((t for t in times if t is not None), default=None),
                "goal": "< 1 s", "pass": ok}


# --------------------------------------------------------------------------- b: SIGTERM


def fault_sigterm(models: Path, announce_s: float = 0.0, graceful_s: float = 10.0) -> dict:
    """In flight at SIGTERM: a non-stream request (decoding for ~40 % of the graceful timeout, at
    most 3 s) and a 4000-token stream. Watch /readyz, both requests, and the exit. The stream
    either finishes within the drain time or, past it, ends with an error event and [DONE].
    With ``announce_s`` the server keeps accepting that long with /readyz at 503."""
    srv = RemoteServer(models_dir=models, env={"CHATVLM_SERVER__DRAIN_ANNOUNCE_S": str(announce_s),
                                               "CHATVLM_SERVER__GRACEFUL_TIMEOUT_S": str(graceful_s)})
    try:
        with httpx.Client(base_url=srv.url) as c:
            _load(c, TEXT_MODEL)
            # Calibrate: tokens per second of one request on this machine.
            t0 = time.monotonic()
            c.post("/v1/chat/completions", json={**stream_payload(400), "stream": False}, timeout=60)
            tps = 400 / max(1e-3, time.monotonic() - t0)
        long_tokens = int(min(4000, max(50, tps * min(3.0, 0.4 * graceful_s))))
        result: dict = {}

        def long_request() -> None:
            t = time.monotonic()
            try:
                r = httpx.post(srv.url + "/v1/chat/completions",
                               json={**stream_payload(long_tokens), "stream": False}, timeout=60)
                body = r.json()
                result.update(status=r.status_code, seconds=round(time.monotonic() - t, 2),
                              finish_reason=(body.get("choices") or [{}])[0].get("finish_reason"),
                              completion_tokens=(body.get("usage") or {}).get("completion_tokens"),
                              error=(body.get("error") or {}).get("code") if isinstance(body.get("error"), dict) else None)
            except httpx.HTTPError as exc:
                result.update(status=None, seconds=round(time.monotonic() - t, 2), error=type(exc).__name__)

        th = threading.Thread(target=long_request, daemon=True)
        th.start()
        stream = RawStream(srv.port, "/v1/chat/completions", stream_payload(4000), timeout=60)
        stream.read_headers()
        stream.next_events(3, time_cap=20)
        with httpx.Client(base_url=srv.url) as c:
            ready_before = c.get("/readyz", timeout=5).status_code
            active_before = engine_counts(c)[0]
        time.sleep(0.3)
        sig_at = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        readyz: dict[str, int] = {}
        first_503_after = None
        stream_thread_result: dict = {}

        def drain_stream() -> None:
            stream.read_to_end(time_cap=40)
            stream_thread_result["ended_after"] = round(time.monotonic() - sig_at, 2)

        st = threading.Thread(target=drain_stream, daemon=True)
        st.start()
        # Fresh connections to /readyz every 20 ms for 1.5 s, then every 250 ms until exit.
        while srv.proc.poll() is None and time.monotonic() - sig_at < 40:
            try:
                code = httpx.get(srv.url + "/readyz", timeout=2).status_code
                key = str(code)
                if code == 503 and first_503_after is None:
                    first_503_after = round(time.monotonic() - sig_at, 3)
            except httpx.ConnectError:
                key = "refused"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            readyz[key] = readyz.get(key, 0) + 1
            time.sleep(0.02 if time.monotonic() - sig_at < 1.5 else 0.25)
        try:
            srv.proc.wait(timeout=max(1, 45 - (time.monotonic() - sig_at)))
        except Exception:  # noqa: BLE001 - reported as not exited
            pass
        exit_after = round(time.monotonic() - sig_at, 2) if srv.proc.poll() is not None else None
        th.join(65)
        st.join(45)
        stream.close()
        tail = stream.events[-3:]
        err_event = any(e not in ("[DONE]",) and '"error"' in e for e in stream.events)
        out = {
            "fault": "b SIGTERM drain", "calibrated_tokens_per_s": round(tps), "long_request_tokens": long_tokens,
            "ready_before": ready_before, "active_before": active_before,
            "readyz_after_sigterm": readyz, "first_readyz_503_after_s": first_503_after,
            "in_flight_request": result,
            "long_stream": {"events": len(stream.events), "error_event": err_event,
                            "ended_with_done": bool(stream.events) and stream.events[-1] == "[DONE]",
                            "chunked_terminator_seen": stream.tail.endswith(b"0\r\n\r\n"),
                            "connection_closed": stream.eof,
                            "last_events": [e[:160] for e in tail], **stream_thread_result},
            "exit_after_s": exit_after, "exit_code": srv.proc.returncode,
            "graceful_timeout_s": graceful_s, "drain_announce_s": announce_s,
        }
        finished = any('"finish_reason":"length"' in e for e in stream.events)
        out["long_stream"]["outcome"] = "error event" if err_event else ("finished" if finished else "cut")
        out["drain_pass"] = (result.get("status") == 200 and exit_after is not None
                             and exit_after < graceful_s + announce_s + 5 and (announce_s == 0 or readyz.get("503", 0) > 0))
        out["stream_end_pass"] = out["long_stream"]["ended_with_done"] and (err_event or finished)
        out["pass"] = out["drain_pass"] and out["stream_end_pass"]
        return out
    finally:
        srv.stop()


# --------------------------------------------------------------------------- c: bad weights


def fault_bad_weights(models: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="chatvlm-badweights-"))
    try:
        bad = work / "models"
        shutil.copytree(models, bad)
        (bad / VLM / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file\xff" * 64)
        with RemoteServer(models_dir=bad) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            img = SAMPLE.read_bytes()
            vlm = []
            for i in range(3):
                r = c.post("/chat", data={"model": VLM, "max_tokens": "8"}, files={"file": ("a.png", img, "image/png")})
                body = r.json()
                code = (body.get("error") or {}).get("code") if isinstance(body.get("error"), dict) else body.get("code")
                vlm.append({"status": r.status_code, "code": code, "retry_after": r.headers.get("Retry-After")})
            r = c.post("/v1/chat/completions", json={"model": VLM, "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            oa = r.json().get("error") or {}
            vlm.append({"surface": "openai", "status": r.status_code, "code": oa.get("code"),
                        "retry_after": r.headers.get("Retry-After")})
            others = {}
            r = c.post("/v1/chat/completions", json={"model": TEXT_MODEL, "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            others[TEXT_MODEL] = r.status_code
            r = c.post("/ocr", data={"model": "rapidocr"}, files={"file": ("a.png", img, "image/png")})
            others["rapidocr"] = r.status_code
            others["health"] = c.get("/health").status_code
            others["readyz"] = c.get("/readyz").status_code
            ok = (all(v["status"] == 503 and v["code"] == "MODEL_LOAD_FAILED" and v["retry_after"] for v in vlm)
                  and all(v == 200 for v in others.values()))
            return {"fault": "c failed model load isolated", "broken_model_answers": vlm,
                    "others": others, "pass": ok}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- d: unload mid-stream


def fault_unload(models: Path) -> dict:
    with RemoteServer(models_dir=models) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        _load(c, TEXT_MODEL)
        s = RawStream(srv.port, "/v1/chat/completions", stream_payload(4000))
        try:
            status = s.read_headers()
            s.next_events(5, time_cap=30)
            t0 = time.monotonic()
            r = c.delete(f"/models/{TEXT_MODEL}")
            delete_status = r.status_code
            s.read_to_end(time_cap=30)
            ended_after = round(time.monotonic() - t0, 3)
        finally:
            s.close()
        events = s.events
        err_idx = [i for i, e in enumerate(events) if '"error"' in e]
        ends_done = bool(events) and events[-1] == "[DONE]"
        error_code = None
        if err_idx:
            try:
                error_code = json.loads(events[err_idx[-1]])["error"].get("code")
            except (ValueError, KeyError, AttributeError):
                pass
        ok = ends_done and bool(err_idx) and err_idx[-1] == len(events) - 2
        return {"fault": "d engine failure mid-stream (unload)", "status": status, "delete_status": delete_status,
                "events": len(events), "error_event_code": error_code, "ended_with_done": ends_done,
                "error_then_done": ok, "stream_ended_after_delete_s": ended_after,
                "last_events": [e[:200] for e in events[-2:]], "pass": ok}


# --------------------------------------------------------------------------- e: auth


def _fill_path(path: str) -> str:
    return re.sub(r"\{([^}:]+)(:[^}]*)?\}", lambda m: "dummy", path)


def fault_auth(models: Path) -> dict:
    import asyncio

    import websockets

    key = "k1"
    with RemoteServer(models_dir=models, env={"CHATVLM_AUTH__API_KEYS": '["k1"]'}) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        spec = c.get("/openapi.json", headers={"X-API-Key": key}).json()
        tried, not_401, probes = 0, [], {}
        for path, ops in spec["paths"].items():
            for method in ops:
                if method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                    continue
                url = _fill_path(path)
                r = c.request(method.upper(), url)
                if path in PROBES:
                    probes[f"{method.upper()} {path}"] = r.status_code
                    continue
                tried += 1
                if r.status_code != 401:
                    not_401.append(f"{method.upper()} {path} -> {r.status_code}")
        # Paths outside the schema: the docs, the schema itself, metrics, an unknown path.
        extra = ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect", "/metrics", "/no-such-path"]
        for path in extra:
            tried += 1
            r = c.get(path)
            if r.status_code != 401:
                not_401.append(f"GET {path} -> {r.status_code}")
        # A wrong key and the key in the other header spelling.
        wrong = c.get("/models", headers={"Authorization": "Bearer nope"}).status_code
        good_bearer = c.get("/models", headers={"Authorization": f"Bearer {key}"}).status_code
        good_header = c.get("/models", headers={"X-API-Key": key}).status_code

        async def ws_try(path: str, headers: dict | None = None) -> str:
            try:
                async with websockets.connect(srv.ws_url + path, open_timeout=10,
                                              additional_headers=headers or {}) as ws:
                    msg = await asyncio.wait_for(ws.recv(), 5)
                    return "open:" + str(msg)[:60]
            except websockets.exceptions.InvalidStatus as exc:
                return str(exc.response.status_code)
            except Exception as exc:  # noqa: BLE001 - reported
                return type(exc).__name__

        ws_paths = ["/ws/chat/dummy/", "/ws/chat/dummy"]
        ws_results = {p: asyncio.run(ws_try(p)) for p in ws_paths}
        ws_with_key = asyncio.run(ws_try(ws_paths[0], {"X-API-Key": key}))
        tried += len(ws_paths)
        not_401 += [f"WS {p} -> {v}" for p, v in ws_results.items() if v != "401"]
        share = 100.0 * (tried - len(not_401)) / tried if tried else 0.0
        return {"fault": "e auth enforced", "operations_in_openapi": sum(len(o) for o in spec["paths"].values()),
                "requests_without_key": tried, "answered_401": tried - len(not_401), "percent_401": round(share, 1),
                "not_401": not_401, "probes_without_key": probes, "websockets": ws_results,
                "websocket_with_key": ws_with_key, "wrong_key": wrong,
                "right_key_bearer": good_bearer, "right_key_x_api_key": good_header,
                "pass": share == 100.0 and wrong == 401 and good_bearer == 200 and good_header == 200
                        and all(v == 200 for v in probes.values())}


FAULTS = {"a": fault_disconnect, "b": fault_sigterm, "c": fault_bad_weights, "d": fault_unload, "e": fault_auth}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--models-dir", type=Path, help="tiny models (built into a temp dir when absent)")
    p.add_argument("--json", type=Path)
    p.add_argument("--graceful", type=float, default=10.0, help="(b): server.graceful_timeout_s")
    p.add_argument("--drain-announce", type=float, default=0.0,
                   help="(b): server.drain_announce_s, seconds of /readyz 503 before connections are refused")
    args = p.parse_args(argv)
    chosen = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        p.error(f"unknown faults: {unknown}")
    work = Path(tempfile.mkdtemp(prefix="chatvlm-faults-"))
    try:
        models = args.models_dir or build_models(work / "models")
        results = []
        for f in chosen:
            t0 = time.monotonic()
            try:
                res = FAULTS[f](models, args.drain_announce, args.graceful) if f == "b" else FAULTS[f](models)
            except Exception as exc:  # noqa: BLE001 - one fault's harness failure does not hide the others
                res = {"fault": f, "pass": False, "harness_error": f"{type(exc).__name__}: {exc}"[:2000]}
            res["seconds"] = round(time.monotonic() - t0, 1)
            results.append(res)
            print(json.dumps(res, indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| fault | pass | seconds |\n| --- | --- | --- |")
    for r in results:
        print(f"| {r['fault']} | {r['pass']} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
