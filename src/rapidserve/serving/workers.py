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
from rapidserve.runner.layer_groups import LayerGroups
from rapidserve.runner.model_runner import ModelRunner, StepResult
from rapidserve.runner.setup import PreparedModel, device_memory_bytes, prepare_model, resolve_device
from rapidserve.runner.timeline import StepTimeline
from rapidserve.sampling import PromptLogprobsChunk, TokenLogprobs, make_generator
from rapidserve.scheduler.chunked import ScheduledRequest, SchedulerConfig
from rapidserve.scheduler.decode import DecodeScheduler
from rapidserve.scheduler.prefill import PrefillJob, PrefillScheduler
from rapidserve.serving import messages as m
from rapidserve.serving.liveness import StepClock, inject_step_hang
from rapidserve.serving.partitioning import DecodePartitioning, PrefillPartitioning

# How long an idle worker blocks on its inbox before looking again (no busy polling).
_IDLE_WAIT_S = 0.5
# The rapid prefill worker on CPU: the length of a group of layers (see PrefillWorker).
_CPU_GROUP_S = 1.0


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


def drive(worker: Any, inbox: Any, clock: StepClock) -> None:
    """Run a worker's turns over its inbox until one says stop, each turn timed as one step on
    the step clock (the front's step watch judges its age; 0 while the worker waits on the
    inbox)."""
    while True:
        msgs = _drain(inbox, block=worker.idle)
        clock.start()
        go = worker.turn(msgs)
        clock.stop()
        if not go:
            return


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
    if req.num_output_tokens:
        # NOTE: a recompute after a preemption: the prompt's logprobs went with the first token
        # (a prefill side runs a prompt whole), so none is scored again.
        req.num_prompt_logprobs = req.num_prompt_tokens
    _restore_generator(runner, req, work.generator_state)
    return req


def _start_timeline(runner: ModelRunner, config: EngineConfig, role: str) -> str | None:
    if config.step_timeline:
        runner.timeline = StepTimeline(role, runner.device)
    return config.step_timeline


def _dump_timeline(runner: ModelRunner, directory: str | None) -> None:
    if directory and runner.timeline is not None:
        runner.timeline.dump(directory)


