"""The three serving topologies on the virtual clock, each built from the engine's own parts:

- hybrid: `LLMEngine.step` itself (its ChunkedScheduler, async scheduling and outputs) over a
  stand-in runner;
- rapid: the decode and prefill workers' turns (`DecodeTurns`, `PrefillTurns`) with their
  schedulers, block manager and `DecodePartitioning`/`PrefillPartitioning` (the configured policy
  deciding every step), over in-memory inboxes; the two workers' steps overlap in virtual time;
- disagg: the decode instance's turns and the prefill instance's (`PrefillInstanceTurns`) with
  their own pools, a static SM split and a priced KV copy per prompt.

The front (`SimFront`) is the engine's `EngineFront`: it validates and admits requests as the
server does and records when each token reaches it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from rapidserve.bench.metrics import RequestRecord
from rapidserve.bench.workloads import SampleRequest
from rapidserve.config import EngineConfig
from rapidserve.serving.front import EngineFront
from rapidserve.serving.hybrid import LLMEngine
from rapidserve.kv.block_manager import BlockManager
from rapidserve.model.config import ModelConfig
from rapidserve.model.loader import model_config, resolve_max_model_len
from rapidserve.model.source import load_source, resolve_model
from rapidserve.request import Request, RequestStatus
from rapidserve.resources.partition import Granted, Partition, PhaseStreams, round_to_granularity
from rapidserve.resources.policy import PartitionStats
from rapidserve.resources.profile import Profile
from rapidserve.sampling_params import SamplingParams
from rapidserve.scheduler.chunked import SchedulerConfig
from rapidserve.scheduler.decode import DecodeScheduler
from rapidserve.scheduler.disagg_prefill import DisaggPrefillScheduler
from rapidserve.scheduler.prefill import PrefillScheduler
from rapidserve.serving import messages as m
from rapidserve.serving.disagg import KVTransfer, PrefillInstanceTurns
from rapidserve.serving.partitioning import DecodePartitioning, PrefillPartitioning
from rapidserve.serving.workers import DecodeTurns, PrefillTurns
from rapidserve.sim.clock import ARRIVAL, Clock, Driver, EventLoop, Inbox
from rapidserve.sim.runner import SIM_TOKEN, DecodeRunner, HybridRunner, PrefillRunner

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}
_CONTEXT_BYTES = 512 << 20  # the CUDA context and memory outside torch's allocator (about)
# Partitioning takes a device; with a SimPartitioner it makes no stream on it.
_CPU_DEVICE = torch.device("cpu")


# ---- the model and its memory -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    config: ModelConfig  # with its weight format (config.quantization: None or "fp8")
    max_model_len: int
    dtype_bytes: int
    kv_dtype_bytes: int = 0  # bytes per KV entry (--kv-cache-dtype fp8: 1); 0: dtype_bytes

    @classmethod
    def of(cls, engine: EngineConfig) -> ModelShape:
        """The configured model's shape (its config only: no weights are read), with the weight
        format (--quantization, or the checkpoint's) and the KV cache's dtype the engine would use."""
        source = resolve_model(engine.model)
        meta = load_source(source, "dummy")
        cfg = model_config(meta.config, engine.quantization)
        dtype = engine.dtype if engine.dtype != "auto" else cfg.config_dtype
        nbytes = _DTYPE_BYTES.get(dtype, 2)
        return cls(cfg, resolve_max_model_len(engine.max_model_len, cfg), nbytes,
                   1 if engine.kv_cache_dtype == "fp8" else nbytes)

    @property
    def weight_bytes(self) -> int:
        """Every weight the engine holds: embedding and LM head, and per layer attention and the
        MLP, or for a MoE layer its router, every routed expert and a shared expert. FP8 weights
        (--quantization fp8): one byte each for the projections the engine quantizes (attention,
        dense MLPs, shared experts; model/quant.py), the rest in the model's dtype."""
        c = self.config
        h = c.hidden_size
        attn = h * (c.q_size + 2 * c.kv_size) + c.q_size * h
        mlp = 3 * h * c.intermediate_size
        n_moe = c.num_moe_layers if c.is_moe else 0
        shared = 3 * h * c.shared_expert_intermediate_size if c.is_moe else 0
        proj = c.num_layers * attn + (c.num_layers - n_moe) * mlp + n_moe * shared
        moe = n_moe * (h * c.num_experts + (h if shared else 0) + c.num_experts * c.expert_params)
        embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
        proj_bytes = 1 if c.quantization == "fp8" else self.dtype_bytes
        return proj * proj_bytes + (moe + embed) * self.dtype_bytes

    def block_bytes(self, block_size: int) -> int:
        c = self.config
        return c.num_layers * 2 * c.num_kv_heads * c.head_dim * (self.kv_dtype_bytes or self.dtype_bytes) * block_size

    def peak_bytes(self, engine: EngineConfig) -> int:
        """Weights plus the largest step's activations and logits, as the engine probes them."""
        c = self.config
        tokens = min(engine.max_num_batched_tokens, self.max_model_len)
        act = tokens * (3 * c.intermediate_size + 4 * c.hidden_size + c.q_size + 2 * c.kv_size) * self.dtype_bytes
        logits = engine.max_num_seqs * c.vocab_size * 4
        return self.weight_bytes + act + logits


def kv_blocks(engine: EngineConfig, shape: ModelShape, gpu_memory_bytes: int, share: float = 1.0) -> int:
    """KV blocks of a pool sized as the engine sizes it on a GPU of `gpu_memory_bytes` (`share`
    of the utilization target: the disagg instances'), unless the config fixes it."""
    if engine.num_kv_blocks is not None:
        return engine.num_kv_blocks
    if engine.kv_cache_memory_bytes is not None:
        budget = int(engine.kv_cache_memory_bytes * share)
    else:
        peak = shape.peak_bytes(engine)
        budget = int(gpu_memory_bytes * engine.gpu_memory_utilization * share) - peak - _CONTEXT_BYTES
        if engine.use_cuda_graphs:
            budget -= peak - shape.weight_bytes  # the graphs' pool holds about one step's activations
    n = budget // shape.block_bytes(engine.block_size)
    if n < 1:
        raise ValueError(f"no memory left for the KV cache of {engine.model} on {gpu_memory_bytes / 2**30:.0f} GiB: "
                         "give --gpu-memory-gb or --num-kv-blocks")
    return int(n)


# ---- the front ----------------------------------------------------------------------------------


class RunResult(NamedTuple):
    records: list[RequestRecord]
    duration: float  # first arrival (0) -> last token
    partition: PartitionStats | None  # rapid with a partition policy
    num_steps: dict[str, int]  # per worker
    busy_s: dict[str, float]  # device time per worker
    num_preemptions: int
    num_kv_blocks: int


class _Recorder:
    """When each request arrived and each of its tokens reached the front."""

    def __init__(self, n: int) -> None:
        self.arrival = [0.0] * n
        self.times: list[list[float]] = [[] for _ in range(n)]
        self.errors: dict[int, str] = {}
        self.finished: set[int] = set()

    def records(self, requests: Sequence[SampleRequest]) -> list[RequestRecord]:
        out = []
        for i, req in enumerate(requests):
            ts = self.times[i]
            if i in self.errors or i not in self.finished:
                why = self.errors.get(i, "unfinished when the simulation ran out of events (a stall: no worker "
                                         "could make progress)")
                out.append(RequestRecord(prompt_len=req.prompt_len, error=why))
                continue
            a = self.arrival[i]
            itls = tuple(b - a_ for a_, b in zip(ts, ts[1:]))
            out.append(RequestRecord(prompt_len=req.prompt_len, output_len=len(ts), ttft=ts[0] - a, itls=itls,
                                     e2el=ts[-1] - a, success=True))
        return out

    @property
    def last_time(self) -> float:
        return max((ts[-1] for ts in self.times if ts), default=0.0)


def _params(output_len: int) -> SamplingParams:
    # As `bench serve` asks: greedy, ignore_eos, exactly output_len tokens.
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)


