"""The README's curl examples parse, name routes and methods /openapi.json declares, send JSON
bodies that are JSON, and upload sample files that exist (a user copies them verbatim)."""
from __future__ import annotations

import json
import re
import shlex
from urllib.parse import urlsplit

from core.config import load_settings
from server.app import create_app

from tests.conftest import ROOT

README = ROOT / "README.md"
HOSTS = {"127.0.0.1:8000", "server:8000"}


def bash_blocks(text: str) -> list[list[str]]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None and line[3:].strip() == "bash":
                current = []
            elif current is not None:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def curl_commands() -> list[list[str]]:
    """Each curl call as its argument list (shell continuations and multi-line quotes joined)."""
    out = []
    for block in bash_blocks(README.read_text()):
        command = ""
        for line in block:
            command = f"{command}\n{line}" if command else line
            try:
                words = shlex.split(command, comments=True)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            if command.rstrip().endswith("\\"):
                continue
            command = ""
            while (start := next((i for i, w in enumerate(words) if w in ("curl", "$(curl")
                                  or w.endswith("=$(curl")), None)) is not None:
                words = words[start + 1:]
                end = next((i for i, w in enumerate(words) if w in ("|", ")", "&&", ";")), len(words))
                out.append(words[:end])
                words = words[end:]
        assert not command, f"unterminated command in README: {command[:80]!r}"
    return out


def method_and_url(args: list[str]) -> tuple[str, str]:
    method, urls = None, []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-X":
            method, i = args[i + 1], i + 2
            continue
        if a in ("-H", "-d", "-F", "-o", "-D", "--data"):
            i += 2
            continue
        if a.startswith("http"):
            urls.append(a)
        i += 1
    assert len(urls) == 1, args
    if method is None:
        method = "POST" if any(a in ("-d", "-F", "--data") for a in args) else "GET"
    return method, urls[0]


def route_patterns() -> list[tuple[re.Pattern, set[str]]]:
    doc = create_app(load_settings(ROOT / "config.yaml")).openapi()
    return [(re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"),
             {m.upper() for m in item}) for path, item in doc["paths"].items()]


def test_readme_curl_examples_name_declared_routes_with_valid_bodies():
    commands = curl_commands()
    assert len(commands) >= 80  # the README documents every surface with curl
    patterns = route_patterns()
    for args in commands:
        method, url = method_and_url(args)
        parts = urlsplit(url)
        assert parts.netloc in HOSTS, url
        methods = {m for pattern, ms in patterns if pattern.match(parts.path) for m in ms}
        assert methods, f"no route {parts.path} in /openapi.json (README: curl {' '.join(args)[:100]})"
        assert method in methods, f"{method} {parts.path}: the route takes {sorted(methods)}"
        for flag, value in zip(args, args[1:]):
            if flag == "-d" and "$" not in value:
                json.loads(value)  # a body the README shows must be JSON
            if flag == "-F" and "=@samples/" in value:
                assert (ROOT / value.split("=@", 1)[1]).is_file(), value