class DecodeTurns:
    """What the decode worker does each turn, without threads, processes or a device: read the
    messages that came in, hand prompts to the prefill side, ask the partition policy, launch a
    decode step and take the tokens of the one before it. `DecodeWorker` drives it from a
    blocking inbox on the GPU; the simulator (rapidserve.sim) from in-memory queues on a virtual
    clock with a runner that prices steps instead of running them.

    The runner is anything with the ModelRunner calls used here: `submit(scheduled, prev)` -> a
    step with `.scheduled` and `.tokens()`, `release(request_id)`, `generators` (request id ->
    random stream) and `device`; the partitioning a `DecodePartitioning` (or None)."""

    def __init__(self, scheduler: DecodeScheduler, runner: Any, eos: tuple[int, ...], to_prefill: Any,
                 to_front: Any, partitioning: DecodePartitioning | None, async_scheduling: bool) -> None:
        self.scheduler = scheduler
        self.blocks = scheduler.blocks
        self.runner = runner
        self.eos = eos
        self.to_prefill, self.to_front = to_prefill, to_front
        self.partitioning = partitioning
        self.async_scheduling = async_scheduling
        self._in_flight: tuple[int, StepResult] | None = None  # (step number, launched step)
        self._num_steps = 0

    @property
    def idle(self) -> bool:
        """Nothing to do until a message comes (the inbox may be waited on)."""
        sched = self.scheduler
        return not sched.running and not sched.ready and self._in_flight is None

    def close(self) -> None:
        """What a Shutdown releases (the device worker's timeline, graphs and partitions)."""

    def turn(self, msgs: list[Any]) -> bool:
        """One iteration of the worker's loop over the messages read since the last one; False
        once told to stop (`Shutdown`)."""
        sched = self.scheduler
        events: list[m.TokenEvent] = []
        for msg in msgs:
            if isinstance(msg, m.Submit):
                sched.add(Request(msg.request_id, msg.prompt_token_ids, msg.params, msg.max_tokens))
            elif isinstance(msg, m.PrefillDone):
                req = sched.prefill_done(msg.request_id)
                if req is not None:
                    _restore_generator(self.runner, req, msg.generator_state)
                    self._take(req, msg.token, events, msg.logprobs, msg.prompt_logprobs)
            elif isinstance(msg, m.PrefillDropped):
                sched.prefill_dropped(msg.request_id)
            elif isinstance(msg, m.PartitionFollowed):
                if self.partitioning is not None:
                    self.partitioning.followed(msg.decided_s, msg.moved_s)
            elif isinstance(msg, m.PrefillFailed):
                self._prefill_failed(msg)
            elif isinstance(msg, m.Abort):
                if sched.abort(msg.request_id):
                    self.to_prefill.put(m.CancelPrefill(msg.request_id))
                self.runner.release(msg.request_id)
            elif isinstance(msg, m.Shutdown):
                logging.getLogger("rapidserve.decode").info("decode worker stopping")
                self.close()
                return False
        collected = self._decode_step(events, sched.hand_over())
        if events or msgs or collected:
            self.to_front.put(m.StepEvents(events, self._stats()))
        return True

    def _decode_step(self, events: list[m.TokenEvent], jobs: list[PrefillJob]) -> bool:
        """Hand the prompts of `jobs` (their blocks allocated) to the prefill worker, launch the
        next decode step, then take the tokens of the one before it (async scheduling) or of this
        one. Returns whether there is news for the front (a step's tokens were taken, or the
        partition changed)."""
        out = self.scheduler.schedule()
        moved = None
        if self.partitioning is not None and self.partitioning.partitioned:  # `off`: nothing to decide
            decided_s = self.partitioning.clock()
            moved = self.partitioning.before_step(self._step_state(out.scheduled), self.runner)
            if moved is not None:
                self.to_prefill.put(m.SetPartition(moved, decided_s))
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
        tokens = result.tokens()
        for s, token, logprobs in zip(result.scheduled, tokens, result.logprobs()):
            req = s.request
            if self.async_scheduling:
                req.num_pending -= 1
            if not req.status.finished:  # else it stopped or was aborted meanwhile: discarded
                self._take(req, token, events, logprobs)
        if self.partitioning is not None and self.partitioning.closed_loop:
            self.partitioning.observe(result)  # its measured time, read now that its tokens are in
        self.blocks.retire(step)
        return True

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

    def _take(self, req: Request, token: int, events: list[m.TokenEvent],
              logprobs: TokenLogprobs | None = None, prompt_logprobs: PromptLogprobsChunk | None = None) -> None:
        """A request's next token (from the prefill worker or a decode step), with its logprobs
        (and, the first token, its prompt's) if the request asked."""
        req.append_token(token)
        status, reason = req.token_stop(token, self.eos)
        if status is not None:
            self.scheduler.finish(req, status)
            self.runner.release(req.request_id)
        events.append(m.TokenEvent(req.request_id, token, status.value if status else None, reason, logprobs,
                                   prompt_logprobs))


class DecodeWorker(DecodeTurns):
    """The decode worker on a device: loads the model, owns the KV cache, runs `turn` over its
    inbox until told to stop."""

    def __init__(
        self, config: EngineConfig, inbox: Any, to_prefill: Any, to_front: Any, share: bool,
        clock: StepClock | None = None,
    ) -> None:
        self.inbox, self.to_prefill, self.to_front = inbox, to_prefill, to_front
        self.clock = clock or StepClock(None)
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
            self.runner.measure_steps = self.partitioning.closed_loop  # the policy learns from its steps' times
        if prepared.use_graphs:  # its steps are pure decodes
            self.runner.capture_graphs(config.max_num_seqs, config.max_num_batched_tokens, piecewise=False)
            if self.partitioning is not None:
                self.partitioning.capture_graphs(self.runner)  # a set per partition
        self.timeline_dir = _start_timeline(self.runner, config, "decode")
        inject_step_hang("decode", self.runner)
        DecodeTurns.__init__(
            self, DecodeScheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks),
            self.runner, self.eos, to_prefill, to_front, self.partitioning,
            config.resolve_async_scheduling(prepared.device),
        )
        # NOTE: the prefill side starts only now, after every CUDA graph of this worker is
        # captured: a capture forbids other threads of the process unsafe CUDA calls meanwhile
        # (and on one GPU the disagg prefill instance sizes its pool from what is left).
        self.to_prefill.put(self._handoff)
        self.to_front.put(m.Ready(cache.num_blocks, config.block_size, self.eos))

    def run(self) -> None:
        drive(self, self.inbox, self.clock)

    def close(self) -> None:
        _dump_timeline(self.runner, self.timeline_dir)
        if self.partitioning is not None:
            self.runner.drop_graphs()
            self.partitioning.close()

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


