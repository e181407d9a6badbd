"""The server's log, as vLLM users expect it: one line per request, the engine's load every few
seconds while it is busy, nothing while it is idle.

- `RequestLogMiddleware` (ASGI) writes, when a response has been sent in full (a stream too):
  ``POST /v1/completions 200 | prompt 12 tok, output 32 tok | 0.412 s``. Probes (/health,
  /metrics) are logged at DEBUG, so a scraper does not fill the log.
- `StatsLogger` is an asyncio task, started with the first request, that every `interval_s`
  writes running/waiting requests, prompt and generation throughput over the interval, KV cache
  usage and the SM partition in force, and stays silent over intervals with nothing to report.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from rapidserve.async_engine import AsyncEngine, RequestStream

log = logging.getLogger("rapidserve.server")
stats_log = logging.getLogger("rapidserve.stats")

_PROBES = ("/health", "/metrics", "/version")


@dataclass
class RequestRecord:
    """What the request log says of one HTTP request; the handler adds the tokens."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    engine_requests: int = 0

    def add(self, streams: Iterable[RequestStream]) -> None:
        for s in streams:
            self.engine_requests += 1
            self.prompt_tokens += s.num_prompt_tokens
            self.output_tokens += len(s.token_times)


# NOTE: set by the middleware for the duration of one HTTP request; the handler's tasks (and a
# streaming body's) inherit a copy of the context, so they all see the same record object.
current_record: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "rapidserve_request_record", default=None)


def record_streams(streams: Iterable[RequestStream]) -> None:
    """Count a finished batch's tokens into the current HTTP request's log line."""
    record = current_record.get()
    if record is not None:
        record.add(streams)


class RequestLogMiddleware:
    """One log line per HTTP request, written after its last byte (streams included)."""

    def __init__(self, app: ASGIApp, stats: StatsLogger | None = None) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.stats is not None:
            self.stats.ensure_started()
        path = scope["path"]
        record = RequestRecord()
        token = current_record.set(record)
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.monotonic()
        try:
            await self.app(scope, receive, send_status)
        finally:
            current_record.reset(token)
            elapsed = time.monotonic() - t0
            level = logging.DEBUG if path in _PROBES else logging.INFO
            if path not in _PROBES and self.stats is not None:
                self.stats.num_requests += 1
            if log.isEnabledFor(level):
                client = scope.get("client")
                who = f"{client[0]}:{client[1]} " if client else ""
                tokens = (f" | prompt {record.prompt_tokens} tok, output {record.output_tokens} tok"
                          if record.engine_requests else "")
                # 499: the client went away before a response started (nginx's code for it).
                log.log(level, "%s%s %s %d%s | %.3f s", who, scope["method"], path, status or 499,
                        tokens, elapsed)


class StatsLogger:
    """The engine's load every `interval_s` while there is any (vLLM's periodic stats line)."""

    def __init__(self, engine: AsyncEngine, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError(f"stats_interval_s must be >= 0, got {interval_s}")
        self.engine = engine
        self.interval_s = interval_s
        self.num_requests = 0  # HTTP requests answered, probes aside (for the shutdown line)
        self._task: asyncio.Task[None] | None = None
        self._last = (time.monotonic(), 0, 0)  # when, prompt tokens, generation tokens

    def ensure_started(self) -> None:
        """Start the task on the running loop (once; again if its loop has gone)."""
        if self.interval_s == 0 or not stats_log.isEnabledFor(logging.INFO):
            return
        if self._task is None or self._task.done():
            self._last = (time.monotonic(), self.engine.num_prompt_tokens, self.engine.num_generation_tokens)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.engine.healthy:
            await asyncio.sleep(self.interval_s)
            line = self.line()
            if line is not None:
                stats_log.info("%s", line)

    def line(self) -> str | None:
        """The stats line for the time since the last call, or None when there was no load."""
        now = time.monotonic()
        prompt, gen = self.engine.num_prompt_tokens, self.engine.num_generation_tokens
        t0, prompt0, gen0 = self._last
        self._last = (now, prompt, gen)
        s = self.engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and prompt == prompt0 and gen == gen0:
            return None  # idle: quiet
        dt = max(now - t0, 1e-9)
        text = (f"engine ({self.engine.mode}): {s.num_running} running, {s.num_waiting} waiting | "
                f"prompt {(prompt - prompt0) / dt:.1f} tok/s, generation {(gen - gen0) / dt:.1f} tok/s | "
                f"KV cache {100 * s.kv_cache_usage:.1f} % used")
        if self.engine.mode == "rapid":
            if s.partition is not None and s.partition.current:
                text += f" | partition {s.partition.current}"
            else:
                text += " | partition " + (f"decode {s.decode_sms} SMs" if s.decode_sms else "none (whole device)")
        return text
