"""Where OCR results go, and what a rerun may skip.

Every record is written whole or not at all: a JSONL line is one ``write`` followed by a flush
and an fsync, an output file is written beside its final name and renamed onto it, and only
then is its manifest line appended. A line cut short by a crash (the only partial write
possible) is dropped when the file is opened again. A rerun skips the files whose record says
``ok`` under the same key (content hash + options).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, Any

SUFFIX = {"text": ".txt", "markdown": ".md", "json": ".json"}
MANIFEST = "manifest.jsonl"


def _load_done(path: Path) -> dict[str, dict[str, Any]]:
    """Records of a JSONL file by key (the last one wins), after cutting a partial last line."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):  # a line cut short: drop it, so appends start on a fresh line
        with path.open("r+b") as f:
            f.truncate(len(complete))
    for line in complete.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("key"):
            done[record["key"]] = record
    return done


class _Appender:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        last = _load_done(path)
        self.done = {k: r for k, r in last.items() if r.get("status") == "ok"}
        # Files whose job was submitted but not collected (an interrupted run, or --no-wait): job ids.
        self.pending = {k: r["job_id"] for k, r in last.items() if r.get("status") == "submitted" and r.get("job_id")}
        self._f: IO[str] = path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class JsonlSink:
    """``--out FILE.jsonl``: one object per file, the whole answer included."""

    def __init__(self, path: Path) -> None:
        self._out = _Appender(path)
        self.done = self._out.done
        self.pending = self._out.pending

    def write(self, record: dict[str, Any], result: dict[str, Any] | None) -> None:
        self._out.append({**record, "result": result} if result is not None else record)

    def write_pending(self, record: dict[str, Any]) -> None:
        self._out.append(record)

    def close(self) -> None:
        self._out.close()


class DirSink:
    """``--out-dir DIR``: ``<name>.md``/``.json``/``.txt`` per file, beside ``manifest.jsonl``."""

    def __init__(self, directory: Path, fmt: str) -> None:
        self.dir = directory
        self.fmt = fmt
        self._out = _Appender(directory / MANIFEST)
        self.done = self._out.done
        self.pending = self._out.pending
        self._taken = {r["output"]: k for k, r in self.done.items() if r.get("output")}

    def _name(self, record: dict[str, Any]) -> str:
        name = Path(record["name"]).with_suffix(SUFFIX[self.fmt]).as_posix()
        owner = self._taken.get(name)
        if owner is not None and owner != record["key"]:  # two inputs with one name (a/x.png, b/x.png)
            name = Path(name).with_stem(f"{Path(name).stem}.{record['key'][:8]}").as_posix()
        self._taken[name] = record["key"]
        return name

    def write(self, record: dict[str, Any], result: dict[str, Any] | None) -> None:
        if result is not None:
            name = self._name(record)
            target = self.dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            tmp.write_text(render(result, self.fmt), encoding="utf-8")
            os.replace(tmp, target)
            record = {**record, "output": name}
        self._out.append(record)

    def write_pending(self, record: dict[str, Any]) -> None:
        self._out.append(record)

    def close(self) -> None:
        self._out.close()


class StreamSink:
    """No ``--out``: JSONL on a piped stdout (for scripts), readable text on a terminal."""

    def __init__(self, stream: IO[str] | None = None, console: Any = None, show_pending: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.console = console
        self.show_pending = show_pending  # --no-wait: the submitted jobs' ids are the output
        self.done: dict[str, dict[str, Any]] = {}  # stdout keeps no state: nothing to resume
        self.pending: dict[str, str] = {}

    def write_pending(self, record: dict[str, Any]) -> None:
        if not self.show_pending:
            return
        if self.console is not None:
            self.console.print(f"{record['path']}: job {record['job_id']} submitted", markup=False, highlight=False)
            return
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()

    def write(self, record: dict[str, Any], result: dict[str, Any] | None) -> None:
        if self.console is not None:
            if result is not None:
                self.console.rule(record["path"])
                self.console.print(render(result, record["options"]["format"]), markup=False, highlight=False)
            return
        self.stream.write(json.dumps({**record, "result": result} if result is not None else record,
                                     ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


def render(result: dict[str, Any], fmt: str) -> str:
    if fmt == "markdown":
        return (result.get("markdown") or result.get("text") or "") + "\n"
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False, indent=2) + "\n"
    return (result.get("text") or "") + "\n"
