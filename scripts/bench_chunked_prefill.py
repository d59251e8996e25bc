"""Chunked prefill: the worst gap between tokens that running streams see while a long prompt
(4,000 tokens) joins their batch, against their usual step time; one prefill vs chunks, side by
side in one run through the engine on one real model. Gaps are taken per token (between the
running rows' decode steps) and per text event (what a client receives).

    .venv/bin/python scripts/bench_chunked_prefill.py /tmp/bench-llm-peers/smollm2 --chunks 0,512,128 --control

The control (``--control``) runs the same streams with nothing joining, for as many steps as the
longest join: its worst gap is what the machine alone does to these steps.
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


def run(adapter, chunk: int, streams: int, long_ids: list[int] | None, new_tokens: int, control_steps: int = 0) -> tuple:
    """(median token gap, worst token gap during the join, the same two for text events at the
    client, TTFT of the long prompt, its reply, the decode steps' median time during the join,
    the number of steps during the join, the 99th percentile of the token gaps during the join);
    times in seconds. Without ``long_ids`` (the control) nothing joins: the same figures over
    the next ``control_steps`` steps.

    A token gap is the time between two decode steps of the running rows (each gives every row
    its next token), taken on the engine's thread as each step ends. A text event is what a
    client receives: a token whose text is empty or held back (a special token, part of a
    character) sends none, so one text gap can span two steps or more."""
    from core.types import CancelToken, GenerationParams
    from engine.backend import BatchBackend, EncodedPrompt
    from engine.engine import Engine

    backend = BatchBackend(adapter.model, adapter.tokenizer, adapter.encode, prefill_chunk=chunk)
    steps: list[float] = []
    took: list[tuple[float, float]] = []  # (end, duration) of each decode call alone
    decode = backend.decode

    def timed_decode(tokens):
        start = time.perf_counter()
        out = decode(tokens)
        steps.append(time.perf_counter())
        took.append((steps[-1], steps[-1] - start))
        return out

    backend.decode = timed_decode

    async def main():
        engine = Engine(backend, name="bench", stream_interval=0.0)
        engine.start()
        params = GenerationParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        stamps: list[list[float]] = [[] for _ in range(streams)]

        async def consume(i: int, handle) -> None:
            async for delta in handle:
                if delta.text:
                    stamps[i].append(time.perf_counter())

        try:
            # The streams run until the long prompt's reply is complete (then they are cancelled):
            # a stream ending first would leave a gap that is no stall.
            cancels = [CancelToken() for _ in range(streams)]
            handles = [engine.submit(EncodedPrompt(adapter.tokenizer(f"Story number {i}: once upon a time")["input_ids"]),
                                     params, cancels[i]) for i in range(streams)]
            tasks = [asyncio.create_task(consume(i, h)) for i, h in enumerate(handles)]
            while min(len(s) for s in stamps) < 8:  # all streams running at their usual pace
                await asyncio.sleep(0.01)
            joined_at = time.perf_counter()
            first, text = None, ""
            if long_ids is None:  # the control: the same streams, nothing joins
                begin = len(steps)
                while len(steps) < begin + control_steps:
                    await asyncio.sleep(0.01)
                first = time.perf_counter()
            else:
                long = engine.submit(EncodedPrompt(long_ids), GenerationParams(max_new_tokens=4, temperature=0.0,
                                                                               ignore_eos=True), CancelToken())
                async for delta in long:
                    first = first or time.perf_counter()
                    text += delta.text
            assert all(not h.done() for h in tasks), "a stream ended before the long prompt's reply"
            for cancel in cancels:
                cancel.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await asyncio.to_thread(engine.stop)
        gaps_before = [b - a for s in stamps for a, b in zip(s, s[1:]) if b < joined_at]
        gaps_join = [b - a for s in stamps for a, b in zip(s, s[1:]) if a <= first and b >= joined_at]
        token_before = [b - a for a, b in zip(steps, steps[1:]) if b < joined_at]
        token_join = [b - a for a, b in zip(steps, steps[1:]) if a <= first and b >= joined_at]
        # The decode calls' own time while the long prompt joins: this machine's speed swings
        # (the same decode-only step takes 40 or 70 ms from one second to the next), so the worst
        # gap is also set against the steps taken at the same time.
        decode_join = [d for end, d in took if joined_at <= end <= first]
        return (statistics.median(token_before), max(token_join, default=0.0), statistics.median(gaps_before),
                max(gaps_join, default=0.0), first - joined_at, text, statistics.median(decode_join or [0.0]),
                len(token_join), sorted(token_join)[int(0.99 * (len(token_join) - 1))] if token_join else 0.0)

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--chunks", default="0,512,128", help="prefill chunk sizes to compare (0: one prefill)")
    parser.add_argument("--slice-share", type=float, default=None,
                        help="a layer slice's share of a decode step (engine/long_prompts.py SLICE_OF_STEP)")
    parser.add_argument("--control", action="store_true",
                        help="also run the streams with nothing joining, for as many steps as the longest join took: "
                             "the machine's own gaps between decode steps")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quantization", default="none",
                        help="the model's precision setting, as in the registry (auto: int4 for a GGUF's 4-bit layers)")
    parser.add_argument("--from-gguf", action="store_true",
                        help="the folder is a converted GGUF (what `quantization: auto` needs to keep its 4-bit layers)")
    a = parser.parse_args(argv)
    import engine.long_prompts
    from llm.causal import CausalLMAdapter
    from models.adapter import ModelSpec

    if a.slice_share is not None:
        engine.long_prompts.SLICE_OF_STEP = a.slice_share

    adapter = CausalLMAdapter(ModelSpec(id="bench", name="bench", kind="causal_lm", path=a.path, device="cpu",
                                        threads=a.threads, quantization=a.quantization,
                                        options={"from_gguf": True} if a.from_gguf else {}))
    adapter.load()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    words = ("the river carries boats past the old mill while children count the ducks " * 600).split()
    long_ids = adapter.tokenizer(" ".join(words))["input_ids"][:a.long_tokens]
    # Enough new tokens that the streams are still running when the long prompt has joined.
    print(f"load average before: {os.getloadavg()}; {adapter.precision.label}; {a.streams} streams; "
          f"a {len(long_ids)}-token prompt joins; slices of {engine.long_prompts.SLICE_OF_STEP} a step", flush=True)
    rows, replies, longest = [], set(), 0
    modes = [int(c) for c in a.chunks.split(",")] + (["control"] if a.control else [])
    for chunk in modes:
        control = chunk == "control"
        step, worst, text_step, text_worst, ttft, text, during, count, p99 = run(
            adapter, 0 if control else chunk, a.streams, None if control else long_ids, 4000, longest)
        if not control:
            replies.add(text)
            longest = max(longest, count)
        name = "nothing joins (control)" if control else f"chunks of {chunk}" if chunk else "one prefill"
        rows.append((name, step, worst, text_step, text_worst, ttft, during, p99))
        print(f"  {name}: token gaps: step {step * 1000:.0f} ms, "
              f"worst {worst * 1000:.0f} ms ({worst / step:.1f}×); decode steps during the join {during * 1000:.0f} ms "
              f"(worst gap {worst / during:.1f}× that, 99th percentile {p99 * 1000:.0f} ms); text events: {text_step * 1000:.0f} ms, worst "
              f"{text_worst * 1000:.0f} ms ({text_worst / text_step:.1f}×); "
              f"{f'{count} steps' if control else f'long prompt TTFT {ttft:.2f} s'}", flush=True)
    print(f"load average after: {os.getloadavg()}\n")
    print("| prefill | usual step (median token gap) | worst token gap while the long prompt joins | worst / step | "
          "decode steps during the join (median) | worst / those | 99th percentile gap / those | "
          "text events: median / worst gap (worst / median) | TTFT of the long prompt |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, step, worst, text_step, text_worst, ttft, during, p99 in rows:
        print(f"| {name} | {step * 1000:.0f} ms | {worst * 1000:.0f} ms | "
              f"{worst / step:.1f}× | {during * 1000:.0f} ms | {worst / max(during, 1e-9):.1f}× | "
              f"{p99 * 1000:.0f} ms ({p99 / max(during, 1e-9):.1f}×) | "
              f"{text_step * 1000:.0f} / {text_worst * 1000:.0f} ms ({text_worst / text_step:.1f}×) | "
              f"{'–' if name.startswith('nothing') else f'{ttft:.2f} s'} |")
    print(f"\nthe long prompt's reply is {'identical' if len(replies) == 1 else 'DIFFERENT'} across the modes")
    return 0 if len(replies) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
