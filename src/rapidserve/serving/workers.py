"""The rapid topology's two workers: decode (owns the weights, the KV cache and its blocks) and
prefill (whole prompts into blocks the decode worker gave it). The same code runs as threads of
one process or as two processes; only the queues and the way tensors are shared differ.

NOTE: every piece of state has one writer. The decode worker alone changes the BlockManager and
the decode batch; the prefill worker alone runs prompts; they talk only through messages.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch

from rapidserve.attention.backend import select_backend
from rapidserve.config import EngineConfig
from rapidserve.kv.block_manager import BlockManager
from rapidserve.kv.cache import KVCache
from rapidserve.request import Request, RequestStatus
from rapidserve.resources.policy import StepState
from rapidserve.runner.model_runner import ModelRunner, StepResult
from rapidserve.runner.setup import PreparedModel, device_memory_bytes, prepare_model, resolve_device
from rapidserve.runner.timeline import StepTimeline
from rapidserve.sampling import make_generator
from rapidserve.scheduler.chunked import ScheduledRequest, SchedulerConfig
from rapidserve.scheduler.decode import DecodeScheduler
from rapidserve.scheduler.prefill import PrefillJob, PrefillScheduler
from rapidserve.serving import messages as m
from rapidserve.serving.partitioning import DecodePartitioning, PrefillPartitioning

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


def request_of(work: m.PrefillWork, runner: ModelRunner) -> Request:
    """The request a prefill side runs for a PrefillWork: every token it has (its prompt, plus
    its outputs after a preemption), and a seeded request's random stream where it was."""
    req = Request(work.request_id, work.token_ids[: work.num_prompt_tokens], work.params, work.max_tokens)
    req.all_token_ids = list(work.token_ids)
    _restore_generator(runner, req, work.generator_state)
    return req


def _start_timeline(runner: ModelRunner, config: EngineConfig, role: str) -> str | None:
    if config.step_timeline:
        runner.timeline = StepTimeline(role, runner.device)
    return config.step_timeline


def _dump_timeline(runner: ModelRunner, directory: str | None) -> None:
    if directory and runner.timeline is not None:
        runner.timeline.dump(directory)


# ---- decode ------------------------------------------------------------------------------------


