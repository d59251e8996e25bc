"""Chunked prefill: the worst gap between tokens that running streams see while a long prompt
(4,000 tokens) joins their batch, against their usual step time; one prefill vs chunks, side by
side in one run through the engine on one real model. Gaps are taken per token (between the
running rows' decode steps) and per text event (what a client receives).

    .venv/bin/python scripts/bench_chunked_prefill.py /tmp/bench-llm-peers/smollm2 --chunks 0,512,128 --control

Each gap is also set against the decode steps' own time around it (the 33 nearest calls): the
streams' step grows with their length (here from ~20 to ~35 ms over a join), so that is their
usual step at that moment. The long prompt's reply is 4 tokens; the gaps from its first token
until 16 steps after it left show what its leaving costs the others.

Each mode also prints its three largest gaps split into what the engine's thread did in them:
the rows' decode call, the long prompt's slice, and the rest (delivering tokens, bookkeeping,
and time the machine took outside both), each in usual steps.

The control (``--control``) runs the same streams with nothing joining, for as many steps as the
longest join: its worst gap is what the machine alone does to these steps.

On a virtual machine the hypervisor sometimes runs another guest on our cores for tens of
milliseconds (Linux counts it per CPU as "steal" in /proc/stat, in ticks of 10 ms): that time
is the machine's, not the engine's. Each gap is also given without it (the most any one CPU lost
during the gap: the cores work together, so one stolen core stalls both), with the number of
gaps that lost any; at 10 ms a tick, that is ±10 ms per gap.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Figures:
    """One mode's figures; times in seconds."""
    step: float         # the usual step: the median token gap before the long prompt came
    worst: float        # the worst token gap while it joined
    worst_local: float  # the same gap against the decode steps' own time around it
    p99_local: float    # the 99th percentile of those ratios
    during: float       # the decode steps' median time during the join
    count: int          # token gaps during the join
    text_step: float    # text events at the client: the median gap before, the worst during
    text_worst: float
    ttft: float         # of the long prompt
    text: str           # its reply
    leave: float        # the worst token gap from its first token until 16 steps after it left
    leave_local: float  # that gap against the steps around it
    worst_clean: float  # the worst ratio to the steps around it once the time the hypervisor took is out
    stolen: int         # the join's gaps during which the hypervisor took time (steal ticks in /proc/stat)
    largest: list       # the join's three largest gaps, each (ratio, decode call, slice, the rest) in usual steps


TICK = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def steal_ticks() -> tuple[int, ...]:
    """Per CPU, the time the hypervisor gave it to others since boot, in ticks (none where
    /proc/stat is not there)."""
    try:
        with open("/proc/stat") as f:
            return tuple(int(line.split()[8]) for line in f if line[:3] == "cpu" and line[3].isdigit())
    except (OSError, IndexError, ValueError):
        return ()


def local_ratios(steps: list[float], took: list[tuple[float, float]], begin: float, end: float,
                 stolen: list[tuple[int, ...]]) -> list[tuple[float, float, float]]:
    """(gap, gap / the median decode call of the 33 around it, the time the hypervisor took from
    a CPU during it) for each token gap between ``begin`` and ``end``: the median is the streams'
    usual step at that moment (it grows with their length, from ~20 to ~35 ms over a join here,
    so one median for the whole join overstates the late gaps and understates the early ones)."""
    out = []
    for j in range(1, len(steps)):
        a, b = steps[j - 1], steps[j]
        if a <= end and b >= begin:
            around = [d for _, d in took[max(0, j - 16):j + 17]]
            lost = max((y - x for x, y in zip(stolen[j - 1], stolen[j])), default=0) * TICK
            out.append((b - a, (b - a) / statistics.median(around), lost))
    return out


