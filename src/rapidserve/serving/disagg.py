"""The disagg topology (the baseline the rapid mode is compared with): a prefill instance and a
decode instance, each with its own copy of the weights and its own KV pool; after a prefill the
prompt's KV is copied from the prefill instance's pool into blocks the decode instance allocated
in its pool.

It reuses the rapid topology's parts: the front (`RapidEngine`: queues, placement, failure
handling), the decode worker's request flow (`DecodeWorker`: it allocates the prompt's blocks in
its pool, hands the request over, takes the first token back, decodes) and the messages. What
differs:

- the decode instance shares only its KV cache tensor with the prefill instance (CUDA IPC
  through torch.multiprocessing on GPU, shared memory on CPU), never its model: the tensor is
  the destination of the copies;
- the prefill instance loads its own model and has its own pool and BlockManager
  (`DisaggPrefillScheduler`): whole prompts FCFS up to the token budget, into its own blocks
  (waiting when its pool is full); after the forward it copies each prompt's blocks into the
  decode instance's blocks with a device copy on its own stream (across devices with
  `--disagg-devices P,D`), synchronizes, and only then sends `PrefillDone`: the decode instance
  never starts a request whose KV has not fully arrived. A failed copy fails that request only
  (`PrefillFailed` -> the decode instance frees its blocks -> an output with finish_reason
  "error").
- Every copy is counted and timed (bytes, seconds) and reported to the front with the prefill
  pool's state (`TransferReport`); `stats().kv_transfer` carries the totals to /metrics.

Memory (`--disagg-memory-split F`, the prefill instance's share; `instance_config`):
- `--num-kv-blocks N`: each pool has N blocks (the split does not apply).
- CPU, or a fixed `--kv-cache-memory-bytes B` (CPU default 1 GiB): prefill F x B, decode (1-F) x B.
- One GPU, sized from memory: the decode instance sizes first, as the hybrid engine would with
  gpu_memory_utilization x (1-F): its pool = (1-F) x util x total - its peak (weights and the
  largest step) - memory outside torch (its CUDA context). The prefill instance starts sizing
  only once the decode instance holds everything (weights, pool, CUDA graphs) and takes what
  remains of util x total: util x total - the decode instance's use - its own peak - its context
  (about F x util x total minus its weights and activations).
- Two GPUs (`--disagg-devices P,D`): each instance is alone on its device and sizes as the hybrid
  engine does there (gpu_memory_utilization or --kv-cache-memory-bytes); the split does not apply.
The prefill instance runs eagerly (no CUDA graphs: its prompts are long), as rapid's does.

Test hook: the environment variable RAPIDSERVE_INJECT_KV_TRANSFER_FAILURE (comma-separated request
ids or fnmatch patterns, e.g. `7,cmpl-*-1`), read by the prefill instance when it starts, makes
the transfers of the requests it matches fail. An
environment variable rather than a config field: it is inherited by the spawned prefill process
and seen by a prefill thread alike, and it keeps a test-only switch out of EngineConfig, the CLI
and `LLM(...)`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from rapidserve.config import EngineConfig, parse_disagg_devices
from rapidserve.serving.front import KV_TRANSFER_BUCKETS, EngineStats, KVTransferStats
from rapidserve.kv.block_manager import BlockManager
from rapidserve.resources.partition import Partition, Partitioner, make_partitioner, round_to_granularity
from rapidserve.runner.model_runner import ModelRunner
from rapidserve.runner.setup import (
    _CPU_KV_BYTES,
    PreparedModel,
    device_memory_bytes,
    prepare_model,
    resolve_device,
)
from rapidserve.scheduler.disagg_prefill import DisaggPrefillScheduler
from rapidserve.serving import messages as m
from rapidserve.serving.liveness import StepClock, inject_step_hang
from rapidserve.serving.rapid import _START_TIMEOUT_S, RapidEngine, WorkerError
from rapidserve.serving.workers import (
    DecodeWorker,
    _generator_state,
    _worker_setup,
    first_message,
    request_of,
    drive,
    run_worker,
)

log = logging.getLogger("rapidserve.engine")

INJECT_FAILURE_ENV = "RAPIDSERVE_INJECT_KV_TRANSFER_FAILURE"


class KVTransferError(RuntimeError):
    """A prompt's KV could not be copied into the decode instance's pool."""


# ---- messages of this topology ---------------------------------------------------------------


@dataclass(frozen=True)
class SharedKV:
    """decode -> prefill instance, once: the decode pool's tensor, destination of the copies
    (a CUDA IPC handle or shared memory under process placement)."""

    kv_cache: Any  # [layers, 2, blocks, block_size, kv_heads, head_dim]


@dataclass(frozen=True)
class PrefillReady:
    """prefill instance -> front, once its model and pool exist."""

    num_kv_blocks: int


@dataclass(frozen=True)
class KVTransfer:
    request_id: str
    num_blocks: int
    num_bytes: int
    seconds: float  # from issuing the copy to its completion on the device


@dataclass(frozen=True)
class TransferReport:
    """prefill instance -> front, after each batch: its copies and its pool's state."""

    transfers: tuple[KVTransfer, ...]
    num_free_blocks: int
    num_blocks: int
    memory_bytes: int = 0  # GPU memory the prefill instance holds


