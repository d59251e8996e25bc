"""Generation-engine benchmark (issue 3), every number measured side by side in one run.

Two checkpoints: the tiny random Qwen2 causal LM of ``make_tiny_models.py`` (framework
overhead) and a "small" random Qwen2 of ~27M parameters (``bench_models.py``; compute-bound
like a real model). Each request is the same chat message of exactly 20 tokens and
generates exactly 64 new tokens, greedily, with EOS ignored. Per checkpoint:

a) sequential ``model.generate`` of 16 requests (in this process);
b) one batched ``model.generate`` of all 16, left-padded: the limit of this machine;
c) ``transformers serve --continuous-batching`` with 16 concurrent streaming clients;
d) ``transformers serve`` without continuous batching, 16 concurrent streaming clients;
e) our server (``api.py``) with 1, 4, 8 and 16 concurrent streaming clients draining the
   same 16 requests on ``/v1/chat/completions`` through the ``openai`` SDK;
f) 8 requests with an image on a Qwen2-VL through our server, all at once against one after
   another: the tiny Qwen2-VL of ``make_tiny_models.py`` with "tiny", the ~30M one of
   ``bench_models.py`` (an 8-block vision tower) with "small". The replies of the two runs
   are compared (equal on the tiny one, which runs in fp32; the small one runs in bf16,
   where a batch's rounding may flip a near-tie). The same again on a server with
   ``vision_worker: false`` (the vision tower inside the prefill forward, as before the
   vision worker) gives the "before" beside it.

Throughput is completion tokens / wall time of the whole batch of requests; TTFT is
request start to the first non-empty content delta. Every measurement runs one warm-up
round first and reports the median of ``--rounds``; TTFT percentiles pool all rounds.

    .venv/bin/python scripts/bench_engine.py [--only tiny|small] [--skip-serve] [--rounds 3]
                                             [--work-dir DIR]   # reuse built checkpoints
    .venv/bin/python scripts/bench_engine.py --only-vlm         # part f) alone, tiny and small

All traffic goes to 127.0.0.1, every loop is bounded, and every server this script starts
is stopped before it exits.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import io
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from scripts.bench_llm_peers import process_server  # noqa: E402
from scripts.bench_models import SMALL_ID, SMALL_VLM_ID, build_small_causal_lm, build_small_qwen2_vl  # noqa: E402
from scripts.make_tiny_models import build_tiny_models  # noqa: E402
from tests.server_process import RemoteServer, free_port  # noqa: E402

TEXT_ID = SMALL_ID  # both checkpoints are served under the default text model's id
VLM_ID = "qwen_vl_2b"
assert SMALL_VLM_ID == VLM_ID  # the small Qwen2-VL is served under the same id
N_REQUESTS = 16
PROMPT_TOKENS = 20
NEW_TOKENS = 64
CLIENT_LEVELS = (1, 4, 8, 16)
VLM_REQUESTS = 8
REQUEST_TIMEOUT_S = 180.0
LEVEL_TIMEOUT_S = 600.0
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
TRANSFORMERS_CLI = ROOT / ".venv" / "bin" / "transformers"


# ----------------------------------------------------------------------------- results

@dataclass
class Measure:
    tok_s: float | None = None
    ttft: list[float] = field(default_factory=list)  # seconds, pooled over rounds
    error: str | None = None
    extra: str = ""

    def pct(self, q: float) -> float | None:
        if not self.ttft:
            return None
        ordered = sorted(self.ttft)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def cell(self) -> str:
        if self.error:
            return f"error: {self.error}"
        if self.tok_s is None:
            return "skipped"
        text = f"{self.tok_s:,.0f} tok/s"
        if self.ttft:
            text += f", TTFT p50 {ms(self.pct(0.5))} / p95 {ms(self.pct(0.95))}"
        return text + (f" {self.extra}" if self.extra else "")


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:,.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


NOTES: list[str] = []


def note(text: str) -> None:
    NOTES.append(text)
    print(f"  note: {text}", flush=True)


@dataclass
class Checkpoint:
    name: str           # "tiny" | "small"
    models_dir: Path    # folder holding <TEXT_ID>/ and <VLM_ID>/
    path: Path          # the text model folder
    messages: list[list[dict]]  # one chat per request, user message of PROMPT_TOKENS tokens
    prompt_ids: list[list[int]]  # the same chats after the chat template
    pad_id: int


# ----------------------------------------------------------------------------- prompts

def exact_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` different texts that the tokenizer encodes to exactly ``length`` tokens."""
    special = set(tokenizer.all_special_ids)
    pieces = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if len(text) > 1 and text.startswith(" ") and text[1:].isalpha() and \
                tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            pieces.append(text)
    if len(pieces) < 8:
        raise RuntimeError(f"tokenizer has too few word tokens ({len(pieces)}) to build prompts")
    rng = random.Random(seed)
    prompts: list[str] = []
    for _ in range(n):
        text = ""
        for _attempt in range(10 * length + 100):
            candidate = (text + rng.choice(pieces)).lstrip()
            count = len(tokenizer.encode(candidate, add_special_tokens=False))
            if count <= length:
                text = candidate
            if count == length:
                break
        if len(tokenizer.encode(text, add_special_tokens=False)) != length:
            raise RuntimeError(f"could not build a {length}-token prompt")
        prompts.append(text)
    return prompts