def made_of(steps: list[float], took: list[tuple[float, float]], sliced: list[tuple[float, float]],
            begin: float, end: float, count: int = 3) -> list[tuple[float, float, float, float]]:
    """The ``count`` largest token gaps between ``begin`` and ``end``, each as (gap, decode call,
    slice, the rest) in units of the median decode call of the 33 around it: what the engine's
    thread did in that gap (the rest: delivering tokens, the engine's own bookkeeping, and any
    time the machine took outside both calls)."""
    out = []
    for j in range(1, len(steps)):
        a, b = steps[j - 1], steps[j]
        if a <= end and b >= begin:
            usual = statistics.median(d for _, d in took[max(0, j - 16):j + 17])
            decode = sum(d for e, d in took if a < e <= b)
            slice_ = sum(e - s for s, e in sliced if a < e <= b)
            out.append(((b - a) / usual, decode / usual, slice_ / usual, (b - a - decode - slice_) / usual))
    return sorted(out, reverse=True)[:count]


def run(adapter, chunk: int, streams: int, long_ids: list[int] | None, new_tokens: int, control_steps: int = 0,
        share: float | None = None, stream_prompts: list[list[int]] | None = None) -> Figures:
    """The figures of one mode. Without ``long_ids`` (the control) nothing joins: the same
    figures over the next ``control_steps`` steps.

    A token gap is the time between two decode steps of the running rows (each gives every row
    its next token), taken on the engine's thread as each step's tokens go out. A text event is what a
    client receives: a token whose text is empty or held back (a special token, part of a
    character) sends none, so one text gap can span two steps or more."""
    from core.types import CancelToken, GenerationParams
    from engine.backend import BatchBackend, EncodedPrompt
    from engine.engine import Engine

    backend = BatchBackend(adapter.model, adapter.tokenizer, adapter.encode, prefill_chunk=chunk,
                           **({} if share is None else {"slice_share": share}))
    steps: list[float] = []
    took: list[tuple[float, float]] = []  # (end, duration) of each decode call alone
    stolen: list[tuple[int, ...]] = []  # the CPUs' steal ticks as each step ended
    decode = backend.decode

    def timed_decode(tokens):
        start = time.perf_counter()
        out = decode(tokens)
        end = time.perf_counter()
        took.append((end, end - start))
        return out

    backend.decode = timed_decode
    sliced: list[tuple[float, float]] = []  # (start, end) of each call that advanced the long prompt
    chunk_step = backend.prefill_chunk_step

    def timed_chunk_step(part):
        start = time.perf_counter()
        out = chunk_step(part)
        sliced.append((start, time.perf_counter()))
        return out

    backend.prefill_chunk_step = timed_chunk_step

    async def main():
        engine = Engine(backend, name="bench", stream_interval=0.0)
        deliver = engine._deliver

        def timed_deliver(items):
            # A step's tokens go out here, after any slice of the long prompt's prefill.
            if len(took) > len(steps):
                steps.append(time.perf_counter())
                stolen.append(steal_ticks())
            deliver(items)

        engine._deliver = timed_deliver
        engine.start()
        params = GenerationParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        stamps: list[list[float]] = [[] for _ in range(streams)]

        async def consume(i: int, handle) -> None:
            async for delta in handle:
                if delta.text:
                    stamps[i].append(time.perf_counter())

        async def steps_more(n: int) -> None:
            begin = len(steps)
            while len(steps) < begin + n:
                await asyncio.sleep(0.01)

        try:
            # The streams run until the long prompt has left the batch (then they are
            # cancelled): a stream ending first would leave a gap that is no stall.
            cancels = [CancelToken() for _ in range(streams)]
            prompts = stream_prompts or [adapter.tokenizer(f"Story number {i}: once upon a time")["input_ids"]
                                         for i in range(streams)]
            handles = [engine.submit(EncodedPrompt(prompts[i]),
                                     params, cancels[i]) for i in range(streams)]
            tasks = [asyncio.create_task(consume(i, h)) for i, h in enumerate(handles)]
            while min(len(s) for s in stamps) < 8:  # all streams running at their usual pace
                await asyncio.sleep(0.01)
            joined_at = time.perf_counter()
            first, text = None, ""
            if long_ids is None:  # the control: the same streams, nothing joins
                await steps_more(control_steps)
                first = time.perf_counter()
            else:
                long = engine.submit(EncodedPrompt(long_ids), GenerationParams(max_new_tokens=4, temperature=0.0,
                                                                               ignore_eos=True), CancelToken())
                async for delta in long:
                    first = first or time.perf_counter()
                    text += delta.text
            await steps_more(16)  # the long row has left: the steps after it
            left = time.perf_counter()
            assert all(not h.done() for h in tasks), "a stream ended before the long prompt left"
            for cancel in cancels:
                cancel.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await asyncio.to_thread(engine.stop)
        gaps_before = [b - a for s in stamps for a, b in zip(s, s[1:]) if b < joined_at]
        gaps_join = [b - a for s in stamps for a, b in zip(s, s[1:]) if a <= first and b >= joined_at]
        token_before = [b - a for a, b in zip(steps, steps[1:]) if b < joined_at]
        join = local_ratios(steps, took, joined_at, first, stolen)
        leave = local_ratios(steps, took, first, left, stolen) if long_ids is not None else [(0.0, 0.0, 0.0)]
        ratios = sorted(r for _, r, _ in join)
        # The decode calls' own time while the long prompt joins: this machine's speed swings
        # (the same decode-only step takes 40 or 70 ms from one second to the next), so the worst
        # gap is also set against the steps taken at the same time.
        decode_join = [d for end, d in took if joined_at <= end <= first]
        return Figures(step=statistics.median(token_before), worst=max(g for g, _, _ in join), worst_local=ratios[-1],
                       p99_local=ratios[int(0.99 * (len(ratios) - 1))], during=statistics.median(decode_join or [0.0]),
                       count=len(join), text_step=statistics.median(gaps_before), text_worst=max(gaps_join, default=0.0),
                       ttft=first - joined_at, text=text, leave=max(g for g, _, _ in leave),
                       leave_local=max(r for _, r, _ in leave),
                       worst_clean=max(r * max(0.0, g - lost) / g for g, r, lost in join),
                       stolen=sum(lost > 0 for _, _, lost in join),
                       largest=made_of(steps, took, sliced, joined_at, first))

    return asyncio.run(main())