# ---- prefill -----------------------------------------------------------------------------------


class PrefillTurns:
    """What the prefill worker does each turn, without threads, processes or a device: read its
    messages, follow a partition switch, run the next batch of whole prompts and report each
    one's first token. `PrefillWorker` drives it from a blocking inbox; the simulator from
    in-memory queues on a virtual clock. The runner needs `execute(batch)` -> tokens,
    `release(request_id)`, `generators` and `device` (as ModelRunner has them)."""

    def __init__(self, scheduler: PrefillScheduler, runner: Any, to_decode: Any,
                 partitioning: PrefillPartitioning) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.to_decode = to_decode
        self.partitioning = partitioning
        self._held: list[Any] = []  # messages read between layer groups, handled after the step

    @property
    def idle(self) -> bool:
        return not self.scheduler.waiting and not self._held

    def close(self) -> None:
        """What a Shutdown releases (the device worker's timeline, graphs and partitions)."""

    def turn(self, msgs: list[Any]) -> bool:
        """One iteration of the worker's loop; False once told to stop (`Shutdown`)."""
        sched = self.scheduler
        held, self._held = self._held, []
        for msg in held + msgs:
            if isinstance(msg, m.PrefillWork):
                sched.add(PrefillJob(request_of(msg, self.runner), msg.block_ids))
            elif isinstance(msg, m.CancelPrefill):
                # Not run yet: drop it. Otherwise its PrefillDone is on the way, and the
                # decode worker settles the abort when it arrives.
                if sched.drop(msg.request_id):
                    self.runner.release(msg.request_id)
                    self.to_decode.put(m.PrefillDropped(msg.request_id))
            elif isinstance(msg, m.SetPartition):
                self._follow(msg)
            elif isinstance(msg, m.Shutdown):
                logging.getLogger("rapidserve.prefill").info("prefill worker stopping")
                self.close()
                return False
        batch = sched.schedule()
        if not batch:
            return True
        result, failed = self._submit(batch)
        for f in failed:  # the decode worker frees their blocks and fails them
            rid = f.scheduled.request.request_id
            sched.finish(rid)
            self.runner.release(rid)
            self.to_decode.put(m.PrefillFailed(rid, f.message))
        tokens = result.tokens()
        prompt_logprobs = result.prompt_logprobs()
        for s, token, logprobs in zip(result.scheduled, tokens, result.logprobs()):
            rid = s.request.request_id
            sched.finish(rid)
            self.to_decode.put(m.PrefillDone(rid, token, _generator_state(self.runner, rid), logprobs,
                                             prompt_logprobs.get(rid)))
        return True

    def _submit(self, batch: list[ScheduledRequest]) -> tuple[Any, list[Any]]:
        """The step and the requests it could not run (ModelRunner.submit_isolated)."""
        return self.runner.submit_isolated(batch)

    def _follow(self, msg: m.SetPartition) -> None:
        """Move to the decode worker's new partition now and tell it when (its reaction time)."""
        self.partitioning.follow(msg.partition)
        timeline = getattr(self.runner, "timeline", None)
        if timeline is not None:
            timeline.mark("follow", str(msg.partition), msg.decided_s)
        self.to_decode.put(m.PartitionFollowed(msg.partition, msg.decided_s, self.partitioning.clock()))


