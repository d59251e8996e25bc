"""Bounded load test on loopback: a mix of /ocr, /chat, streaming /v1/chat/completions and
/batch/ocr from many concurrent clients, while a separate task times /health every 50 ms.

Two phases against one server started with small engine queues:

1. below capacity (``--low`` clients, 16 by default): goal 0 errors;
2. above capacity (``--high`` clients, 200 by default): goal, every non-200 is a 503 with
   ``Retry-After`` (no 5xx of another kind, no hang, no reset).

Reported: requests and statuses per phase and endpoint, p50/p99 latency per endpoint,
/health p50/p99/max, and the server's RSS, open file descriptors and temporary files (in
the server's own TMPDIR) before the load, right after it and after 5 s idle.

    python scripts/load_test.py                         # builds tiny models, starts a server
    python scripts/load_test.py --high 200 --high-requests 1200 --json out.json

Every request goes to 127.0.0.1; each phase has a request budget and a time cap, each request a
timeout; the server is always stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
TEXT_MODEL = "qwen2_5_0_5b"
VLM = "qwen_vl_2b"
OCR_MODEL = "rapidocr"
ENDPOINTS = ("ocr", "chat", "stream", "batch")


@dataclass
class Result:
    endpoint: str
    status: int | None          # None: no answer (timeout, reset)
    latency: float
    retry_after: bool = False
    code: str | None = None     # error code from the body, when there is one
    note: str | None = None     # e.g. "stream_error_event", "batch_item_errors:OVERLOADED"


@dataclass
class Phase:
    name: str
    clients: int
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0
    stopped_by: str = ""


# --------------------------------------------------------------------------- requests


def _images() -> list[tuple[str, bytes]]:
    names = ["receipt_en.png", "line_ru.png", "line_zh.png"]
    return [(n, (SAMPLES / n).read_bytes()) for n in names]


def _code_of(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return err.get("code") or err.get("type")
        for key in ("code", "error_code"):
            if isinstance(data.get(key), str):
                return data[key]
        detail = data.get("detail")
        if isinstance(detail, dict):
            return detail.get("code")
    return None


async def _post_form(session, url, fields: dict, files: list[tuple[str, str, bytes]], timeout: float):
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, str(v))
    for name, filename, data in files:
        form.add_field(name, io.BytesIO(data), filename=filename, content_type="image/png")
    async with session.post(url, data=form, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        body = await r.read()
        return r.status, r.headers, body


async def do_request(kind: str, session: aiohttp.ClientSession, base: str, images, timeout: float) -> Result:
    t0 = time.perf_counter()
    status, headers, body, note = None, {}, b"", None
    try:
        if kind == "ocr":
            name, data = images[0]
            status, headers, body = await _post_form(session, base + "/ocr", {"model": OCR_MODEL},
                                                     [("file", name, data)], timeout)
        elif kind == "chat":
            name, data = images[1]
            status, headers, body = await _post_form(
                session, base + "/chat", {"model": VLM, "prompt": "What is written here?", "max_tokens": 16},
                [("file", name, data)], timeout)
        elif kind == "batch":
            status, headers, body = await _post_form(session, base + "/batch/ocr", {"model": OCR_MODEL},
                                                     [("files", n, d) for n, d in images], timeout)
            if status == 200:
                items = json.loads(body).get("results", [])
                bad = Counter(i.get("code") or "FAILED" for i in items if i.get("status") != "success")
                if bad:
                    note = "batch_item_errors:" + ",".join(f"{c}x{n}" for c, n in sorted(bad.items()))
        elif kind == "stream":
            payload = {"model": TEXT_MODEL, "stream": True, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "Tell me a short story."}]}
            async with session.post(base + "/v1/chat/completions", json=payload,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                status, headers = r.status, r.headers
                if status != 200:
                    body = await r.read()
                else:
                    done = saw_error = False
                    async for raw in r.content:
                        line = raw.decode("utf-8", "replace").strip()
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            break
                        try:
                            if "error" in json.loads(data):
                                saw_error = True
                        except ValueError:
                            pass
                    if saw_error:
                        note = "stream_error_event"
                    elif not done:
                        note = "stream_without_done"
        else:
            raise ValueError(kind)
    except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
        return Result(kind, None, time.perf_counter() - t0, note=type(exc).__name__)
    latency = time.perf_counter() - t0
    return Result(kind, status, latency, retry_after="Retry-After" in headers,
                  code=_code_of(body) if status != 200 else None, note=note)


async def run_phase(phase: Phase, base: str, *, total: int, time_cap: float, timeout: float,
                    images, seed: int) -> None:
    """``phase.clients`` workers share a budget of ``total`` requests; the phase also stops at
    ``time_cap`` seconds (requests in flight then get up to ``timeout`` to finish)."""
    rng = random.Random(seed)
    budget = iter(range(total))
    deadline = time.monotonic() + time_cap
    connector = aiohttp.TCPConnector(limit=phase.clients + 8, force_close=False)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker(wid: int) -> None:
            kinds = list(ENDPOINTS)
            rng2 = random.Random(rng.random() + wid)
            while time.monotonic() < deadline:
                if next(budget, None) is None:
                    return
                kind = kinds[rng2.randrange(len(kinds))]
                phase.results.append(await do_request(kind, session, base, images, timeout))

        await asyncio.gather(*(worker(i) for i in range(phase.clients)))
    phase.wall_s = time.monotonic() - t0
    phase.stopped_by = "time cap" if len(phase.results) < total else "request budget"


async def health_probe(base: str, stop: asyncio.Event, out: list[tuple[float, int | None]],
                       interval: float = 0.05, max_probes: int = 10_000) -> None:
    """GET /health every ``interval`` s on its own connection until ``stop`` is set."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(max_probes):
            if stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
                    out.append((time.perf_counter() - t0, r.status))
            except (asyncio.TimeoutError, aiohttp.ClientError):
                out.append((time.perf_counter() - t0, None))
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))


