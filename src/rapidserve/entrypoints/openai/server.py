"""The OpenAI-compatible HTTP server: `build_app(async_engine, ServerConfig) -> FastAPI`.

Routes: POST /v1/completions, POST /v1/chat/completions (both stream over SSE), GET /v1/models,
GET /health, GET /metrics, POST /tokenize, POST /detokenize, GET /version.

Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with vLLM's type
names (BadRequestError, NotFoundError, ...) and the HTTP status as `code`.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from rapidserve import __version__
from rapidserve.async_engine import (
    AsyncEngine, ChatPrompt, EngineDeadError, Prompt, RequestStream, prompt_token_ids,
)
from rapidserve.serving.front import EngineFront, check_unicode
from rapidserve.entrypoints.openai.metrics import ServerMetrics
from rapidserve.entrypoints.openai.server_log import RequestLogMiddleware, StatsLogger, record_streams
from rapidserve.entrypoints.openai.protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
    ChatResponseMessage, ChatStreamChoice, CompletionChoice, CompletionRequest,
    CompletionResponse, CompletionStreamResponse, DeltaMessage, DetokenizeRequest, ErrorInfo,
    ErrorResponse, HealthResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse, UsageInfo,
    DetokenizeResponse, VersionResponse,
)
from rapidserve.entrypoints.openai.logprobs import (
    CompletionLogprobsBuilder, chat_logprobs, new_logprobs, prompt_logprobs_json,
)
from rapidserve.entrypoints.openai.streamed_text import StreamedText
from rapidserve.outputs import CompletionOutput, RequestOutput
from rapidserve.sampling_params import SamplingParams

log = logging.getLogger("rapidserve.server")

T = TypeVar("T")

_ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
    405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
    500: "InternalServerError", 503: "ServiceUnavailableError",
}
_OPEN_PATHS = ("/health", "/metrics", "/version")  # answered without the API key
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # vLLM binds 0.0.0.0; here exposing the server is a choice
    port: int = 8000
    api_key: str | None = None  # clients must send `Authorization: Bearer <key>`
    max_queue_len: int = 1024  # requests admitted and not finished; more get 503
    graceful_shutdown_s: float = 10.0  # on SIGTERM, how long open requests may still run
    # The names requests may use for the model (vLLM's --served-model-name A B ...); responses
    # carry the engine's name (the first). Empty: the engine's name only.
    served_model_names: tuple[str, ...] = ()
    stats_interval_s: float = 5.0  # the engine-stats log line's period while busy (0: none)
    # Larger request bodies get 413 before they are parsed; None: sized from the model's context
    # (request_body_limit).
    max_request_body_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_request_body_bytes is not None and self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be at least 1, got {self.max_request_body_bytes}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be at least 1, got {self.max_queue_len}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.graceful_shutdown_s < 0:
            raise ValueError(f"graceful_shutdown_s must be >= 0, got {self.graceful_shutdown_s}")
        if self.stats_interval_s < 0:
            raise ValueError(f"stats_interval_s must be >= 0, got {self.stats_interval_s}")
        if any(not n for n in self.served_model_names):
            raise ValueError("served_model_names must not contain an empty name")


# The default body limit: room for a prompt that fills the context even at the worst encoding
# (a token of many characters, each escaped as \uXXXX by the client's JSON), plus the rest of the
# request.
_BODY_BYTES_PER_TOKEN = 64
_BODY_BYTES_BASE = 1 << 20


def request_body_limit(config: ServerConfig, max_model_len: int) -> int:
    """The largest request body the server reads (bytes)."""
    if config.max_request_body_bytes is not None:
        return config.max_request_body_bytes
    return _BODY_BYTES_BASE + _BODY_BYTES_PER_TOKEN * max_model_len


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def _error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(
        message=message, type=_ERROR_TYPES.get(status, "APIError"), param=param, code=status))


def _printable(text: str) -> str:
    """`text` with what UTF-8 cannot carry (lone surrogates echoed from a request) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = _error_body(status, _printable(message), None if param is None else _printable(param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _bad_request(e: ValueError) -> APIError:
    param = getattr(e, "param", None)
    if param is None:
        # SamplingParams' messages start with the parameter's name.
        first = str(e).split(" ", 1)[0]
        param = first if first in _SAMPLING_FIELDS else None
    return APIError(400, str(e), param)


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """One line out of pydantic's errors, and the top-level field they concern."""
    by_field: dict[str, list[tuple[list[Any], str]]] = {}
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"Invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        loc = [x for x in err.get("loc", ()) if x != "body"]
        by_field.setdefault(str(loc[0]) if loc else "", []).append((loc, str(err.get("msg"))))
    parts = []
    for field, errs in by_field.items():
        # A union field reports one error per member type, each under the member's name.
        members = {loc[1] for loc, _ in errs if len(loc) > 1 and isinstance(loc[1], str)}
        if len(members) > 1:
            parts.append(f"{field}: the value matches none of the accepted types ({errs[0][1]})")
        else:
            for loc, msg in errs:
                parts.append(f"{'.'.join(str(x) for x in loc) or 'body'}: {msg}")
    first = next(iter(by_field), "")
    return "; ".join(parts[:3]) or "invalid request", first or None


def _ending(c: CompletionOutput, echo_only: bool = False) -> dict[str, Any]:
    """A completion choice's finish_reason and stop_reason. Echo alone (max_tokens 0) ends by its
    length whatever ended the one token generated and dropped (an EOS, a stop id)."""
    if echo_only and c.finish_reason is not None:
        return {"finish_reason": "length", "stop_reason": None}
    return {"finish_reason": _finish_reason(c), "stop_reason": _stop_reason(c)}


def _finish_reason(c: CompletionOutput) -> str | None:
    """A choice's OpenAI finish_reason (None while it runs; each choice ends on its own)."""
    if c.finish_reason is None:
        return None
    return "length" if c.finish_reason == "length" else "stop"


class _RequestFailed(Exception):
    """The engine ended one request with an error (finish_reason "error"); the others go on."""


def _check_failed(output: RequestOutput) -> RequestOutput:
    if output.error is not None:
        raise _RequestFailed(f"request {output.request_id} failed: {output.error}")
    return output


def _stop_reason(c: CompletionOutput) -> int | str | None:
    return c.stop_reason if c.finish_reason is not None else None


def _is_final_of_many(output: RequestOutput) -> bool:
    """A parallel request's (n > 1) final output: its choices' completions, each of which its
    own events have already streamed (ParentRequest)."""
    return output.finished and len(output.outputs) > 1


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


_SSE_DONE = "data: [DONE]\n\n"


def _stream_error(request_id: str, error: Exception) -> str:
    """The error event that ends a stream the engine failed (or the shutdown cut): one log line."""
    log.warning("stream %s ended with an error: %s", request_id, str(error).splitlines()[0] if str(error) else "")
    return _sse(_error_body(getattr(error, "status", 500), _printable(str(error))))


class _ApiKeyMiddleware:
    """401 for requests without `Authorization: Bearer <key>` (health and metrics stay open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(
                    401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'.",
                    headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_DRAIN_CAP_BYTES = 64 << 20  # an oversized body up to this is read (and dropped) before the 413


class _BodyLimitMiddleware:
    """413 for a request whose body is larger than `limit` bytes, before the app parses it (and
    before a client sending one slowly has been read past the limit)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send, drain=int(declared) <= _DRAIN_CAP_BYTES)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large(scope, receive, send, drain=message.get("more_body", False))
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, drain: bool) -> None:
        # NOTE: the rest of the body (if more is coming: once it is all in, receive() waits for
        # the disconnect) is read and dropped, up to a cap, before answering: a client still
        # sending when the connection closes would see a reset, not the 413.
        drained = 0
        while drain and drained < _DRAIN_CAP_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        response = error_response(
            413, f"The request body is larger than this server accepts ({self.limit} bytes; "
            "--max-request-body-bytes).", headers={"Connection": "close"})
        await response(scope, receive, send)


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends (done, client gone, cancelled),
    even if its body was never started."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _wait_for_disconnect(request: Request) -> None:
    # NOTE: the body has been read already, so receive() blocks until the client goes away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """The result of `work`, or None (after cancelling it) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # cancelling the consumers aborts their requests
    return task.result() if task in done else None


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) from several streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    inbox: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                inbox.put_nowait((i, out))
        except Exception as e:  # EngineDeadError, surfaced in order
            inbox.put_nowait((i, e))
            return
        inbox.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _Batch:
    """The engine requests of one HTTP request (one per prompt), and their release."""

    def __init__(self, server: OpenAIServer, streams: list[RequestStream], n: int = 1) -> None:
        self.streams = streams
        self.n = n  # sequences per stream (SamplingParams.n): the queue slots each holds
        self._server = server
        self._closed = False

    def close(self) -> None:
        """Abort what is unfinished, record metrics, give back the queue slots. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for stream in self.streams:
            stream.close()
            self._server.metrics.observe_request(stream)
        record_streams(self.streams)
        self._server.release(len(self.streams) * self.n)


class OpenAIServer:
    """Request handling behind the routes; one per app."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(engine.model_name)
        self.model_names = (engine.model_name,) + tuple(
            n for n in config.served_model_names if n != engine.model_name)
        self._admitted = 0  # engine requests admitted and not released (the bounded queue)
        self.stats_logger: StatsLogger | None = None  # set by build_app

    # ---- admission ---------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "model")

    def end_streams(self, reason: str) -> None:
        """End every open request with an error event / answer (`reason`), e.g. when the
        server shuts down with requests still running after its grace period."""
        n = self.engine.fail_requests(reason)
        if n:
            log.warning("%s: ending %d open request(s) with an error", reason, n)

    def release(self, n: int) -> None:
        self._admitted -= n

    async def admit(self, prompts: list[Prompt], params: SamplingParams, request_id: str) -> _Batch:
        # NOTE: the queue bound counts sequences: a prompt with n choices holds n slots.
        n = len(prompts) * params.n
        if n > self.config.max_queue_len:
            # Retry-After would be a lie: it can never fit.
            what = f"{n} prompts" if params.n == 1 else f"{len(prompts)} prompt(s) x n={params.n} choices"
            raise APIError(
                400, f"The request holds {what}, more than the server ever queues at once "
                f"({self.config.max_queue_len}, --max-queue-len); send them in smaller batches.",
                "prompt" if params.n == 1 else "n")
        if self._admitted + n > self.config.max_queue_len:
            raise APIError(
                503, f"The server is at capacity ({self.config.max_queue_len} requests queued or "
                "running); retry later.", headers={"Retry-After": "1"})
        # Reserved before awaiting, so concurrent admissions cannot overshoot the bound.
        self._admitted += n
        ids = [f"{request_id}-{i}" for i in range(n)]
        try:
            # All prompts go to the engine thread together: one round trip, not one per prompt.
            results = await asyncio.gather(
                *(self.engine.generate(p, params, rid) for p, rid in zip(prompts, ids)),
                return_exceptions=True,
            )
        except BaseException:  # cancelled: streams already admitted were dropped by gather
            for rid in ids:
                self.engine.abort(rid)
            self.release(n)
            raise
        streams = [r for r in results if isinstance(r, RequestStream)]
        self.release(n - len(streams) * params.n)  # the failed ones never held a slot
        batch = _Batch(self, streams, params.n)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            batch.close()
            err = errors[0]
            if isinstance(err, ValueError):
                raise _bad_request(err)
            if isinstance(err, EngineDeadError):
                raise APIError(500, str(err))
            raise err
        return batch

    async def collect(self, batch: _Batch) -> list[RequestOutput]:
        """The final output of every stream."""

        async def last(stream: RequestStream) -> RequestOutput:
            final = None
            async for out in stream:
                final = out
            if final is None or not final.finished:
                raise EngineDeadError(f"request {stream.request_id} was aborted")
            return _check_failed(final)

        return await asyncio.gather(*(last(s) for s in batch.streams))

    async def run_full(self, request: Request, batch: _Batch,
                       respond: Callable[[list[RequestOutput]], BaseModel | Awaitable[BaseModel]]) -> Response:
        """A non-streaming answer; a client that leaves first has its requests aborted."""
        try:
            finals = await _until_disconnect(request, self.collect(batch))
        except (EngineDeadError, _RequestFailed) as e:
            raise APIError(getattr(e, "status", 500), str(e)) from e
        finally:
            batch.close()
        if finals is None:
            log.info("client disconnected; aborted %d request(s)", len(batch.streams))
            return Response(status_code=499)
        answer = respond(finals)
        if inspect.isawaitable(answer):
            answer = await answer
        return JSONResponse(answer.model_dump())

    # ---- completions -------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        try:
            params = body.sampling_params()
            prompts: list[Prompt] = list(body.prompts())
        except ValueError as e:
            raise _bad_request(e) from e
        request_id = f"cmpl-{uuid.uuid4().hex}"
        batch = await self.admit(prompts, params, request_id)
        created = int(time.time())
        model = self.engine.model_name
        if body.stream:
            return _SSEResponse(
                self._completion_events(batch, params, request_id, created, body.include_usage, body.echo,
                                        body.echo_only),
                batch.close)

        async def respond(finals: list[RequestOutput]) -> CompletionResponse:
            echoes = [await self._echo(o, params) if body.echo else None for o in finals]
            # once per prompt, not per choice: the n choices share it (and it is long)
            prompt_lps = [None if body.prompt_logprobs is None else prompt_logprobs_json(o.prompt_logprobs)
                          for o in finals]
            # vLLM's order: prompt by prompt, each prompt's n choices (index = prompt * n + choice)
            return CompletionResponse(
                id=request_id, created=created, model=model,
                choices=[CompletionChoice(index=i * params.n + c.index,
                                          **_echoed(o, echo, body.echo_only, c.text, c.token_ids, c.logprobs,
                                                    top=body.logprobs),
                                          **_ending(c, body.echo_only), prompt_logprobs=prompt_lps[i])
                         for i, (o, echo) in enumerate(zip(finals, echoes)) for c in o.outputs],
                usage=_usage(finals, body.echo_only))

        return await self.run_full(request, batch, respond)

    async def _echo(self, out: RequestOutput, params: SamplingParams) -> _Echo:
        """What completions' echo puts before a prompt's choices (on the tokenizer thread)."""
        ids = out.prompt_token_ids

        def make(e: EngineFront) -> _Echo:
            tokenizer = e.tokenizer
            if tokenizer is None:
                return _Echo(out.prompt or "", {})
            text = out.prompt if out.prompt is not None else str(
                tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens))
            return _Echo(text, {ids[0]: str(tokenizer.decode(ids[:1]))})

        return await self.engine.tokenize(make)

    async def _completion_events(self, batch: _Batch, params: SamplingParams, request_id: str,
                                 created: int, include_usage: bool, echo: bool = False,
                                 echo_only: bool = False) -> AsyncIterator[str]:
        # One per choice: index = prompt * n + the choice's index (as non-streaming).
        texts = [StreamedText(params) for _ in range(len(batch.streams) * params.n)]
        logprobs = [CompletionLogprobsBuilder() for _ in texts]
        # Under echo, each choice's first chunk carries the prompt (as vLLM's): per prompt, once made.
        echoes: dict[int, _Echo] = {}
        echoed = [False] * len(texts)
        finals: list[RequestOutput] = []
        model = self.engine.model_name
        try:
            async for i, out in _merged(batch.streams):
                if _check_failed(out).finished:
                    finals.append(out)
                if _is_final_of_many(out):
                    continue
                c = out.outputs[0]
                k = i * params.n + c.index
                delta = texts[k].delta(out)
                token_ids, entries = new_logprobs(out)
                if echo and not echoed[k]:
                    echoed[k] = True
                    if i not in echoes:
                        echoes[i] = await self._echo(out, params)
                    choice = _echoed(out, echoes[i], echo_only, delta, token_ids,
                                     None if params.logprobs is None else entries, params.logprobs, logprobs[k])
                elif echo_only:
                    choice = {"text": "", "logprobs": None}  # (the dropped token never has another)
                else:
                    choice = {"text": delta, "logprobs": None if params.logprobs is None
                              else logprobs[k].build(token_ids, entries)}
                yield _sse(CompletionStreamResponse(
                    id=request_id, created=created, model=model,
                    choices=[CompletionChoice(index=k, **choice, **_ending(c, echo_only))]))
            if include_usage:
                yield _sse(CompletionStreamResponse(
                    id=request_id, created=created, model=model, choices=[], usage=_usage(finals, echo_only)))
        except (EngineDeadError, _RequestFailed) as e:
            yield _stream_error(request_id, e)
        yield _SSE_DONE

    # ---- chat --------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        try:
            params = body.sampling_params()
            prompt = ChatPrompt(body.template_messages(), body.add_generation_prompt)
        except ValueError as e:
            raise _bad_request(e) from e
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        batch = await self.admit([prompt], params, request_id)
        created = int(time.time())
        model = self.engine.model_name
        if body.stream:
            return _SSEResponse(
                self._chat_events(batch, params, request_id, created, body.include_usage),
                batch.close)

        def respond(finals: list[RequestOutput]) -> ChatCompletionResponse:
            return ChatCompletionResponse(
                id=request_id, created=created, model=model,
                choices=[ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                    logprobs=_chat_logprobs(c, params),
                                    finish_reason=_finish_reason(c), stop_reason=_stop_reason(c))
                         for o in finals for c in o.outputs],
                usage=_usage(finals))

        return await self.run_full(request, batch, respond)

    async def _chat_events(self, batch: _Batch, params: SamplingParams, request_id: str,
                           created: int, include_usage: bool) -> AsyncIterator[str]:
        texts = [StreamedText(params) for _ in range(params.n)]  # one per choice
        model = self.engine.model_name
        final: RequestOutput | None = None
        first = [True] * params.n
        try:
            # NOTE: every chunk carries one token of one choice; the role rides on each choice's
            # first token's chunk (no token-less chunk goes out before a choice's first token).
            async for _, out in _merged(batch.streams):
                final = out if _check_failed(out).finished else None
                if _is_final_of_many(out):
                    continue
                c = out.outputs[0]
                delta = DeltaMessage(role="assistant" if first[c.index] else None,
                                     content=texts[c.index].delta(out))
                first[c.index] = False
                yield _sse(ChatCompletionChunk(
                    id=request_id, created=created, model=model,
                    choices=[ChatStreamChoice(index=c.index, delta=delta, finish_reason=_finish_reason(c),
                                              logprobs=None if params.logprobs is None
                                              else chat_logprobs(*new_logprobs(out), params.logprobs),
                                              stop_reason=_stop_reason(c))]))
            if include_usage and final is not None:
                yield _sse(ChatCompletionChunk(
                    id=request_id, created=created, model=model, choices=[], usage=_usage([final])))
        except (EngineDeadError, _RequestFailed) as e:
            yield _stream_error(request_id, e)
        yield _SSE_DONE

    # ---- tokenizer ---------------------------------------------------------------------------

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        try:
            if body.messages is not None:
                chat = ChatPrompt([m.template_message() for m in body.messages], body.add_generation_prompt)
                tokens = await self.engine.tokenize(lambda e: prompt_token_ids(e, chat))
            else:
                text, add = body.prompt, body.add_special_tokens
                tokens = await self.engine.tokenize(lambda e: _encode(e, text or "", add))
        except ValueError as e:
            raise _bad_request(e) from e
        except EngineDeadError as e:
            raise APIError(500, str(e)) from e
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=self.engine.max_model_len)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        tokens = body.tokens
        try:
            text = await self.engine.tokenize(lambda e: _decode(e, tokens))
        except ValueError as e:
            raise APIError(400, str(e), "tokens") from e
        except EngineDeadError as e:
            raise APIError(500, str(e)) from e
        return DetokenizeResponse(prompt=text)

    def model_card(self, name: str | None = None) -> ModelCard:
        e = self.engine
        return ModelCard(id=name or e.model_name, root=e.model_root, max_model_len=e.max_model_len)