# ---- configuration -------------------------------------------------------------------------


def instance_config(config: EngineConfig, role: str) -> EngineConfig:
    """The config an instance builds its model and KV pool from: its device and its share of
    memory (see the module's docstring)."""
    if config.disagg_devices is not None:
        p, d = parse_disagg_devices(config.disagg_devices)
        cfg = dataclasses.replace(config, device=f"cuda:{p if role == 'prefill' else d}")
        separate = p != d
    else:
        cfg, separate = config, False
    if role == "prefill":
        cfg = dataclasses.replace(cfg, enforce_eager=True)
    if separate or cfg.num_kv_blocks is not None:
        return cfg
    share = config.disagg_memory_split if role == "prefill" else 1.0 - config.disagg_memory_split
    if cfg.kv_cache_memory_bytes is not None or resolve_device(cfg.device).type == "cpu":
        budget = cfg.kv_cache_memory_bytes or _CPU_KV_BYTES
        return dataclasses.replace(cfg, kv_cache_memory_bytes=max(1, int(budget * share)))
    if role == "decode":
        return dataclasses.replace(cfg, gpu_memory_utilization=cfg.gpu_memory_utilization * share)
    return cfg  # sizes from what the decode instance left (it waits for SharedKV)


def apply_static_sm_split(config: EngineConfig, role: str) -> Partitioner | None:
    """On one GPU, give this instance its side of a static SM split (standing in for separate
    devices: decode the group of `--disagg-decode-sms` SMs, default half; prefill the remainder; through the resources
    layer's mechanism; each instance makes the same split) and run on that side's stream. Call
    it once the instance's device is set, before it builds anything; keep what it returns alive
    as long as the instance runs. Nothing to do on CPU or with the instances on two devices."""
    device = resolve_device(config.device)
    if device.type != "cuda":
        return None
    if config.disagg_devices is not None:
        p, d = parse_disagg_devices(config.disagg_devices)
        if p != d:
            return None
    side = "decode" if role == "decode" else "prefill"
    partitioner = make_partitioner(device, True, side)  # type: ignore[arg-type]
    if partitioner.total_sms < 2 * partitioner.granularity:
        log.warning("%s instance: this GPU cannot be partitioned; both instances may use every SM", role)
        return partitioner
    want = config.disagg_decode_sms or partitioner.total_sms // 2
    n = round_to_granularity(want, partitioner.granularity, partitioner.total_sms)
    if n != want and config.disagg_decode_sms:
        log.warning("%s instance: --disagg-decode-sms %d rounded to %d (multiples of %d)", role, want, n,
                    partitioner.granularity)
    split = Partition.split(n, partitioner.total_sms)
    (granted,) = partitioner.prepare([split])
    streams = partitioner.streams(split)
    stream = streams.decode if side == "decode" else streams.prefill
    assert stream is not None
    stream.wait_stream(torch.cuda.current_stream(device))
    torch.cuda.set_stream(stream)
    log.info("%s instance: static SM split %s (decode group %d SMs, prefill remainder %d)", role, split,
             granted.decode_sms, granted.prefill_sms)
    return partitioner


# ---- the KV copy -----------------------------------------------------------------------------


