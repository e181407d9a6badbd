"""The rapid topology's engine front: starts the decode and prefill workers (two processes or
two threads), submits requests to the decode worker and turns its token events into outputs.

The front holds a mirror of each request (prompt, sampled tokens, text) for its outputs; the
decode worker decides token-level ends (EOS, stop ids, length) and frees the blocks; the front
decides stop strings (text) and then aborts the request in the decode worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Any

import torch.multiprocessing as mp

from rapidserve.config import EngineConfig
from rapidserve.serving.front import EngineFront, EngineStats
from rapidserve.model.loader import model_config, resolve_max_model_len
from rapidserve.model.source import load_source, resolve_model
from rapidserve.outputs import RequestOutput
from rapidserve.request import Request, RequestStatus
from rapidserve.resources.leftovers import remove_stale_tmpdirs, tmpdir_prefix
from rapidserve.resources.mps import MpsDaemon, ensure_mps
from rapidserve.runner.setup import resolve_device
from rapidserve.serving import messages as m
from rapidserve.serving.liveness import Heartbeats, StepWatch, worker_entry
from rapidserve.serving.workers import decode_main, prefill_main

log = logging.getLogger("rapidserve.engine")

_START_TIMEOUT_S = 900.0  # loading a large model can take minutes
_POLL_S = 0.05  # step() waits this long for events before returning none
_JOIN_S = 10.0  # shutdown: how long the workers may take to stop when asked (without a config)
_KILL_S = 2.0  # then: how long SIGTERM may take before SIGKILL


# A Unix socket's path holds at most 107 bytes (sun_path). Under process placement on CPU a worker
# passes tensors by file descriptor, over a socket multiprocessing makes in the worker's temporary
# directory: $TMPDIR/rapidserve-<pid>-XXXXXXXX/pymp-XXXXXXXX/listener-XXXXXXXX.
_AF_UNIX_PATH_MAX = 107
_SOCKET_PATH_TAIL = len("/rapidserve-4194304-XXXXXXXX/pymp-XXXXXXXX/listener-XXXXXXXX")


def check_socket_room(tmp_root: str) -> None:
    """ValueError if the workers' sockets under `tmp_root` ($TMPDIR) could not be made. NOTE:
    without this, the decode worker's first hand-over of tensors fails in a queue's feeder thread
    (only printed there) and the prefill worker fails at the first request with an unrelated
    error."""
    if len(os.fsencode(tmp_root)) + _SOCKET_PATH_TAIL > _AF_UNIX_PATH_MAX:
        raise ValueError(
            f"the temporary directory {tmp_root!r} is too long for the workers' Unix sockets (at most "
            f"{_AF_UNIX_PATH_MAX - _SOCKET_PATH_TAIL} bytes under process placement on CPU): set TMPDIR "
            "to a shorter directory (e.g. /tmp), or use --placement thread")


class WorkerError(RuntimeError):
    """A worker of the rapid topology died; every pending request failed with it."""


class RapidEngine(EngineFront):
    mode = "rapid"  # the topology's workers: see _worker_targets
    liveness_poll_s: float | None = 0.5  # an idle AsyncEngine calls check_liveness() this often

    def __init__(self, config: EngineConfig) -> None:
        if config.mode != self.mode:
            raise ValueError(f"{type(self).__name__} runs the {self.mode} mode, not {config.mode!r}")
        super().__init__(config)
        # The front needs the config and the tokenizer, not the weights (the decode worker
        # loads those).
        source = resolve_model(config.model)
        meta = load_source(source, "dummy")
        self.model_config = model_config(meta.config, config.quantization)
        self.tokenizer = meta.tokenizer
        if config.tokenizer:
            from rapidserve.model.loader import load_tokenizer

            self.tokenizer = load_tokenizer(config.tokenizer)
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.model_config)
        self.model_name = config.served_model_name or source.display_name
        self.placement = config.placement
        self.mps: MpsDaemon | None = None
        if self.placement == "process" and resolve_device(config.device).type == "cuda":
            self.mps, why_not = ensure_mps(config.mps)
            if why_not is not None:
                log.warning("%s; using thread placement", why_not)
                self.placement = "thread"
        self.failed: str | None = None
        self.worker_stats: m.WorkerStats | None = None  # the decode worker's latest report
        self.heartbeats: Heartbeats | None = None  # process placement only
        self.steps: StepWatch | None = None  # both placements
        self._hung: set[str] = set()  # roles that went silent or wedged: shutdown does not wait for them
        try:
            self._start_workers()
            # every worker is up: from now on, silence or a step without end is a failure
            self.steps.arm()
            polls = [self.liveness_poll_s or 0.5]
            if self.config.step_timeout_s > 0:
                polls.append(self.steps.poll_s)
            if self.heartbeats is not None:
                self.heartbeats.arm()
                if self.heartbeats.timeout_s > 0:
                    polls.append(self.heartbeats.poll_s)
            self.liveness_poll_s = min(polls)
        except BaseException:  # a failure, or SIGTERM/Ctrl-C while starting: no worker outlives us
            self.shutdown()
            raise

    # ---- workers -----------------------------------------------------------------------------

    def _start_workers(self) -> None:
        roles = ["decode", "prefill"]  # (both topologies: see _worker_targets)
        if self.placement == "process":
            ctx = mp.get_context("spawn")
            self.steps = StepWatch(roles, self.config.step_timeout_s, lambda: ctx.RawValue("d", 0.0))
            self.to_decode: Any = ctx.Queue()
            self.to_prefill: Any = ctx.Queue()
            self.to_front: Any = ctx.Queue()
            targets = self._worker_targets()
            hb = self.heartbeats = Heartbeats(ctx, list(targets), self.config.worker_heartbeat_timeout_s)
            # NOTE: the parent-death signal is tied to the spawning *thread*: only ask for it
            # from the main thread (which ends only with the process); see serving/liveness.py.
            pdeathsig = threading.current_thread() is threading.main_thread()
            if resolve_device(self.config.device).type == "cpu":
                check_socket_room(tempfile.gettempdir())
            remove_stale_tmpdirs()  # those of servers killed before they could (SIGKILL)
            self._tmpdir = tempfile.mkdtemp(prefix=tmpdir_prefix(os.getpid()))  # the workers' temp files
            self.workers = {
                role: ctx.Process(target=worker_entry, name=f"rapidserve-{role}", daemon=True,
                                  args=(role, hb.slots[role], hb.interval, pdeathsig, target, args, self._tmpdir))
                for role, (target, args) in targets.items()
            }
        else:
            # NOTE: a thread's step clock is a plain double of this process (written under the GIL)
            self.steps = StepWatch(roles, self.config.step_timeout_s, lambda: ctypes.c_double(0.0))
            self.to_decode, self.to_prefill, self.to_front = queue.Queue(), queue.Queue(), queue.Queue()
            self.workers = {
                role: threading.Thread(target=target, name=f"rapidserve-{role}", daemon=True, args=args)
                for role, (target, args) in self._worker_targets().items()
            }
        for w in self.workers.values():
            w.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            msg = self._next_message(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if isinstance(msg, m.Ready):
                self.num_kv_blocks, self.block_size = msg.num_kv_blocks, msg.block_size
                self.eos_token_ids = msg.eos_token_ids
                break
            if msg is None and time.monotonic() > deadline:
                self.shutdown()
                raise WorkerError("the rapid topology's workers did not start in time")
        pids = ", ".join(f"{role} pid {w.pid}" for role, w in self.workers.items() if hasattr(w, "pid"))
        log.info("%s topology up (%s placement%s): KV %d blocks of %d", self.mode, self.placement,
                 f"; {pids}" if pids else "", self.num_kv_blocks, self.block_size)

    def _worker_targets(self) -> dict[str, tuple[Any, tuple[Any, ...]]]:
        """Each worker's entry point and arguments, by role (the queues exist by now)."""
        cfg = self.config
        return {
            "decode": (decode_main, (cfg, self.to_decode, self.to_prefill, self.to_front,
                                     self.placement == "process", self.steps.slots["decode"])),
            "prefill": (prefill_main, (cfg, self.to_prefill, self.to_decode, self.to_front,
                                       self.steps.slots["prefill"])),
        }

    def _next_message(self, timeout: float) -> Any:
        """The next message for the front, or None after timeout. Raises WorkerError (after
        stopping everything) if a worker failed or died."""
        try:
            msg = self.to_front.get(timeout=timeout)
        except queue.Empty:
            msg = None
        if isinstance(msg, m.WorkerFailed):
            self._fail(f"the {msg.role} worker failed: {msg.message}")
        self._check_workers()
        return msg

    def check_liveness(self) -> None:
        """Raise WorkerError (the engine failed; the workers told to stop) if a worker died or
        went silent. Cheap (no message is read): an idle AsyncEngine calls it every liveness_poll_s."""
        self._check_alive()
        self._check_workers()

    def _check_workers(self) -> None:
        """Fail if a worker died or went silent (a few syscalls and shared reads: every poll)."""
        for role, w in self.workers.items():
            if not w.is_alive():
                # A worker that raised reported why before it ended: its last words win.
                last = self._last_words()
                if last is not None:
                    self._fail(f"the {last.role} worker failed: {last.message}")
                self._fail(f"the {role} worker exited unexpectedly"
                           + (f" (exit code {w.exitcode})" if hasattr(w, "exitcode") else ""))
        silent = self.heartbeats.silent() if self.heartbeats is not None else None
        if silent is not None:
            role, age = silent
            self._hung.add(role)
            self._fail(f"the {role} worker sent no heartbeat for {age:.1f} s (stopped or hung; "
                       f"--worker-heartbeat-timeout-s {self.heartbeats.timeout_s:g})")
        wedged = self.steps.hung() if self.steps is not None else None
        if wedged is not None:
            role, age = wedged
            self._hung.add(role)
            # NOTE: a thread cannot be killed: it is left blocked (a daemon: the process's exit
            # ends it); the engine is failed all the same.
            self._fail(self.steps.verdict(f"the {role} worker", age))

    def _last_words(self) -> m.WorkerFailed | None:
        """A WorkerFailed still on its way to the front (anything else is dropped: we fail)."""
        deadline = time.monotonic() + _POLL_S
        while True:
            try:
                msg = self.to_front.get(timeout=max(0.0, deadline - time.monotonic()))
            except (queue.Empty, OSError, ValueError):
                return None
            if isinstance(msg, m.WorkerFailed):
                return msg

    def _fail(self, reason: str) -> None:
        """Fail the engine: log the whole reason (a worker's traceback), keep its first line as
        the short one (WorkerError, /health, each failed request), tell the workers to stop.

        NOTE: it does not wait for them (shutdown() does, bounded): the caller fails the pending
        requests first, and a worker process can take seconds to tear down."""
        log.error("%s", reason)
        short = reason.splitlines()[0] if reason else "a worker failed"
        self.failed = short
        self._ask_to_stop()
        raise WorkerError(short)

    def _ask_to_stop(self) -> None:
        """Shutdown to both workers; SIGKILL to a silent or wedged one (stopped or hung: nothing
        else ends a stopped process, and a wedged one reads no message)."""
        for q in (getattr(self, "to_decode", None), getattr(self, "to_prefill", None)):
            if q is not None:
                try:
                    q.put(m.Shutdown())
                except (ValueError, OSError):
                    pass
        for role in getattr(self, "_hung", set()):
            w = self.workers.get(role)
            if w is not None and hasattr(w, "kill") and w.is_alive():
                w.kill()

    def shutdown(self) -> None:
        """Stop both workers (idempotent); leaves no process or thread behind."""
        workers = getattr(self, "workers", {})
        self._ask_to_stop()
        # Bounded, then escalating: asked (Shutdown) -> SIGTERM -> SIGKILL. A worker known to be
        # silent (stopped or hung) is neither waited for nor asked: only SIGKILL ends a stopped
        # process (a SIGTERM stays pending until it is continued).
        hung = getattr(self, "_hung", set())
        config = getattr(self, "config", None)  # None: shut down before __init__ set it
        deadline = time.monotonic() + (config.worker_shutdown_timeout_s if config is not None else _JOIN_S)
        for role, w in workers.items():
            if w.is_alive() and role not in hung:
                w.join(timeout=max(0.0, deadline - time.monotonic()))
        procs = {role: w for role, w in workers.items() if w.is_alive() and hasattr(w, "kill")}
        for role, w in procs.items():
            w.kill() if role in hung else w.terminate()
        for w in procs.values():
            w.join(timeout=_KILL_S)
            if w.is_alive():
                log.warning("%s (pid %d) ignored SIGTERM; killing it", w.name, w.pid)
                w.kill()
                w.join(timeout=_KILL_S)
        for w in workers.values():
            if w.is_alive():
                log.error("%s did not stop", w.name)
        tmpdir = getattr(self, "_tmpdir", None)
        if tmpdir is not None and not any(w.is_alive() for w in workers.values()):
            shutil.rmtree(tmpdir, ignore_errors=True)
        if self.placement == "process":
            for name in ("to_decode", "to_prefill", "to_front"):
                q = getattr(self, name, None)
                if q is not None:
                    q.cancel_join_thread()
                    q.close()
        mps = getattr(self, "mps", None)
        if mps is not None:
            mps.stop()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    # ---- the front ---------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.failed is not None:
            raise WorkerError(self.failed)

    def _submit(self, req: Request) -> None:
        self._check_alive()
        self.to_decode.put(m.Submit(req.request_id, req.prompt_token_ids, req.params, req.max_tokens))

    def stats(self) -> EngineStats:
        """As of the decode worker's latest report."""
        s = self.worker_stats
        if s is None:
            return EngineStats(0, 0, self.num_kv_blocks, self.num_kv_blocks, 0)
        return EngineStats(s.num_running, s.num_waiting + s.num_prefilling, s.num_free_blocks,
                           s.num_blocks, s.num_preemptions, decode_sms=s.decode_sms, partition=s.partition,
                           memory_bytes=s.memory_bytes)

    def _release(self, req: Request, decided_by_worker: bool) -> None:
        if not decided_by_worker and self.failed is None:
            self.to_decode.put(m.Abort(req.request_id))

    def _on_report(self, msg: Any) -> None:
        """Another message for the front (a subclass's topology may send some; rapid none)."""

    def _step(self) -> list[RequestOutput]:
        """Outputs of the tokens the workers produced since the last call; waits briefly for
        some when there are none yet."""
        self._check_alive()
        outputs: list[RequestOutput] = []
        # NOTE: always wait a little: a caller that spins on step() must not starve the
        # workers (under thread placement they need the GIL to make progress).
        msg = self._next_message(timeout=_POLL_S)
        while msg is not None:
            if isinstance(msg, m.StepEvents):
                self.worker_stats = msg.stats
                for ev in msg.events:
                    req = self._requests.get(ev.request_id)
                    if req is None:
                        continue  # aborted or stopped here meanwhile
                    status = RequestStatus(ev.status) if ev.status is not None else None
                    if (out := self._take_token(req, ev.token, (status, ev.stop_reason), ev.logprobs,
                                                ev.prompt_logprobs)) is not None:
                        outputs.append(out)
            elif isinstance(msg, m.RequestFailed):
                req = self._requests.get(msg.request_id)
                if req is not None:
                    outputs.append(self._on_error(req, msg.message))
            else:
                self._on_report(msg)
            try:
                msg = self.to_front.get_nowait()
            except queue.Empty:
                msg = None
            if isinstance(msg, m.WorkerFailed):
                self._fail(f"the {msg.role} worker failed: {msg.message}")
        return outputs
