"""The decode step over a padded cache against a ragged one, side by side in one run.

A batch's KV cache is one buffer per layer, rows left-padded to the longest. Padded, the compiled
step attends over every position with a mask (bitwise transformers' own attention); ragged, each
row attends from its own first position (engine/native_step.cpp ``attend_from``) and the padding
is never read. Two cases:

- ``--running``: 4 rows of that many tokens decode, then a 4,000-token prompt joins in one
  prefill; the steps after the join (a long prompt joining long chat histories);
- ``--short``: that many short prompts (30 to 130 tokens) prefilled together, then decoded (the
  usual batch of many clients: ragged from its first step with the model option
  ``ragged_decode``, on by default);
- ``--equal``: ROWSxTOKENS, rows whose prompts are all that long (no padding: the masked step
  runs without a mask, transformers' SDPA call for grouped heads), e.g. 1x1500 and 4x1500: the
  step of long chats, where that call's cost shows.

    .venv/bin/python scripts/bench_join_layout.py DIR --running 1640,3500 --short 1,4,16 \\
        --equal 1x1500,4x1500 --threads 2 --quantization auto --from-gguf

Each layout runs twice, interleaved; the greedy tokens of the two layouts are compared.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def steps_after_join(adapter, text_ids: list[int], running: int, ragged: bool, steps: int) -> tuple[float, list]:
    """(median decode step, greedy tokens) after a 4,000-token prompt joins 4 rows of ``running``."""
    from engine import backend as backend_module
    from engine.backend import BatchBackend, EncodedPrompt

    # Any padding makes the join ragged, or none does.
    backend_module.RAGGED_MIN_PAD = 0 if ragged else 1 << 62
    backend = BatchBackend(adapter.model, adapter.tokenizer, adapter.encode, prefill_chunk=0, ragged_decode=False)
    tokens = backend.prefill([EncodedPrompt(text_ids[i + 1:i + 1 + running]) for i in range(4)]).argmax(-1).tolist()
    for _ in range(3):
        tokens = backend.decode(tokens).argmax(-1).tolist()
    tokens = tokens + backend.prefill([EncodedPrompt(text_ids[:4000])]).argmax(-1).tolist()
    assert backend.ragged == ragged
    return decode(backend, tokens, steps)


def steps_of_a_batch(adapter, text_ids: list[int], rows: int, ragged: bool, steps: int) -> tuple[float, list]:
    """(median decode step, greedy tokens) of ``rows`` prompts of 30-130 tokens prefilled together."""
    from engine.backend import BatchBackend, EncodedPrompt

    backend = BatchBackend(adapter.model, adapter.tokenizer, adapter.encode, prefill_chunk=0, ragged_decode=ragged)
    lengths = [30 + (100 * i) // max(rows - 1, 1) for i in range(rows)]
    tokens = backend.prefill([EncodedPrompt(text_ids[i:i + n]) for i, n in enumerate(lengths)]).argmax(-1).tolist()
    assert backend.ragged == ragged
    return decode(backend, tokens, steps)


def steps_of_equal_rows(adapter, text_ids: list[int], shape: str, ragged: bool, steps: int) -> tuple[float, list]:
    """(median decode step, greedy tokens) of ROWS prompts of TOKENS tokens each (``shape``
    "ROWSxTOKENS"): no padding."""
    from engine.backend import BatchBackend, EncodedPrompt

    rows, length = (int(x) for x in shape.split("x"))
    backend = BatchBackend(adapter.model, adapter.tokenizer, adapter.encode, prefill_chunk=0, ragged_decode=ragged)
    tokens = backend.prefill([EncodedPrompt(text_ids[i + 1:i + 1 + length]) for i in range(rows)]).argmax(-1).tolist()
    assert backend.ragged == ragged
    return decode(backend, tokens, steps)


def decode(backend, tokens: list[int], steps: int) -> tuple[float, list]:
    took, seen = [], []
    for _ in range(steps):
        start = time.perf_counter()
        logits = backend.decode(tokens)
        took.append(time.perf_counter() - start)
        tokens = logits.argmax(-1).tolist()
        seen.append(tokens)
    backend.keep([])
    return statistics.median(took), seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--running", default="1640,3500", help="the running rows' lengths when the long prompt joins")
    parser.add_argument("--short", default="1,4,16", help="batch sizes of short prompts")
    parser.add_argument("--equal", default="", help="ROWSxTOKENS cases of rows as long as each other, e.g. 4x1500")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--from-gguf", action="store_true")
    a = parser.parse_args(argv)
    from scripts.bench_chunked_prefill import LONG_TEXT, load_adapter

    adapter = load_adapter(a.path, a.threads, a.quantization, a.from_gguf)
    text_ids = adapter.tokenizer(LONG_TEXT)["input_ids"]
    cases = [(f"4 rows of {n} tokens, then a 4,000-token prompt joins", steps_after_join, int(n))
             for n in a.running.split(",") if n] + \
            [(f"{n} short prompts (30-130 tokens) prefilled together" if int(n) > 1 else "1 short prompt (30 tokens)",
              steps_of_a_batch, int(n))
             for n in a.short.split(",") if n] + \
            [(f"{shape.split('x')[0]} rows of {shape.split('x')[1]} tokens each (no padding)", steps_of_equal_rows, shape)
             for shape in a.equal.split(",") if shape]
    print(f"{adapter.precision.label}; median decode step over {a.steps} steps; each layout twice, interleaved\n")
    print("| case | padded (masked attention) | ragged (each row from its own first position) | padded / ragged | greedy tokens |")
    print("|---|---|---|---|---|")
    for name, fn, n in cases:
        times: dict[bool, list[float]] = {False: [], True: []}
        tokens: dict[bool, list] = {}
        for ragged in (False, True, False, True):
            took, seen = fn(adapter, text_ids, n, ragged, a.steps)
            times[ragged].append(took)
            tokens[ragged] = seen
        padded, ragged = min(times[False]), min(times[True])
        print(f"| {name} | {padded * 1000:.1f} ms | {ragged * 1000:.1f} ms | {padded / ragged:.2f}× | "
              f"{'the same' if tokens[False] == tokens[True] else 'DIFFERENT'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
