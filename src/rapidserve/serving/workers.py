"""The rapid topology's two workers: decode (owns the weights, the KV cache and its blocks) and
prefill (whole prompts into blocks the decode worker gave it). The same code runs as threads of
one process or as two processes; only the queues and the way tensors are shared differ.

NOTE: every piece of state has one writer. The decode worker alone changes the BlockManager and
the decode batch; the prefill worker alone runs prompts; they talk only through messages.
"""

from __future__ import annotations

import logging
import queue
import traceback
from typing import Any

import torch

from rapidserve.attention.backend import select_backend
from rapidserve.config import EngineConfig
from rapidserve.kv.block_manager import BlockManager
from rapidserve.kv.cache import KVCache
from rapidserve.request import Request
from rapidserve.runner.model_runner import ModelRunner
from rapidserve.runner.setup import prepare_model, resolve_device
from rapidserve.sampling import make_generator
from rapidserve.scheduler.chunked import SchedulerConfig
from rapidserve.scheduler.decode import DecodeScheduler
from rapidserve.scheduler.prefill import PrefillJob, PrefillScheduler
from rapidserve.serving import messages as m

# How long an idle worker blocks on its inbox before looking again (no busy polling).
_IDLE_WAIT_S = 0.5


def _drain(inbox: Any, block: bool) -> list[Any]:
    """Every message waiting in the inbox; with block, wait for at least one (up to a while)."""
    out = []
    try:
        out.append(inbox.get(timeout=_IDLE_WAIT_S) if block else inbox.get_nowait())
        while True:
            out.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return out


def _generator_state(runner: ModelRunner, request_id: str) -> torch.Tensor | None:
    gen = runner.generators.pop(request_id, None)
    return None if gen is None else gen.get_state()


def _restore_generator(runner: ModelRunner, req: Request, state: torch.Tensor | None) -> None:
    if state is not None and req.params.seed is not None:
        gen = make_generator(req.params.seed, runner.device)
        gen.set_state(state)
        runner.generators[req.request_id] = gen


# ---- decode ------------------------------------------------------------------------------------


class DecodeWorker:
    def __init__(
        self, config: EngineConfig, inbox: Any, to_prefill: Any, to_front: Any, share: bool
    ) -> None:
        self.inbox, self.to_prefill, self.to_front = inbox, to_prefill, to_front
        prepared = prepare_model(config)
        model, cache = prepared.loaded.model, prepared.cache
        if share and cache.tensor.device.type == "cpu":
            # Process placement on CPU: move weights and cache into shared memory before any
            # view of them is taken, so that the prefill process writes the same pages.
            model.share_memory()
            cache.tensor.share_memory_()
        self.to_prefill.put(m.SharedTensors(
            model, cache.tensor, prepared.loaded.max_model_len, prepared.eos_token_ids
        ))
        self.blocks = BlockManager(cache.num_blocks, config.block_size)
        self.eos = prepared.eos_token_ids
        self.runner = ModelRunner(
            model, cache, self.blocks, prepared.device, self.eos, prepared.backend,
            prepared.loaded.max_model_len,
        )
        if prepared.use_graphs:
            self.runner.capture_graphs(config.max_num_seqs, config.max_num_batched_tokens)
        self.scheduler = DecodeScheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                                         self.blocks)
        self.to_front.put(m.Ready(cache.num_blocks, config.block_size, self.eos))

    def run(self) -> None:
        log = logging.getLogger("rapidserve.decode")
        sched = self.scheduler
        while True:
            events: list[m.TokenEvent] = []
            idle = not sched.running and not sched.ready
            msgs = _drain(self.inbox, block=idle)
            for msg in msgs:
                if isinstance(msg, m.Submit):
                    sched.add(Request(msg.request_id, msg.prompt_token_ids, msg.params, msg.max_tokens))
                elif isinstance(msg, m.PrefillDone):
                    req = sched.prefill_done(msg.request_id)
                    if req is not None:
                        _restore_generator(self.runner, req, msg.generator_state)
                        self._take(req, msg.token, events)
                elif isinstance(msg, m.PrefillDropped):
                    sched.prefill_dropped(msg.request_id)
                elif isinstance(msg, m.Abort):
                    if sched.abort(msg.request_id):
                        self.to_prefill.put(m.CancelPrefill(msg.request_id))
                    self.runner.release(msg.request_id)
                elif isinstance(msg, m.Shutdown):
                    log.info("decode worker stopping")
                    return
            for job in sched.hand_over():
                req = job.request
                self.to_prefill.put(m.PrefillWork(
                    req.request_id, list(req.all_token_ids), req.num_prompt_tokens, req.params,
                    req.max_tokens, job.block_ids, _generator_state(self.runner, req.request_id),
                ))
            out = sched.schedule()
            if out.scheduled:
                tokens = self.runner.execute(out.scheduled)
                for s, token in zip(out.scheduled, tokens):
                    self._take(s.request, token, events)
            if events or msgs:
                self.to_front.put(m.StepEvents(events, self._stats()))

    def _stats(self) -> m.WorkerStats:
        sched = self.scheduler
        return m.WorkerStats(
            self.blocks.num_free_blocks, self.blocks.num_blocks, len(sched.running) + len(sched.ready),
            len(sched.waiting), len(sched.prefilling), sched.num_preemptions,
        )

    def _take(self, req: Request, token: int, events: list[m.TokenEvent]) -> None:
        """A request's next token (from the prefill worker or a decode step)."""
        req.append_token(token)
        status, reason = req.token_stop(token, self.eos)
        if status is not None:
            self.scheduler.finish(req, status)
            self.runner.release(req.request_id)
        events.append(m.TokenEvent(req.request_id, token, status.value if status else None, reason))


