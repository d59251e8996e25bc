"""The ``chatvlm`` command (typer + rich). Subcommands: serve, ocr, chat, models."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from chatvlm.backends import Failure, LocalBackend, OcrOptions, RemoteBackend

app = typer.Typer(help="ChatVLMLLM from the command line: serve the API, OCR files and folders, chat about an "
                       "image, and manage models, in-process or against a server (--server URL).",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="rich")
models_app = typer.Typer(help="List, load and unload models; start, stop and read the logs of models on a "
                              "server (management service).\n\nExample: [bold]chatvlm models ls --server "
                              "http://127.0.0.1:8000[/bold]", no_args_is_help=True)
app.add_typer(models_app, name="models")
err = Console(stderr=True)

ServerOpt = Annotated[Optional[str], typer.Option("--server", envvar="CHATVLM_SERVER",
                      help="Base URL of a running server (e.g. http://127.0.0.1:8000); without it the work "
                           "runs in this process.")]
KeyOpt = Annotated[Optional[str], typer.Option("--api-key", envvar="CHATVLM_API_KEY",
                   help="API key for a server with keys on.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="In-process: settings file (default config.yaml).")]
ModelsDirOpt = Annotated[Optional[Path], typer.Option("--models-dir", help="In-process: where model folders live.")]


def _backend(server: str | None, api_key: str | None, config: Path | None, models_dir: Path | None,
             workers: int = 4, request_timeout_s: float | None = None) -> Any:
    if server:
        return RemoteBackend(server, api_key=api_key, workers=workers)
    return LocalBackend(config, models_dir, request_timeout_s=request_timeout_s)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


# ---- serve -------------------------------------------------------------------------------------
@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def serve(host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
          port: Annotated[Optional[int], typer.Option(help="Port (default 8000).")] = None,
          config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
          allow_unauthenticated_public: Annotated[bool, typer.Option(
              "--allow-unauthenticated-public", help="Serve a non-loopback host with no API keys (not advised).")] = False
          ) -> None:
    """Serve the HTTP API and the playground (/ui), with the same flags as api.py.

    Example: [bold]chatvlm serve --port 8000 --models-dir weights[/bold]
    """
    import api
    from chatvlm.settings import config_path

    config = config_path(config)
    argv = [*(["--host", host] if host else []), *(["--port", str(port)] if port else []),
            *(["--config", str(config)] if config else []), *(["--models-dir", str(models_dir)] if models_dir else []),
            *(["--allow-unauthenticated-public"] if allow_unauthenticated_public else [])]
    raise typer.Exit(api.main(argv))


# ---- ocr ---------------------------------------------------------------------------------------
@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def ocr(paths: Annotated[list[Path], typer.Argument(help="Files and folders (walked recursively); images and "
                                                          "PDFs are recognised by their content.")],
        out: Annotated[Optional[Path], typer.Option("--out", help="Write one JSON object per file to this JSONL "
                                                    "file; a rerun skips the files already done.")] = None,
        out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Write <name>.md/.json/.txt per file "
                                                        "and manifest.jsonl here; a rerun skips the files done.")] = None,
        format: Annotated[str, typer.Option("--format", help="text, markdown or json.")] = "text",
        model: Annotated[Optional[str], typer.Option(help="Model id (default: the server's choice).")] = None,
        language: Annotated[Optional[str], typer.Option(help="Language, e.g. English, Russian, Chinese.")] = None,
        pages: Annotated[Optional[str], typer.Option(help="PDF pages to read, e.g. 1-3,7 (1-based).")] = None,
        concurrency: Annotated[int, typer.Option(min=1, max=64, help="Files read at once.")] = 1,
        server: ServerOpt = None, api_key: KeyOpt = None, config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
        timeout: Annotated[float, typer.Option(help="Seconds allowed per file.")] = 300.0,
        job_pages: Annotated[int, typer.Option("--job-pages", min=0, help="PDFs of this many pages or more are "
                                               "read as jobs (POST /jobs/ocr; in-process, the same job service): "
                                               "progress per page, and an interrupted run carries on with the "
                                               "job. 0: never.")] = 4,
        wait: Annotated[bool, typer.Option("--wait/--no-wait", help="--no-wait (with --server): submit the long "
                                           "PDFs' jobs and exit; the same command run again collects them.")] = True
        ) -> None:
    """OCR files and folders into JSONL, a folder of outputs, or stdout; resumable.

    Examples:
      [bold]chatvlm ocr samples/ --out out.jsonl[/bold]
      [bold]chatvlm ocr scans/ --out-dir md/ --format markdown --concurrency 2 --server http://127.0.0.1:8000[/bold]
      [bold]chatvlm ocr receipt.png | jq -r .result.text[/bold]
      [bold]chatvlm ocr big.pdf --out out.jsonl --server http://127.0.0.1:8000 --no-wait[/bold]  (rerun to collect)
    Exit status: 0 when every file was read, 1 when any failed, 130 when interrupted (rerun to continue).
    """
    from chatvlm import ocr_run
    from chatvlm.inputs import collect
    from chatvlm.outputs import DirSink, JsonlSink, StreamSink
    from core.errors import InvalidParameter
    from ocr.page_ranges import parse_pages

    if format not in ("text", "markdown", "json"):
        _fail("--format must be text, markdown or json")
    if out and out_dir:
        _fail("give --out or --out-dir, not both")
    if not wait and not server:
        _fail("--no-wait needs --server: in-process, nothing runs once the command ends")
    try:
        parse_pages(pages)
        files = collect(paths)
    except InvalidParameter as exc:
        _fail(f"--pages: {exc.message}")
    except FileNotFoundError as exc:
        _fail(f"no such file or folder: {exc}")
    opts = OcrOptions(model=model, language=language, format=format, pages=pages)
    try:
        jobs = ocr_run.plan(files, opts)  # reads and hashes every file: Ctrl-C here has written nothing
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if out:
        sink: Any = JsonlSink(out)
    elif out_dir:
        sink = DirSink(out_dir, format)
    else:
        sink = StreamSink(console=Console(soft_wrap=True) if sys.stdout.isatty() else None, show_pending=not wait)

    def on_failure(path: Path, exc: Failure) -> None:
        err.print(f"[red]failed[/red] {path}: {exc.message} ({exc.code})", highlight=False)

    async def go() -> ocr_run.Summary:
        async with _backend(server, api_key, config, models_dir, workers=concurrency,
                            request_timeout_s=timeout) as backend:
            if any(j.key not in sink.done for j in jobs):
                await backend.warm(model)
            with _progress() as progress:
                return await ocr_run.run(jobs, backend, opts, sink, concurrency, progress, on_failure,
                                         job_pages=job_pages, wait=wait)

    try:
        summary = asyncio.run(go())
    except KeyboardInterrupt:  # while the model was loading: nothing was read or written
        err.print("interrupted before the first file; run the same command again to start", highlight=False)
        raise typer.Exit(130) from None
    finally:
        sink.close()
    parts = [f"{summary.read} read", f"{summary.skipped} already done" if summary.skipped else "",
             f"{summary.submitted} left running as jobs (run the same command again to collect them)"
             if summary.submitted else "",
             f"[red]{len(summary.failed)} failed[/red]" if summary.failed else "", f"in {summary.seconds:.1f} s"]
    err.print(", ".join(p for p in parts if p), highlight=False)
    if summary.interrupted:
        left = summary.total - summary.read - summary.skipped - summary.submitted - len(summary.failed)
        err.print(f"interrupted: {left} file(s) "
                  "not read; run the same command again to continue", highlight=False)
    raise typer.Exit(summary.exit_code)


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    class Rate(TextColumn):
        def render(self, task):  # items per second, over the whole run
            speed = task.finished_speed or task.speed
            return super().render(task) if speed is None else f"{speed:.2f}/s"

    return Progress(TextColumn("{task.description:>5}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    Rate(""), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err, disable=not err.is_terminal)


# ---- chat --------------------------------------------------------------------------------------
@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def chat(image: Annotated[Path, typer.Argument(help="The image to ask about.", exists=True, dir_okay=False)],
         question: Annotated[str, typer.Argument(help="What to ask.")],
         model: Annotated[Optional[str], typer.Option(help="Vision-language model id.")] = None,
         temperature: Annotated[Optional[float], typer.Option(min=0, max=2, help="0 is greedy.")] = None,
         max_tokens: Annotated[Optional[int], typer.Option(min=1, max=8192)] = None,
         server: ServerOpt = None, api_key: KeyOpt = None, config: ConfigOpt = None,
         models_dir: ModelsDirOpt = None) -> None:
    """Ask a vision-language model about an image; the answer streams to the terminal.

    Example: [bold]chatvlm chat samples/receipt_en.png "What is the total?" --server http://127.0.0.1:8000[/bold]
    """
    data = image.read_bytes()

    async def go() -> None:
        async with _backend(server, api_key, config, models_dir, workers=1) as backend:
            async for piece in backend.chat_stream(question, data, model, temperature, max_tokens):
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")

    try:
        asyncio.run(go())
    except Failure as exc:
        _fail(f"{exc.message} ({exc.code})", 1)
    except KeyboardInterrupt:
        raise typer.Exit(130)


# ---- models ------------------------------------------------------------------------------------
def _models_call(server, api_key, config, models_dir, fn) -> Any:
    async def go() -> Any:
        async with _backend(server, api_key, config, models_dir, workers=1) as backend:
            return await fn(backend)

    try:
        return asyncio.run(go())
    except Failure as exc:
        _fail(f"{exc.message} ({exc.code})", 1)


def _table(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json or not sys.stdout.isatty():
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table("id", "name", "kind", "tasks", "installed", "loaded", "status", "reason")
    for r in rows:
        table.add_row(r["id"], r["name"], r["kind"], ",".join(r["tasks"] or ()), "yes" if r["installed"] else "no",
                      "yes" if r["loaded"] else "no", r["status"], r.get("reason") or "")
    Console().print(table)


JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per model (the default when piped).")]


@models_app.command("ls")
def models_ls(server: ServerOpt = None, api_key: KeyOpt = None, config: ConfigOpt = None,
              models_dir: ModelsDirOpt = None, as_json: JsonOpt = False) -> None:
    """Every configured model: installed, loaded, status, and why not when it cannot serve.

    Example: [bold]chatvlm models ls[/bold]
    """
    _table(_models_call(server, api_key, config, models_dir, lambda b: b.models()), as_json)


@models_app.command("ps")
def models_ps(server: ServerOpt = None, api_key: KeyOpt = None, config: ConfigOpt = None,
              models_dir: ModelsDirOpt = None, as_json: JsonOpt = False) -> None:
    """The models loaded now (in-process nothing stays loaded between commands: use --server).

    Example: [bold]chatvlm models ps --server http://127.0.0.1:8000[/bold]
    """
    rows = _models_call(server, api_key, config, models_dir, lambda b: b.models())
    _table([r for r in rows if r["loaded"] or r["status"] == "loading"], as_json)


@models_app.command("load")
def models_load(model: Annotated[str, typer.Argument(help="Model id.")], server: ServerOpt = None,
                api_key: KeyOpt = None, config: ConfigOpt = None, models_dir: ModelsDirOpt = None) -> None:
    """Load a model now (in-process: checks that it loads, and how long it takes).

    Example: [bold]chatvlm models load rapidocr --server http://127.0.0.1:8000[/bold]
    """
    print(json.dumps(_models_call(server, api_key, config, models_dir, lambda b: b.load(model))))


@models_app.command("unload")
def models_unload(model: Annotated[str, typer.Argument(help="Model id.")], server: ServerOpt = None,
                  api_key: KeyOpt = None, config: ConfigOpt = None, models_dir: ModelsDirOpt = None) -> None:
    """Unload a model and free its memory.

    Example: [bold]chatvlm models unload rapidocr --server http://127.0.0.1:8000[/bold]
    """
    print(json.dumps(_models_call(server, api_key, config, models_dir, lambda b: b.unload(model))))


# ---- the management service: login, start, stop, logs -------------------------------------------
TokenOpt = Annotated[Optional[str], typer.Option("--token", envvar="CHATVLM_TOKEN",
                     help="A management token (POST /api/auth/token); default: the one `chatvlm login` saved.")]


def _need_server(server: str | None) -> str:
    if not server:
        _fail("this talks to a running server's management service: give --server URL (or $CHATVLM_SERVER)")
    return server


def _managed(fn):
    from chatvlm.manage import Refused

    try:
        return fn()
    except Refused as exc:
        _fail(exc.message, exc.status)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def login(server: ServerOpt = None,
          user: Annotated[str, typer.Option("--user", help="Management user name.")] = "admin",
          password: Annotated[Optional[str], typer.Option("--password", envvar="CHATVLM_PASSWORD",
                                                          help="Default: asked for, not echoed.")] = None) -> None:
    """Sign in to a server's management service; the token is saved for that server (0600 file).

    Example: [bold]chatvlm login --server http://127.0.0.1:8000 --user admin[/bold]
    """
    from chatvlm.manage import login as do_login, token_file

    server = _need_server(server)
    if password is None:
        password = typer.prompt("password", hide_input=True)
    answer = _managed(lambda: do_login(server, user, password))
    err.print(f"signed in to {server} as {user} for {answer['expires_in'] // 60} min (token in {token_file()})",
              highlight=False)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def logout(server: ServerOpt = None) -> None:
    """Forget the token saved for a server.

    Example: [bold]chatvlm logout --server http://127.0.0.1:8000[/bold]
    """
    from chatvlm.manage import forget_token

    server = _need_server(server)
    err.print(f"signed out of {server}" if forget_token(server) else f"no token was saved for {server}",
              highlight=False)


def _lifecycle(action: str, model: str, server: str | None, token: str | None, api_key: str | None,
               force: bool, timeout: float | None, wait: bool) -> None:
    from chatvlm.manage import call, wait_task

    server = _need_server(server)
    accepted = _managed(lambda: call(server, token, api_key, lambda c: c.lifecycle(model, action, force, timeout)))
    if not wait:
        print(json.dumps(accepted))
        return
    task = _managed(lambda: wait_task(server, token, api_key, accepted["task_id"], (timeout or 600) + 30))
    print(json.dumps(task))
    if task["status"] == "failed":
        _fail(f"{action} of {model} failed: {task.get('error')} ({task.get('error_code')})", 1)
    if task["status"] != "succeeded":
        _fail(f"{action} of {model} is still {task['status']} (task {task['task_id']})", 1)


WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the task to end (default), or print "
                                       "its id at once.")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", min=0.001, help="Seconds: start = the load, "
                                                     "stop = the wait for in-flight requests.")]


@models_app.command("start")
def models_start(model: Annotated[str, typer.Argument(help="Model id.")], server: ServerOpt = None,
                 token: TokenOpt = None, api_key: KeyOpt = None, timeout: TimeoutOpt = None,
                 wait: WaitOpt = True) -> None:
    """Start a model on the server (management service): it loads now and runs also after a restart.

    Example: [bold]chatvlm models start rapidocr --server http://127.0.0.1:8000[/bold]
    """
    _lifecycle("start", model, server, token, api_key, False, timeout, wait)


@models_app.command("stop")
def models_stop(model: Annotated[str, typer.Argument(help="Model id.")], server: ServerOpt = None,
                token: TokenOpt = None, api_key: KeyOpt = None, timeout: TimeoutOpt = None, wait: WaitOpt = True,
                force: Annotated[bool, typer.Option("--force", help="Cancel in-flight requests at once.")] = False
                ) -> None:
    """Stop a model on the server: its requests get 503 MODEL_NOT_RUNNING until it is started.

    Example: [bold]chatvlm models stop rapidocr --server http://127.0.0.1:8000[/bold]
    """
    _lifecycle("stop", model, server, token, api_key, force, timeout, wait)


@models_app.command("logs")
def models_logs(model: Annotated[str, typer.Argument(help="Model id.")], server: ServerOpt = None,
                token: TokenOpt = None, api_key: KeyOpt = None,
                lines: Annotated[int, typer.Option("--lines", "-n", min=0, max=100_000)] = 100,
                follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C ends).")]
                = False) -> None:
    """A model's log on the server: lifecycle events, warnings, errors, request summaries.

    Example: [bold]chatvlm models logs rapidocr --follow --server http://127.0.0.1:8000[/bold]
    """
    from chatvlm.manage import call, print_log_line

    server = _need_server(server)
    if not follow:
        for line in _managed(lambda: call(server, token, api_key, lambda c: c.model_logs(model, lines))):
            print_log_line(line)
        return

    def stream(client) -> None:
        gen = client.follow_model_logs(model, lines)
        try:
            for line in gen:
                print_log_line(line)
        finally:
            gen.close()

    try:
        _managed(lambda: call(server, token, api_key, stream))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def main() -> None:
    """Console-script entry point."""
    app()
