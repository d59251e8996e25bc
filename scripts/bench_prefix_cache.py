"""Prefix cache: time to first token with a shared ~1,000-token system prompt, cache off vs on,
side by side through the engine on one real model (default dtype resolution: bf16 here).

Each request is the shared system prompt plus its own question, one at a time (TTFT without
queueing). With the cache on, the first request fills it and is not timed; the replies (greedy)
must be identical in both modes, and the script checks that.

    .venv/bin/python scripts/bench_prefix_cache.py /tmp/bench-llm-peers/smollm2
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = ["Where is my parcel?", "How do I fill in a customs form?", "Can I change the address?",
             "What does express delivery cost?", "How do I return an item?", "Do you ship to Norway?"]
RULE = ("Rule {i}: when a customer asks about parcel {i}, check the tracking number, the customs status and the "
        "delivery window, then answer politely in the customer's language and offer further help. ")


def system_prompt(tokenizer, target: int) -> str:
    text, i = "You are the support assistant of a shipping company. ", 0
    while len(tokenizer(text)["input_ids"]) < target:
        text += RULE.format(i=i)
        i += 1
    return text


def run(backend, tokenizer, encode, prompts, new_tokens: int) -> list[tuple[float, str]]:
    from core.types import CancelToken, GenerationParams
    from engine.engine import Engine

    async def main():
        engine = Engine(backend, name="bench")
        engine.start()
        out = []
        try:
            for p in prompts:
                t0 = time.perf_counter()
                handle = engine.submit(encode(p), GenerationParams(max_new_tokens=new_tokens, temperature=0.0,
                                                                   ignore_eos=True), CancelToken())
                first, text = None, ""
                async for delta in handle:
                    if first is None:
                        first = time.perf_counter() - t0
                    text += delta.text
                out.append((first, text))
        finally:
            await asyncio.to_thread(engine.stop)
        return out

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=8)
    a = parser.parse_args(argv)
    from llm.causal import CausalLMAdapter
    from llm.types import ChatMessage
    from models.adapter import ModelSpec

    adapter = CausalLMAdapter(ModelSpec(id="bench", name="bench", kind="causal_lm", path=a.path, device="cpu"))
    adapter.load()
    system = system_prompt(adapter.tokenizer, a.prefix_tokens)
    chats = [[ChatMessage("system", system), ChatMessage("user", q)] for q in QUESTIONS]
    n_prompt = len(adapter.encode(chats[0], None).input_ids)
    print(f"load average before: {os.getloadavg()}; {adapter.precision.label}; prompts of ~{n_prompt} tokens, "
          f"the first {len(adapter.encode([ChatMessage('system', system)], None).input_ids)} shared", flush=True)

    from engine.backend import BatchBackend

    def backend(mb: float) -> BatchBackend:
        return BatchBackend(adapter.model, adapter.tokenizer, adapter.encode, prefix_cache_mb=mb)

    encode = lambda chat: adapter.encode(chat, None)  # noqa: E731
    off = run(backend(0), adapter.tokenizer, encode, chats, a.new_tokens)
    on_backend = backend(256)
    on = run(on_backend, adapter.tokenizer, encode, chats, a.new_tokens)
    same = [x[1] for x in off] == [x[1] for x in on]
    t_off = statistics.median(t for t, _ in off[1:])
    t_on = statistics.median(t for t, _ in on[1:])  # the first request with the cache on fills it
    print(f"load average after: {os.getloadavg()}\n")
    print("| shared prefix | TTFT cache off (median) | TTFT cache on (median, warm) | ratio | replies identical |")
    print("|---|---|---|---|---|")
    print(f"| {a.prefix_tokens} tokens | {t_off * 1000:.0f} ms | {t_on * 1000:.0f} ms | {t_off / t_on:.1f}× | "
          f"{'yes' if same else 'NO'} |")
    print(f"cache: {on_backend.prefix_cache.hits} hits, {on_backend.prefix_cache.misses} misses, "
          f"{on_backend.prefix_cache.bytes / 2**20:.1f} MB held")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
