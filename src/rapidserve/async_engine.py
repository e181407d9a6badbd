"""AsyncEngine: the asyncio front of an engine (any topology) stepped by one dedicated thread.

Two sides meet here:

- the engine thread (one, named ``rapidserve-engine``) owns the engine (`LLMEngine` in the
  hybrid mode, `RapidEngine` in the rapid mode: whatever `create_engine` built). It runs
  commands (admit a request, abort one, a read such as tokenizing) between steps and steps
  while any request is unfinished; when there is nothing to do it blocks on its inbox, so an
  idle server spends no CPU.
- the event loop (one) owns every `RequestStream`. The engine thread hands it each step's
  outputs in one `loop.call_soon_threadsafe` call; they land in per-request `asyncio.Queue`s.

NOTE: only the engine thread changes the engine (its scheduler, block manager) once the
AsyncEngine is built: one writer, no locks around engine state. The loop side sees the engine
through `stats()`, a snapshot the engine thread publishes after each step and each batch of
commands, and through `call()`, which runs a function on the engine thread. Tokenizing (a prompt,
a chat template, /tokenize) only reads the tokenizer and the model's config, and runs on a
tokenizer thread of its own (`tokenize()`), so that a long prompt never holds up a step: the
HF tokenizers release the GIL while they encode.

The step watch (`--step-timeout-s`): in the hybrid mode the engine thread runs the device steps
itself, so when one never ends (a kernel that never ends, a deadlock) it cannot notice. A small
watcher thread (`StepWatcher`) judges the engine thread's step clock; past the bound it declares
the engine dead from outside (`_declare_dead`: every pending request fails, `/health` says why,
the on_fatal callbacks run) and leaves the wedged thread behind, a daemon that ends with the
process. The rapid and disagg modes' steps run in workers their front watches (serving/rapid.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, TypeVar

from rapidserve.serving.front import EngineFront, EngineStats
from rapidserve.serving.liveness import StepClock, StepWatch, StepWatcher
from rapidserve.outputs import RequestOutput
from rapidserve.sampling_params import SamplingParams

log = logging.getLogger("rapidserve.engine")

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (a step raised, or shutdown() was called)."""

    status = 500  # the HTTP status the server answers it with


class ShuttingDownError(EngineDeadError):
    """The request was still open when the server shut down (`AsyncEngine.fail_requests`)."""

    status = 503


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the model's chat template (on the engine thread)."""

    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True


