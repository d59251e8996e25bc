"""``chatvlm ocr``: folders, content sniffing, failures and the exit status, JSONL/out-dir/stdout,
and resuming after SIGINT, in-process and against a real server."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.conftest import SAMPLES, chatvlm, cli_env
from scripts.make_doc_pages import draw_png, make_page
from tests.pdf_docs import text_page
from tests.server_process import ROOT

EXPECTED_OK = {"receipt_en.png", "sub/line_zh.png", "scan_without_suffix", "contract.pdf"}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def mode_args(mode: str, request) -> list[str]:
    if mode == "server":
        return ["--server", request.getfixturevalue("ocr_server").url]
    return ["--models-dir", str(request.getfixturevalue("no_weights"))]


@pytest.mark.parametrize("mode", ["in-process", "server"])
def test_folder_to_jsonl_with_a_broken_file(mode, request, docs_folder, tmp_path):
    out = tmp_path / "out.jsonl"
    run = chatvlm("ocr", str(docs_folder), "--out", str(out), "--model", "rapidocr", *mode_args(mode, request),
                  env=cli_env(tmp_path))
    assert run.returncode == 1, run.stderr  # one file failed
    assert "broken.png" in run.stderr and "INVALID_IMAGE" in run.stderr
    by_name = {r["name"]: r for r in records(out)}
    assert set(by_name) == EXPECTED_OK | {"broken.png"}  # notes.txt is not a document: skipped
    assert by_name["broken.png"]["status"] == "error" and by_name["broken.png"]["error"]["code"] == "INVALID_IMAGE"
    for name in EXPECTED_OK:
        assert by_name[name]["status"] == "ok", by_name[name]
        assert by_name[name]["result"]["model"] == "rapidocr"
    assert "CORNER MARKET" in by_name["receipt_en.png"]["result"]["text"]
    assert "HELLO" in by_name["scan_without_suffix"]["result"]["text"]  # recognised by its bytes
    pdf = by_name["contract.pdf"]
    assert pdf["pages"] == 2 and [p["page"] for p in pdf["result"]["page_results"]] == [0, 1]
    assert "PAGE 1" in pdf["result"]["text"] and "PAGE 2" in pdf["result"]["text"]
    # A rerun skips what is done and tries the failed file again.
    again = chatvlm("ocr", str(docs_folder), "--out", str(out), "--model", "rapidocr", *mode_args(mode, request),
                    env=cli_env(tmp_path))
    assert again.returncode == 1
    assert "0 read, 4 already done, 1 failed" in again.stderr
    assert len(records(out)) == 6


def test_in_process_and_server_print_the_same_json(request, docs_folder, tmp_path):
    """The same files and options give the same records both ways, every field of the answer
    included (a table's cells, a fallback's requested_model and reason), but the timing."""
    page = tmp_path / "doc_page.png"
    draw_png(make_page(0, "en", two_column=False, seed=101)).save(page)
    outs = {}
    for mode in ("in-process", "server"):
        outs[mode] = tmp_path / f"{mode}.jsonl"
        # qwen_vl_7b is not installed: the default route (doc_cpu) serves, and the answer says so.
        run = chatvlm("ocr", str(page), str(SAMPLES / "receipt_en.png"), str(docs_folder / "contract.pdf"),
                      "--format", "json", "--pages", "2", "--model", "qwen_vl_7b", "--out", str(outs[mode]),
                      *mode_args(mode, request), env=cli_env(tmp_path))
        assert run.returncode == 0, run.stderr

    def untimed(record: dict) -> dict:
        return {**record, "result": {k: v for k, v in record["result"].items() if k != "processing_time"}}

    local, remote = records(outs["in-process"]), records(outs["server"])
    assert [untimed(r) for r in local] == [untimed(r) for r in remote]
    doc = local[0]["result"]
    assert doc["model"] == "doc_cpu" and doc["requested_model"] == "qwen_vl_7b"
    assert "not installed" in doc["fallback_reason"]
    tables = [b for b in doc["blocks"] if b["category"] == "Table"]
    assert tables and all(b["cells"] for b in tables) and tables[0]["text"].startswith("<table")
    pdf = local[2]["result"]
    assert [p["page"] for p in pdf["page_results"]] == [1] and "PAGE 2" in pdf["text"]


def test_jsonl_on_a_piped_stdout_and_exit_zero(request, tmp_path):
    run = chatvlm("ocr", str(SAMPLES / "receipt_en.png"), "--server", request.getfixturevalue("ocr_server").url,
                  env=cli_env(tmp_path))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["status"] == "ok" and "CORNER MARKET" in record["result"]["text"]
    assert "1 read" in run.stderr  # the summary goes to stderr, never into the JSONL


def test_out_dir_writes_outputs_beside_a_manifest(request, docs_folder, tmp_path):
    out_dir = tmp_path / "md"
    run = chatvlm("ocr", str(docs_folder), "--out-dir", str(out_dir), "--format", "markdown", "--pages", "2",
                  "--concurrency", "2", *mode_args("server", request), env=cli_env(tmp_path))
    assert run.returncode == 1
    manifest = {r["name"]: r for r in records(out_dir / "manifest.jsonl")}
    assert manifest["contract.pdf"]["output"] == "contract.md"
    assert manifest["sub/line_zh.png"]["output"] == "sub/line_zh.md"
    assert "output" not in manifest["broken.png"]
    md = (out_dir / "contract.md").read_text(encoding="utf-8")
    assert "PAGE 2" in md and "PAGE 1" not in md  # --pages 2: only the second page was read
    assert not list(out_dir.rglob("*.part"))


@pytest.mark.parametrize("mode", ["in-process", "server"])
def test_sigint_mid_run_then_resume(mode, request, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(14):  # distinct content, so distinct keys
        text_page([f"DOCUMENT NUMBER {i + 10}", f"LINE {i * 7 + 10}"]).save(folder / f"doc{i:02d}.png")
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "chatvlm", "ocr", str(folder), "--out", str(out), "--model", "rapidocr",
            *mode_args(mode, request)]
    proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    raw = out.read_bytes()
    assert raw.endswith(b"\n")  # nothing half-written
    first = records(out)
    assert 3 <= len(first) < 14 and all(r["status"] == "ok" for r in first)
    rerun = subprocess.run(args, cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{14 - len(first)} read, {len(first)} already done" in rerun.stderr
    final = records(out)
    assert sorted(r["name"] for r in final) == [f"doc{i:02d}.png" for i in range(14)]
    assert all(f"DOCUMENT NUMBER {int(r['name'][3:5]) + 10}" in r["result"]["text"] for r in final)


def test_a_cut_last_line_is_dropped_on_resume(request, tmp_path):
    out = tmp_path / "out.jsonl"
    run = chatvlm("ocr", str(SAMPLES / "receipt_en.png"), "--out", str(out), *mode_args("server", request),
                  env=cli_env(tmp_path))
    assert run.returncode == 0
    out.write_bytes(out.read_bytes() + b'{"path": "cut sh')  # what a crash mid-write could leave
    run = chatvlm("ocr", str(SAMPLES / "receipt_en.png"), str(SAMPLES / "line_ru.png"), "--out", str(out),
                  *mode_args("server", request), env=cli_env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert [r["name"] for r in records(out)] == ["receipt_en.png", "line_ru.png"]


def test_usage_errors_exit_2(tmp_path):
    assert chatvlm("ocr", str(tmp_path / "missing")).returncode == 2
    assert chatvlm("ocr", str(SAMPLES), "--format", "yaml").returncode == 2
    bad_pages = chatvlm("ocr", str(SAMPLES), "--pages", "3-1")
    assert bad_pages.returncode == 2 and "--pages" in bad_pages.stderr


def test_unreachable_server_fails_each_file_with_a_clear_message(tmp_path):
    run = chatvlm("ocr", str(SAMPLES / "receipt_en.png"), "--server", "http://127.0.0.1:9", env=cli_env(tmp_path))
    assert run.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in run.stderr and "CONNECTION_FAILED" in run.stderr
