"""Runs one scheduled step on the model: builds the flattened inputs, runs the forward, samples."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple

import numpy as np
import torch

from rapidserve.attention.backend import AttentionBackend
from rapidserve.attention.metadata import AttentionMetadata, forward_context
from rapidserve.kv.block_manager import BlockTables, blocks_needed
from rapidserve.kv.cache import KVCache
from rapidserve.model.llama import CausalLM
from rapidserve.runner.graphs import (
    DecodeGraphs, PiecewiseGraphs, StaticInputs, decode_batch_sizes, decode_num_splits, pick,
    token_buckets,
)
from rapidserve.runner.inputs import StepInputs
from rapidserve.runner.layer_groups import LayerGroups
from rapidserve.runner.timeline import StepTimeline
from rapidserve.sampling import PendingTokens, Sampler, SamplingBatch, TokenHistory, make_generator
from rapidserve.sampling.logprobs import LogprobsTensors, TokenLogprobs, compute_logprobs, unpack
from rapidserve.sampling.prompt_logprobs import (
    PromptLogprobsChunk, PromptLogprobsPlan, PromptLogprobsTensors, compute_prompt_logprobs,
)
from rapidserve.scheduler.chunked import ScheduledRequest

log = logging.getLogger("rapidserve.engine")


class StepResult:
    """A launched step: its sampled tokens live on the device until `tokens()` reads them."""

    def __init__(self, scheduled: list[ScheduledRequest], sampled: torch.Tensor | None,
                 rows: dict[str, int], started: torch.cuda.Event | float | None = None,
                 logprobs: LogprobsTensors | list[TokenLogprobs | None] | None = None,
                 prompt_logprobs: PromptLogprobsTensors | dict[str, PromptLogprobsChunk] | None = None) -> None:
        """started: where the step's timing began (ModelRunner.measure_steps): a timing event
        recorded before its kernels (CUDA), or the host's perf_counter (CPU: the step ran
        synchronously, it is over now). logprobs: those of the rows that asked, on the device
        (or already on the host, one per sampling row); None when no request asked.
        prompt_logprobs: the prompt positions the step scored for the requests that asked (on
        the device, or already on the host by request id); None when none."""
        self.scheduled = scheduled
        self.sampled = sampled  # [S] int64 on the device, one per sampling request
        self.rows = rows  # request id -> its row in `sampled`
        self._logprobs = logprobs
        self._prompt_logprobs = prompt_logprobs
        self._host: torch.Tensor | None = None
        self._host_logprobs: torch.Tensor | None = None
        self._host_prompt: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self._started = started if isinstance(started, torch.cuda.Event) else None
        self._elapsed_s = time.perf_counter() - started if isinstance(started, float) else None
        if sampled is not None and sampled.device.type == "cuda":
            # Start the copy back now, behind the step's kernels; tokens() waits for it only.
            self._host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            self._host.copy_(sampled, non_blocking=True)
            if isinstance(logprobs, LogprobsTensors):
                # NOTE: before the event: the one wait in tokens() covers both copies.
                self._host_logprobs = torch.empty(logprobs.packed.shape, dtype=logprobs.packed.dtype,
                                                  pin_memory=True)
                self._host_logprobs.copy_(logprobs.packed, non_blocking=True)
        if isinstance(prompt_logprobs, PromptLogprobsTensors) and prompt_logprobs.packed.device.type == "cuda":
            # (a step that only prefills a chunk samples nothing: it still needs its event)
            self._host_prompt = torch.empty(prompt_logprobs.packed.shape, dtype=torch.float32, pin_memory=True)
            self._host_prompt.copy_(prompt_logprobs.packed, non_blocking=True)
        if self._host is not None or self._host_prompt is not None:
            self._ready = torch.cuda.Event(enable_timing=self._started is not None)
            self._ready.record()

    def device_s(self) -> float | None:
        """The step's time on the device in seconds (CUDA: between events around its kernels;
        CPU: the host's time), or None if it was not measured. On CUDA call it after tokens():
        it then reads the events without another wait."""
        if self._elapsed_s is not None:
            return self._elapsed_s
        if self._started is None or self._ready is None:
            return None
        self._ready.synchronize()
        return self._started.elapsed_time(self._ready) / 1e3

    def tokens(self) -> list[int]:
        """The sampled token of each sampling request, in order (waits for the step)."""
        if self.sampled is None:
            return []
        if self._host is None:
            return self.sampled.tolist()
        self._ready.synchronize()
        assert self._host is not None
        return self._host.tolist()

    def logprobs(self) -> list[TokenLogprobs | None]:
        """The logprobs of each sampling request's token, in the order of tokens() (None for a
        request that did not ask). Waits for the step as tokens() does."""
        num_rows = 0 if self.sampled is None else int(self.sampled.shape[0])
        lp = self._logprobs
        if lp is None:
            return [None] * num_rows
        if not isinstance(lp, LogprobsTensors):
            return lp
        if self._host_logprobs is None:
            return unpack(lp, lp.packed.tolist(), num_rows)
        assert self._ready is not None
        self._ready.synchronize()
        return unpack(lp, self._host_logprobs.tolist(), num_rows)

    def prompt_logprobs(self) -> dict[str, PromptLogprobsChunk]:
        """The prompt logprobs the step computed, by request id (only requests that asked and
        whose step scored prompt tokens). Waits for the step as tokens() does."""
        plp = self._prompt_logprobs
        if plp is None:
            return {}
        if not isinstance(plp, PromptLogprobsTensors):
            return plp
        if self._host_prompt is None:
            return plp.plan.split(plp.packed.numpy())
        assert self._ready is not None
        self._ready.synchronize()
        return plp.plan.split(self._host_prompt.numpy())


# What a device (or driver) failure says: after one the device's state is unknown, so no
# request can be blamed and the engine must stop (a supervisor restarts it).
_DEVICE_FAILURE_MARKERS = ("CUDA error", "CUDA driver", "device-side assert", "CUBLAS_STATUS",
                           "CUDNN_STATUS", "HIP error", "NCCL error", "illegal memory access")


def is_device_failure(error: BaseException) -> bool:
    """Whether a step's exception is the device's (fatal) rather than one request's."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(k in str(error) for k in _DEVICE_FAILURE_MARKERS)