# --------------------------------------------------------------------------- server side


def server_resources(pid: int, tmpdir: Path) -> dict:
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in procs) / 2**20
    fds = sum(p.num_fds() for p in procs)
    temp = sum(1 for p in tmpdir.rglob("*") if p.is_file()) if tmpdir.exists() else 0
    return {"rss_mb": round(rss, 1), "open_fds": fds, "temp_files": temp}


# --------------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:.0f}"


def summarize(phase: Phase) -> dict:
    res = phase.results
    by_ep: dict[str, list[Result]] = defaultdict(list)
    for r in res:
        by_ep[r.endpoint].append(r)
    non200 = [r for r in res if r.status != 200]
    bad_over = [r for r in non200 if not (r.status == 503 and r.retry_after)]
    notes = Counter(r.note for r in res if r.note)
    return {
        "clients": phase.clients,
        "requests": len(res),
        "wall_s": round(phase.wall_s, 1),
        "stopped_by": phase.stopped_by,
        "statuses": dict(Counter(str(r.status) for r in res)),
        "errors": len(non200) + sum(1 for r in res if r.status == 200 and r.note),
        "non200": len(non200),
        "non200_not_503_retry_after": len(bad_over),
        "non200_codes": dict(Counter(f"{r.status}:{r.code or r.note}" for r in non200)),
        "notes_on_200": dict(Counter(r.note for r in res if r.status == 200 and r.note)),
        "all_notes": dict(notes),
        "per_endpoint": {
            ep: {
                "n": len(rs),
                "ok": sum(1 for r in rs if r.status == 200 and not r.note),
                "statuses": dict(Counter(str(r.status) for r in rs)),
                "p50_ms_200": _ms(pct([r.latency for r in rs if r.status == 200], 50)),
                "p99_ms_200": _ms(pct([r.latency for r in rs if r.status == 200], 99)),
                "p50_ms_all": _ms(pct([r.latency for r in rs], 50)),
                "p99_ms_all": _ms(pct([r.latency for r in rs], 99)),
                "p99_ms_503": _ms(pct([r.latency for r in rs if r.status == 503], 99)),
            } for ep, rs in sorted(by_ep.items())
        },
    }


def health_summary(samples: list[tuple[float, int | None]]) -> dict:
    lat = [s[0] for s in samples]
    return {"probes": len(samples), "non200": sum(1 for s in samples if s[1] != 200),
            "p50_ms": _ms(pct(lat, 50)), "p99_ms": _ms(pct(lat, 99)),
            "max_ms": _ms(max(lat) if lat else None),
            "mean_ms": _ms(statistics.fmean(lat) if lat else None)}


def markdown(report: dict) -> str:
    out = []
    for key in ("below", "above"):
        s = report[key]
        title = "below capacity" if key == "below" else "above capacity"
        out.append(f"### {title}: {s['clients']} concurrent clients, {s['requests']} requests in "
                   f"{s['wall_s']} s (stopped by {s['stopped_by']})\n")
        out.append(f"statuses {s['statuses']}; non-200: {s['non200']} "
                   f"(of which not 503 + Retry-After: **{s['non200_not_503_retry_after']}**); "
                   f"errors incl. 200s with failed items/stream errors: **{s['errors']}**")
        if s["non200_codes"]:
            out.append(f"; non-200 by code {s['non200_codes']}")
        if s["notes_on_200"]:
            out.append(f"; 200 with a problem inside {s['notes_on_200']}")
        out.append("\n\n| endpoint | n | 200 ok | statuses | p50 ms (200) | p99 ms (200) | p50 ms (all) | p99 ms (all) | p99 ms (503) |\n")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
        for ep, e in s["per_endpoint"].items():
            out.append(f"| {ep} | {e['n']} | {e['ok']} | {e['statuses']} | {e['p50_ms_200']} | {e['p99_ms_200']} "
                       f"| {e['p50_ms_all']} | {e['p99_ms_all']} | {e['p99_ms_503']} |\n")
        h = report[f"health_{key}"]
        out.append(f"\n/health during the phase: {h['probes']} probes, non-200 {h['non200']}, "
                   f"p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms\n\n")
    r = report["resources"]
    out.append("### server resources\n\n| | RSS MB | open fds | temp files |\n| --- | --- | --- | --- |\n")
    for k in ("before", "after", "after_idle_5s"):
        out.append(f"| {k} | {r[k]['rss_mb']} | {r[k]['open_fds']} | {r[k]['temp_files']} |\n")
    return "".join(out)