class SimFront(EngineFront):
    """The rapid and disagg topologies' front: the engine front's admission checks, requests
    submitted to the decode worker's inbox, tokens recorded as the worker's events arrive."""

    def __init__(self, config: EngineConfig, shape: ModelShape, num_kv_blocks: int, inbox: Inbox,
                 submit_clock: Clock, event_clock: Clock, recorder: _Recorder) -> None:
        """submit_clock: the time requests arrive; event_clock: the decode worker's (its events
        reach the front when it puts them)."""
        super().__init__(config)
        self.model_config = shape.config
        self.tokenizer = None
        self.max_model_len = shape.max_model_len
        self.model_name = config.model or ""
        self.eos_token_ids = shape.config.eos_token_ids
        self.num_kv_blocks, self.block_size = num_kv_blocks, config.block_size
        self.inbox, self.recorder = inbox, recorder
        self.submit_clock, self.event_clock = submit_clock, event_clock

    def _submit(self, req: Request) -> None:
        self.inbox.put_at(self.submit_clock.now,
                          m.Submit(req.request_id, req.prompt_token_ids, req.params, req.max_tokens))

    def _release(self, req: Request, decided_by_worker: bool) -> None:
        if not decided_by_worker:
            self.inbox.put_at(self.event_clock.now, m.Abort(req.request_id))

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        return _encode_ids(self, prompt)

    # the decode worker's `to_front` queue
    def put(self, msg: Any) -> None:
        if isinstance(msg, m.StepEvents):
            t = self.event_clock.now
            times = self.recorder.times
            for ev in msg.events:
                times[int(ev.request_id)].append(t)
                if ev.status is not None:
                    self.recorder.finished.add(int(ev.request_id))
                    # NOTE: no text, no stop strings here: the worker's verdict ends it (what
                    # _on_token would do, without building an output per token).
                    req = self._requests.pop(ev.request_id, None)
                    if req is not None:
                        req.status = RequestStatus(ev.status)
                        self._text.pop(ev.request_id, None)
        elif isinstance(msg, m.RequestFailed):
            req = self._requests.get(msg.request_id)
            if req is not None:
                self._on_error(req, msg.message)
                self.recorder.errors[int(msg.request_id)] = msg.message