def load_checkpoint(name: str, models_dir: Path) -> Checkpoint:
    from transformers import AutoTokenizer

    path = models_dir / TEXT_ID
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = exact_prompts(tokenizer, N_REQUESTS, PROMPT_TOKENS)
    messages = [[{"role": "user", "content": t}] for t in texts]
    prompt_ids = []
    for chat, text in zip(messages, texts):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        body = tokenizer.encode(text, add_special_tokens=False)
        if not any(ids[i:i + len(body)] == body for i in range(len(ids) - len(body) + 1)):
            note(f"{name}: the chat template re-tokenises the 20-token message differently")
        prompt_ids.append(list(ids))
    return Checkpoint(name, models_dir, path, messages, prompt_ids, tokenizer.pad_token_id)


def build_checkpoints(work: Path, which: list[str]) -> dict[str, Checkpoint]:
    out = {}
    for name in which:
        models_dir = work / name
        t0 = time.perf_counter()
        if name == "tiny":
            missing = [i for i in (TEXT_ID, VLM_ID) if not (models_dir / i / "config.json").exists()]
            if missing:
                build_tiny_models(models_dir, missing)
        else:
            if not (models_dir / TEXT_ID / "config.json").exists():
                build_small_causal_lm(models_dir / TEXT_ID)
            if not (models_dir / VLM_ID / "config.json").exists():
                build_small_qwen2_vl(models_dir / VLM_ID)
        out[name] = load_checkpoint(name, models_dir)
        print(f"[{name}] checkpoint ready in {time.perf_counter() - t0:.1f}s: {models_dir}", flush=True)
    return out


# ----------------------------------------------------------------------------- in-process generate