class _Echo(NamedTuple):
    """What completions' echo puts before a prompt's choices: the prompt's text (as given, or
    its token ids decoded), and its first token's text (that token's logprobs item has no
    `Logprob` to take it from)."""

    text: str
    first_token: dict[int, str]


def _echoed(out: RequestOutput, echo: _Echo | None, echo_only: bool, text: str, token_ids: list[int],
            entries: Any, top: int | None = None, builder: CompletionLogprobsBuilder | None = None,
            ) -> dict[str, Any]:
    """A choice's (or its first chunk's) text and logprobs: the generated ones (`text`,
    `token_ids` and their logprob `entries`; None: not asked), after the prompt's (their `top`
    most likely each) under echo (`echo` not None), alone with echo_only (max_tokens 0: the one
    generated token dropped)."""
    builder = builder or CompletionLogprobsBuilder()
    if echo is None:
        return {"text": text, "logprobs": None if entries is None else builder.build(token_ids, entries)}
    lp = None
    if entries is not None:
        # NOTE: with echo and logprobs the request asked the prompt's logprobs too (protocol).
        if out.prompt_logprobs is None:
            raise RuntimeError(f"request {out.request_id}: no prompt logprobs for its echo")
        lp = builder.build(out.prompt_token_ids, out.prompt_logprobs, echo.first_token, top=top)
        if not echo_only:
            builder.build(token_ids, entries, out=lp)
    return {"text": echo.text + ("" if echo_only else text), "logprobs": lp}