def _encode_ids(front: EngineFront, prompt: str | list[int]) -> tuple[str | None, list[int]]:
    """The front's prompt check for token ids, at the cost of one max() (the workloads draw ids
    in range; EngineFront checks each one)."""
    if isinstance(prompt, str) or not prompt or not 0 <= min(prompt) <= max(prompt) < front.model_config.vocab_size:
        return EngineFront.encode_prompt(front, prompt)
    return None, list(prompt)


def _admit(front: EngineFront, i: int, req: SampleRequest, recorder: _Recorder) -> None:
    prompt = req.prompt if isinstance(req.prompt, list) else [SIM_TOKEN] * req.prompt_len
    try:
        front.add_request(prompt, _params(req.output_len), request_id=str(i))
    except ValueError as e:  # the server answers 400: a failed request
        recorder.errors[i] = f"HTTP 400: {e}"


# ---- hybrid -------------------------------------------------------------------------------------


class SimHybridEngine(LLMEngine):
    """LLMEngine with its model replaced by a stand-in runner: `step` is the engine's own."""

    def __init__(self, config: EngineConfig, shape: ModelShape, num_kv_blocks: int, cost: Any, clock: Clock) -> None:
        EngineFront.__init__(self, config)
        self.model_config = shape.config
        self.tokenizer = None
        self.max_model_len = shape.max_model_len
        self.model_name = config.model or ""
        self.eos_token_ids = shape.config.eos_token_ids
        self.num_kv_blocks, self.block_size = num_kv_blocks, config.block_size
        self.clock = clock
        runner = HybridRunner(EventLoop(), clock, cost)
        # async scheduling as on CUDA (the configuration being simulated runs on a GPU)
        self._init_steps(config, BlockManager(num_kv_blocks, config.block_size), runner,
                         config.async_scheduling is not False)

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        return _encode_ids(self, prompt)

    def shutdown(self) -> None:
        pass


def run_hybrid(config: EngineConfig, shape: ModelShape, num_kv_blocks: int, cost: Any,
               requests: Sequence[SampleRequest], arrivals: Sequence[float]) -> RunResult:
    clock = Clock()
    rec = _Recorder(len(requests))
    engine = SimHybridEngine(config, shape, num_kv_blocks, cost, clock)
    runner = engine.runner
    n, i = len(requests), 0
    while True:
        while i < n and arrivals[i] <= clock.now:
            rec.arrival[i] = arrivals[i]
            _admit(engine, i, requests[i], rec)
            i += 1
        if not engine.has_unfinished_requests() and engine._in_flight is None:
            if i >= n:
                break
            clock.now = arrivals[i]
            continue
        steps = runner.num_steps
        outputs = engine.step()
        t = clock.now
        for out in outputs:
            rec.times[int(out.request_id)].append(t)
            if out.finished:
                rec.finished.add(int(out.request_id))
        if runner.num_steps == steps and not outputs:  # nothing to run until the next arrival
            if i >= n:
                raise RuntimeError(f"the hybrid engine stalled with {engine.scheduler.num_unfinished} requests")
            clock.now = max(clock.now, arrivals[i])
    return RunResult(rec.records(requests), rec.last_time, None, {"hybrid": runner.num_steps},
                     {"hybrid": runner.busy_s}, engine.scheduler.num_preemptions, num_kv_blocks)