# ---- prefill -----------------------------------------------------------------------------------


class PrefillWorker:
    def __init__(self, config: EngineConfig, inbox: Any, to_decode: Any, shared: m.SharedTensors) -> None:
        self.inbox, self.to_decode = inbox, to_decode
        device = resolve_device(config.device)
        self.scheduler = PrefillScheduler(config.max_num_batched_tokens, config.block_size)
        # NOTE: token-level stop rules are the decode worker's; the prefill worker only samples
        # (with EOS banned below min_tokens). Steps run eagerly: whole prompts are long.
        self.runner = ModelRunner(
            shared.model, KVCache.from_tensor(shared.kv_cache), self.scheduler.tables,
            device, shared.eos_token_ids, select_backend(config.attention_backend, device),
            shared.max_model_len,
        )

    def run(self) -> None:
        log = logging.getLogger("rapidserve.prefill")
        sched = self.scheduler
        while True:
            for msg in _drain(self.inbox, block=not sched.waiting):
                if isinstance(msg, m.PrefillWork):
                    req = Request(msg.request_id, msg.token_ids[: msg.num_prompt_tokens], msg.params,
                                  msg.max_tokens)
                    req.all_token_ids = list(msg.token_ids)
                    _restore_generator(self.runner, req, msg.generator_state)
                    sched.add(PrefillJob(req, msg.block_ids))
                elif isinstance(msg, m.CancelPrefill):
                    # Not run yet: drop it. Otherwise its PrefillDone is on the way, and the
                    # decode worker settles the abort when it arrives.
                    if sched.drop(msg.request_id):
                        self.runner.release(msg.request_id)
                        self.to_decode.put(m.PrefillDropped(msg.request_id))
                elif isinstance(msg, m.Shutdown):
                    log.info("prefill worker stopping")
                    return
            batch = sched.schedule()
            if not batch:
                continue
            tokens = self.runner.execute(batch)
            for s, token in zip(batch, tokens):
                rid = s.request.request_id
                sched.finish(rid)
                self.to_decode.put(m.PrefillDone(rid, token, _generator_state(self.runner, rid)))


# ---- entry points (a thread's or a process's target) -------------------------------------------


def _own_stream(config: EngineConfig) -> None:
    """Give this worker its own CUDA stream, so that the two workers' kernels can overlap
    (threads of one process would otherwise share the default stream)."""
    device = resolve_device(config.device)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.cuda.set_stream(torch.cuda.Stream())


def decode_main(config: EngineConfig, inbox: Any, to_prefill: Any, to_front: Any, share: bool) -> None:
    try:
        _own_stream(config)
        DecodeWorker(config, inbox, to_prefill, to_front, share).run()
    except BaseException as e:  # noqa: BLE001 - report anything, then stop
        to_front.put(m.WorkerFailed("decode", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        to_prefill.put(m.Shutdown())


def prefill_main(config: EngineConfig, inbox: Any, to_decode: Any, to_front: Any) -> None:
    try:
        first = inbox.get()
        if isinstance(first, m.Shutdown):
            return
        if not isinstance(first, m.SharedTensors):
            raise RuntimeError(f"expected the shared model and cache first, got {type(first).__name__}")
        _own_stream(config)
        PrefillWorker(config, inbox, to_decode, first).run()
    except BaseException as e:  # noqa: BLE001
        to_front.put(m.WorkerFailed("prefill", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        to_decode.put(m.Shutdown())
