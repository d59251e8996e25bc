"""The remote engine's cost: the same streaming clients straight to ``transformers serve`` and
through our server (a model of kind ``remote`` pointing at that same transformers serve).

  a) direct:  clients -> transformers serve /v1/chat/completions
  b) through: clients -> ours /v1/chat/completions (model "remote") -> transformers serve

Both in one run, on one transformers serve process (the same model, the same weights), in
alternating rounds so that a busy machine weighs on both alike. Printed: tokens per second at 16
concurrent streaming clients and the ratio (b/a), TTFT p50 at 16 clients, and TTFT p50 of single
requests one after another (the overhead our hop adds when nothing queues).

    .venv/bin/python scripts/bench_remote.py                 # a tiny random-weight checkpoint
    .venv/bin/python scripts/bench_remote.py --model-path /path/to/SmolLM2-135M-Instruct --tokens 64

With ``--compare-tree DIR`` (another checkout, e.g. ``git archive <commit> | tar -x -C DIR``), it
measures the relay itself instead: the same clients through our server from DIR (A) and from this
tree (B), both relaying to the one transformers serve, in ABBA rounds; printed per side: tok/s and
the relaying server's CPU per streamed event, with the ratios B/A.

Bounded loops, 127.0.0.1 only, every server stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from scripts.bench_llm_peers import OFFLINE_ENV, PROMPTS, process_server  # noqa: E402
from tests.server_process import RemoteServer, free_port  # noqa: E402

REQUEST_TIMEOUT_S = 300.0


async def one_stream(client: httpx.AsyncClient, url: str, model: str, messages, tokens: int) -> tuple[float, int]:
    """(TTFT in seconds, completion tokens) of one streamed chat completion."""
    body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, usage = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if ttft is None and any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                ttft = time.perf_counter() - started
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - started), usage


async def concurrent(url: str, model: str, clients: int, per_client: int, tokens: int
                     ) -> tuple[float, list[float], int]:
    """(tokens per second, TTFTs, tokens) of ``clients`` streaming clients, ``per_client`` requests each."""
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def worker(i: int) -> list[tuple[float, int]]:
            return [await one_stream(client, url, model, PROMPTS[(i + k) % len(PROMPTS)], tokens)
                    for k in range(per_client)]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - started
    return sum(n for _, n in results) / wall, [t for t, _ in results], sum(n for _, n in results)


async def sequential_ttft(targets: list[tuple[str, str]], n: int) -> list[list[float]]:
    """TTFT of single requests, alternating between the targets, ``n`` each."""
    out: list[list[float]] = [[] for _ in targets]
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        for k in range(n):
            for i, (url, model) in enumerate(targets):
                ttft, _ = await one_stream(client, url, model, PROMPTS[k % len(PROMPTS)], 4)
                out[i].append(ttft)
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, help="a Hugging Face folder (default: the tiny random Qwen2)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client per round")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, in ABBA order (direct, through us)")
    parser.add_argument("--single", type=int, default=20, help="sequential single requests per target")
    parser.add_argument("--remote-threads", type=int, default=0,
                        help="OMP_NUM_THREADS of transformers serve (0: its default, every core); 1 leaves a core to "
                             "us and the clients, as a remote on its own machine would")
    parser.add_argument("--compare-tree", type=Path,
                        help="another checkout of this repository: compare its relay (A) with this tree's (B)")
    a = parser.parse_args()

    model_path = a.model_path
    if model_path is None:
        from scripts.make_tiny_models import build_tiny_models

        model_path = build_tiny_models(Path(tempfile.mkdtemp(prefix="bench-remote-")), ["qwen2_5_0_5b"])["qwen2_5_0_5b"]
    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    args = [str(cli), "serve", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level",
            "warning", "--continuous-batching", "--cb-max-memory-percent", "0.05", "--cb-max-batch-tokens", "2048"]
    tenv = {"OMP_NUM_THREADS": str(a.remote_threads)} if a.remote_threads else None
    with process_server(args, port, env=tenv) as tserve:
        if a.compare_tree:
            return compare_trees(a, tserve, model_path)
        env = _remote_env(a, tserve, model_path)
        with RemoteServer(models_dir=Path(tempfile.mkdtemp(prefix="bench-remote-empty-")), env=env) as ours:
            direct, through = (tserve, str(model_path)), (ours.url, "remote")
            print(f"model: {model_path}; {a.clients} clients x {a.per_client} requests x {a.tokens} tokens, "
                  f"{a.rounds} rounds; transformers serve threads: {a.remote_threads or 'default'}", flush=True)
            asyncio.run(concurrent(*direct, 4, 1, 8))  # warm-up: the model loads in transformers serve
            asyncio.run(concurrent(*through, 4, 1, 8))
            tps: dict[str, list[float]] = {"direct": [], "through": []}
            ttfts: dict[str, list[float]] = {"direct": [], "through": []}
            front = psutil.Process(ours.proc.pid)
            cpu_front, events = 0.0, 0
            for r in range(a.rounds):  # ABBA order: a machine getting busier or quieter weighs on both
                order = (("direct", direct), ("through", through))
                for label, target in order if r % 2 == 0 else order[::-1]:
                    before = _cpu(front)
                    rate, t, n = asyncio.run(concurrent(*target, a.clients, a.per_client, a.tokens))
                    if label == "through":
                        cpu_front += _cpu(front) - before
                        events += n
                    tps[label].append(rate)
                    ttfts[label] += t
                    print(f"  round {r + 1} {label:>7}: {rate:7.1f} tok/s, TTFT p50 {p50(t):7.1f} ms", flush=True)
            single = asyncio.run(sequential_ttft([direct, through], a.single))
    d, t = statistics.median(tps["direct"]), statistics.median(tps["through"])
    print(f"\n{a.clients} streaming clients: direct {d:.1f} tok/s, through us {t:.1f} tok/s, ratio {t / d:.3f}")
    print(f"TTFT p50 at {a.clients} clients: direct {p50(ttfts['direct']):.1f} ms, through us "
          f"{p50(ttfts['through']):.1f} ms, overhead {p50(ttfts['through']) - p50(ttfts['direct']):+.1f} ms")
    print(f"TTFT p50 of single requests: direct {p50(single[0]):.1f} ms, through us {p50(single[1]):.1f} ms, "
          f"overhead {p50(single[1]) - p50(single[0]):+.1f} ms")
    print(f"our server's CPU while streaming: {cpu_front:.2f} s for {events} streamed events "
          f"({cpu_front / max(events, 1) * 1e6:.0f} us per event, HTTP handling included)")
    print(f"per-round ratios (through/direct): "
          + ", ".join(f"{t_ / d_:.2f}" for d_, t_ in zip(tps["direct"], tps["through"])))


def _remote_env(a, tserve: str, model_path: Path) -> dict[str, str]:
    return {**OFFLINE_ENV, "CHATVLM_MODELS__REMOTE__NAME": "transformers serve", "CHATVLM_MODELS__REMOTE__KIND": "remote",
            "CHATVLM_MODELS__REMOTE__FRAMEWORK": "openai", "CHATVLM_MODELS__REMOTE__REMOTE__BASE_URL": json.dumps([tserve]),
            "CHATVLM_MODELS__REMOTE__REMOTE__REMOTE_MODEL": str(model_path),
            "CHATVLM_MODELS__REMOTE__REMOTE__MAX_CONCURRENCY": str(a.clients * 2),
            "CHATVLM_MODELS__REMOTE__MAX_QUEUE": str(a.clients * 4), "CHATVLM_SERVER__LOG_LEVEL": "warning"}


def compare_trees(a, tserve: str, model_path: Path) -> None:
    """Relay A (``--compare-tree``) against relay B (this tree), same clients, same remote, ABBA rounds."""
    with contextlib.ExitStack() as stack:
        relays = {}
        for label, tree in (("A", a.compare_tree.resolve()), ("B", ROOT)):
            port = free_port()
            env = {**_remote_env(a, tserve, model_path), "CHATVLM_DATA_DIR": tempfile.mkdtemp(prefix=f"bench-{label}-")}
            url = stack.enter_context(process_server(
                [sys.executable, str(tree / "api.py"), "--host", "127.0.0.1", "--port", str(port), "--models-dir",
                 tempfile.mkdtemp(prefix="bench-remote-empty-")], port, env=env, cwd=tree))
            proc = next(c for c in psutil.Process().children() if f"--port {port}" in " ".join(c.cmdline()))
            relays[label] = (url, proc)
            asyncio.run(concurrent(url, "remote", 4, 1, 8))  # warm-up (the first also loads the remote's model)
        print(f"A: {a.compare_tree}, B: {ROOT}; {a.clients} clients x {a.per_client} requests x {a.tokens} tokens, "
              f"{a.rounds} rounds", flush=True)
        tps = {"A": [], "B": []}
        cpu, events = {"A": 0.0, "B": 0.0}, {"A": 0, "B": 0}
        for r in range(a.rounds):
            for label in ("AB" if r % 2 == 0 else "BA"):
                url, proc = relays[label]
                before = _cpu(proc)
                rate, _, n = asyncio.run(concurrent(url, "remote", a.clients, a.per_client, a.tokens))
                cpu[label] += _cpu(proc) - before
                events[label] += n
                tps[label].append(rate)
                print(f"  round {r + 1} {label}: {rate:7.1f} tok/s", flush=True)
    us = {k: cpu[k] / max(events[k], 1) * 1e6 for k in cpu}
    med = {k: statistics.median(v) for k, v in tps.items()}
    for k in "AB":
        print(f"relay {k}: {med[k]:.1f} tok/s, {us[k]:.0f} us of CPU per streamed event ({events[k]} events)")
    print(f"B/A: tok/s {med['B'] / med['A']:.3f}, CPU per event {us['B'] / us['A']:.3f}")


def _cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


if __name__ == "__main__":
    main()