# ---- rapid --------------------------------------------------------------------------------------


class SimPartitioner:
    """The partitioning mechanism of the simulated GPU: every partition a policy names exists,
    with no streams (the runners read the partition in force)."""

    def __init__(self, total_sms: int, granularity: int, side: str) -> None:
        self.total_sms, self.granularity, self.side = total_sms, granularity, side
        self._granted: list[Granted] = []

    def prepare(self, partitions: Sequence[Partition]) -> list[Granted]:
        self._granted = [Granted(p, p.decode_share(self.total_sms), p.prefill_share(self.total_sms))
                         for p in partitions]
        return list(self._granted)

    def streams(self, partition: Partition) -> PhaseStreams:
        return PhaseStreams(None, None)

    def granted(self) -> list[Granted]:
        return list(self._granted)

    def close(self) -> None:
        pass


def _sms(partition: Partition, total: int, side: str) -> int | None:
    """A side's SMs in a partition; None for the whole device (over-allocated or alone)."""
    if partition.is_full:
        return None
    return partition.decode_share(total) if side == "decode" else partition.prefill_share(total)


def run_rapid(config: EngineConfig, shape: ModelShape, num_kv_blocks: int, cost: Any, profile: Profile,
              requests: Sequence[SampleRequest], arrivals: Sequence[float]) -> RunResult:
    loop = EventLoop()
    d_clock, p_clock, f_clock = Clock(), Clock(), Clock()
    rec = _Recorder(len(requests))
    total, gran = profile.total_sms, profile.metadata.sm_granularity
    to_decode, to_prefill = Inbox(p_clock), Inbox(d_clock)
    # NOTE: the front's messages (Submit) are put with put_at(arrival); the prefill worker's
    # (PrefillDone) are stamped with its clock, so the decode inbox's sender clock is p_clock.
    front = SimFront(config, shape, num_kv_blocks, to_decode, f_clock, d_clock, rec)
    d_part = DecodePartitioning(config, _CPU_DEVICE, SimPartitioner(total, gran, "decode"), clock=lambda: loop.now)
    p_part = PrefillPartitioning(config, _CPU_DEVICE, SimPartitioner(total, gran, "prefill"), clock=lambda: loop.now)
    prefill_runner: PrefillRunner | None = None

    def prefill_step(t: float) -> Any:
        return prefill_runner.running_at(t) if prefill_runner is not None else None

    d_runner = DecodeRunner(loop, d_clock, cost, lambda: _sms(d_part.current, total, "decode"), prefill_step)
    prefill_runner = PrefillRunner(loop, p_clock, cost, lambda: _sms(p_part.current, total, "prefill"),
                                   d_runner.running_at)
    blocks = BlockManager(num_kv_blocks, config.block_size)
    decode = DecodeTurns(DecodeScheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), blocks),
                         d_runner, shape.config.eos_token_ids, to_prefill, front, d_part,
                         config.async_scheduling is not False)
    prefill = PrefillTurns(PrefillScheduler(config.max_num_batched_tokens, config.block_size), prefill_runner,
                           to_decode, p_part)
    Driver(loop, d_clock, decode, to_decode, lambda: d_runner.num_steps)
    Driver(loop, p_clock, prefill, to_prefill, lambda: prefill_runner.num_steps)
    _arrivals(loop, front, f_clock, requests, arrivals, rec)
    loop.run()
    stats = d_part.stats() if d_part.partitioned else None
    return RunResult(rec.records(requests), rec.last_time, stats,
                     {"decode": d_runner.num_steps, "prefill": prefill_runner.num_steps},
                     {"decode": d_runner.busy_s, "prefill": prefill_runner.busy_s},
                     decode.scheduler.num_preemptions, num_kv_blocks)


def _arrivals(loop: EventLoop, front: EngineFront, clock: Clock, requests: Sequence[SampleRequest],
              arrivals: Sequence[float], rec: _Recorder) -> None:
    """Each request reaches the front at its arrival time (events, one after the other)."""
    n = len(requests)

    def arrive(i: int) -> None:
        clock.now = arrivals[i]
        rec.arrival[i] = arrivals[i]
        _admit(front, i, requests[i], rec)
        if i + 1 < n:
            loop.at(arrivals[i + 1], ARRIVAL, lambda: arrive(i + 1))

    if n:
        loop.at(arrivals[0], ARRIVAL, lambda: arrive(0))


