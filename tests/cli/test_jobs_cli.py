"""``chatvlm ocr`` on long PDFs: read as jobs (the server's job API, or in-process the same job
service), a run interrupted by SIGINT carried on with the same job, and --no-wait."""
from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time

import requests

from tests.cli.conftest import chatvlm, cli_env
from tests.cli.test_ocr_cli import mode_args, records
from tests.pdf_docs import text_pdf
from tests.server_process import ROOT


def long_pdf(tmp_path, pages: int):
    path = tmp_path / f"long-{pages}.pdf"
    path.write_bytes(text_pdf(pages)[0])
    return path


def test_a_long_pdf_goes_through_the_job_api(request, tmp_path):
    server = request.getfixturevalue("ocr_server")
    out = tmp_path / "out.jsonl"
    run = chatvlm("ocr", str(long_pdf(tmp_path, 5)), "--out", str(out), "--model", "rapidocr", "--server", server.url,
                  env=cli_env(tmp_path))
    assert run.returncode == 0, run.stderr
    submitted, done = records(out)
    assert submitted["status"] == "submitted" and done["status"] == "ok"
    job = requests.get(f"{server.url}/jobs/{submitted['job_id']}", timeout=30).json()
    assert job["status"] == "succeeded" and job["pages_done"] == job["pages_total"] == 5
    answer = requests.get(f"{server.url}/jobs/{submitted['job_id']}/result", timeout=30).json()
    assert {**done["result"], "processing_time": 0} == {**answer, "processing_time": 0}
    assert all(f"PAGE {i}" in done["result"]["text"] for i in range(1, 6)) and done["pages"] == 5
    # Below --job-pages a PDF is one /ocr call: no job record.
    short = tmp_path / "short.jsonl"
    assert chatvlm("ocr", str(long_pdf(tmp_path, 5)), "--out", str(short), "--job-pages", "6", "--model", "rapidocr",
                   "--server", server.url, env=cli_env(tmp_path)).returncode == 0
    assert [r["status"] for r in records(short)] == ["ok"]


def test_no_wait_submits_and_a_rerun_collects(request, tmp_path):
    server = request.getfixturevalue("ocr_server")
    pdf = long_pdf(tmp_path, 4)
    piped = chatvlm("ocr", str(pdf), "--no-wait", "--model", "rapidocr", "--server", server.url, env=cli_env(tmp_path))
    assert piped.returncode == 0, piped.stderr
    (line,) = piped.stdout.splitlines()  # the job's record is the output
    assert json.loads(line)["status"] == "submitted" and "left running as jobs" in piped.stderr
    out = tmp_path / "out.jsonl"
    first = chatvlm("ocr", str(pdf), "--out", str(out), "--no-wait", "--model", "rapidocr", "--server", server.url,
                    env=cli_env(tmp_path))
    assert first.returncode == 0 and "0 read" in first.stderr
    job_id = records(out)[0]["job_id"]
    second = chatvlm("ocr", str(pdf), "--out", str(out), "--model", "rapidocr", "--server", server.url,
                     env=cli_env(tmp_path))
    assert second.returncode == 0 and "1 read" in second.stderr, second.stderr
    assert [r["status"] for r in records(out)] == ["submitted", "ok"]  # collected, not submitted again
    assert requests.get(f"{server.url}/jobs/{job_id}", timeout=30).json()["status"] == "succeeded"
    assert "PAGE 4" in records(out)[1]["result"]["text"]
    assert chatvlm("ocr", str(pdf), "--no-wait").returncode == 2  # in-process: nothing would run


def test_sigint_during_a_job_then_the_rerun_carries_on_with_it(request, tmp_path):
    """In-process: the job service keeps each finished page in its database; the rerun resumes the same job
    from its next page instead of reading the document again."""
    pdf = long_pdf(tmp_path, 10)
    out = tmp_path / "out.jsonl"
    env = cli_env(tmp_path)
    args = [sys.executable, "-m", "chatvlm", "ocr", str(pdf), "--out", str(out), "--model", "rapidocr",
            *mode_args("in-process", request)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "data" / "cli-jobs" / "chatvlm.db"  # the CLI's own job database
    job_id = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if job_id is None and out.exists() and out.read_bytes().endswith(b"\n"):
            job_id = records(out)[0]["job_id"]
        if job_id is not None and pages_kept(db, job_id) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    kept = pages_kept(db, job_id)
    assert 2 <= kept < 10, kept
    assert [r["status"] for r in records(out)] == ["submitted"]
    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 read" in rerun.stderr
    submitted, done = records(out)
    assert done["status"] == "ok" and done["pages"] == 10
    assert [p["page"] for p in done["result"]["page_results"]] == list(range(10))
    assert all(f"PAGE {i}" in done["result"]["text"] for i in range(1, 11))
    with contextlib.closing(sqlite3.connect(db)) as conn:  # the same job, no second one
        assert conn.execute("SELECT id FROM jobs").fetchall() == [(job_id,)]


def pages_kept(db, job_id: str) -> int:
    """Finished pages of the job in the CLI's job database (0 before it exists)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            return conn.execute("SELECT count(*) FROM job_pages WHERE job_id = ?", (job_id,)).fetchone()[0]
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0
