"""The alert condition grammar: ``<metric> <op> <number> [for <duration>]``, parsed, never eval'd.

    condition := metric op number [ "for" duration ]
    metric    := one of METRICS
    op        := ">" | ">=" | "<" | "<=" | "==" | "!="
    number    := [-] digits [ "." digits ]
    duration  := digits ( "s" | "m" | "h" )       e.g. 30s, 5m, 1h

A condition that does not parse raises ``ConditionError`` with the 1-based column where it fails.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable, Iterator

# metric -> (scope, description). scope: what one value belongs to (evaluated per GPU, per model,
# or once for the machine).
METRICS: dict[str, tuple[str, str]] = {
    "gpu_utilization": ("gpu", "a GPU's utilization, percent"),
    "gpu_temperature": ("gpu", "a GPU's temperature, Celsius"),
    "gpu_memory_percent": ("gpu", "a GPU's memory in use, percent"),
    "cpu_percent": ("system", "the machine's CPU use, percent"),
    "memory_percent": ("system", "the machine's memory in use, percent"),
    "disk_percent": ("system", "the data directory's disk in use, percent"),
    "response_time": ("model", "a model's mean request latency over the last sample, seconds"),
    "error_rate": ("model", "a model's failed / all requests over the last sample, 0..1"),
    "queue_depth": ("model", "a model's requests waiting"),
    "model_error": ("model", "1 for a model whose status is error, else 0"),
}

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
_UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_DURATION_S = 7 * 86400
MAX_LENGTH = 200

_TOKEN = re.compile(r"""
    (?P<ws>[ \t]+)
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?(?![\w.]))
  | (?P<duration>[0-9]+[smh](?!\w))
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>>=|<=|==|!=|>|<)
  | (?P<bad>-?[0-9][\w.]*)
""", re.VERBOSE)


class ConditionError(ValueError):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.reason = message
        self.position = position  # 1-based column


@dataclass(frozen=True)
class Token:
    kind: str      # number | duration | word | op | end
    text: str
    pos: int       # 1-based column


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    threshold: float
    for_s: float = 0.0

    @property
    def scope(self) -> str:
        return METRICS[self.metric][0]

    def holds(self, value: float) -> bool:
        return OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        text = f"{self.metric} {self.op} {self.threshold:g}"
        return text + (f" for {self.for_s:g}s" if self.for_s else "")


def tokenize(text: str) -> Iterator[Token]:
    """Tokens, read lazily: an error is reported where the grammar first fails, left to right."""
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            raise ConditionError(f"unexpected character {text[i]!r}", i + 1)
        if m.lastgroup == "bad":
            raise ConditionError(f"{m.group()!r} is not a number or a duration (30s, 5m, 1h)", i + 1)
        if m.lastgroup != "ws":
            yield Token(m.lastgroup, m.group(), i + 1)
        i = m.end()
    yield Token("end", "", len(text) + 1)


def parse(text: str) -> Condition:
    """The condition, or ConditionError naming where it fails."""
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"a condition is at most {MAX_LENGTH} characters", MAX_LENGTH + 1)
    stream = tokenize(text)
    ahead: list[Token] = []

    def peek() -> Token:
        if not ahead:
            ahead.append(next(stream))
        return ahead[0]

    def expect(kind: str, what: str) -> Token:
        tok = peek()
        if tok.kind != kind:
            found = "the end" if tok.kind == "end" else repr(tok.text)
            raise ConditionError(f"expected {what}, found {found}", tok.pos)
        return ahead.pop()

    metric = expect("word", "a metric name")
    if metric.text not in METRICS:
        raise ConditionError(f"unknown metric {metric.text!r} (one of: {', '.join(METRICS)})", metric.pos)
    op = expect("op", "a comparison (> >= < <= == !=)")
    number = expect("number", "a number")
    threshold = float(number.text)
    if not math.isfinite(threshold):
        raise ConditionError("the number is out of range", number.pos)
    for_s = 0.0
    if peek().kind == "word" and peek().text == "for":
        ahead.pop()
        dur = expect("duration", "a duration such as 30s, 5m or 1h")
        for_s = float(int(dur.text[:-1]) * _UNITS[dur.text[-1]])
        if not 0 < for_s <= MAX_DURATION_S:
            raise ConditionError(f"the duration must be between 1s and {MAX_DURATION_S // 86400} days", dur.pos)
    end = peek()
    if end.kind != "end":
        raise ConditionError(f"expected 'for <duration>' or the end, found {end.text!r}", end.pos)
    return Condition(metric.text, op.text, threshold, for_s)