class FailedRequest(NamedTuple):
    """A request a step could not run: the others of its batch went on without it."""

    scheduled: ScheduledRequest
    message: str


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        blocks: BlockTables,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        backend: AttentionBackend,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.backend = backend
        self.table_width = blocks_needed(max_model_len, blocks.block_size)
        self.sampler = Sampler()
        # NOTE: per-request random streams of seeded requests; they survive preemption so a
        # recomputed request continues its stream rather than restarting it.
        self.generators: dict[str, torch.Generator] = {}
        for i, attn in enumerate(model.attention_layers):
            attn.bind(*cache.layer(i), backend)
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        )
        self.static: StaticInputs | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None
        self.timeline: StepTimeline | None = None  # set to record when each step ran
        self.measure_steps = False  # time each step (StepResult.device_s): the closed-loop policies' input
        self.layer_groups: LayerGroups | None = None  # eager steps run in layer groups (the rapid prefill worker)
        self._decode_graph_sets: dict[Hashable, DecodeGraphs] = {}  # per SM partition; None: the first
        self._graph_pool: object = None

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    # ---- CUDA graphs -------------------------------------------------------------------------

    def capture_graphs(self, max_num_seqs: int, max_num_batched_tokens: int, decode: bool = True,
                       piecewise: bool = True) -> None:
        """Capture whole-step graphs for decode batches of up to max_num_seqs (`decode`) and
        piecewise graphs for steps of up to max_num_batched_tokens tokens (`piecewise`). The
        rapid topology's decode worker needs only the former, its prefill worker the latter."""
        if self.device.type != "cuda" or not self.backend.graph_safe:
            raise ValueError("CUDA graphs need a CUDA device and the triton attention backend")
        t0 = time.perf_counter()
        dec_sizes = decode_batch_sizes(max_num_seqs) if decode else []
        tok_sizes = token_buckets(max_num_batched_tokens) if piecewise else []
        self.static = StaticInputs(max([*tok_sizes, *dec_sizes, 1]), max(max_num_seqs, 1),
                                   self.table_width, self.device)
        pool = self._graph_pool = torch.cuda.graph_pool_handle()
        # NOTE: a graph keeps the SM partition of the stream it is captured on: a worker on a
        # partition's stream captures there (torch's own capture stream covers the whole device;
        # capturing on the legacy default stream is not allowed).
        current = torch.cuda.current_stream(self.device)
        stream = None if current == torch.cuda.default_stream(self.device) else current
        if decode:
            self.decode_graphs = DecodeGraphs(self.model, self.static, dec_sizes, self.model.config.vocab_size,
                                              pool, self.device, num_sms=self.num_sms)
            self.decode_graphs.capture(stream)
            self._decode_graph_sets = {None: self.decode_graphs}
        if piecewise:
            # The activations' dtype (the embedding's), not the cache's: an FP8 cache holds E4M3.
            self.piecewise = PiecewiseGraphs(self.model, self.static, tok_sizes, pool, self.device,
                                             self.model.embed_tokens.weight.dtype)
            self.piecewise.capture(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured decode graphs for batch sizes %s and piecewise graphs for %s tokens in %.1f s",
                 dec_sizes, tok_sizes, time.perf_counter() - t0)

    def capture_partition_graphs(self, key: Hashable, stream: torch.cuda.Stream, num_sms: int) -> None:
        """Capture another set of decode graphs on `stream` (an SM partition's decode stream: a
        graph keeps the partition it was captured in), with KV split counts for `num_sms`.
        Needs `capture_graphs` first (the static inputs and pool are shared)."""
        if self.decode_graphs is None or self.static is None:
            raise RuntimeError("capture_graphs(decode=True) must run before capture_partition_graphs")
        base = self._decode_graph_sets[None]
        graphs = DecodeGraphs(self.model, self.static, base.sizes, self.model.config.vocab_size,
                              self._graph_pool, self.device, num_sms=num_sms, logits=base.logits)
        graphs.capture(stream)
        torch.cuda.synchronize(self.device)
        self._decode_graph_sets[key] = graphs

    def drop_graphs(self) -> None:
        """Free every captured graph (before the streams they were captured on are destroyed)."""
        self.decode_graphs = self.piecewise = None
        self._decode_graph_sets.clear()

    @property
    def partition_graph_keys(self) -> set[Hashable]:
        return {k for k in self._decode_graph_sets if k is not None}

    def use_partition(self, key: Hashable, num_sms: int) -> None:
        """Run the next steps on the decode graphs captured for `key` (None: the first set) and
        size eager decode attention splits for `num_sms` SMs."""
        self.num_sms = num_sms
        if self._decode_graph_sets:
            self.decode_graphs = self._decode_graph_sets[key]

    # ---- one step ----------------------------------------------------------------------------

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _metadata(self, inp: StepInputs) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._tensor(inp.slot_mapping),
            query_start_loc=self._tensor(inp.query_start_loc),
            seq_lens=self._tensor(inp.seq_lens),
            block_tables=self._tensor(inp.block_tables),
            query_start_loc_host=inp.query_start_loc.tolist(),
            seq_lens_host=inp.seq_lens.tolist(),
            max_query_len=inp.max_query_len,
            max_seq_len=inp.max_seq_len,
            **self._decode_split(inp),
        )

    def _decode_split(self, inp: StepInputs) -> dict[str, int]:
        """How a mixed step's leading decodes are run (see AttentionMetadata.num_decodes)."""
        nd = inp.num_decodes
        if nd == 0:
            return {}
        return {"num_decodes": nd,
                "num_splits": decode_num_splits(nd, self.model.config.num_kv_heads, self.num_sms)}

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest],
                between_groups: Callable[[], None] | None = None) -> list[int]:
        """Run one step and wait for it; returns the sampled token of each sampling request,
        in order. between_groups: with `layer_groups`, called between two groups of layers."""
        return self.submit(scheduled, between_groups=between_groups).tokens()

    @torch.inference_mode()
    def submit(self, scheduled: list[ScheduledRequest], prev: StepResult | None = None,
               between_groups: Callable[[], None] | None = None) -> StepResult:
        """Launch one step without waiting for it (on CUDA the host returns as soon as the work
        is queued). Tokens still pending from `prev` (the step in flight) are fed to this one
        from device memory. An eager step runs in groups of layers when `layer_groups` is set,
        calling `between_groups` (if given) between two of them."""
        rows = [s for s in scheduled if s.samples]
        start = self.timeline.begin() if self.timeline is not None else None
        started = self._start_timing() if self.measure_steps else None
        plan = PromptLogprobsPlan(scheduled)
        logits, prompt_logprobs = self._forward_step(scheduled, prev, between_groups, plan if plan else None)
        sampled = logprobs = None
        if rows:
            batch = self._sampling_batch(rows)
            batch.pending = self._pending_tokens(rows, batch, prev)
            sampled = self.sampler(logits, batch)  # [S] int64
            # NOTE: eager, after the sampler, on the logits the step returned (a decode graph's
            # output buffer is not overwritten before the next replay, queued behind this)
            logprobs = compute_logprobs(logits, sampled, batch.params)
        if self.timeline is not None:
            self.timeline.end(start, sum(s.num_new_tokens for s in scheduled), len(scheduled))
        result = StepResult(scheduled, sampled, {s.request.request_id: i for i, s in enumerate(rows)}, started,
                            logprobs, prompt_logprobs)
        # NOTE: last, once nothing can fail: submit_isolated runs a failed step's requests again,
        # and those runs must score the same positions.
        plan.launched()
        return result

    def _start_timing(self) -> torch.cuda.Event | float:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()  # NOTE: on the worker's current stream, the one the step's kernels go to
            return ev
        return time.perf_counter()

    @torch.inference_mode()
    def submit_isolated(
        self, scheduled: list[ScheduledRequest], prev: StepResult | None = None,
        between_groups: Callable[[], None] | None = None,
    ) -> tuple[StepResult, list[FailedRequest]]:
        """`submit`, but an exception raised while building or sampling the step is pinned on
        the requests it concerns: the step is run again one request at a time, those that still
        fail are returned (the caller ends them with an error and frees their blocks) and the
        others' tokens are the step's. A device failure, or a fault every request of a batch
        hits alone (the engine's, not theirs), is raised.

        NOTE: running a request's tokens again is safe: the scheduler advanced it once, each
        run writes the same KV slots, and `prev`'s pending tokens stay on the device."""
        try:
            return self.submit(scheduled, prev, between_groups), []
        except Exception as e:  # noqa: BLE001 - classified below
            if is_device_failure(e):
                raise
            first = e
        if len(scheduled) == 1:
            return StepResult([], None, {}), [FailedRequest(scheduled[0], _describe(first))]
        log.warning("a step of %d requests failed (%s); running them one at a time to find the "
                    "failing ones", len(scheduled), _describe(first))
        kept: list[ScheduledRequest] = []
        sampled: list[torch.Tensor] = []
        logprobs: list[TokenLogprobs | None] = []
        prompt_logprobs: dict[str, PromptLogprobsChunk] = {}
        failed: list[FailedRequest] = []
        for s in scheduled:
            try:
                alone = self.submit([s], prev)
            except Exception as e:  # noqa: BLE001
                if is_device_failure(e):
                    raise
                failed.append(FailedRequest(s, _describe(e)))
                continue
            kept.append(s)
            prompt_logprobs.update(alone.prompt_logprobs())  # read back at once, as the logprobs
            if alone.sampled is not None:
                sampled.append(alone.sampled)
                # Read back at once (a wait, on this rare path only): the runs' k differ.
                logprobs += alone.logprobs()
        if not kept:
            raise first
        rows = {s.request.request_id: i for i, s in enumerate(s for s in kept if s.samples)}
        return StepResult(kept, torch.cat(sampled) if sampled else None, rows,  # [S] int64
                          logprobs=logprobs if any(lp is not None for lp in logprobs) else None,
                          prompt_logprobs=prompt_logprobs or None), failed

    def _fill_pending(self, input_ids: torch.Tensor, inp: StepInputs, prev: StepResult | None) -> None:
        """Write the tokens the step in flight samples into this step's input ids (device to
        device: the host never waits for them)."""
        if not len(inp.pending_index):
            return
        if prev is None or prev.sampled is None:
            raise RuntimeError("a step has pending tokens but no step in flight produces them")
        try:
            src = [prev.rows[rid] for rid in inp.pending_request_ids]
        except KeyError as e:
            raise RuntimeError(f"request {e.args[0]!r} has a pending token the step in flight does not sample") from None
        where = self._tensor(np.stack([inp.pending_index, np.array(src, dtype=np.int64)]))  # [2, P]: one copy
        input_ids.index_copy_(0, where[0], prev.sampled.index_select(0, where[1]))

    def _forward_step(self, scheduled: list[ScheduledRequest], prev: StepResult | None,
                      between_groups: Callable[[], None] | None = None, plan: PromptLogprobsPlan | None = None,
                      ) -> tuple[torch.Tensor | None, PromptLogprobsTensors | None]:
        """The logits of the step's sampling rows [S, V] (None if none samples), and the prompt
        logprobs of `plan`'s positions."""
        b = len(scheduled)
        t = sum(s.num_new_tokens for s in scheduled)
        # NOTE: a decode graph keeps only its sampling rows' logits: a step that scores prompt
        # positions (one-token prefill chunks that look like decodes) runs piecewise or eagerly.
        if self.decode_graphs is not None and t == b and plan is None:
            n = pick(self.decode_graphs.sizes, b)
            if n is not None:
                assert self.static is not None
                inp = StepInputs(scheduled, self.blocks, pad_seqs=n, pad_tokens=n, table_width=self.table_width)
                self.static.load(inp, n, n)
                self._fill_pending(self.static.input_ids, inp, prev)
                logits = self.decode_graphs.replay(n)
                # NOTE: a one-token prefill chunk looks like a decode but does not sample.
                return (logits[:b] if len(inp.logits_indices) == b else logits[self._tensor(inp.logits_indices)]), None
        if self.piecewise is not None:
            n = pick(self.piecewise.sizes, t)
            if n is not None:
                assert self.static is not None
                inp = StepInputs(scheduled, self.blocks, pad_tokens=n, table_width=self.table_width)
                s = self.static
                s.load(inp, n, b)
                self._fill_pending(s.input_ids, inp, prev)
                meta = AttentionMetadata(
                    slot_mapping=s.slot_mapping[:t], query_start_loc=s.query_start_loc[: b + 1],
                    seq_lens=s.seq_lens[:b], block_tables=s.block_tables[:b],
                    query_start_loc_host=[], seq_lens_host=[],
                    max_query_len=inp.max_query_len, max_seq_len=inp.max_seq_len,
                    **self._decode_split(inp),
                )
                hidden = self.piecewise.run(n, t, meta)
                return self._select_logits(hidden, inp, plan)
        inp = StepInputs(scheduled, self.blocks)
        input_ids = self._tensor(inp.input_ids)
        self._fill_pending(input_ids, inp, prev)
        with forward_context(self._metadata(inp)):
            if self.layer_groups is None:
                hidden = self.model(input_ids, self._tensor(inp.positions))
            else:
                hidden = self._forward_in_groups(input_ids, self._tensor(inp.positions), self.layer_groups,
                                                 between_groups)
        return self._select_logits(hidden, inp, plan)

    def _forward_in_groups(self, input_ids: torch.Tensor, positions: torch.Tensor, groups: LayerGroups,
                           between: Callable[[], None] | None) -> torch.Tensor:
        """The model's forward, a group of layers at a time (the same ops as forward, so the same
        tokens), calling `between` after each group but the last, and timing the groups."""
        model = self.model
        num_layers, tokens = len(model.layers), int(input_ids.shape[0])
        cuda = self.device.type == "cuda"
        h = model.embed_tokens(input_ids)  # [T, hidden]
        in_flight: tuple[torch.cuda.Event, torch.cuda.Event, int] | None = None  # (begin, end, layers)
        start = 0
        while start < num_layers:
            end = min(num_layers, start + groups.size(tokens))
            if cuda:
                begin = torch.cuda.Event(enable_timing=True)
                begin.record()
                h = model.forward_layers(positions, h, start, end)
                done = torch.cuda.Event(enable_timing=True)
                done.record()
                # NOTE: the host waits for the group before this one, so it stays at most one group
                # ahead of the device: a partition switch between groups then takes effect once the
                # group in flight is done, not after every queued layer of the prompt.
                if in_flight is not None:
                    in_flight[1].synchronize()
                    groups.measured(tokens, in_flight[2], in_flight[0].elapsed_time(in_flight[1]) / 1e3)
                in_flight = (begin, done, end - start)
            else:
                t0 = time.perf_counter()
                h = model.forward_layers(positions, h, start, end)
                groups.measured(tokens, end - start, time.perf_counter() - t0)
            if end < num_layers and between is not None:
                between()
            start = end
        return model.norm(h)

    def _select_logits(self, hidden: torch.Tensor, inp: StepInputs, plan: PromptLogprobsPlan | None,
                       ) -> tuple[torch.Tensor | None, PromptLogprobsTensors | None]:
        prompt = None
        if plan is not None:
            prompt = compute_prompt_logprobs(hidden, self.model.compute_logits, plan,
                                             self.model.config.vocab_size)
        if len(inp.logits_indices) == 0:
            return None, prompt
        return self.model.compute_logits(hidden[self._tensor(inp.logits_indices)]), prompt

    def _sampling_batch(self, rows: list[ScheduledRequest]) -> SamplingBatch:
        params, gens, banned = [], [], []
        histories: list[TokenHistory | None] = []
        for s in rows:
            req, p = s.request, s.request.params
            params.append(p)
            gen = None
            if p.seed is not None and not p.greedy:
                gen = self.generators.get(req.request_id)
                if gen is None:
                    gen = self.generators[req.request_id] = make_generator(p.seed, self.device)
            gens.append(gen)
            if req.num_output_tokens + req.num_pending < p.min_tokens:
                stop_ids = p.stop_token_ids + (() if p.ignore_eos else self.eos_token_ids)
                banned.append(tuple(stop_ids))
            else:
                banned.append(())
            # Only for the rows that asked: a plain batch builds no history. The prompt only
            # counts for the repetition penalty.
            histories.append(None if not p.penalized else TokenHistory(
                req.prompt_token_ids if p.repetition_penalty != 1.0 else (), req.output_token_ids))
        return SamplingBatch(params=params, generators=gens, banned_token_ids=banned,
                             histories=histories if any(h is not None for h in histories) else None)

    def _pending_tokens(self, rows: list[ScheduledRequest], batch: SamplingBatch,
                        prev: StepResult | None) -> PendingTokens | None:
        """The last output token of each penalized row whose token is still being sampled by the
        step in flight (async scheduling), taken from that step's device tensor.

        NOTE: with one-step-ahead scheduling the host plans step N+1 before step N's token lands
        in `all_token_ids`; the penalties of step N+1 must count it, so it is read on the device
        (as `_fill_pending` feeds it to the model), never by waiting for step N."""
        if batch.histories is None:
            return None
        at = [(i, s.request.request_id) for i, (s, h) in enumerate(zip(rows, batch.histories))
              if h is not None and s.request.num_pending]
        if not at:
            return None
        if prev is None or prev.sampled is None:
            raise RuntimeError("a penalized request has a pending token but no step in flight produces it")
        try:
            src = [prev.rows[rid] for _, rid in at]
        except KeyError as e:
            raise RuntimeError(f"request {e.args[0]!r} has a pending token the step in flight does not sample") from None
        index = self._tensor(np.array(src, dtype=np.int64))  # [P]
        return PendingTokens([i for i, _ in at], prev.sampled.index_select(0, index))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