# --------------------------------------------------------------------------- main


async def _phase_with_health(phase: Phase, base: str, **kw) -> list:
    stop = asyncio.Event()
    samples: list = []
    probe = asyncio.create_task(health_probe(base, stop, samples))
    try:
        await run_phase(phase, base, **kw)
    finally:
        stop.set()
        await asyncio.wait_for(probe, 15)
    return samples


async def _warm_up(base: str, images, timeout: float) -> list[Result]:
    """One request of each kind, so model loads do not count as load-test latency or growth."""
    async with aiohttp.ClientSession() as session:
        return [await do_request(k, session, base, images, timeout) for k in ENDPOINTS]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--low", type=int, default=16, help="clients below capacity")
    p.add_argument("--high", type=int, default=200, help="clients above capacity")
    p.add_argument("--low-requests", type=int, default=200)
    p.add_argument("--high-requests", type=int, default=1200)
    p.add_argument("--low-time", type=float, default=45.0, help="time cap of phase 1, s")
    p.add_argument("--high-time", type=float, default=45.0, help="time cap of phase 2, s")
    p.add_argument("--timeout", type=float, default=60.0, help="per request, s")
    p.add_argument("--queue", type=int, default=4, help="engine max_queue of the two tiny models")
    p.add_argument("--batch", type=int, default=4, help="engine max_batch_size of the two tiny models")
    p.add_argument("--models-dir", type=Path, help="tiny models (built into a temp dir when absent)")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the server, e.g. CHATVLM_SERVER__IDLE_TRIM_S=0 (repeatable)")
    args = p.parse_args(argv)
    args.high = max(1, min(args.high, 500))
    args.low = max(1, min(args.low, 500))

    sys.path.insert(0, str(ROOT))
    from tests.server_process import RemoteServer

    work = Path(tempfile.mkdtemp(prefix="chatvlm-load-"))
    server_tmp = work / "server-tmp"
    server_tmp.mkdir()
    models_dir = args.models_dir
    if models_dir is None:
        from scripts.make_tiny_models import build_tiny_models

        models_dir = work / "models"
        build_tiny_models(models_dir, [TEXT_MODEL, VLM])
    env = {"TMPDIR": str(server_tmp), "CHATVLM_DATA_DIR": str(work / "data")}
    for mid in (TEXT_MODEL, VLM):
        env[f"CHATVLM_MODELS__{mid.upper()}__MAX_QUEUE"] = str(args.queue)
        env[f"CHATVLM_MODELS__{mid.upper()}__MAX_BATCH_SIZE"] = str(args.batch)
    env.update(kv.split("=", 1) for kv in args.server_env)
    images = _images()
    t_start = time.monotonic()
    server = RemoteServer(models_dir=models_dir, env=env)
    try:
        base, pid = server.url, server.proc.pid
        warm = asyncio.run(_warm_up(base, images, args.timeout))
        print("warm-up:", [(r.endpoint, r.status, round(r.latency, 2)) for r in warm], flush=True)
        before = server_resources(pid, server_tmp)
        below = Phase("below", args.low)
        h_below = asyncio.run(_phase_with_health(below, base, total=args.low_requests, time_cap=args.low_time,
                                                 timeout=args.timeout, images=images, seed=1))
        print(f"phase 1 done: {len(below.results)} requests in {below.wall_s:.1f}s", flush=True)
        above = Phase("above", args.high)
        h_above = asyncio.run(_phase_with_health(above, base, total=args.high_requests, time_cap=args.high_time,
                                                 timeout=args.timeout, images=images, seed=2))
        print(f"phase 2 done: {len(above.results)} requests in {above.wall_s:.1f}s", flush=True)
        after = server_resources(pid, server_tmp)
        time.sleep(5)
        idle = server_resources(pid, server_tmp)
        alive = server.proc.poll() is None
    finally:
        server.stop()
    report = {
        "config": {"server_env": args.server_env, "low_clients": args.low, "high_clients": args.high, "engine_max_queue": args.queue,
                   "engine_max_batch_size": args.batch, "ocr_runner_queue": "rapidocr: concurrency 2, max_queue 64, refused when the expected wait misses the deadline"},
        "below": summarize(below), "above": summarize(above),
        "health_below": health_summary(h_below), "health_above": health_summary(h_above),
        "resources": {"before": before, "after": after, "after_idle_5s": idle},
        "server_alive_at_end": alive,
        "runtime_s": round(time.monotonic() - t_start, 1),
    }
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    print(f"runtime {report['runtime_s']} s; server alive at the end: {alive}")
    ok = (report["below"]["errors"] == 0 and report["above"]["non200_not_503_retry_after"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