# ---- disagg -------------------------------------------------------------------------------------


class SimPrefillInstance(PrefillInstanceTurns):
    """The prefill instance's turns; its KV copy is priced, not made."""

    def __init__(self, scheduler: DisaggPrefillScheduler, runner: PrefillRunner, to_decode: Any, to_front: Any,
                 cost: Any, block_bytes: int) -> None:
        super().__init__(scheduler, runner, to_decode, to_front)
        self.cost, self.block_bytes = cost, block_bytes
        self.transfer_s = 0.0

    def _transfer(self, request_id: str) -> KVTransfer:
        own, _dest = self.scheduler.transfer_plan(request_id)
        num_bytes = len(own) * self.block_bytes
        seconds = self.cost.kv_transfer_s(num_bytes)
        self.runner.extend(seconds)  # the copy runs on its stream, and it waits for it
        self.transfer_s += seconds
        return KVTransfer(request_id, len(own), num_bytes, seconds)


class _Discard:
    """A queue whose messages nobody reads (the prefill instance's transfer reports)."""

    def put(self, msg: Any) -> None:
        pass


def disagg_split(config: EngineConfig, profile: Profile) -> tuple[int, int]:
    """(decode SMs, prefill SMs) of the disagg mode's static split, as the instances make it."""
    total, gran = profile.total_sms, profile.metadata.sm_granularity
    want = config.disagg_decode_sms or total // 2
    n = round_to_granularity(want, gran, total)
    return n, total - n


def run_disagg(config: EngineConfig, shape: ModelShape, gpu_memory_bytes: int, cost: Any, profile: Profile,
               requests: Sequence[SampleRequest], arrivals: Sequence[float]) -> RunResult:
    loop = EventLoop()
    d_clock, p_clock, f_clock = Clock(), Clock(), Clock()
    rec = _Recorder(len(requests))
    f = config.disagg_memory_split
    d_blocks_n = kv_blocks(config, shape, gpu_memory_bytes, 1.0 - f)
    # the prefill instance runs eagerly and sizes from what the decode instance left (about F of it)
    p_cfg = dataclasses.replace(config, enforce_eager=True)
    p_blocks_n = kv_blocks(p_cfg, shape, gpu_memory_bytes, f)
    to_decode, to_prefill = Inbox(p_clock), Inbox(d_clock)
    front = SimFront(config, shape, min(d_blocks_n, p_blocks_n), to_decode, f_clock, d_clock, rec)
    d_sms, p_sms = disagg_split(config, profile)
    prefill_runner: PrefillRunner | None = None

    def prefill_step(t: float) -> Any:
        return prefill_runner.running_at(t) if prefill_runner is not None else None

    d_runner = DecodeRunner(loop, d_clock, cost, lambda: d_sms, prefill_step)
    prefill_runner = PrefillRunner(loop, p_clock, cost, lambda: p_sms, d_runner.running_at)
    d_blocks = BlockManager(d_blocks_n, config.block_size)
    decode = DecodeTurns(DecodeScheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), d_blocks),
                         d_runner, shape.config.eos_token_ids, to_prefill, front, None,
                         config.async_scheduling is not False)
    p_blocks = BlockManager(p_blocks_n, config.block_size)
    prefill = SimPrefillInstance(DisaggPrefillScheduler(p_blocks, config.max_num_batched_tokens), prefill_runner,
                                 to_decode, _Discard(), cost, shape.block_bytes(config.block_size))
    Driver(loop, d_clock, decode, to_decode, lambda: d_runner.num_steps)
    Driver(loop, p_clock, prefill, to_prefill, lambda: prefill_runner.num_steps)
    _arrivals(loop, front, f_clock, requests, arrivals, rec)
    loop.run()
    return RunResult(rec.records(requests), rec.last_time, None,
                     {"decode": d_runner.num_steps, "prefill": prefill_runner.num_steps},
                     {"decode": d_runner.busy_s, "prefill": prefill_runner.busy_s, "kv_transfer": prefill.transfer_s},
                     decode.scheduler.num_preemptions, d_blocks_n)


def gpu_memory_from_name(name: str) -> int | None:
    """Bytes of memory a GPU name states ('NVIDIA H100 80GB HBM3' -> 80 GiB), or None."""
    m = re.search(r"(\d+)\s*GB", name)
    if m:
        return int(m.group(1)) << 30
    known = {"H200": 141, "B200": 180, "MI300X": 192}
    for key, gb in known.items():
        if key in name:
            return gb << 30
    return None