class DecodeWorker:
    def __init__(
        self, config: EngineConfig, inbox: Any, to_prefill: Any, to_front: Any, share: bool
    ) -> None:
        self.inbox, self.to_prefill, self.to_front = inbox, to_prefill, to_front
        device = resolve_device(config.device)
        # The rapid mode's SM partitions: made first, so that all this worker runs is on its
        # partition's stream (the disagg mode's decode instance has its static split already).
        self.partitioning = DecodePartitioning(config, device) if config.mode == "rapid" else None
        prepared = prepare_model(config)
        model, cache = prepared.loaded.model, prepared.cache
        self._share(prepared, share)
        self.blocks = BlockManager(cache.num_blocks, config.block_size)
        self.eos = prepared.eos_token_ids
        self.runner = ModelRunner(
            model, cache, self.blocks, prepared.device, self.eos, prepared.backend,
            prepared.loaded.max_model_len,
        )
        if self.partitioning is not None:
            self.partitioning.use(self.runner, self.partitioning.current)
        if prepared.use_graphs:  # its steps are pure decodes
            self.runner.capture_graphs(config.max_num_seqs, config.max_num_batched_tokens, piecewise=False)
            if self.partitioning is not None:
                self.partitioning.capture_graphs(self.runner)  # a set per partition
        self.timeline_dir = _start_timeline(self.runner, config, "decode")
        self.async_scheduling = config.resolve_async_scheduling(prepared.device)
        self._in_flight: tuple[int, StepResult] | None = None  # (step number, launched step)
        self._num_steps = 0
        self.scheduler = DecodeScheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                                         self.blocks)
        # NOTE: the prefill side starts only now, after every CUDA graph of this worker is
        # captured: a capture forbids other threads of the process unsafe CUDA calls meanwhile
        # (and on one GPU the disagg prefill instance sizes its pool from what is left).
        self.to_prefill.put(self._handoff)
        self.to_front.put(m.Ready(cache.num_blocks, config.block_size, self.eos))

    def run(self) -> None:
        log = logging.getLogger("rapidserve.decode")
        sched = self.scheduler
        while True:
            events: list[m.TokenEvent] = []
            idle = not sched.running and not sched.ready and self._in_flight is None
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
                elif isinstance(msg, m.PrefillFailed):
                    self._prefill_failed(msg)
                elif isinstance(msg, m.Abort):
                    if sched.abort(msg.request_id):
                        self.to_prefill.put(m.CancelPrefill(msg.request_id))
                    self.runner.release(msg.request_id)
                elif isinstance(msg, m.Shutdown):
                    log.info("decode worker stopping")
                    _dump_timeline(self.runner, self.timeline_dir)
                    if self.partitioning is not None:
                        self.runner.drop_graphs()
                        self.partitioning.close()
                    return
            collected = self._decode_step(events, sched.hand_over())
            if events or msgs or collected:
                self.to_front.put(m.StepEvents(events, self._stats()))

    def _decode_step(self, events: list[m.TokenEvent], jobs: list[PrefillJob]) -> bool:
        """Hand the prompts of `jobs` (their blocks allocated) to the prefill worker, launch the
        next decode step, then take the tokens of the one before it (async scheduling) or of this
        one. Returns whether there is news for the front (a step's tokens were taken, or the
        partition changed)."""
        out = self.scheduler.schedule()
        moved = None
        if self.partitioning is not None and self.partitioning.partitioned:  # `off`: nothing to decide
            moved = self.partitioning.before_step(self._step_state(out.scheduled), self.runner)
            if moved is not None:
                self.to_prefill.put(m.SetPartition(moved))
        # NOTE: after the partition message: a prompt handed over now is prefilled in the partition
        # decided with it in view (the prefill worker reads its inbox in order), never in the one
        # before, when no prompt was there (e.g. over-allocated, beside this decode step).
        for job in jobs:
            req = job.request
            self.to_prefill.put(m.PrefillWork(
                req.request_id, list(req.all_token_ids), req.num_prompt_tokens, req.params,
                req.max_tokens, job.block_ids, _generator_state(self.runner, req.request_id),
            ))
        prev, self._in_flight = self._in_flight, None
        if out.scheduled:
            self._num_steps += 1
            result, failed = self.runner.submit_isolated(out.scheduled, prev[1] if prev else None)
            for f in failed:
                self._fail_request(f.scheduled.request, f.message)
            launched = (self._num_steps, result)
            if self.async_scheduling:
                for s in result.scheduled:
                    s.request.num_pending += 1
                self.blocks.fence(self._num_steps)
                self._in_flight = launched
            else:
                prev = launched
        if prev is None:
            return moved is not None  # a new partition is news for the front's stats too
        step, result = prev
        for s, token in zip(result.scheduled, result.tokens()):
            req = s.request
            if self.async_scheduling:
                req.num_pending -= 1
            if not req.status.finished:  # else it stopped or was aborted meanwhile: discarded
                self._take(req, token, events)
        self.blocks.retire(step)
        return True

    def _share(self, prepared: PreparedModel, share: bool) -> None:
        """What the prefill worker runs on, the model and the KV cache (sent at the end of
        __init__)."""
        model, cache = prepared.loaded.model, prepared.cache
        if share and cache.tensor.device.type == "cpu":
            # Process placement on CPU: move weights and cache into shared memory before any
            # view of them is taken, so that the prefill process writes the same pages.
            model.share_memory()
            cache.tensor.share_memory_()
        self._handoff: Any = m.SharedTensors(
            model, cache.tensor, prepared.loaded.max_model_len, prepared.eos_token_ids
        )

    def _prefill_failed(self, msg: m.PrefillFailed) -> None:
        """The prefill side could not deliver a request's KV (the disagg topology: its transfer
        failed). Its blocks are freed and it ends with an error; the others go on."""
        req = self.scheduler.prefill_failed(msg.request_id)
        self.runner.release(msg.request_id)
        if req is not None:
            self.to_front.put(m.RequestFailed(msg.request_id, msg.message))

    def _fail_request(self, req: Request, message: str) -> None:
        """A step could not run this request (see ModelRunner.submit_isolated): free its blocks
        and end it with an error; the other requests go on."""
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        self.runner.release(req.request_id)
        self.to_front.put(m.RequestFailed(req.request_id, message))

    def _step_state(self, scheduled: list[ScheduledRequest]) -> StepState:
        """What the partition policy decides the coming step from."""
        sched = self.scheduler
        contexts = [s.start + 1 for s in scheduled]
        waiting = sum(r.num_tokens for r in sched.waiting) + sum(r.num_tokens for r in sched.prefilling.values())
        return StepState(len(scheduled), sum(contexts) / len(contexts) if contexts else 0.0,
                         max(contexts, default=0), waiting, bool(sched.prefilling))

    def _stats(self) -> m.WorkerStats:
        sched = self.scheduler
        part = self.partitioning
        return m.WorkerStats(
            self.blocks.num_free_blocks, self.blocks.num_blocks, len(sched.running) + len(sched.ready),
            len(sched.waiting), len(sched.prefilling), sched.num_preemptions,
            part.decode_sms() if part is not None else 0,
            part.stats() if part is not None and part.partitioned else None,
            device_memory_bytes(self.runner.device),
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
        self.partitioning = PrefillPartitioning(config, device)
        self.scheduler = PrefillScheduler(config.max_num_batched_tokens, config.block_size)
        # NOTE: token-level stop rules are the decode worker's; the prefill worker only samples
        # (with EOS banned below min_tokens).
        backend = select_backend(config.attention_backend, device)
        self.runner = ModelRunner(
            shared.model, KVCache.from_tensor(shared.kv_cache), self.scheduler.tables,
            device, shared.eos_token_ids, backend, shared.max_model_len,
        )
        if config.use_cuda_graphs and device.type == "cuda" and backend.graph_safe and not self.partitioning.partitioned:
            # Piecewise graphs (the layers between attention calls per padded token count): a
            # step of short prompts is otherwise launch-bound; prompts longer than the token
            # budget run eagerly. Not with SM partitions: a graph keeps the partition it was
            # captured in, and a set per partition costs more than launching long prompts.
            self.runner.capture_graphs(config.max_num_seqs, config.max_num_batched_tokens, decode=False)
        self.timeline_dir = _start_timeline(self.runner, config, "prefill")

    def run(self) -> None:
        log = logging.getLogger("rapidserve.prefill")
        sched = self.scheduler
        while True:
            for msg in _drain(self.inbox, block=not sched.waiting):
                if isinstance(msg, m.PrefillWork):
                    sched.add(PrefillJob(request_of(msg, self.runner), msg.block_ids))
                elif isinstance(msg, m.CancelPrefill):
                    # Not run yet: drop it. Otherwise its PrefillDone is on the way, and the
                    # decode worker settles the abort when it arrives.
                    if sched.drop(msg.request_id):
                        self.runner.release(msg.request_id)
                        self.to_decode.put(m.PrefillDropped(msg.request_id))
                elif isinstance(msg, m.SetPartition):
                    self.partitioning.follow(msg.partition)
                elif isinstance(msg, m.Shutdown):
                    log.info("prefill worker stopping")
                    _dump_timeline(self.runner, self.timeline_dir)
                    self.runner.drop_graphs()
                    self.partitioning.close()
                    return
            batch = sched.schedule()
            if not batch:
                continue
            self.partitioning.before_step()
            result, failed = self.runner.submit_isolated(batch)
            for f in failed:  # the decode worker frees their blocks and fails them
                rid = f.scheduled.request.request_id
                sched.finish(rid)
                self.runner.release(rid)
                self.to_decode.put(m.PrefillFailed(rid, f.message))
            for s, token in zip(result.scheduled, result.tokens()):
                rid = s.request.request_id
                sched.finish(rid)
                self.to_decode.put(m.PrefillDone(rid, token, _generator_state(self.runner, rid)))


# ---- entry points (a thread's or a process's target) -------------------------------------------


def _worker_setup(config: EngineConfig) -> None:
    """Give this worker its own CUDA stream, so that the two workers' kernels can overlap
    (threads of one process would otherwise share the default stream); as a process of its own,
    half the CPU cores for torch's threads (two workers each spinning a pool over every core
    slow each other several times over on CPU)."""
    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    device = resolve_device(config.device)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.cuda.set_stream(torch.cuda.Stream())


def run_worker(role: str, to_peer: Any, to_front: Any, body: Callable[[], None]) -> None:
    """A worker's thread or process: any failure is reported to the front (`WorkerFailed`)
    and stops the other worker."""
    try:
        body()
    except BaseException as e:  # noqa: BLE001 - report anything, then stop
        to_front.put(m.WorkerFailed(role, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        to_peer.put(m.Shutdown())


def first_message(inbox: Any, kind: type) -> Any:
    """The message a worker waits for before it can start (what it runs on), or None if it is
    told to stop first."""
    first = inbox.get()
    if isinstance(first, m.Shutdown):
        return None
    if not isinstance(first, kind):
        raise TypeError(f"expected {kind.__name__} first, got {type(first).__name__}")
    return first


def decode_main(config: EngineConfig, inbox: Any, to_prefill: Any, to_front: Any, share: bool) -> None:
    def body() -> None:
        _worker_setup(config)
        DecodeWorker(config, inbox, to_prefill, to_front, share).run()

    run_worker("decode", to_prefill, to_front, body)


def prefill_main(config: EngineConfig, inbox: Any, to_decode: Any, to_front: Any) -> None:
    def body() -> None:
        shared = first_message(inbox, m.SharedTensors)  # the decode worker's model and cache
        if shared is not None:
            _worker_setup(config)
            PrefillWorker(config, inbox, to_decode, shared).run()

    run_worker("prefill", to_decode, to_front, body)
