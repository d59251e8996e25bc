"""The ragged cache's attention in one decode step, side by side: ATen's SDPA called once per
row (as the compiled step did) against engine/native_step.cpp's kernel (each key/value head
read once for its group of query heads, long rows split over the threads). The case is the one
right after a long prompt joined a batch: four short rows and one of 4,000 positions, in cache
buffers wider than what is used, for a SmolLM2-135M-shaped model (30 layers, 9 query heads on 3
key/value heads of 64).

    .venv/bin/python scripts/bench_ragged_attention.py --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long", type=int, default=4000, help="positions of the long row")
    a = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from engine import native_step

    if not native_step.wait(600) or not native_step.fast_kernels():
        print(f"the compiled kernels are not available here: {native_step.error() or 'no avx2/fma'}")
        return 1
    torch.set_num_threads(a.threads)
    layers, kv_heads, n_rep, dim = 30, 3, 3, 64
    used = a.long + 10
    starts = [a.long - 100, a.long - 95, a.long - 50, a.long - 10, 0]  # four short rows, one long
    rows = len(starts)
    print(f"{layers} layers, {rows} rows (one of {used - starts[-1]} positions), {a.threads} threads")
    print("| dtype | SDPA once per row | kernel | ratio |\n|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        kbuf = [torch.randn(rows, kv_heads, used + 1000, dim, dtype=dtype) for _ in range(layers)]
        vbuf = [torch.randn(rows, kv_heads, used + 1000, dim, dtype=dtype) for _ in range(layers)]
        q = torch.randn(rows, kv_heads * n_rep, 1, dim, dtype=dtype)

        def per_row() -> None:
            for k, v in zip(kbuf, vbuf):
                keys, values = k[:, :, :used], v[:, :, :used]
                torch.cat([F.scaled_dot_product_attention(q[r:r + 1], keys[r:r + 1, :, s:], values[r:r + 1, :, s:],
                                                          scale=dim ** -0.5, enable_gqa=True)
                           for r, s in enumerate(starts)])

        def kernel() -> None:
            for k, v in zip(kbuf, vbuf):
                torch.ops.chatvlm_native.attend_from(q, k[:, :, :used], v[:, :, :used], starts, n_rep, dim ** -0.5)

        best: dict[str, float] = {}
        for _ in range(3):  # interleaved, best of three: this machine's speed swings
            for name, fn in (("sdpa", per_row), ("kernel", kernel)):
                fn()
                t = time.perf_counter()
                for _ in range(5):
                    fn()
                best[name] = min(best.get(name, 1e9), (time.perf_counter() - t) / 5)
        print(f"| {str(dtype).removeprefix('torch.')} | {best['sdpa'] * 1e3:.1f} ms | {best['kernel'] * 1e3:.1f} ms | "
              f"{best['sdpa'] / best['kernel']:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