Prompt = str | list[int] | ChatPrompt


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """vLLM's server rule: a request that cannot fit is refused, not silently shortened."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {num_prompt_tokens} tokens (and at least one token must be generated). "
            "Please reduce the length of the prompt."
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the length of the prompt or max_tokens."
        )


def prompt_token_ids(engine: EngineFront, prompt: Prompt) -> list[int]:
    """The token ids of a prompt (run on the engine thread: it uses the engine's tokenizer)."""
    if isinstance(prompt, ChatPrompt):
        import jinja2

        try:
            return engine.chat_prompt(prompt.messages, prompt.add_generation_prompt)
        except jinja2.TemplateError as e:
            # Templates reject some conversations themselves (e.g. roles out of order).
            raise ValueError(f"the chat template rejected the messages: {e}") from e
    return engine.encode_prompt(prompt)[1]


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of the tokenizer stands for (its longest vocabulary entry,
    added tokens included): a text of n characters has at least n / this many tokens. (For
    byte-level BPE an entry's characters are bytes, and a character is at least one byte.)
    NOTE: a bound for tokenizers whose normalizer does not drop characters (none of the
    decoder models' do); byte-fallback entries such as "<0x0A>" only loosen it."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(t) for t in vocab), default=0)


def prompt_chars(prompt: Prompt) -> int:
    """Characters of a prompt's text (0 for token ids)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, ChatPrompt):
        return sum(len(c) for m in prompt.messages if isinstance(c := m.get("content"), str))
    return 0


def _admit(engine: EngineFront, ids: list[int], params: SamplingParams, request_id: str) -> int:
    engine.add_request(ids, params, request_id)
    return len(ids)


class _Command(NamedTuple):
    fn: Callable[[EngineFront], Any]
    future: asyncio.Future[Any] | None  # None: fire and forget (aborts)


_STOP = object()  # the inbox item that ends the engine thread
_ABORTED = object()  # the stream item that ends an aborted request's iteration

# After the last request ends, an idle engine thread keeps stepping (every _SETTLE_POLL_S, for
# _SETTLE_S) before it sleeps: engines whose stats come from worker reports (rapid) need that
# to show the blocks of the last requests freed.
_SETTLE_S = 1.0
_SETTLE_POLL_S = 0.05


class _Failure(NamedTuple):
    message: str
    error: type[EngineDeadError] = EngineDeadError


class EngineFailure(RuntimeError):
    """The engine was declared failed from outside its thread (`AsyncEngine.fail`)."""


class _Fatal(NamedTuple):  # the inbox item of AsyncEngine.fail
    reason: str


class RequestStream:
    """One request's outputs, as an async iterator; closing it early aborts the request.

    Iteration yields each RequestOutput (one per step that gave the request a token) and stops
    after the finished one. If the engine dies it raises EngineDeadError. Cancelling a consumer
    waiting on it, or calling `close()` before the end, aborts the request in the engine and so
    frees its KV blocks.
    """

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self.arrival_time = time.monotonic()
        # time.monotonic() on the engine thread when each output was produced (one per token),
        # and the choice (CompletionOutput.index: a child of a request with n > 1) it was for.
        self.token_times: list[float] = []
        self.token_choices: list[int] = []
        self.num_prompt_tokens = 0
        self.finished = False  # the engine has delivered its last output (or failed it)
        self._done = False  # the consumer has seen the end
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._engine = engine

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.close()
            raise
        if item is _ABORTED:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error(item.message)
        if item.finished:
            self._done = True
        return item

    def close(self) -> None:
        """Stop consuming; aborts the request if the engine has not finished it."""
        self._done = True
        if not self.finished:
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    # ---- called by the AsyncEngine on the loop thread ----------------------------------------

    def _put(self, item: Any, finished: bool) -> None:
        if finished:
            self.finished = True
        self._queue.put_nowait(item)


class AsyncEngine:
    """An engine stepped by its own thread, driven from one asyncio event loop. It takes the
    engine over: shutdown() also shuts the engine down (its workers, in the rapid mode)."""

    def __init__(self, engine: EngineFront, join_timeout_s: float = 60.0) -> None:
        self._engine = engine
        self._join_timeout_s = join_timeout_s
        # Read once here, before the thread starts: these never change afterwards.
        self.model_name: str = engine.model_name
        self.model_root: str = engine.config.model or engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.mode: str = engine.config.mode
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # NOTE: `_lock` orders "submit a command" against "the engine thread stopped", so that
        # no command is left in the inbox after the thread drained it for the last time.
        self._lock = threading.Lock()
        self._dead = False
        self._error: BaseException | None = None
        self._dead_message = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        # Tokens admitted and delivered since start (loop thread only; the stats log's rates).
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._settle_until = 0.0  # engine thread: keep refreshing stats until then when idle
        self._stats = engine.stats()
        self._on_fatal: list[Callable[[str], None]] = []  # guarded by _lock
        # A prompt with more characters than this has more tokens than the context holds for
        # sure: refused before it is tokenized (0: no tokenizer, no bound).
        self._max_token_chars = max_token_chars(engine.tokenizer) if engine.tokenizer is not None else 0
        self.max_prompt_chars = self._max_token_chars * self.max_model_len
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rapidserve-tokenizer")
        self._cuda_index = _cuda_index(getattr(engine, "device", None))
        self._liveness_poll_s = engine.liveness_poll_s  # idle: wake this often to check workers
        # The step watch of the engine thread, when it runs the device steps itself (hybrid).
        # NOTE: `_wedged` is set (under _lock, with _dead) only by the watcher; once set, the
        # engine thread, should its step ever end, delivers nothing and stops.
        self._wedged = False
        self._step_clock = StepClock(None)
        self._step_watcher: StepWatcher | None = None
        role = engine.caller_step_role
        if role is not None and engine.config.step_timeout_s > 0:
            # (a plain double: one writer, the engine thread, under the GIL; as thread placement's)
            steps = StepWatch([role], engine.config.step_timeout_s, lambda: ctypes.c_double(0.0))
            self._step_clock = StepClock(steps.slots[role])
            self._step_watcher = StepWatcher(steps, self._on_wedged, name="rapidserve-step-watch")
            steps.arm()  # start-up (loading, graph capture) is over: it had its own bound
        self._thread = threading.Thread(target=self._run, name="rapidserve-engine", daemon=True)
        self._thread.start()
        if self._step_watcher is not None:
            self._step_watcher.start()

    # ---- loop side ---------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return not self._dead and self._thread.is_alive()

    @property
    def dead_reason(self) -> str:
        """Why the engine is not running, in one short line ("" while it runs): for /health and
        supervisors; the whole story (a worker's traceback) is in the log."""
        if not self._dead and self._thread.is_alive():
            return ""
        line = (self._dead_message or "the engine is not running").splitlines()[0]
        return line if len(line) <= 300 else line[:297] + "..."

    @property
    def error(self) -> BaseException | None:
        """The exception that killed the engine thread, if one did."""
        return self._error

    @property
    def num_requests(self) -> int:
        """Requests admitted and not yet finished or aborted."""
        return len(self._streams)

    def stats(self) -> EngineStats:
        return self._stats

    async def call(self, fn: Callable[[EngineFront], T]) -> T:
        """Run `fn(engine)` on the engine thread between two steps and return its result
        (its exception is raised here; the engine carries on)."""
        loop = self._bind_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._submit(_Command(fn, future))
        return await future

    async def tokenize(self, fn: Callable[[EngineFront], T]) -> T:
        """Run `fn(engine)` on the tokenizer thread (off the engine thread: it may only read the
        tokenizer and the model's config) and return its result."""
        loop = self._bind_loop()
        if self._dead:
            raise EngineDeadError(self._dead_message)
        return await loop.run_in_executor(self._tokenizer_pool, fn, self._engine)

    def check_prompt_size(self, prompt: Prompt) -> None:
        """Refuse a prompt that cannot fit the context before spending time tokenizing it."""
        chars = prompt_chars(prompt)
        if self.max_prompt_chars and chars > self.max_prompt_chars:
            at_least = math.ceil(chars / self._max_token_chars)
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {chars} characters, so at least {at_least} tokens. Please "
                "reduce the length of the prompt."
            )
        if isinstance(prompt, list):
            check_context_length(len(prompt), None, self.max_model_len)

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Admit a request and return the stream of its outputs.

        Raises ValueError (bad prompt or parameters, or too long for the context) before
        anything is generated, and EngineDeadError when the engine is not running. The prompt
        is tokenized on the tokenizer thread, then admitted on the engine thread.
        """
        self._bind_loop()
        if self._dead:
            raise EngineDeadError(self._dead_message)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_prompt_size(prompt)
        ids = await self.tokenize(lambda e: prompt_token_ids(e, prompt))
        check_context_length(len(ids), params.max_tokens, self.max_model_len)
        if request_id in self._streams:  # taken while this one was being tokenized
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, self)
        # Registered before submitting, so no output can arrive for an unknown stream.
        self._streams[request_id] = stream
        try:
            stream.num_prompt_tokens = await self.call(
                lambda e: _admit(e, ids, params, request_id)
            )
        except asyncio.CancelledError:
            # The admission may still happen on the engine thread: abort after it (FIFO inbox).
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self.num_prompt_tokens += stream.num_prompt_tokens
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it has finished); its stream ends without more outputs."""
        stream = self._streams.pop(request_id, None)
        if stream is None or self._dead:
            return
        stream._put(_ABORTED, finished=True)
        try:
            self._submit(_Command(lambda e: e.abort_request(request_id), None))
        except EngineDeadError:
            pass

    def fail_requests(self, message: str) -> int:
        """End every open request with `message` (ShuttingDownError in its stream) and abort it
        in the engine, which goes on; for a server that shuts down. Loop side. Returns how many
        there were."""
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            stream._put(_Failure(message, ShuttingDownError), finished=True)
            try:
                self._submit(_Command(lambda e, rid=request_id: e.abort_request(rid), None))
            except EngineDeadError:
                pass
        return len(streams)

    def on_fatal(self, callback: Callable[[str], None]) -> None:
        """Call `callback(message)` (from the engine thread, or now if it has already happened)
        once the engine has failed for good and every pending request has been failed: the
        server uses it to exit non-zero, so that a supervisor restarts it. Not called after a
        plain shutdown()."""
        with self._lock:
            if not self._dead:
                self._on_fatal.append(callback)
                return
            failed = self._error is not None
        if failed:
            callback(self._dead_message)

    def fail(self, reason: str) -> None:
        """Declare the engine failed for good (e.g. a worker found dead by a watchdog), from any
        thread: after its current step the engine thread stops, fails every pending request
        with `reason` and runs the `on_fatal` callbacks. The one exit path of every fatal
        failure, like a step's exception."""
        with self._lock:
            if not self._dead:
                self._inbox.put(_Fatal(reason))

    def shutdown(self) -> None:
        """Stop the engine thread after its current step; pending requests fail. Idempotent;
        call it from any thread (not from the engine thread). Bounded: a thread wedged in a step
        is not waited for (it cannot be stopped; a daemon, it ends with the process)."""
        with self._lock:
            if not self._dead:
                self._inbox.put(_STOP)
            wedged = self._wedged
        if self._step_watcher is not None:
            self._step_watcher.stop()
        self._thread.join(0 if wedged else self._join_timeout_s)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        if wedged and self._thread.is_alive():
            log.warning("engine thread left wedged in its step (it ends with the process)")
        elif self._thread.is_alive():
            log.warning("engine thread did not stop within %.0f s", self._join_timeout_s)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("an AsyncEngine serves one event loop at a time; this is another one")
        return loop

    def _submit(self, command: _Command) -> None:
        with self._lock:
            if self._dead:
                raise EngineDeadError(self._dead_message)
            self._inbox.put(command)

    def _deliver(self, outputs: list[RequestOutput], t: float) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted after this step was scheduled
                continue
            # NOTE: a parallel request's final output (n completions) folds its children's
            # outputs, each already delivered: it adds no token.
            if len(out.outputs) == 1:
                stream.token_times.append(t)
                stream.token_choices.append(out.outputs[0].index)
            self.num_generation_tokens += len(out.delta_token_ids)
            if out.finished:
                del self._streams[out.request_id]
            stream._put(out, out.finished)

    def _fail_all(self, message: str) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._put(_Failure(message), finished=True)

    # ---- engine thread -----------------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the event loop (nothing to do if no loop has used us yet)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: nobody is left to tell
            log.debug("event loop closed; dropped a delivery")

    def _next_commands(self) -> list[Any]:
        items = []
        if not self._engine.has_unfinished_requests():
            try:
                if time.monotonic() < self._settle_until:
                    items.append(self._inbox.get(timeout=_SETTLE_POLL_S))
                else:
                    # idle: sleep until there is something to do (waking to check the workers)
                    items.append(self._inbox.get(timeout=self._liveness_poll_s))
            except queue.Empty:
                return items
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        engine = self._engine
        try:
            if self._cuda_index is not None:
                import torch

                # The current device is per thread; kernels launch on it.
                torch.cuda.set_device(self._cuda_index)
            log.info("engine thread started (model %s, mode %s)", self.model_name, self.mode)
            while True:
                if self._wedged:  # the watcher failed the engine as a step ended, just in time
                    self._stop("", None)
                    return
                had_requests = engine.has_unfinished_requests()
                commands = self._next_commands()
                for item in commands:
                    if item is _STOP:
                        self._stop("the engine has shut down", None)
                        log.info("engine thread stopped")
                        return
                    if isinstance(item, _Fatal):
                        raise EngineFailure(item.reason)
                    self._execute(item)
                # Idle steps are no-ops for the hybrid engine; in the rapid mode they read the
                # workers' reports, so that stats() sees the blocks of the last requests freed.
                if engine.has_unfinished_requests() or time.monotonic() < self._settle_until:
                    self._step_clock.start()
                    try:
                        outputs = engine.step()
                    finally:
                        self._step_clock.stop()
                    if self._wedged:
                        # Its requests have been failed: nothing is delivered (a late step).
                        log.warning("the step the watcher declared wedged has ended; the engine "
                                    "thread stops (the engine has failed)")
                        self._stop("", None)  # shuts the engine down: this thread owns it again
                        return
                    if outputs:
                        self._post(self._deliver, outputs, time.monotonic())
                else:
                    engine.check_liveness()  # no step checks the workers while idle
                if had_requests and not engine.has_unfinished_requests():
                    self._settle_until = time.monotonic() + _SETTLE_S
                self._stats = engine.stats()
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine; say so everywhere
            log.exception("engine step failed; failing every request")
            self._stop(f"the engine failed: {type(e).__name__}: {e}", e)

    def _execute(self, command: _Command) -> None:
        if command.future is None:
            command.fn(self._engine)  # an abort: an exception here is an engine failure
            return
        try:
            result = command.fn(self._engine)
        except Exception as e:  # the caller's problem (e.g. a bad prompt), not the engine's
            self._post(_set_exception, command.future, e)
        else:
            self._post(_set_result, command.future, result)

    def _on_wedged(self, role: str, age: float) -> None:
        """The watcher's verdict (on its thread): the engine thread has been in one step too long."""
        assert self._step_watcher is not None
        reason = self._step_watcher.watch.verdict(f"the {role} thread", age)
        log.error("%s; failing every request (the thread is left behind: it cannot be stopped)", reason)
        error = EngineFailure(reason)
        # NOTE: not _stop(): the engine's own shutdown is the engine thread's to run (it is inside
        # the engine now); the process's exit ends the wedged thread.
        self._declare_dead(f"the engine failed: {type(error).__name__}: {reason}", error, wedged=True)

    def _stop(self, message: str, error: BaseException | None) -> None:
        """The engine thread's end: the engine declared dead (unless the watcher already did),
        then shut down.
        NOTE: dead and every pending request failed first, the engine's shutdown (its workers:
        seconds, bounded) after, so that /health and the clients learn at once."""
        self._declare_dead(message, error)
        try:
            self._engine.shutdown()  # its workers, if the topology has any
        except Exception:  # noqa: BLE001 - already stopping; the first error is the one to report
            log.exception("engine shutdown failed")

    def _declare_dead(self, message: str, error: BaseException | None, wedged: bool = False) -> None:
        """Mark the engine dead, fail every pending command and request with `message` and, for a
        failure (`error`), run the on_fatal callbacks. From any thread; only the first call counts
        (the requests go to the loop thread, their owner, through call_soon_threadsafe)."""
        with self._lock:
            if self._dead:
                return
            self._dead = True
            self._wedged = wedged
            self._error = error
            self._dead_message = message
            pending = []
            while True:
                try:
                    pending.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
        for item in pending:
            if isinstance(item, _Command) and item.future is not None:
                self._post(_set_exception, item.future, EngineDeadError(message))
        self._post(self._fail_all, message)
        if error is not None:
            with self._lock:
                callbacks, self._on_fatal = self._on_fatal, []
            for callback in callbacks:
                try:
                    callback(message)
                except Exception:  # noqa: BLE001 - the others must still run
                    log.exception("an on_fatal callback failed")
        if self._step_watcher is not None:
            self._step_watcher.stop()


def _cuda_index(device: Any) -> int | None:
    """The index of the engine's CUDA device (a plain "cuda" names the creating thread's current
    device; the engine thread's own starts at 0), or None off CUDA."""
    if device is None or device.type != "cuda":
        return None
    if device.index is not None:
        return device.index
    import torch

    return torch.cuda.current_device()


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # the caller may have been cancelled
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