def bench_generate(ck: Checkpoint, rounds: int) -> tuple[Measure, Measure]:
    """(a) one request at a time and (b) all 16 in one left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ck.path, dtype=torch.float32).eval()
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  pad_token_id=ck.pad_id, temperature=None, top_p=None, top_k=None)

    def batch_inputs(rows: list[list[int]]):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), ck.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids, mask

    def run(rows: list[list[int]]) -> int:
        ids, mask = batch_inputs(rows)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = out.shape[1] - ids.shape[1]
        if new != NEW_TOKENS:
            note(f"{ck.name}: generate returned {new} new tokens instead of {NEW_TOKENS}")
        return new * len(rows)

    seq, batched = Measure(), Measure()
    run(ck.prompt_ids[:1])  # warm-up
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tokens = sum(run([row]) for row in ck.prompt_ids)
        rates.append(tokens / (time.perf_counter() - t0))
    seq.tok_s = statistics.median(rates)
    print(f"[{ck.name}] a) sequential generate: {seq.cell()}", flush=True)

    run(ck.prompt_ids)  # warm-up at full batch
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tokens = run(ck.prompt_ids)
        rates.append(tokens / (time.perf_counter() - t0))
    batched.tok_s = statistics.median(rates)
    print(f"[{ck.name}] b) one batched generate: {batched.cell()}", flush=True)
    del model
    gc.collect()
    return seq, batched


# ----------------------------------------------------------------------------- streaming clients

@dataclass
class Reply:
    ttft: float | None
    completion_tokens: int | None
    prompt_tokens: int | None
    finish_reason: str | None
    chunks: int
    text: str = ""
    index: int = -1  # the chat's position in the list drained


async def stream_one(client, model: str, messages: list[dict], extra_body: dict | None) -> Reply:
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra_body)
    ttft = completion = prompt = finish = None
    chunks = 0
    text = []
    async with stream:  # closes the connection even if the loop stops early
        async for chunk in stream:
            if chunk.usage is not None:
                completion, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    chunks += 1
                    text.append(choice.delta.content)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                if choice.finish_reason:
                    finish = choice.finish_reason
    return Reply(ttft, completion, prompt, finish, chunks, "".join(text))


async def drain(base_url: str, model: str, chats: list[list[dict]], concurrency: int,
                extra_body: dict | None) -> tuple[float, list[Reply]]:
    """``concurrency`` clients take the chats from one queue; returns (wall seconds, replies)."""
    import httpx
    from openai import AsyncOpenAI

    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(chats):
        queue.put_nowait(item)
    replies: list[Reply] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0,
                           timeout=REQUEST_TIMEOUT_S,
                           http_client=httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S)) as client:

        async def worker() -> None:
            while True:
                try:
                    index, chat = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                reply = await stream_one(client, model, chat, extra_body)
                reply.index = index
                replies.append(reply)

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), LEVEL_TIMEOUT_S)
        return time.perf_counter() - t0, replies


def check_replies(label: str, replies: list[Reply], prompt_len: int | None) -> None:
    short = [r.completion_tokens for r in replies if r.completion_tokens != NEW_TOKENS]
    if short:
        note(f"{label}: {len(short)}/{len(replies)} streams did not report {NEW_TOKENS} completion tokens "
             f"(got {sorted(set(short), key=lambda x: (x is None, x))})")
    if prompt_len is not None:
        bad = {r.prompt_tokens for r in replies if r.prompt_tokens not in (None, prompt_len)}
        if bad:
            note(f"{label}: prompt_tokens {sorted(bad)} instead of {prompt_len}")


def measure_clients(label: str, base_url: str, model: str, chats: list[list[dict]], concurrency: int,
                    rounds: int, extra_body: dict | None, prompt_len: int | None,
                    warmup: int | None = None, texts: dict[int, str] | None = None) -> Measure:
    """Warm-up (``warmup`` requests, default all), then ``rounds`` timed rounds (``texts``: the
    replies, by chat index)."""
    result = Measure()
    try:
        warm = chats if warmup is None else chats[:warmup]
        asyncio.run(drain(base_url, model, warm, min(concurrency, len(warm)), extra_body))
        rates = []
        for _ in range(rounds):
            wall, replies = asyncio.run(drain(base_url, model, chats, concurrency, extra_body))
            check_replies(label, replies, prompt_len)
            if texts is not None:
                texts.update((r.index, r.text) for r in replies)
            rates.append(sum(r.completion_tokens or 0 for r in replies) / wall)
            result.ttft += [r.ttft for r in replies if r.ttft is not None]
        result.tok_s = statistics.median(rates)
    except Exception as exc:  # report the failure in the table and go on with the next measurement
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    print(f"  {label}: {result.cell()}", flush=True)
    return result


# ----------------------------------------------------------------------------- transformers serve

@contextlib.contextmanager
def transformers_serve(model_path: Path, continuous_batching: bool):
    """``transformers serve`` pinned to the local folder on the CPU; stopped on exit."""
    port = free_port()
    args = [str(TRANSFORMERS_CLI), "serve", str(model_path), "--device", "cpu", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if continuous_batching:
        # Without a cap its paged KV cache reserves ~13 GB of RAM on the CPU. With the cap alone
        # the default 8192-token batch's attention mask (8192² floats) no longer fits, and the
        # worker dies on the first request ("num_sectors = -4"): 1024 batch tokens hold all 16
        # prompts' prefill in one step.
        args += ["--continuous-batching", "--cb-max-memory-percent", "0.02", "--cb-max-batch-tokens", "1024"]
    with process_server(args, port, startup_s=120) as url:
        yield url


def bench_transformers_serve(ck: Checkpoint, continuous_batching: bool, rounds: int) -> Measure:
    label = f"[{ck.name}] {'c) transformers serve --continuous-batching' if continuous_batching else 'd) transformers serve'}"
    try:
        with transformers_serve(ck.path, continuous_batching) as url:
            # Without CB requests run one at a time: a short warm-up is enough to load the model.
            return measure_clients(label, url, str(ck.path), ck.messages, N_REQUESTS, rounds, None,
                                   len(ck.prompt_ids[0]), warmup=None if continuous_batching else 2)
    except Exception as exc:
        print(f"  {label}: error {exc}", flush=True)
        return Measure(error=f"{type(exc).__name__}: {str(exc)[:160]}")


# ----------------------------------------------------------------------------- our server

def test_image_data_url(seed: int) -> str:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (224, 168), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(200), rng.randrange(150)
        draw.rectangle((x, y, x + 24, y + 16), fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.text((10, 10), f"Invoice {seed}", fill=(0, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bench_ours(ck: Checkpoint, rounds: int, with_vlm: bool, with_text: bool = True,
               vision_worker: bool = True) -> dict[str, Measure]:
    out: dict[str, Measure] = {}
    extra = {"ignore_eos": True}
    data_dir = Path(tempfile.mkdtemp(prefix="bench-engine-data-"))
    server = None
    env = {**OFFLINE_ENV, "CHATVLM_DATA_DIR": str(data_dir)}
    suffix = "" if vision_worker else "_inline"
    if not vision_worker:
        env[f"CHATVLM_MODELS__{VLM_ID.upper()}__OPTIONS"] = '{"vision_worker": false}'
    try:
        server = RemoteServer(models_dir=ck.models_dir, startup_timeout=120, env=env)
        # A round at full concurrency loads the model; each level then warms up with its own batch size.
        for n in CLIENT_LEVELS if with_text else ():
            if n == CLIENT_LEVELS[0]:
                asyncio.run(drain(server.url, TEXT_ID, ck.messages, N_REQUESTS, extra))
            out[f"ours{n}"] = measure_clients(f"[{ck.name}] e) ours, {n} clients", server.url, TEXT_ID,
                                              ck.messages, n, rounds, extra, len(ck.prompt_ids[0]), warmup=n)
        if with_vlm:
            chats = [[{"role": "user", "content": [
                {"type": "text", "text": "Read all the text in this image."},
                {"type": "image_url", "image_url": {"url": test_image_data_url(i)}}]}]
                for i in range(VLM_REQUESTS)]
            seq_texts: dict[int, str] = {}
            conc_texts: dict[int, str] = {}
            how = "vision worker" if vision_worker else "vision tower in prefill"
            out["vlm_seq" + suffix] = measure_clients(
                f"[{ck.name}] f) VLM {VLM_ID} ({how}), {VLM_REQUESTS} sequential", server.url,
                VLM_ID, chats, 1, rounds, extra, None, warmup=2, texts=seq_texts)
            out["vlm_conc" + suffix] = measure_clients(
                f"[{ck.name}] f) VLM {VLM_ID} ({how}), {VLM_REQUESTS} concurrent", server.url,
                VLM_ID, chats, VLM_REQUESTS, rounds, extra, None, texts=conc_texts)
            same = sum(seq_texts.get(i) == conc_texts.get(i) is not None for i in range(VLM_REQUESTS))
            note(f"{ck.name} Qwen2-VL ({how}): {same}/{VLM_REQUESTS} concurrent replies identical to the "
                 "sequential ones")
    except Exception as exc:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        print(f"  [{ck.name}] our server: error {msg}", flush=True)
        for key in [f"ours{n}" for n in CLIENT_LEVELS if with_text] + \
                ([f"vlm_seq{suffix}", f"vlm_conc{suffix}"] if with_vlm else []):
            out.setdefault(key, Measure(error=msg))
    finally:
        if server is not None:
            if any(m.error for m in out.values()):
                tail = server.logs()[-1500:]
                if tail.strip():
                    print(f"  [{ck.name}] server log tail:\n{tail}", flush=True)
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- report

def ratio(a: Measure | None, b: Measure | None) -> float | None:
    if a is None or b is None or not a.tok_s or not b.tok_s:
        return None
    return a.tok_s / b.tok_s


def verdict(value: float | None, ok: bool | None, fmt: str) -> str:
    if value is None or ok is None:
        return "—"
    return fmt.format(value) + (" ✅" if ok else " ❌")


def report(results: dict[str, dict[str, Measure]], cks: dict[str, Checkpoint], rounds: int) -> str:
    names = list(results)
    prompt_lens = ", ".join(f"{n}: {len(cks[n].prompt_ids[0])}" for n in names)
    lines = [
        f"Part f): {VLM_REQUESTS} requests, each a 224×168 PNG and one instruction, {NEW_TOKENS} new tokens, "
        "greedy, EOS ignored.",
        "",
        f"{N_REQUESTS} requests, each a {PROMPT_TOKENS}-token user message ({prompt_lens} tokens after the chat "
        f"template) and exactly {NEW_TOKENS} new tokens, greedy, EOS ignored. Median of {rounds} rounds after a "
        "warm-up; TTFT percentiles over all rounds' requests.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = [
        ("seq", "sequential `model.generate`"),
        ("batched", f"one batched `generate` of all {N_REQUESTS} (the limit here)"),
        ("serve_cb", f"`transformers serve --continuous-batching`, {N_REQUESTS} concurrent streaming clients"),
        ("serve", f"`transformers serve` without continuous batching, {N_REQUESTS} clients"),
    ] + [(f"ours{n}", f"ours, {n} concurrent streaming client{'s' if n > 1 else ''}") for n in CLIENT_LEVELS] + [
        ("vlm_seq", f"ours, Qwen2-VL (tiny / ~30M small) with an image, {VLM_REQUESTS} requests one after another"),
        ("vlm_conc", f"ours, Qwen2-VL (tiny / ~30M small) with an image, {VLM_REQUESTS} concurrent requests"),
        ("vlm_seq_inline", f"the same, vision tower inside prefill (`vision_worker: false`), {VLM_REQUESTS} one after another"),
        ("vlm_conc_inline", f"the same, vision tower inside prefill, {VLM_REQUESTS} concurrent"),
    ]
    for key, title in rows:
        if not any(key in results[n] for n in names):
            continue
        lines.append(f"| {title} | " + " | ".join(results[n][key].cell() if key in results[n] else "—"
                                                  for n in names) + " |")

    lines += ["", "| target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(title: str, fn) -> None:
        lines.append(f"| {title} | " + " | ".join(fn(results[n], n) for n in names) + " |")

    def cb_ratio(r, _n):
        v = ratio(r.get(f"ours{N_REQUESTS}"), r.get("serve_cb"))
        return verdict(v, None if v is None else v >= 1.5, "{:.2f}×")

    def ttft(r, _n):
        ours, theirs = r.get(f"ours{N_REQUESTS}"), r.get("serve_cb")
        if not ours or not theirs or ours.pct(0.95) is None or theirs.pct(0.95) is None:
            return "—"
        ok = ours.pct(0.95) <= theirs.pct(0.95)
        return f"{ms(ours.pct(0.95))} vs {ms(theirs.pct(0.95))}" + (" ✅" if ok else " ❌")

    def limit(r, n):
        v = ratio(r.get(f"ours{N_REQUESTS}"), r.get("batched"))
        if v is None:
            return "—"
        return verdict(v, v >= 0.7, "{:.2f}×") if n == "small" else f"{v:.2f}× (no target)"

    def vlm(r, _n):
        v = ratio(r.get("vlm_conc"), r.get("vlm_seq"))
        return verdict(v, None if v is None else v >= 3, "{:.2f}×")

    def vlm_inline(r, _n):
        v = ratio(r.get("vlm_conc_inline"), r.get("vlm_seq_inline"))
        return "—" if v is None else f"{v:.2f}×"

    text = any("serve_cb" in results[n] or "batched" in results[n] for n in names)
    if text:
        row(f"ours ({N_REQUESTS} clients) / `transformers serve --continuous-batching` throughput ≥ 1.5×", cb_ratio)
        row(f"TTFT p95, ours ({N_REQUESTS}) vs `transformers serve --continuous-batching` (ours ≤ theirs)", ttft)
        row(f"ours ({N_REQUESTS} clients) / one batched `generate` ≥ 0.7× (small)", limit)
    row(f"VLM: {VLM_REQUESTS} concurrent / sequential ≥ 3× (tiny, small)", vlm)
    if any("vlm_conc_inline" in results[n] for n in names):
        row(f"VLM before (vision tower inside prefill): {VLM_REQUESTS} concurrent / sequential", vlm_inline)
    for n in names:
        v = ratio(results[n].get(f"ours{N_REQUESTS}"), results[n].get("seq"))
        if v is not None:
            lines.append(f"\n{n}: ours ({N_REQUESTS} clients) is {v:.1f}× sequential `model.generate`.")
    if NOTES:
        lines += ["", "Notes:"] + [f"- {t}" for t in NOTES]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "small"], help="benchmark one checkpoint only")
    parser.add_argument("--skip-serve", action="store_true", help="skip the `transformers serve` baselines")
    parser.add_argument("--only-vlm", action="store_true",
                        help="only part f) (image requests on the tiny and small Qwen2-VL), side by side")
    parser.add_argument("--no-vlm-inline", action="store_true",
                        help="skip part f)'s baseline with the vision tower inside prefill (vision_worker: false)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per measurement (default 3)")
    parser.add_argument("--threads", type=int,
                        help="torch/OpenMP threads for this process and every server (default: torch's own)")
    parser.add_argument("--work-dir", type=Path,
                        help="keep the checkpoints here and reuse them next time (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be ≥ 1")
    os.environ.update(OFFLINE_ENV)
    if args.threads:  # inherited by the servers started below
        os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    which = [args.only] if args.only else ["tiny", "small"]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-engine-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, dict[str, Measure]] = {}
    try:
        cks = build_checkpoints(work, which)
        for name, ck in cks.items():
            r = results[name] = {}
            if not args.only_vlm:
                r["seq"], r["batched"] = bench_generate(ck, args.rounds)
            if not args.skip_serve and not args.only_vlm:
                r["serve_cb"] = bench_transformers_serve(ck, True, args.rounds)
                r["serve"] = bench_transformers_serve(ck, False, args.rounds)
            r.update(bench_ours(ck, args.rounds, with_vlm=True, with_text=not args.only_vlm))
            if not args.no_vlm_inline:
                r.update(bench_ours(ck, args.rounds, with_vlm=True, with_text=False, vision_worker=False))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    load = "/".join(f"{x:.1f}" for x in load_before) + " → " + "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n## Engine benchmark ({os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load}; {time.perf_counter() - started:.0f} s)\n")
    print(report(results, cks, args.rounds))
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