LONG_TEXT = ("the river carries boats past the old mill while children count the ducks " * 600).rstrip()


def load_adapter(path: Path, threads: int | None, quantization: str, from_gguf: bool):
    """The model loaded as the registry loads a `causal_lm` (llm/causal.py), on the CPU, with
    torch's own thread count set to ``threads`` too."""
    import torch

    from llm.causal import CausalLMAdapter
    from models.adapter import ModelSpec

    adapter = CausalLMAdapter(ModelSpec(id="bench", name="bench", kind="causal_lm", path=path, device="cpu",
                                        threads=threads, quantization=quantization,
                                        options={"from_gguf": True} if from_gguf else {}))
    adapter.load()
    if threads:
        torch.set_num_threads(threads)
    return adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--chunks", default="0,512,128", help="prefill chunk sizes to compare (0: one prefill)")
    parser.add_argument("--slice-share", default=None,
                        help="a slice's share of a decode step (the model setting prefill_slice_share; default "
                             "engine/long_prompts.py SLICE_OF_STEP); several, comma-separated, run each chunk size with each")
    parser.add_argument("--slow-step", default=None,
                        help="a decode step slower than this many usual steps takes its excess out of the slice "
                             "after it (engine/long_prompts.py SLOW_STEP, the default); 'off': the slice keeps its "
                             "whole budget whatever the step took (as before the ninth session); several, "
                             "comma-separated, run each sliced mode with each")
    parser.add_argument("--layer-fit", default=None,
                        help="the share of a slice's budget one layer of a cut chunk is planned to take "
                             "(engine/long_prompts.py LAYER_FIT, the default); a list runs each")
    parser.add_argument("--usual", default="median16",
                        help="what a slow step is judged against (engine/backend.py USUAL_QUANTILE): 'median16', the "
                             "median of the last 16 steps (the default), or 'low', the 25th percentile of the last 64, "
                             "which a burst of slow steps does not raise; 'median16,low' runs each sliced mode with each")
    parser.add_argument("--row-blocks", default="off",
                        help="on: a layer the slice has no room for runs in row blocks; off: whole layers only "
                             "(engine/sliced_prefill.py SPLIT_LAYERS, the default); "
                             "'on,off' runs each sliced mode with each")
    parser.add_argument("--pieces", default=None,
                        help="on: while rows decode, chunks keep their size and layers run in pieces of rows "
                             "(engine/layer_pieces.py); off: chunks cut until one layer fits a slice "
                             "(engine/sliced_prefill.py PIECES, the default); 'on,off' runs each sliced mode with each")
    parser.add_argument("--control", action="store_true",
                        help="also run the streams with nothing joining, for as many steps as the longest join took: "
                             "the machine's own gaps between decode steps")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--stream-tokens", type=int, default=0,
                        help="the streams' prompts are this long (default: a short sentence each), e.g. 1600: "
                             "long chat histories decoding as the long prompt joins")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quantization", default="none",
                        help="the model's precision setting, as in the registry (auto: int4 for a GGUF's 4-bit layers)")
    parser.add_argument("--from-gguf", action="store_true",
                        help="the folder is a converted GGUF (what `quantization: auto` needs to keep its 4-bit layers)")
    a = parser.parse_args(argv)
    import engine.backend
    import engine.long_prompts
    import engine.sliced_prefill

    shares = [float(x) for x in a.slice_share.split(",")] if a.slice_share else [engine.long_prompts.SLICE_OF_STEP]
    slows = [float("inf") if x == "off" else float(x) for x in a.slow_step.split(",")] if a.slow_step \
        else [engine.long_prompts.SLOW_STEP]
    fits = [float(x) for x in a.layer_fit.split(",")] if a.layer_fit else [engine.long_prompts.LAYER_FIT]
    splits = [x.strip() == "on" for x in a.row_blocks.split(",")]
    pieces = [x.strip() == "on" for x in a.pieces.split(",")] if a.pieces else [engine.sliced_prefill.PIECES]
    usuals = {"median16": (0.5, 16), "low": (0.25, 64)}
    bases = [x.strip() for x in a.usual.split(",")]
    if any(x not in usuals for x in bases):
        parser.error(f"--usual takes {', '.join(usuals)}")
    adapter = load_adapter(a.path, a.threads, a.quantization, a.from_gguf)
    long_ids = adapter.tokenizer(LONG_TEXT)["input_ids"][:a.long_tokens]
    # Other texts than the long prompt's, each its own from the first token: no prefix cache hits.
    other = " a quiet wind moves over the fields as the farmer walks home at dusk" * (a.stream_tokens // 8 + 1)
    stream_prompts = [adapter.tokenizer(f"Story number {i}:{other}")["input_ids"][:a.stream_tokens]
                      for i in range(a.streams)] if a.stream_tokens else None
    # Enough new tokens that the streams are still running when the long prompt has joined.
    print(f"load average before: {os.getloadavg()}; {adapter.precision.label}; {a.streams} streams; "
          f"{f'of {a.stream_tokens} tokens each; ' if a.stream_tokens else ''}a {len(long_ids)}-token prompt joins",
          flush=True)
    rows, replies, longest = [], set(), 0
    modes = [(int(c), share, slow, split, base, fit, piece) for c in a.chunks.split(",")
             for share in (shares if int(c) else [None])
             for slow in (slows if int(c) else [None]) for split in (splits if int(c) else [None])
             for base in (bases if int(c) else [None]) for fit in (fits if int(c) else [None])
             for piece in (pieces if int(c) else [None])]
    for chunk, share, slow, split, base, fit, piece in modes + ([("control",) + (None,) * 6] if a.control else []):
        control = chunk == "control"
        if piece is not None:
            engine.sliced_prefill.PIECES = piece
        if slow is not None:
            engine.long_prompts.SLOW_STEP = slow
        if base is not None:
            engine.backend.USUAL_QUANTILE, engine.backend.USUAL_WINDOW = usuals[base]
        if split is not None:
            engine.sliced_prefill.SPLIT_LAYERS = split
        if fit is not None:
            engine.long_prompts.LAYER_FIT = fit
        f = run(adapter, 0 if control else chunk, a.streams, None if control else long_ids, 4000, longest, share,
                stream_prompts)
        if not control:
            replies.add(f.text)
            longest = max(longest, f.count)
        name = "nothing joins (control)" if control else "one prefill" if not chunk \
            else f"chunks of {chunk}, slices of {share} a step" + (
                f", slow steps' excess over {slow}× " + ("the median of 16" if base == "median16" else "the low usual") +
                " out of the slice" if slow != float("inf") else ", no slow-step guard") + (
                ", layers in pieces of rows" if piece else ", layers split into row blocks" if split else ", whole layers") + (
                f", a {'piece' if piece else 'layer'} planned at {fit} of the slice" if fit != 1.0 else "")
        rows.append((name, f))
        print(f"  {name}: token gaps: step {f.step * 1000:.0f} ms, worst {f.worst * 1000:.0f} ms "
              f"({f.worst_local:.1f}× the steps around it, 99th percentile {f.p99_local:.1f}×, "
              f"{f.worst_clean:.1f}× at worst without the time the hypervisor took ({f.stolen} gaps lost some); "
              f"{f.worst / f.during:.1f}× the join's median step of {f.during * 1000:.0f} ms); "
              f"{'' if control else f'as it leaves {f.leave * 1000:.0f} ms ({f.leave_local:.1f}×); '}"
              f"text events: {f.text_step * 1000:.0f} ms, worst {f.text_worst * 1000:.0f} ms; "
              f"{f'{f.count} steps' if control else f'long prompt TTFT {f.ttft:.2f} s'}", flush=True)
        print("    its largest gaps, in usual steps (decode call + slice + the rest): " + "; ".join(
            f"{g:.2f} = {d:.2f} + {sl:.2f} + {r:.2f}" for g, d, sl, r in f.largest), flush=True)
    print(f"load average after: {os.getloadavg()}\n")
    print("| prefill | usual step (median token gap before) | worst token gap while the long prompt joins | "
          "worst / the steps around it | 99th percentile of gap / steps around it | "
          "worst / steps around it, without the time the hypervisor took (gaps that lost some) | "
          "worst / the join's median step | "
          "worst gap as it leaves (/ steps around it) | text events: median / worst gap | TTFT of the long prompt |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, f in rows:
        control = name.startswith("nothing")
        print(f"| {name} | {f.step * 1000:.0f} ms | {f.worst * 1000:.0f} ms | {f.worst_local:.2f}× | {f.p99_local:.2f}× | "
              f"{f.worst_clean:.2f}× ({f.stolen}) | "
              f"{f.worst / max(f.during, 1e-9):.1f}× ({f.during * 1000:.0f} ms) | "
              f"{'–' if control else f'{f.leave * 1000:.0f} ms ({f.leave_local:.1f}×)'} | "
              f"{f.text_step * 1000:.0f} / {f.text_worst * 1000:.0f} ms | {'–' if control else f'{f.ttft:.2f} s'} |")
    print(f"\nthe long prompt's reply is {'identical' if len(replies) == 1 else 'DIFFERENT'} across the modes")
    return 0 if len(replies) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