def _chat_logprobs(c: CompletionOutput, params: SamplingParams) -> ChatLogprobs | None:
    return None if c.logprobs is None or params.logprobs is None else chat_logprobs(c.token_ids, c.logprobs,
                                                                                   params.logprobs)


def _usage(finals: list[RequestOutput], echo_only: bool = False) -> UsageInfo:
    """OpenAI's usage: each prompt counted once, the completion tokens of every choice summed
    (none under echo_only: the one generated is dropped)."""
    return UsageInfo.of(sum(len(o.prompt_token_ids) for o in finals),
                        0 if echo_only else sum(len(c.token_ids) for o in finals for c in o.outputs))


def _tokenizer(engine: EngineFront) -> Any:
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer: start the server with --tokenizer")
    return engine.tokenizer


def _encode(engine: EngineFront, text: str, add_special_tokens: bool) -> list[int]:
    check_unicode(text, "prompt")
    return list(_tokenizer(engine).encode(text, add_special_tokens=add_special_tokens))


def _decode(engine: EngineFront, tokens: list[int]) -> str:
    tokenizer = _tokenizer(engine)
    vocab = engine.model_config.vocab_size
    for t in tokens:
        if not 0 <= t < vocab:
            raise ValueError(f"token id {t} is not in the vocabulary [0, {vocab})")
    return str(tokenizer.decode(tokens))


