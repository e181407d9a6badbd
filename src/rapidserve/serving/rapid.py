"""The rapid topology's engine front: starts the decode and prefill workers (two processes or
two threads), submits requests to the decode worker and turns its token events into outputs.

The front holds a mirror of each request (prompt, sampled tokens, text) for its outputs; the
decode worker decides token-level ends (EOS, stop ids, length) and frees the blocks; the front
decides stop strings (text) and then aborts the request in the decode worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch.multiprocessing as mp

from rapidserve.config import EngineConfig
from rapidserve.engine import EngineFront, EngineStats
from rapidserve.model.config import ModelConfig
from rapidserve.model.loader import resolve_max_model_len
from rapidserve.model.source import load_source, resolve_model
from rapidserve.outputs import RequestOutput
from rapidserve.request import Request, RequestStatus
from rapidserve.resources.mps import MpsDaemon, ensure_mps
from rapidserve.runner.setup import resolve_device
from rapidserve.serving import messages as m
from rapidserve.serving.workers import decode_main, prefill_main

log = logging.getLogger("rapidserve.engine")

_START_TIMEOUT_S = 900.0  # loading a large model can take minutes
_POLL_S = 0.05  # step() waits this long for events before returning none
_JOIN_S = 10.0


class WorkerError(RuntimeError):
    """A worker of the rapid topology died; every pending request failed with it."""


class RapidEngine(EngineFront):
    mode = "rapid"  # the topology's workers: see _worker_targets

    def __init__(self, config: EngineConfig) -> None:
        if config.mode != self.mode:
            raise ValueError(f"{type(self).__name__} runs the {self.mode} mode, not {config.mode!r}")
        super().__init__(config)
        # The front needs the config and the tokenizer, not the weights (the decode worker
        # loads those).
        source = resolve_model(config.model)
        meta = load_source(source, "dummy")
        self.model_config = ModelConfig.from_hf(meta.config)
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
        try:
            self._start_workers()
        except BaseException:  # a failure, or SIGTERM/Ctrl-C while starting: no worker outlives us
            self.shutdown()
            raise

    # ---- workers -----------------------------------------------------------------------------

    def _start_workers(self) -> None:
        if self.placement == "process":
            ctx = mp.get_context("spawn")
            self.to_decode: Any = ctx.Queue()
            self.to_prefill: Any = ctx.Queue()
            self.to_front: Any = ctx.Queue()
            make = ctx.Process
        else:
            self.to_decode, self.to_prefill, self.to_front = queue.Queue(), queue.Queue(), queue.Queue()
            make = threading.Thread  # type: ignore[assignment]
        self.workers = {
            role: make(target=target, name=f"rapidserve-{role}", daemon=True, args=args)
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
        log.info("%s topology up (%s placement): KV %d blocks of %d", self.mode, self.placement,
                 self.num_kv_blocks, self.block_size)

    def _worker_targets(self) -> dict[str, tuple[Any, tuple[Any, ...]]]:
        """Each worker's entry point and arguments, by role (the queues exist by now)."""
        cfg = self.config
        return {
            "decode": (decode_main, (cfg, self.to_decode, self.to_prefill, self.to_front,
                                     self.placement == "process")),
            "prefill": (prefill_main, (cfg, self.to_prefill, self.to_decode, self.to_front)),
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
        if msg is None:
            for role, w in self.workers.items():
                if not w.is_alive():
                    self._fail(f"the {role} worker exited unexpectedly"
                               + (f" (exit code {w.exitcode})" if hasattr(w, "exitcode") else ""))
        return msg

    def _fail(self, reason: str) -> None:
        self.failed = reason
        log.error("%s", reason.splitlines()[0])
        self.shutdown()
        raise WorkerError(reason)

    def shutdown(self) -> None:
        """Stop both workers (idempotent); leaves no process or thread behind."""
        workers = getattr(self, "workers", {})
        for q in (getattr(self, "to_decode", None), getattr(self, "to_prefill", None)):
            if q is not None:
                try:
                    q.put(m.Shutdown())
                except (ValueError, OSError):
                    pass
        for w in workers.values():
            if w.is_alive():
                w.join(timeout=_JOIN_S)
            if w.is_alive() and hasattr(w, "terminate"):
                w.terminate()
                w.join(timeout=_JOIN_S)
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

    def step(self) -> list[RequestOutput]:
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
                    if (out := self._take_token(req, ev.token, (status, ev.stop_reason))) is not None:
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
