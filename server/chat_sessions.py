"""The conversation store of the EasyVizAI WebSocket chat (seed 001): per session id, the
model the session talks to and its recent user/assistant exchanges.

Memory stays bounded whatever clients do: at most ``max_sessions`` sessions (the least
recently used one is dropped first), at most ``max_turns`` exchanges and ``max_chars``
characters of history per session (the oldest exchanges go first), and sessions idle for
``idle_s`` seconds are forgotten. Everything lives in this process; a restart forgets it.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llm.types import ChatMessage

SESSION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

MAX_SESSIONS = 256
MAX_TURNS = 20          # user + assistant exchanges kept per session
MAX_CHARS = 24_000      # characters of history kept per session (both roles)
IDLE_S = 3600.0         # a session nobody used for this long is forgotten


@dataclass(frozen=True)
class Exchange:
    user: str
    assistant: str

    @property
    def chars(self) -> int:
        return len(self.user) + len(self.assistant)


@dataclass
class ChatSession:
    id: str
    model: str | None = None  # set by model_switch; None = the server's default text model
    exchanges: deque[Exchange] = field(default_factory=deque)
    chars: int = 0
    last_used: float = 0.0

    def history(self) -> list[ChatMessage]:
        """The kept exchanges as alternating user/assistant messages, oldest first."""
        out: list[ChatMessage] = []
        for ex in self.exchanges:
            out += [ChatMessage("user", ex.user), ChatMessage("assistant", ex.assistant)]
        return out


class ChatSessionStore:
    def __init__(self, *, max_sessions: int = MAX_SESSIONS, max_turns: int = MAX_TURNS,
                 max_chars: int = MAX_CHARS, idle_s: float = IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.idle_s = idle_s
        self.clock = clock
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()  # least recently used first
        self.connections = 0  # open chat sockets, for the health route

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        self._expire()
        return session_id in self._sessions

    def get(self, session_id: str) -> ChatSession:
        """The session, created empty when unknown or expired; marks it used."""
        self._expire()
        now = self.clock()
        session = self._sessions.pop(session_id, None)
        if session is None:
            session = ChatSession(session_id)
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
        session.last_used = now
        self._sessions[session_id] = session
        return session

    def set_model(self, session_id: str, model: str | None) -> ChatSession:
        session = self.get(session_id)
        session.model = model
        return session

    def record(self, session_id: str, user: str, assistant: str) -> ChatSession:
        """Append one finished exchange, then drop the oldest ones beyond the limits."""
        session = self.get(session_id)
        ex = Exchange(user, assistant)
        session.exchanges.append(ex)
        session.chars += ex.chars
        while session.exchanges and (len(session.exchanges) > self.max_turns or session.chars > self.max_chars):
            session.chars -= session.exchanges.popleft().chars
        return session

    def _expire(self) -> None:
        # Recency order is last_used order, so the expired sessions are all at the front.
        deadline = self.clock() - self.idle_s
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.last_used > deadline:
                break
            self._sessions.popitem(last=False)
