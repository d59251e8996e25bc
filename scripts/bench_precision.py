"""Precision quality guard and speed, side by side on one real model (default SmolLM2-135M-Instruct,
the folder scripts/bench_llm_peers.py converts from the GGUF).

For each precision (fp32, bf16, fp16, bf16 + int8 weight-only, fp32 + int8 weight-only):
  - greedy token agreement with fp32 over the first 32 new tokens, on 8 fixed chat prompts;
  - perplexity of a fixed English text, and its change against fp32;
  - one decode step's time at batch 1 and 16 (model forward with a KV cache of 64 tokens),
    and the engine's whole step at batch 1 and 16 with the share spent outside the forward.

    .venv/bin/python scripts/bench_precision.py /tmp/bench-llm-peers/smollm2 [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["What is the capital of France?", "Explain photosynthesis in two sentences.",
           "Write a haiku about the sea.", "List three uses of a paperclip.",
           "How do I reverse a list in Python?", "Why is the sky blue?",
           "Translate 'good morning' into Spanish and German.", "Give me a tip for better sleep."]
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined a screw press with movable metal type, oil-based ink and paper. Books, which had been "
        "copied by hand for centuries, could now be produced quickly and cheaply. Within fifty years, "
        "printing shops had spread to more than two hundred cities across Europe, and millions of books "
        "had been printed. The spread of printed material changed education, science and religion: ideas "
        "travelled faster than ever before, scholars could compare identical copies of a text, and more "
        "people learned to read. Today, historians regard the printing press as one of the most important "
        "inventions of the second millennium.")
PRECISIONS = [("float32", "none"), ("bfloat16", "none"), ("float16", "none"),
              ("bfloat16", "int8_weight_only"), ("float32", "int8_weight_only")]
NEW = 32


def load(path: Path, dtype: str, quantization: str):
    import torch
    from transformers import AutoModelForCausalLM

    from models.precision import Precision, apply_quantization

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    lossless = quantization.endswith("+lossless")  # int4 as `auto` applies it to GGUF weights
    quantization = quantization.removesuffix("+lossless")
    apply_quantization(model, Precision("cpu", getattr(torch, dtype), quantization, "sdpa", lossless))
    return model


def greedy_tokens(model, tokenizer) -> list[list[int]]:
    import torch

    out = []
    for p in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        out.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return out


def perplexity(model, tokenizer) -> float:
    import torch

    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return math.exp(float(nll))


def step_ms(model, batch: int, rounds: int = 12) -> float:
    import torch

    ids = torch.randint(100, 20000, (batch, 64))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1000


def engine_step(model, tokenizer, batch: int, tokens: int = 24) -> tuple[float, float]:
    """(ms per engine step, share of it outside the model's forward) at this batch size."""
    from core.types import CancelToken, GenerationParams
    from engine.backend import BatchBackend, EncodedPrompt
    from engine.engine import Engine

    forward = [0.0]

    def timing(inner):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                forward[0] += time.perf_counter() - t0
        return timed

    model.forward = timing(model.forward)
    try:
        backend = BatchBackend(model, tokenizer, lambda m, p: EncodedPrompt(tokenizer(p)["input_ids"]))
        if backend.lean is not None:  # Llama decode steps run the lean step, not model.forward
            backend.lean = timing(backend.lean)

        async def run() -> float:
            engine = Engine(backend, name="bench", max_batch=batch)
            params = GenerationParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
            handles = [engine.submit(EncodedPrompt(tokenizer(f"{i} {PROMPTS[i % 8]}")["input_ids"]), params,
                                     CancelToken()) for i in range(batch)]
            t0 = time.perf_counter()
            engine.start()
            for h in handles:
                async for _ in h:
                    pass
            wall = time.perf_counter() - t0
            await asyncio.to_thread(engine.stop)
            return wall

        forward[0] = 0.0
        wall = asyncio.run(run())
        # The prefill is one forward too; the steps are the decode forwards plus the engine's work.
        return wall / tokens * 1000, max(0.0, 1 - forward[0] / wall)
    finally:
        del model.forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a causal LM folder (safetensors)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--precisions", default=",".join(f"{d}+{q}" for d, q in PRECISIONS),
                        help="comma-separated dtype+quantization pairs; the first is the reference")
    a = parser.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from models.precision import cpu_flags, cpu_has_bf16

    torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.path)
    print(f"load average before: {os.getloadavg()}; {a.threads} threads", flush=True)
    ref_tokens = ref_ppl = None
    rows = []
    for dtype, quant in (tuple(p.split("+", 1)) for p in a.precisions.split(",")):
        if dtype == "bfloat16" and not cpu_has_bf16() or dtype == "float16" and "avx512_fp16" not in cpu_flags():
            print(f"  {dtype}+{quant}: skipped, the CPU cannot run it natively", flush=True)
            continue
        model = load(a.path, dtype, quant)
        tokens, ppl = greedy_tokens(model, tokenizer), perplexity(model, tokenizer)
        if ref_tokens is None:
            ref_tokens, ref_ppl = tokens, ppl
        agree = sum(x == y for r, t in zip(ref_tokens, tokens) for x, y in zip(r, t)) / (NEW * len(PROMPTS))
        prefix = statistics.mean(next((i for i, (x, y) in enumerate(zip(r, t)) if x != y), NEW)
                                 for r, t in zip(ref_tokens, tokens))
        s1, s16 = step_ms(model, 1), step_ms(model, 16)
        e1 = e16 = (None, None)
        if not a.skip_engine:
            e1, e16 = engine_step(model, tokenizer, 1), engine_step(model, tokenizer, 16)
        label = dtype if quant == "none" else f"{dtype}+{quant}"
        rows.append((label, agree, prefix, ppl, ppl / ref_ppl - 1, s1, s16, e1, e16))
        print(f"  {label}: agreement {agree:.1%} (first divergence at {prefix:.1f}/32), ppl {ppl:.3f} "
              f"({ppl / ref_ppl - 1:+.2%}), forward B1 {s1:.1f} ms, B16 {s16:.1f} ms, engine {e1} {e16}", flush=True)
        del model
    print(f"load average after: {os.getloadavg()}\n")
    print("| precision | token agreement with fp32 (32 greedy tokens × 8 prompts) | mean tokens before first "
          "divergence | perplexity (change) | decode forward B1 / B16 ms | vs fp32 B1 / B16 | engine step B1 / B16 ms "
          "(share outside forward) |")
    print("|---|---|---|---|---|---|---|")
    for label, agree, prefix, ppl, dppl, s1, s16, e1, e16 in rows:
        eng = "—" if e1[0] is None else f"{e1[0]:.1f} ({e1[1]:.0%}) / {e16[0]:.1f} ({e16[1]:.0%})"
        print(f"| {label} | {agree:.1%} | {prefix:.1f} | {ppl:.3f} ({dppl:+.2%}) | {s1:.1f} / {s16:.1f} | "
              f"{rows[0][5] / s1:.2f}× / {rows[0][6] / s16:.2f}× | {eng} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