class PrefillWorker(PrefillTurns):
    """The prefill worker on a device: runs on the decode worker's model and KV cache."""

    def __init__(self, config: EngineConfig, inbox: Any, to_decode: Any, shared: m.SharedTensors,
                 clock: StepClock | None = None) -> None:
        self.inbox = inbox
        self.clock = clock or StepClock(None)
        device = resolve_device(config.device)
        partitioning = PrefillPartitioning(config, device)
        scheduler = PrefillScheduler(config.max_num_batched_tokens, config.block_size)
        # NOTE: token-level stop rules are the decode worker's; the prefill worker only samples
        # (with EOS banned below min_tokens).
        backend = select_backend(config.attention_backend, device)
        runner = ModelRunner(
            shared.model, KVCache.from_tensor(shared.kv_cache), scheduler.tables,
            device, shared.eos_token_ids, backend, shared.max_model_len,
        )
        super().__init__(scheduler, runner, to_decode, partitioning)
        if config.use_cuda_graphs and device.type == "cuda" and backend.graph_safe and not partitioning.partitioned:
            # Piecewise graphs (the layers between attention calls per padded token count): a
            # step of short prompts is otherwise launch-bound; prompts longer than the token
            # budget run eagerly. Not with SM partitions: a graph keeps the partition it was
            # captured in, and a set per partition costs more than launching long prompts.
            self.runner.capture_graphs(config.max_num_seqs, config.max_num_batched_tokens, decode=False)
        elif config.prefill_max_step_ms > 0 and partitioning.switching:
            # Prompts in groups of layers: a partition switch is followed between two groups.
            self.runner.layer_groups = LayerGroups(config.prefill_max_step_ms / 1e3, len(shared.model.layers),
                                                   self._profiled_prefill_s())
        elif device.type == "cpu" and config.step_timeout_s > 0:
            # NOTE: a CPU prefill of one long prompt can take minutes: in groups of layers of about
            # a second, each a step of its own for the step watch (a CPU forward is synchronous:
            # a group's end is progress), --step-timeout-s bounds a group, not a whole prompt.
            self.runner.layer_groups = LayerGroups(_CPU_GROUP_S, len(shared.model.layers))
        self.timeline_dir = _start_timeline(self.runner, config, "prefill")
        inject_step_hang("prefill", self.runner)

    def _profiled_prefill_s(self) -> Callable[[int], float] | None:
        """A prompt's prefill time on the SMs the prefill side has now, from the policy's profile
        (None without one): the layer groups' size until they have measured their own."""
        profile = getattr(self.partitioning.policy, "profile", None)
        if profile is None:
            return None
        return lambda tokens: profile.prefill_ms(self.partitioning.prefill_sms(), tokens) / 1e3

    def _submit(self, batch: list[ScheduledRequest]) -> tuple[Any, list[Any]]:
        return self.runner.submit_isolated(batch, between_groups=self._between_groups if self.runner.layer_groups else None)

    def _between_groups(self) -> None:
        """Between two layer groups of a prefill step: follow a partition switch at once; every
        other message waits for the step's end (in order). A group is a step of its own for the
        step watch."""
        self.clock.start()
        for msg in _drain(self.inbox, block=False):
            if isinstance(msg, m.SetPartition):
                self._follow(msg)
            else:
                self._held.append(msg)

    def run(self) -> None:
        drive(self, self.inbox, self.clock)

    def close(self) -> None:
        _dump_timeline(self.runner, self.timeline_dir)
        self.runner.drop_graphs()
        self.partitioning.close()


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


def decode_main(config: EngineConfig, inbox: Any, to_prefill: Any, to_front: Any, share: bool,
                step_slot: Any = None) -> None:
    """`step_slot`: the shared double of the front's StepWatch this worker's StepClock writes."""
    def body() -> None:
        _worker_setup(config)
        DecodeWorker(config, inbox, to_prefill, to_front, share, StepClock(step_slot)).run()

    run_worker("decode", to_prefill, to_front, body)


def prefill_main(config: EngineConfig, inbox: Any, to_decode: Any, to_front: Any, step_slot: Any = None) -> None:
    def body() -> None:
        shared = first_message(inbox, m.SharedTensors)  # the decode worker's model and cache
        if shared is not None:
            _worker_setup(config)
            PrefillWorker(config, inbox, to_decode, shared, StepClock(step_slot)).run()

    run_worker("prefill", to_decode, to_front, body)
