"""How long running streams stall while image requests join (issue 15, item 5), with the
engine's vision worker on and off, side by side in one run, in-process (no HTTP).

Per checkpoint (the tiny Qwen2-VL of ``make_tiny_models.py`` and the ~30M one of
``bench_models.py``) and mode: 4 image requests decode (streaming, one event per token); once
they all stream, 4 more image requests arrive at once. Reported: the usual gap between a
running stream's tokens (median before the arrival), the worst gap the running streams see
from the arrival until 0.2 s after the newcomers' first tokens, and that worst gap over the usual one.
Each mode runs ``--rounds`` times alternately; the medians are reported.

    .venv/bin/python scripts/bench_vision_stall.py [--work-dir DIR] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_models import build_small_qwen2_vl  # noqa: E402
from scripts.make_tiny_models import build_tiny_models  # noqa: E402

VLM_ID = "qwen_vl_2b"
RUNNING, ARRIVING = 4, 4


def image(seed: int):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", (224, 168), tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(im).text((10, 10), f"Invoice {seed}", fill=(0, 0, 0))
    return im


async def one_round(adapter, worker: bool) -> tuple[float, float]:
    from core.types import CancelToken, GenerationParams
    from engine.engine import Engine
    from llm.types import ChatMessage, ImagePart

    def chat(i):
        return [ChatMessage("user", (ImagePart(image(i)), "Read all the text in this image."))]

    backend = adapter.engine_backend()
    backend.vision_ahead = worker
    engine = Engine(backend, name="stall", stream_interval=0.0)
    engine.start()
    try:
        gaps: list[tuple[float, float]] = []  # (when the gap ended, its length)

        async def stream(handle, started: asyncio.Event | None):
            last = None
            async for delta in handle:
                now = time.perf_counter()
                if started is not None:
                    started.set()
                if last is not None:
                    gaps.append((now, now - last))
                last = now

        params = GenerationParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
        starts = [asyncio.Event() for _ in range(RUNNING)]
        running = [asyncio.ensure_future(stream(engine.submit(engine.encode(chat(i), None), params, CancelToken()), s))
                   for i, s in enumerate(starts)]
        for s in starts:
            await s.wait()
        await asyncio.sleep(0.3)  # the usual step time
        prompts = [await asyncio.to_thread(engine.encode, chat(100 + i), None) for i in range(ARRIVING)]
        arrived = time.perf_counter()
        late = [engine.submit(p, GenerationParams(max_new_tokens=2, temperature=0.0, ignore_eos=True), CancelToken())
                for p in prompts]
        for h in late:
            async for _ in h:
                break
        await asyncio.sleep(0.2)  # the running streams' next tokens after the newcomers joined
        joined = time.perf_counter()
        for h in late:
            h.cancel.cancel()
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        before = [g for end, g in gaps if end < arrived]
        during = [g for end, g in gaps if arrived <= end <= joined]
        return statistics.median(before), max(during or [0.0])
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, help="keep the checkpoints here (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from models.adapter import ModelSpec
    from vlm.qwen import QwenVLAdapter

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-vision-stall-"))
    load_before = os.getloadavg()
    rows = []
    for name in ("tiny", "small"):
        path = work / name / VLM_ID
        if not (path / "config.json").exists():
            build_tiny_models(work / name, [VLM_ID]) if name == "tiny" else build_small_qwen2_vl(path)
        adapter = QwenVLAdapter(ModelSpec(id=VLM_ID, name=VLM_ID, kind="qwen_vl", path=path, max_pixels=224 * 224))
        adapter.load()
        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        asyncio.run(one_round(adapter, True))  # warm-up
        for _ in range(args.rounds):
            for worker in (False, True):
                results[worker].append(asyncio.run(one_round(adapter, worker)))
        for worker in (False, True):
            step = statistics.median(r[0] for r in results[worker]) * 1000
            worst = statistics.median(r[1] for r in results[worker]) * 1000
            mode = "vision worker" if worker else "vision tower in prefill"
            rows.append(f"| {name} | {mode} | {step:.1f} ms | {worst:.1f} ms | {worst / step:.1f}× |")
            print(rows[-1], flush=True)
        adapter.unload()
    load = "/".join(f"{x:.1f}" for x in load_before) + " → " + "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{RUNNING} streams decoding, {ARRIVING} image requests arrive at once; load average {load}\n")
    print("| checkpoint | mode | usual gap (median) | worst gap while they join | worst / usual |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