def build_app(engine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. The caller owns the engine (and shuts it down)."""
    config = config or ServerConfig()
    server = OpenAIServer(engine, config)
    app = FastAPI(title="rapidserve", version=__version__)
    app.state.server = server
    # NOTE: the last added runs first: the API key is checked before a body is read.
    app.add_middleware(_BodyLimitMiddleware, limit=request_body_limit(config, engine.max_model_len))
    if config.api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=config.api_key)
    # Added last: the outermost, so refused requests (401) are logged too.
    server.stats_logger = StatsLogger(engine, config.stats_interval_s)
    app.add_middleware(RequestLogMiddleware, stats=server.stats_logger)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("answering %d: %s", exc.status, exc.message)
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    # What each route answers, for the OpenAPI schema (the fuzz test holds the server to it).
    # NOTE: bad bodies are answered 400 (OpenAI's status), not FastAPI's 422: see _openapi.
    def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
        found = (*statuses, 413, *((401,) if config.api_key is not None else ()))
        return {s: {"model": ErrorResponse, "description": _ERROR_TYPES[s]} for s in sorted(found)}

    # NOTE: under OpenAPI 3.1 the schema of text/event-stream describes one event: its data is a
    # chunk's JSON (or an error body), then "[DONE]".
    sse_event = {"type": "object", "required": ["data"],
                 "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
    generation = {**errors(400, 404, 500, 503), 200: {"content": {"text/event-stream": {"schema": sse_event}},
                                                        "description": "JSON, or server-sent events with stream=true"}}

    @app.post("/v1/completions", response_model=None,
              responses={**generation, 200: {**generation[200], "model": CompletionResponse}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", response_model=None,
              responses={**generation, 200: {**generation[200], "model": ChatCompletionResponse}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.get("/v1/models", responses=errors())
    async def models() -> ModelList:
        return ModelList(data=[server.model_card(n) for n in server.model_names])

    @app.get("/v1/models/{model_id:path}", responses=errors(404))
    async def model(model_id: str) -> ModelCard:
        server.check_model(model_id)
        return server.model_card(model_id)

    @app.post("/tokenize", responses=errors(400, 404, 500))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await server.tokenize(body)

    @app.post("/detokenize", responses=errors(400, 404, 500))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await server.detokenize(body)

    @app.get("/health", response_model=HealthResponse,
             responses={503: {"model": HealthResponse, "description": "the engine is not running"}, **errors()})
    async def health() -> JSONResponse:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        # One short line, never a traceback (the log has it): /health is open to anyone.
        return JSONResponse({"status": "unhealthy", "error": engine.dead_reason}, status_code=503)

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
        **errors()})
    async def metrics() -> Response:
        server.metrics.update(engine.stats())
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version", responses=errors())
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less the 422 answers it adds to every route with parameters: this
    server answers a body or parameter it cannot read with 400 and OpenAI's error body."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