def copy_blocks(src: torch.Tensor, src_blocks: list[int], dst: torch.Tensor, dst_blocks: list[int]) -> int:
    """Copy whole KV blocks (every layer, K and V) from one cache tensor into another, possibly
    on another device; returns the bytes copied. Queued on the current streams: the caller
    synchronizes."""
    if len(src_blocks) != len(dst_blocks):
        raise KVTransferError(f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks")
    if src.element_size() == 1:
        # An FP8 pool moves as raw bytes (half a bf16 pool's): byte copies are defined on every
        # device and torch version, where index ops on float8 dtypes are not.
        src, dst = src.view(torch.uint8), dst.view(torch.uint8)
    src_idx = torch.tensor(src_blocks, dtype=torch.long, device=src.device)
    dst_idx = torch.tensor(dst_blocks, dtype=torch.long, device=dst.device)
    blocks = src.index_select(2, src_idx)  # [layers, 2, n, block_size, kv_heads, head_dim]
    dst.index_copy_(2, dst_idx, blocks.to(dst.device, non_blocking=True))
    return blocks.numel() * blocks.element_size()


def _synchronize(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.device.type == "cuda":
        torch.cuda.current_stream(src.device).synchronize()
    if dst.device.type == "cuda" and dst.device != src.device:
        torch.cuda.current_stream(dst.device).synchronize()


def _check_compatible(own: torch.Tensor, dest: torch.Tensor) -> None:
    if own.dtype != dest.dtype or own.shape[:2] != dest.shape[:2] or own.shape[3:] != dest.shape[3:]:
        raise ValueError(
            f"the prefill instance's KV pool {tuple(own.shape)} {own.dtype} does not match the decode "
            f"instance's {tuple(dest.shape)} {dest.dtype} (other than in the number of blocks)"
        )


# ---- decode instance -------------------------------------------------------------------------


class DecodeInstance(DecodeWorker):
    """The rapid decode worker over its own weights and pool, sharing only the pool's tensor."""

    def _share(self, prepared: PreparedModel, share: bool) -> None:
        """Only the pool's tensor, the destination of the copies (sent at the end of __init__,
        with the weights, the pool and the CUDA graphs allocated: on one GPU the prefill
        instance sizes its pool from what is left)."""
        tensor = prepared.cache.tensor
        if share and tensor.device.type == "cpu":
            tensor.share_memory_()  # before any view is taken: the prefill process writes these pages
        self._handoff = SharedKV(tensor)


# ---- prefill instance ------------------------------------------------------------------------


class PrefillInstanceTurns:
    """What the prefill instance does each turn, without threads, processes or a device: read its
    messages, run the next batch of whole prompts into its own pool, move each prompt's KV to the
    decode instance (`_transfer`) and report its first token, then its copies and pool to the
    front. `PrefillInstance` drives it on a device; the simulator on a virtual clock, with a
    `_transfer` that charges the copy's time."""

    def __init__(self, scheduler: DisaggPrefillScheduler, runner: Any, to_decode: Any, to_front: Any) -> None:
        self.scheduler = scheduler
        self.blocks = scheduler.blocks
        self.runner = runner
        self.to_decode, self.to_front = to_decode, to_front

    @property
    def idle(self) -> bool:
        return not self.scheduler.waiting

    def turn(self, msgs: list[Any]) -> bool:
        """One iteration of the instance's loop; False once told to stop (`Shutdown`)."""
        plog = logging.getLogger("rapidserve.prefill")
        sched = self.scheduler
        for msg in msgs:
            if isinstance(msg, m.PrefillWork):
                sched.add(request_of(msg, self.runner), msg.block_ids)
            elif isinstance(msg, m.CancelPrefill):
                # Not run yet: drop it. Otherwise its PrefillDone (or PrefillFailed) is on
                # the way, and the decode instance settles the abort when it arrives.
                if sched.drop(msg.request_id):
                    self.runner.release(msg.request_id)
                    self.to_decode.put(m.PrefillDropped(msg.request_id))
            elif isinstance(msg, m.Shutdown):
                plog.info("prefill instance stopping")
                return False
        batch = sched.schedule()
        for req in batch.unplaceable:
            self._fail(req.request_id, f"the request's {req.num_tokens} tokens need more KV blocks "
                                       f"than the prefill instance's pool has ({self.blocks.num_blocks})")
        if not batch.scheduled:
            return True
        result, failed = self.runner.submit_isolated(batch.scheduled)
        for f in failed:  # a step could not run it: fails this request only
            rid = f.scheduled.request.request_id
            sched.finish(rid)
            self._fail(rid, f.message)
        transfers = []
        tokens = result.tokens()
        prompt_logprobs = result.prompt_logprobs()
        for s, token, logprobs in zip(result.scheduled, tokens, result.logprobs()):
            rid = s.request.request_id
            try:
                transfers.append(self._transfer(rid))
            except Exception as e:  # noqa: BLE001 - fails this request only
                plog.warning("prefill: KV transfer of request %s failed: %s", rid, e)
                sched.finish(rid)
                self._fail(rid, f"KV transfer to the decode instance failed: {e}")
                continue
            sched.finish(rid)
            self.to_decode.put(m.PrefillDone(rid, token, _generator_state(self.runner, rid), logprobs,
                                             prompt_logprobs.get(rid)))
        self.to_front.put(TransferReport(tuple(transfers), self.blocks.num_free_blocks, self.blocks.num_blocks,
                                         device_memory_bytes(self.runner.device)))
        return True

    def _transfer(self, request_id: str) -> KVTransfer:
        """Copy the request's prompt KV into its blocks of the decode instance's pool and wait
        until it has arrived."""
        raise NotImplementedError

    def _fail(self, request_id: str, message: str) -> None:
        self.runner.release(request_id)
        self.to_decode.put(m.PrefillFailed(request_id, message))


class PrefillInstance(PrefillInstanceTurns):
    """The prefill instance on a device: its own model and pool, copying KV into the decode
    instance's pool tensor."""

    def __init__(self, config: EngineConfig, inbox: Any, to_decode: Any, to_front: Any, dest: torch.Tensor,
                 clock: StepClock | None = None) -> None:
        self.inbox = inbox
        self.clock = clock or StepClock(None)
        prepared = prepare_model(config)
        self.cache = prepared.cache
        _check_compatible(self.cache.tensor, dest)
        self.dest = dest
        blocks = BlockManager(self.cache.num_blocks, config.block_size)
        # NOTE: token-level stop rules are the decode instance's; this one only samples the
        # first token (with EOS banned below min_tokens).
        runner = ModelRunner(
            prepared.loaded.model, self.cache, blocks, prepared.device, prepared.eos_token_ids,
            prepared.backend, prepared.loaded.max_model_len,
        )
        super().__init__(DisaggPrefillScheduler(blocks, config.max_num_batched_tokens), runner, to_decode, to_front)
        self.inject_failures = [p for p in os.environ.get(INJECT_FAILURE_ENV, "").split(",") if p]
        inject_step_hang("prefill", self.runner)
        to_front.put(PrefillReady(self.cache.num_blocks))

    def run(self) -> None:
        drive(self, self.inbox, self.clock)

    def _transfer(self, request_id: str) -> KVTransfer:
        """Copy the request's prompt KV into its blocks of the decode instance's pool and wait
        until it has arrived."""
        own, dest = self.scheduler.transfer_plan(request_id)
        if any(fnmatch.fnmatchcase(request_id, p) for p in self.inject_failures):
            raise KVTransferError(f"injected failure ({INJECT_FAILURE_ENV})")
        t0 = time.perf_counter()
        num_bytes = copy_blocks(self.cache.tensor, own, self.dest, dest)
        _synchronize(self.cache.tensor, self.dest)
        return KVTransfer(request_id, len(own), num_bytes, time.perf_counter() - t0)


# ---- entry points (a thread's or a process's target) -----------------------------------------


def decode_instance_main(config: EngineConfig, inbox: Any, to_prefill: Any, to_front: Any, share: bool,
                         step_slot: Any = None) -> None:
    def body() -> None:
        _worker_setup(config)
        split = apply_static_sm_split(config, "decode")  # noqa: F841 - kept alive while it runs
        DecodeInstance(config, inbox, to_prefill, to_front, share, StepClock(step_slot)).run()

    run_worker("decode", to_prefill, to_front, body)


def prefill_instance_main(config: EngineConfig, inbox: Any, to_decode: Any, to_front: Any,
                          step_slot: Any = None) -> None:
    def body() -> None:
        shared = first_message(inbox, SharedKV)  # the decode instance's pool: where the copies go
        if shared is None:
            return
        _worker_setup(config)
        split = apply_static_sm_split(config, "prefill")  # noqa: F841 - kept alive while it runs
        PrefillInstance(config, inbox, to_decode, to_front, shared.kv_cache, StepClock(step_slot)).run()

    run_worker("prefill", to_decode, to_front, body)


# ---- the front -------------------------------------------------------------------------------


class _TransferTally:
    """The front's running totals of the transfers reported so far."""

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.seconds = 0.0
        self.buckets = [0] * len(KV_TRANSFER_BUCKETS)
        self.prefill_free_blocks = 0
        self.prefill_total_blocks = 0
        self.prefill_memory_bytes = 0

    def add(self, report: TransferReport) -> None:
        for t in report.transfers:
            self.count += 1
            self.bytes += t.num_bytes
            self.seconds += t.seconds
            for i, bound in enumerate(KV_TRANSFER_BUCKETS):
                if t.seconds <= bound:
                    self.buckets[i] += 1
        self.prefill_free_blocks, self.prefill_total_blocks = report.num_free_blocks, report.num_blocks
        self.prefill_memory_bytes = report.memory_bytes

    def snapshot(self) -> KVTransferStats:
        return KVTransferStats(self.count, self.bytes, self.seconds, tuple(self.buckets),
                               self.prefill_free_blocks, self.prefill_total_blocks, self.prefill_memory_bytes)


class DisaggEngine(RapidEngine):
    """The disagg topology's front: RapidEngine's, over a decode and a prefill instance."""

    mode = "disagg"

    def __init__(self, config: EngineConfig) -> None:
        if config.disagg_devices is not None:
            p, d = parse_disagg_devices(config.disagg_devices)
            if torch.cuda.device_count() <= max(p, d):
                raise ValueError(f"disagg_devices {config.disagg_devices!r} names CUDA devices, but "
                                 f"torch sees {torch.cuda.device_count()}")
        self.transfers = _TransferTally()
        self.decode_num_kv_blocks = self.prefill_num_kv_blocks = 0
        super().__init__(config)

    def _worker_targets(self) -> dict[str, tuple[Any, tuple[Any, ...]]]:
        cfg = self.config
        return {
            "decode": (decode_instance_main, (instance_config(cfg, "decode"), self.to_decode,
                                              self.to_prefill, self.to_front, self.placement == "process",
                                              self.steps.slots["decode"])),
            "prefill": (prefill_instance_main, (instance_config(cfg, "prefill"), self.to_prefill,
                                                self.to_decode, self.to_front, self.steps.slots["prefill"])),
        }

    def _start_workers(self) -> None:
        super()._start_workers()  # returns once the decode instance is Ready
        # NOTE: the prefill instance reports only after the decode instance's Ready (it waits
        # for SharedKV, sent after Ready), so RapidEngine's start-up loop cannot have eaten it.
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            msg = self._next_message(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if isinstance(msg, PrefillReady):
                break
            if msg is None and time.monotonic() > deadline:
                self.shutdown()
                raise WorkerError("the disagg topology's prefill instance did not start in time")
        self.decode_num_kv_blocks, self.prefill_num_kv_blocks = self.num_kv_blocks, msg.num_kv_blocks
        self.transfers.prefill_free_blocks = self.transfers.prefill_total_blocks = msg.num_kv_blocks
        # NOTE: add_request checks a request against num_kv_blocks: here it must fit in both
        # pools (the prefill instance holds all its tokens again after a preemption).
        self.num_kv_blocks = min(self.decode_num_kv_blocks, self.prefill_num_kv_blocks)
        log.info("disagg topology up: decode KV %d blocks, prefill KV %d blocks of %d",
                 self.decode_num_kv_blocks, self.prefill_num_kv_blocks, self.block_size)

    def _on_report(self, msg: Any) -> None:
        if isinstance(msg, TransferReport):
            self.transfers.add(msg)

    def stats(self) -> EngineStats:
        """As of the instances' latest reports; KV blocks are the decode instance's."""
        s = self.worker_stats
        if s is None:
            n = self.decode_num_kv_blocks
            base = EngineStats(0, 0, n, n, 0)
        else:
            base = EngineStats(s.num_running, s.num_waiting + s.num_prefilling, s.num_free_blocks,
                               s.num_blocks, s.num_preemptions, memory_bytes=s.memory_bytes)
        return base._replace(kv_transfer=self.transfers.snapshot())
