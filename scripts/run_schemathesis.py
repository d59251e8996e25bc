"""Schemathesis (4.x) against a running server's /openapi.json: every operation, positive
and negative data. Reports operations x cases, server errors (goal 0) and schema
violations (goal 0), counted from schemathesis' own summary.

    python scripts/run_schemathesis.py --url http://127.0.0.1:8000 [-n 20] [--max-time 600]
    python scripts/run_schemathesis.py --start -n 5        # starts a server on the tiny models

Loopback only; every run is bounded by --max-time and a per-request timeout.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ST = Path(sys.executable).with_name("schemathesis")
HOOKS = ROOT / "scripts" / "schemathesis_hooks.py"  # real image/PDF bytes for the declared file media types
CONFIG = ROOT / "scripts" / "schemathesis.toml"  # the rules JSON Schema cannot state, each with its reason
# Registry models without a tiny builder are installed as a tiny copy of their family, so the
# server under test has every model of its registry (no 503 MODEL_NOT_INSTALLED by design).
STAND_INS = {"qwen_vl_7b": "qwen_vl_2b", "qwen3_vl_4b": "qwen3_vl_2b", "qwen3_vl_8b": "qwen3_vl_2b"}
# Failure codes that are schema violations (statuses, headers, bodies, SSE events, acceptance).
VIOLATIONS = {"ST103", "ST104", "ST105", "ST106", "ST107", "ST108", "ST201", "ST202", "ST203"}


def run(url: str, *, max_examples: int = 10, max_time: float = 600, phases: str | None = None,
        checks: str = "all", mode: str = "all", seed: int = 1, workers: int = 1,
        request_timeout: float = 40, extra: list[str] | None = None) -> dict:
    """Run the CLI, return a summary dict (and the raw text under 'output')."""
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("schemathesis runs go to loopback only")
    args = [str(ST), "--config-file", str(CONFIG), "run", url.rstrip("/") + "/openapi.json", "-n", str(max_examples),
            "--checks", checks, "--mode", mode, "--seed", str(seed), "--no-color",
            "--request-timeout", str(request_timeout), "--max-time", str(int(max_time)),
            "--workers", str(workers), "--output-truncate", "false", *(extra or [])]
    if phases:
        args += ["--phases", phases]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=max_time + 120, cwd=ROOT, env=env)
    out = proc.stdout + proc.stderr
    return summarize(out) | {"exit_code": proc.returncode, "output": out}


def install_stand_ins(models_dir: Path) -> None:
    for model_id, source in STAND_INS.items():
        target = models_dir / model_id
        if not target.exists():
            target.symlink_to(models_dir / source, target_is_directory=True)


def summarize(out: str) -> dict:
    failures = {m.group(1): int(m.group(3)) for m in re.finditer(r"(ST\d{3}) ([^:\n]+): (\d+)", out)}
    statuses: dict[str, int] = {}
    for m in re.finditer(r"^\[(\d{3})\] ", out, re.M):
        statuses[m.group(1)] = statuses.get(m.group(1), 0) + 1
    gen = re.search(r"(\d+) generated", out)
    tested = re.search(r"Tested: (\d+)", out)
    selected = re.search(r"Selected: (\d+)/(\d+)", out)
    per_op = re.findall(r"^_+ ((?:GET|POST|PUT|PATCH|DELETE) \S+) _+$", out, re.M)
    internal = len(re.findall(r"^\[50[0-2]\] ", out, re.M))
    return {
        "operations": int(tested.group(1)) if tested else None,
        "operations_in_schema": int(selected.group(2)) if selected else None,
        "cases_generated": int(gen.group(1)) if gen else None,
        "failures_by_check": failures,
        "server_error_failures_ST101": failures.get("ST101", 0),
        "internal_errors_500_502": internal,
        "schema_violations": sum(v for k, v in failures.items() if k in VIOLATIONS),
        "failing_statuses_shown": statuses,
        "operations_with_failures": per_op,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url")
    p.add_argument("--start", action="store_true", help="start a server on freshly built tiny models")
    p.add_argument("-n", "--max-examples", type=int, default=10)
    p.add_argument("--max-time", type=float, default=600)
    p.add_argument("--phases", help="e.g. examples,coverage,fuzzing,stateful (default: all)")
    p.add_argument("--checks", default="all")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", type=Path, help="write schemathesis' full text output here")
    args = p.parse_args(argv)
    server = None
    if args.start:
        import tempfile
        sys.path.insert(0, str(ROOT))
        from scripts.make_tiny_models import build_tiny_models
        from tests.server_process import RemoteServer
        tiny = Path(tempfile.mkdtemp(prefix="schema-tiny-"))
        build_tiny_models(tiny)
        install_stand_ins(tiny)
        server = RemoteServer(models_dir=tiny)
        url = server.url
    elif args.url:
        url = args.url
    else:
        p.error("--url or --start")
    try:
        res = run(url, max_examples=args.max_examples, max_time=args.max_time, phases=args.phases,
                  checks=args.checks, seed=args.seed)
    finally:
        if server:
            server.stop()
    out = res.pop("output")
    if args.output:
        args.output.write_text(out)
    print(json.dumps(res, indent=1))
    return 0 if res["internal_errors_500_502"] == 0 and res["schema_violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
