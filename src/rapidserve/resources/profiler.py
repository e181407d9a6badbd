"""`rapidserve profile`: measures, on the target device and model, what the partitioning policies
decide from (resources/profile.py), and writes it as JSON.

For each partition (every decode SM count asked for, and the whole device):
- decode step latency at each context length × batch size, alone and beside a running prefill:
  the batch's steps (`_DecodeRunner`: the decode worker's runner call, on KV blocks that were
  never prefilled) are timed on the decode side's stream, while a second thread runs
  whole-prompt prefill steps on the prefill side's stream (for the whole device: a second
  full-device stream, i.e. over-allocation);
- prefill latency of each prompt length on the prefill side's SMs, alone and beside decode
  steps of a fixed batch (--beside-decode-batch sequences at the shortest --context-lens) run back
  to back in a second thread on the decode side's stream (the whole device: over-allocation).

Schema version 3 adds what the step-cost model (resources/cost_model.py) needs:
- decode beside long prompts: each partition's decode steps at --beside-prompt-context-lens ×
  --beside-prompt-batches beside whole prompts of each --beside-prompt-tokens length run back to
  back on the prefill side (the decode table's own beside grid has one prompt length);
- hybrid steps on the whole device (after the partitions, with the engine's graphs, piecewise
  ones included): one chunk of each --hybrid-chunks length at each --hybrid-context-lens offset
  plus each --hybrid-batches decode batch at that context;
- the host overhead: a synchronous decode step's wall time less its time when steps are queued
  back to back (what the device does not overlap; on CPU the host is the device: about 0);
- KV transfers: copies of --kv-transfer-blocks KV blocks between two block sets of the cache
  (the disagg topology's copy on one GPU);
- the model's shapes (weight bytes, KV bytes per token, FLOPs), and the model's fit errors per
  table, printed and stored.

Decode CUDA graphs keep the partition they were captured on, so they are captured again on each
partition's decode stream. Prefill runs eagerly, as the rapid topology's prefill worker does.
Without SM partitioning (CPU, or no mechanism) there is one partition, the whole device; the
profile says so (`metadata.partitioning` "none" and a note).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rapidserve.bench.latency import _int_list
from rapidserve.bench.throughput import BENCH_ENGINE_DEFAULTS
from rapidserve.entrypoints.args import add_engine_args, engine_config_from_args
from rapidserve.kv.block_manager import blocks_needed
from rapidserve.request import Request
from rapidserve.resources.partition import (
    Partition,
    Partitioner,
    default_decode_sm_counts,
    make_partitioner,
    mechanism,
    use_stream,
)
from rapidserve.resources.cost_model import PrefillLoad, StepCostModel
from rapidserve.resources.profile import (
    DecodeBesidePromptsTable,
    DecodeTable,
    DtypeLabel,
    HybridTable,
    KVTransferTable,
    ModelShape,
    PrefillTable,
    Profile,
    ProfileMetadata,
)
from rapidserve.resources.profile_derive import DEFAULT_FP8_FLOPS_SCALE
from rapidserve.runner.model_runner import ModelRunner
from rapidserve.sampling_params import SamplingParams
from rapidserve.scheduler.chunked import ScheduledRequest
from rapidserve.scheduler.prefill import PrefillTables

_PREFILL_ID = "profile-prefill"
_DECODE_ID = "profile-decode-{}"


class _PrefillRunner:
    """Whole-prompt prefill steps on the engine's model and cache, into blocks reserved from the
    engine's block manager (so the timed decodes never share them): the prefill worker's path."""

    def __init__(self, engine: Any, max_tokens: int) -> None:
        self.engine = engine
        if max_tokens + 1 > engine.max_model_len:
            raise ValueError(f"prefill of {max_tokens} tokens does not fit max_model_len {engine.max_model_len}")
        if not engine.blocks.allocate(_PREFILL_ID, max_tokens):
            raise ValueError(f"the KV cache has no room for a {max_tokens}-token prompt to profile prefill "
                             "with: give it more memory (--kv-cache-memory-bytes, --num-kv-blocks)")
        tables = PrefillTables(engine.blocks.block_size)
        tables.set(_PREFILL_ID, list(engine.blocks.block_table(_PREFILL_ID)))
        self.runner = ModelRunner(engine.runner.model, engine.cache, tables, engine.device,
                                  engine.eos_token_ids, engine.backend, engine.max_model_len)
        self.vocab = engine.model_config.vocab_size

    def close(self) -> None:
        self.engine.blocks.free(_PREFILL_ID)

    def step(self, tokens: int, rng: random.Random) -> None:
        """One prompt of `tokens` tokens to its first token, on the current stream (the
        sampled token's copy to the host waits for this stream only)."""
        prompt = [rng.randrange(self.vocab) for _ in range(tokens)]
        req = Request(_PREFILL_ID, prompt, SamplingParams(temperature=0.0, max_tokens=1), 1)
        self.runner.execute([ScheduledRequest(req, 0, tokens, True)])

    def time(self, stream: torch.cuda.Stream | None, tokens: int, repeats: int, rng: random.Random) -> float:
        """Median seconds of `repeats` prefills after one untimed."""
        times = []
        with use_stream(stream):
            for i in range(repeats + 1):
                t = time.perf_counter()
                self.step(tokens, rng)
                if i:
                    times.append(time.perf_counter() - t)
        return statistics.median(times)

    def beside(self, stream: torch.cuda.Stream | None, tokens: int,
               seed: int) -> contextlib.AbstractContextManager[None]:
        """Prefill steps back to back in a second thread while the body runs."""
        rng = random.Random(seed)
        return _back_to_back(lambda: self.step(tokens, rng), stream, "prefill")


@contextlib.contextmanager
def _decode_tables(engine: Any) -> Iterator[PrefillTables]:
    """The engine runner's block tables for the body: set by each `_DecodeRunner` (the idle
    engine's runner steps nothing else while the profile runs)."""
    runner = engine.runner
    saved = runner.blocks
    runner.blocks = tables = PrefillTables(saved.block_size)
    try:
        yield tables
    finally:
        runner.blocks = saved


class _DecodeRunner:
    """Decode steps of a fixed batch through the engine's runner (its decode graphs, captured on
    the partition's decode stream by `_recapture`), on blocks reserved from the engine's block
    manager: the decode worker's path, without its scheduler.

    NOTE: every step recomputes the token at position `context` of each sequence (its KV slot is
    overwritten), so the batch and context stay fixed however many steps run. The KV before it
    is whatever the cache holds (zeros): a step's cost does not depend on the values. So a batch
    that needs more blocks than are free takes every free block and its sequences' tables run
    through them cyclically (several sequences read the same blocks, far apart: each layer's
    share of the pool is many times the L2 cache), and the grid reaches any batch and context."""

    def __init__(self, engine: Any, tables: PrefillTables, batch: int, context: int) -> None:
        self.engine = engine
        self.tables = tables
        if context + 1 > engine.max_model_len:
            raise ValueError(f"decode at context {context} does not fit max_model_len {engine.max_model_len}")
        prefix = f"{_DECODE_ID.format(id(self))}-"
        self.pool_id = prefix + "pool"
        bs = engine.blocks.block_size
        per_seq = blocks_needed(context + 1, bs)
        free = engine.blocks.num_free_blocks
        if per_seq > free:
            raise ValueError(f"the KV cache has no room for one sequence at context {context} ({per_seq} blocks, "
                             f"{free} free): give it more memory (--kv-cache-memory-bytes, --num-kv-blocks) or "
                             "lower --context-lens")
        pool_n = min(batch * per_seq, free)
        engine.blocks.allocate(self.pool_id, pool_n * bs)  # fits: pool_n <= free
        pool = engine.blocks.block_table(self.pool_id)
        self.shared = pool_n < batch * per_seq  # some sequences read the same blocks
        params = SamplingParams(temperature=0.0, max_tokens=1)
        self.scheduled = []
        for i in range(batch):
            rid = f"{prefix}{i}"
            tables.set(rid, [pool[(i * per_seq + j) % pool_n] for j in range(per_seq)])
            self.scheduled.append(ScheduledRequest(Request(rid, [0] * (context + 1), params, 1), context, 1, True))

    def close(self) -> None:
        for s in self.scheduled:
            self.tables.drop(s.request.request_id)
            self.engine.runner.release(s.request.request_id)
        self.engine.blocks.free(self.pool_id)

    def step(self) -> None:
        """One decode step of the whole batch, on the current stream (waits for its tokens
        only, as the decode worker does)."""
        self.engine.runner.execute(self.scheduled)

    def beside(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[None]:
        """Decode steps back to back in a second thread while the body runs."""
        return _back_to_back(self.step, stream, "decode")


@contextlib.contextmanager
def _back_to_back(step: Callable[[], None], stream: torch.cuda.Stream | None, phase: str) -> Iterator[None]:
    """`step()` over and over on `stream` in a second thread while the body runs (it times the
    other phase); the body starts once the thread is in its loop. An error in the thread is
    raised here when the body ends."""
    stop, started = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def loop() -> None:
        try:
            with use_stream(stream):
                while not stop.is_set():
                    started.set()
                    step()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(e)
            started.set()

    thread = threading.Thread(target=loop, name=f"profile-{phase}", daemon=True)
    thread.start()
    started.wait()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:
        other = "prefill" if phase == "decode" else "decode steps"
        raise RuntimeError(f"the {phase} beside the {other} failed: {failed[0]!r}") from failed[0]


def _recapture(engine: Any, stream: torch.cuda.Stream | None, num_sms: int, piecewise: bool = False) -> None:
    """Capture the engine's decode graphs again on the decode stream of the partition to be
    measured (the runner captures on the current stream; the prompts that fill the batch then
    run eagerly); with `piecewise`, the mixed steps' graphs too (the hybrid engine's set).
    Without partition streams the engine's own graphs (piecewise ones included) stay."""
    if not engine.use_graphs or stream is None:
        return
    runner = engine.runner
    runner.drop_graphs()
    gc.collect()
    torch.cuda.synchronize(engine.device)
    torch.cuda.empty_cache()
    with use_stream(stream):
        runner.use_partition(None, num_sms)
        runner.capture_graphs(engine.config.max_num_seqs, engine.config.max_num_batched_tokens, piecewise=piecewise)


def _decode_ms(engine: Any, tables: PrefillTables, stream: torch.cuda.Stream | None, batch: int, context: int,
               args: argparse.Namespace) -> tuple[float, bool]:
    """(median milliseconds of a decode step of `batch` sequences at `context` tokens on `stream`,
    after --warmup-steps untimed ones; whether its sequences shared KV blocks).

    NOTE: the sequences' prompts are not prefilled (a step's cost does not depend on the KV's
    values; see _DecodeRunner): filling a batch of 128 at 4K context through a 16-SM partition
    took minutes per point. A step is timed from the call to its tokens on the host, input
    preparation included (the decode worker overlaps that with the device's previous step)."""
    runner = _DecodeRunner(engine, tables, batch, context)
    try:
        with use_stream(stream):
            for _ in range(args.warmup_steps):
                runner.step()
            times = []
            t = time.perf_counter()
            for _ in range(args.num_steps):
                runner.step()
                now = time.perf_counter()
                times.append(now - t)
                t = now
    finally:
        runner.close()
    return statistics.median(times) * 1e3, runner.shared


class _ChunkRunner:
    """One prefill chunk of `tokens` tokens at offset `context` (its KV before it on blocks that
    were never written: a step's cost does not depend on the values; more blocks than are free
    cycle, as `_DecodeRunner`'s do), sampling its last token as a prompt's last chunk does."""

    def __init__(self, engine: Any, tables: PrefillTables, tokens: int, context: int, keep_free: int) -> None:
        self.engine, self.tables = engine, tables
        if context + tokens + 1 > engine.max_model_len:
            raise ValueError(f"a chunk of {tokens} at offset {context} does not fit max_model_len "
                             f"{engine.max_model_len}")
        bs = engine.blocks.block_size
        need = blocks_needed(context + tokens, bs)
        n = min(need, engine.blocks.num_free_blocks - keep_free)
        if n < 1:
            raise ValueError("the KV cache has no room for a hybrid step's chunk: give it more memory "
                             "(--kv-cache-memory-bytes, --num-kv-blocks)")
        self.rid = f"{_DECODE_ID.format(id(self))}-chunk"
        engine.blocks.allocate(self.rid, n * bs)
        pool = engine.blocks.block_table(self.rid)
        tables.set(self.rid, [pool[j % n] for j in range(need)])
        req = Request(self.rid, [0] * (context + tokens), SamplingParams(temperature=0.0, max_tokens=1), 1)
        self.scheduled = ScheduledRequest(req, context, tokens, True)

    def close(self) -> None:
        self.tables.drop(self.rid)
        self.engine.runner.release(self.rid)
        self.engine.blocks.free(self.rid)


def _timed(step: Callable[[], None], args: argparse.Namespace) -> float:
    """Median ms of --num-steps calls of `step` after --warmup-steps untimed ones."""
    for _ in range(args.warmup_steps):
        step()
    times = []
    for _ in range(args.num_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _hybrid_table(engine: Any, tables: PrefillTables, stream: torch.cuda.Stream | None, args: argparse.Namespace,
                  log: Any) -> HybridTable:
    """Hybrid steps on the whole device: decodes first, then the chunk (the chunked scheduler's
    order), through the engine's runner."""
    grid = []
    bs = engine.blocks.block_size
    for n in args.hybrid_chunks:
        rows = []
        for b in args.hybrid_batches:
            row = []
            for c in args.hybrid_context_lens:
                chunk = _ChunkRunner(engine, tables, n, c, blocks_needed(c + 1, bs) if b else 0)
                decode = _DecodeRunner(engine, tables, b, c) if b else None
                try:
                    step = (decode.scheduled if decode else []) + [chunk.scheduled]
                    with use_stream(stream):
                        row.append(_timed(lambda: engine.runner.execute(step), args))
                finally:
                    if decode is not None:
                        decode.close()
                    chunk.close()
                log(f"hybrid: chunk {n:>5} at {c:>6} + {b:>4} decodes: {row[-1]:8.3f} ms")
            rows.append(row)
        grid.append(rows)
    return HybridTable(tuple(args.hybrid_chunks), tuple(args.hybrid_batches), tuple(args.hybrid_context_lens),
                       _tup(grid))


def _host_overhead_ms(engine: Any, tables: PrefillTables, stream: torch.cuda.Stream | None, context: int,
                      args: argparse.Namespace) -> float:
    """A decode step of one sequence, waited for one at a time, less the same steps queued back
    to back (the device then runs them without waiting for the host): the host time per step
    that the device does not overlap. On CPU both are the same work: about 0."""
    runner = _DecodeRunner(engine, tables, 1, context)
    try:
        with use_stream(stream):
            sync = _timed(runner.step, args)
            for _ in range(args.warmup_steps):
                runner.step()
            t = time.perf_counter()
            last = None
            for _ in range(args.num_steps):
                last = engine.runner.submit(runner.scheduled)
            assert last is not None
            last.tokens()
            if engine.device.type == "cuda":
                torch.cuda.current_stream(engine.device).synchronize()
            queued = 1e3 * (time.perf_counter() - t) / args.num_steps
    finally:
        runner.close()
    return max(0.0, sync - queued)


def _kv_transfer_table(engine: Any, stream: torch.cuda.Stream | None, args: argparse.Namespace,
                       log: Any) -> KVTransferTable:
    """Copies of n KV blocks from one block set of the cache to another (the disagg prefill
    instance's `copy_blocks`, waited for as it waits)."""
    from rapidserve.serving.disagg import copy_blocks

    blocks, bs = engine.blocks, engine.blocks.block_size
    sizes, times = [], []
    for n in args.kv_transfer_blocks:
        if 2 * n > blocks.num_free_blocks:
            log(f"kv transfer: {n} blocks skipped: {blocks.num_free_blocks} free, two sets needed")
            continue
        src_id, dst_id = f"{_PREFILL_ID}-kv-src", f"{_PREFILL_ID}-kv-dst"
        blocks.allocate(src_id, n * bs)
        blocks.allocate(dst_id, n * bs)
        try:
            src, dst = list(blocks.block_table(src_id)), list(blocks.block_table(dst_id))
            tensor = engine.cache.tensor
            nbytes = 0

            def copy() -> None:
                nonlocal nbytes
                nbytes = copy_blocks(tensor, src, tensor, dst)
                if tensor.device.type == "cuda":
                    torch.cuda.current_stream(tensor.device).synchronize()

            with use_stream(stream):
                ms = _timed(copy, args)
        finally:
            blocks.free(src_id)
            blocks.free(dst_id)
        sizes.append(nbytes)
        times.append(ms)
        log(f"kv transfer: {n} blocks ({nbytes / 2**20:.1f} MiB): {ms:.3f} ms ({nbytes / ms / 1e6:.1f} GB/s)")
    if not sizes:
        raise ValueError("no --kv-transfer-blocks size fits the KV cache twice: lower them")
    return KVTransferTable(tuple(sizes), tuple(times))


def run_profile(engine: Any, partitioner: Partitioner, decode_sm_counts: list[int],
                args: argparse.Namespace, log: Any = print) -> Profile:
    """Measure every table of the profile (see the module's doc) with an idle LLMEngine."""
    total = partitioner.total_sms
    parts = [Partition.split(n, total) for n in decode_sm_counts] + [Partition.FULL]
    for g in partitioner.prepare(parts):
        log(f"partition {g.partition}: decode {g.decode_sms} SMs, prefill {g.prefill_sms} SMs")
    granted = {g.partition: g for g in partitioner.granted()}
    rng = random.Random(engine.config.seed)
    prefill = _PrefillRunner(engine, max(max(args.prompt_tokens), args.beside_prefill_tokens,
                                         max(args.beside_prompt_tokens or [0])))
    prompts_beside: dict[int, list] = {n: [] for n in args.beside_prompt_tokens or []}  # [prompt][sm][ctx][batch]
    hybrid = host_ms = transfer = None
    alone: list[list[list[float]]] = []
    beside: list[list[list[float]]] = []
    prefill_ms: dict[int, list[float]] = {}
    prefill_beside_ms: dict[int, list[float]] = {}
    decode_context = min(args.context_lens)
    sm_counts: list[int] = []
    try:
        with _decode_tables(engine) as tables:
            for p in parts:
                streams = partitioner.streams(p)
                d_sms = granted[p].decode_sms if not p.is_full else total
                p_sms = granted[p].prefill_sms if not p.is_full else total
                sm_counts.append(d_sms)
                _recapture(engine, streams.decode, d_sms)
                a_rows, b_rows = [], []
                for context in args.context_lens:
                    a_row, b_row = [], []
                    for batch in args.batch_sizes:
                        ms, shared = _decode_ms(engine, tables, streams.decode, batch, context, args)
                        a_row.append(ms)
                        with prefill.beside(streams.prefill, args.beside_prefill_tokens, rng.randrange(1 << 30)):
                            b_row.append(_decode_ms(engine, tables, streams.decode, batch, context, args)[0])
                        log(f"{p}: decode batch {batch:>4} context {context:>6}: {a_row[-1]:8.3f} ms alone, "
                            f"{b_row[-1]:8.3f} ms beside a prefill" + (" (KV blocks shared: the batch exceeds "
                                                                        "the cache)" if shared else ""))
                    a_rows.append(a_row)
                    b_rows.append(b_row)
                alone.append(a_rows)
                beside.append(b_rows)
                for n in args.beside_prompt_tokens or []:
                    # NOTE: one prefill thread for the whole grid: leaving it waits out a long step.
                    with prefill.beside(streams.prefill, n, rng.randrange(1 << 30)):
                        grid = [[_decode_ms(engine, tables, streams.decode, b, c, args)[0]
                                 for b in args.beside_prompt_batches] for c in args.beside_prompt_context_lens]
                    prompts_beside[n].append(grid)
                    log(f"{p}: decode beside {n}-token prompts: " + ", ".join(
                        f"batch {b} context {c} {grid[i][j]:.3f} ms"
                        for i, c in enumerate(args.beside_prompt_context_lens)
                        for j, b in enumerate(args.beside_prompt_batches)))
                if p_sms not in prefill_ms:
                    prefill_ms[p_sms] = [1e3 * prefill.time(streams.prefill, n, args.prefill_repeats, rng)
                                         for n in args.prompt_tokens]
                    # NOTE: the decode batch's blocks are held only here: the decode grid above needs
                    # the room.
                    decode = _DecodeRunner(engine, tables, args.beside_decode_batch, decode_context)
                    try:
                        with decode.beside(streams.decode):
                            prefill_beside_ms[p_sms] = [
                                1e3 * prefill.time(streams.prefill, n, args.prefill_repeats, rng)
                                for n in args.prompt_tokens]
                    finally:
                        decode.close()
                    log(f"{p}: prefill on {p_sms} SMs: " + ", ".join(
                        f"{n} tok {ms:.3f} ms ({b:.3f} ms beside a decode)"
                        for n, ms, b in zip(args.prompt_tokens, prefill_ms[p_sms], prefill_beside_ms[p_sms])))
            # The whole device, as the hybrid engine runs: its graphs, piecewise ones included.
            full = partitioner.streams(Partition.FULL).decode
            _recapture(engine, full, total, piecewise=True)
            if args.hybrid_chunks:
                hybrid = _hybrid_table(engine, tables, full, args, log)
            host_ms = _host_overhead_ms(engine, tables, full, min(args.context_lens), args)
            log(f"host overhead per step: {host_ms:.3f} ms")
        prefill.close()
        prefill = None
        if args.kv_transfer_blocks:
            transfer = _kv_transfer_table(engine, full, args, log)
    finally:
        if prefill is not None:
            prefill.close()
    partitioned = bool(decode_sm_counts)
    kind = mechanism(engine.device) if partitioned else "none"
    note = "" if partitioned else (
        f"SM partitioning unavailable on {engine.device} ({type(partitioner).__name__}): one partition, "
        "the whole device")
    if sm_counts != sorted(set(sm_counts)):
        raise RuntimeError(f"the partitions' decode SM counts are not distinct and increasing: {sm_counts}")
    psms = sorted(prefill_ms)
    from rapidserve import __version__

    device = engine.device
    meta = ProfileMetadata(
        gpu_name=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        total_sms=total, sm_granularity=partitioner.granularity if partitioned else 1,
        partitioning=kind, model=engine.model_name, dtype=_dtype_label(engine),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        rapidserve_version=__version__, prefill_tokens_beside=args.beside_prefill_tokens, notes=note,
        decode_batch_beside=args.beside_decode_batch, decode_context_beside=decode_context,
    )
    profile = Profile(
        meta,
        DecodeTable(tuple(sm_counts), tuple(args.context_lens), tuple(args.batch_sizes),
                    _tup(alone), _tup(beside)),
        PrefillTable(tuple(psms), tuple(args.prompt_tokens), _tup([prefill_ms[n] for n in psms]),
                     _tup([prefill_beside_ms[n] for n in psms])),
        model_shape=ModelShape.from_config(engine.model_config, meta.dtype),
        hybrid=hybrid,
        decode_beside_prompts=None if not prompts_beside else DecodeBesidePromptsTable(
            tuple(prompts_beside), tuple(sm_counts), tuple(args.beside_prompt_context_lens),
            tuple(args.beside_prompt_batches), _tup([prompts_beside[n] for n in prompts_beside])),
        kv_transfer=transfer,
        host_overhead_ms=host_ms,
    )
    # The step-cost model on what was measured: its errors per table, printed and stored.
    model = StepCostModel.from_profile(profile)
    log(model.describe())
    return dataclasses.replace(profile, fit_errors=dict(model.fit_errors))


def _tup(x: Any) -> Any:
    return tuple(_tup(v) for v in x) if isinstance(x, list) else x


# ---- how long a grid takes ---------------------------------------------------------------------

# NOTE: calibrated on the 2026-11-23 H100 profile run (stage `profile`: 4 splits and the whole
# device, batches 1,16,64,128 x contexts 1024,2560, prompts 2048,8192, 8 steps): 66 s in all,
# of which the step-cost model of that profile prices the timed steps at 39.5 s; the rest
# (engine start, the decode graphs captured again per partition, the blocks set up per point)
# is charged per partition.
PARTITION_OVERHEAD_S = 5.3


def estimate_seconds(model: StepCostModel, decode_sm_counts: list[int], args: argparse.Namespace) -> dict[str, float]:
    """Seconds each part of `run_profile` takes with these arguments, priced by a step-cost model
    of the same GPU and model (e.g. an earlier profile): `--estimate-from`."""
    total = model.total_sms
    parts = [(n, total - n) for n in decode_sm_counts] + [(total, total)]
    steps = args.warmup_steps + args.num_steps
    host = model.host_overhead_s
    out = {"decode": 0.0, "decode beside prompts": 0.0, "prefill": 0.0, "hybrid": 0.0, "overhead": 0.0}
    p0 = [PrefillLoad(args.beside_prefill_tokens)]
    for d_sms, p_sms in parts:
        dec = None if d_sms >= total else d_sms
        pre = None if d_sms >= total else p_sms
        out["overhead"] += PARTITION_OVERHEAD_S
        for c in args.context_lens:
            for b in args.batch_sizes:
                out["decode"] += steps * (model.decode_step_s(b, b * c, dec) + model.decode_step_s(b, b * c, dec, p0)
                                          + 2 * host)
                # leaving the prefill thread waits out half a prefill step on average
                out["decode"] += 0.5 * model.prefill_step_s(p0, pre, (b, b * c))
        for n in args.beside_prompt_tokens or []:
            load = [PrefillLoad(n)]
            for c in args.beside_prompt_context_lens:
                for b in args.beside_prompt_batches:
                    out["decode beside prompts"] += steps * (model.decode_step_s(b, b * c, dec, load) + host)
            out["decode beside prompts"] += 0.5 * model.prefill_step_s(load, pre, (args.beside_prompt_batches[-1], 1))
        beside = (args.beside_decode_batch, args.beside_decode_batch * min(args.context_lens))
        for n in args.prompt_tokens:
            out["prefill"] += (args.prefill_repeats + 1) * (model.prefill_step_s([PrefillLoad(n)], pre)
                                                            + model.prefill_step_s([PrefillLoad(n)], pre, beside))
    for n in args.hybrid_chunks or []:
        for b in args.hybrid_batches:
            for c in args.hybrid_context_lens:
                out["hybrid"] += steps * (model.hybrid_step_s([PrefillLoad(n, c)], b, b * c) + host)
    if args.hybrid_chunks:
        out["overhead"] += PARTITION_OVERHEAD_S  # the piecewise graphs
    out["total"] = sum(out.values())
    return out


# ---- command ---------------------------------------------------------------------------------


def _sorted_list(text: str) -> list[int]:
    return sorted(set(_int_list(text)))


def _optional_list(text: str) -> list[int]:
    """A list, or "none": that table is not measured."""
    return [] if text.strip().lower() == "none" else _sorted_list(text)


def _list_from_zero(text: str) -> list[int]:
    """Comma-separated whole numbers, 0 allowed (a hybrid step without decodes, a chunk at offset 0)."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or values[0] < 0:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 0, got {text!r}")
    return values


def _dtype_label(engine: Any) -> str:
    """The compute dtype, and FP8 weights / KV when on: a profile measured with them holds
    other step times."""
    return str(DtypeLabel(str(engine.dtype).replace("torch.", ""), engine.config.quantization == "fp8",
                          engine.config.kv_cache_dtype != "auto"))


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profile")
    g.add_argument("--output", required=True, help="write the profile (JSON) here")
    g.add_argument("--batch-sizes", type=_sorted_list, default=[1, 16, 64, 128],
                   help="decode batch sizes, comma-separated")
    g.add_argument("--context-lens", type=_sorted_list, default=[1024, 4096, 16384],
                   help="prompt lengths the decodes run at, comma-separated")
    g.add_argument("--sm-counts", type=_sorted_list, default=None,
                   help="decode SM counts, comma-separated (default: every other multiple of the device's "
                        "granularity from two granules up to half the SMs, 16,32,48,64 on an H100; the whole device "
                        "is always added)")
    g.add_argument("--prompt-tokens", type=_sorted_list, default=[512, 2048, 8192],
                   help="prompt lengths of the prefill timings, comma-separated")
    g.add_argument("--beside-prefill-tokens", type=int, default=2048,
                   help="prompt length of the prefill run beside the timed decode steps")
    g.add_argument("--beside-decode-batch", type=int, default=64,
                   help="sequences in the decode steps run beside the timed prefills (at the shortest "
                        "--context-lens; at most --max-num-seqs)")
    g.add_argument("--beside-prompt-tokens", type=_optional_list, default=[8192, 16384],
                   help="decode beside long prompts: prompt lengths run back to back beside the timed decode steps "
                        "on every partition (comma-separated; none: not measured)")
    g.add_argument("--beside-prompt-context-lens", type=_sorted_list, default=[8192],
                   help="contexts of the decode steps timed beside --beside-prompt-tokens")
    g.add_argument("--beside-prompt-batches", type=_sorted_list, default=[16, 64],
                   help="decode batches timed beside --beside-prompt-tokens")
    g.add_argument("--hybrid-chunks", type=_optional_list, default=[512, 1024, 2048],
                   help="hybrid steps on the whole device: prefill chunk lengths (none: not measured)")
    g.add_argument("--hybrid-batches", type=_list_from_zero, default=[0, 16, 64],
                   help="decode batches beside each hybrid chunk (0: the chunk alone)")
    g.add_argument("--hybrid-context-lens", type=_list_from_zero, default=[1024, 4096, 16384],
                   help="context of the hybrid steps: the chunk's offset and each decode's context")
    g.add_argument("--kv-transfer-blocks", type=_optional_list, default=[16, 64, 256],
                   help="KV blocks per timed copy (the disagg transfer; none: not measured)")
    g.add_argument("--estimate-from", default=None, metavar="PROFILE",
                   help="print how long this grid would take, priced by the step-cost model of an earlier profile "
                        "of the same GPU and model (no engine is started), and exit")
    g.add_argument("--derive-from", default=None, metavar="PROFILE",
                   help="measure nothing: derive the profile of --model (a preset:NAME) from this measured one by "
                        "the step-cost model's roofline fit (see docs/cost-model.md); marked DERIVED, owed a "
                        "measurement")
    g.add_argument("--bandwidth-scale", type=float, default=1.0,
                   help="with --derive-from: the target GPU's memory bandwidth / the measured GPU's (an H200 from an "
                        "H100: 4.8 / 3.35 = 1.43); same SMs and compute assumed")
    g.add_argument("--gpu-name", default=None,
                   help="with --derive-from: the target GPU's name (its memory is read from it by the simulator, "
                        "e.g. 'NVIDIA H200 141GB HBM3e'); default: the measured GPU's")
    g.add_argument("--fp8-flops-scale", type=float, default=DEFAULT_FP8_FLOPS_SCALE,
                   help="with --derive-from and --quantization fp8 (from a bf16 profile): the FP8 GEMMs' FLOP rate over "
                        "the measured bf16 rate (an assumption owed a measurement: ~2 on Hopper's dense tensor cores)")
    g.add_argument("--derive-context-lens", type=_sorted_list, default=None,
                   help="with --derive-from: the derived decode table's contexts (default: the measured ones; others "
                        "are the step-cost model's predictions)")
    g.add_argument("--derive-batch-sizes", type=_sorted_list, default=None,
                   help="with --derive-from: the derived decode table's batch sizes (default: the measured ones)")
    g.add_argument("--num-steps", type=int, default=8, help="timed steps per point")
    g.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps before them")
    g.add_argument("--prefill-repeats", type=int, default=3, help="timed runs of each prefill point (the median is kept)")
    add_engine_args(parser)
    # NOTE: decode graphs are captured again per partition up to --max-num-seqs: 128, the largest
    # default batch, not the engine's 256 (the default grid's ~3 minutes count on it).
    parser.set_defaults(func=main, **{**BENCH_ENGINE_DEFAULTS, "max_num_seqs": 128})


def _decode_sm_counts(args: argparse.Namespace, total: int, gran: int) -> list[int]:
    if args.sm_counts is None:
        # NOTE: every other multiple of the granularity (16, 32, 48, 64 on an H100): the default
        # grid then fits ~3 minutes for an 8B model; the step-cost model interpolates between.
        return default_decode_sm_counts(total, gran)[::2] if total > 1 else []
    bad = [n for n in args.sm_counts if n % gran or n >= total]
    if bad:
        raise ValueError(f"--sm-counts {bad}: decode SM counts must be multiples of {gran} below {total}")
    return list(args.sm_counts)


def _print_estimate(args: argparse.Namespace) -> int:
    from rapidserve.resources.profile import load_profile

    model = StepCostModel.from_profile(load_profile(args.estimate_from))
    meta = model.profile.metadata
    sms = _decode_sm_counts(args, meta.total_sms, meta.sm_granularity)
    parts = estimate_seconds(model, sms, args)
    print(f"estimated from {args.estimate_from} ({meta.model} {meta.dtype} on {meta.gpu_name}), decode SMs "
          f"{','.join(map(str, sms)) or 'none'} and the whole device:")
    for k, v in parts.items():
        print(f"  {k:<22} {v:7.1f} s")
    return 0


def _derive(args: argparse.Namespace) -> int:
    from rapidserve.resources.profile import load_profile
    from rapidserve.resources.profile_derive import derive_profile, preset_target

    if args.model is None:
        raise ValueError("--derive-from needs --model preset:NAME (the model to derive the profile for)")
    measured = load_profile(args.derive_from)
    dtype = None if args.dtype == "auto" else args.dtype
    target = preset_target(args.model, dtype, args.gpu_name, args.bandwidth_scale, args.quantization,
                           args.kv_cache_dtype, args.fp8_flops_scale)
    profile = derive_profile(measured, target, args.derive_context_lens, args.derive_batch_sizes)
    profile.save(args.output)
    print(profile.metadata.notes)
    print(f"wrote {args.output}")
    return 0


def main(args: argparse.Namespace) -> int:
    from rapidserve.serving.hybrid import LLMEngine
    if (args.num_steps < 1 or args.warmup_steps < 0 or args.prefill_repeats < 1 or args.beside_prefill_tokens < 1
            or args.beside_decode_batch < 1):
        raise ValueError("need --num-steps >= 1, --warmup-steps >= 0, --prefill-repeats >= 1, "
                         "--beside-prefill-tokens >= 1, --beside-decode-batch >= 1")
    if args.estimate_from is not None:
        return _print_estimate(args)
    if args.derive_from is not None:
        return _derive(args)
    config = engine_config_from_args(args)
    if args.beside_decode_batch > config.max_num_seqs:
        raise ValueError(f"--beside-decode-batch {args.beside_decode_batch} > --max-num-seqs {config.max_num_seqs}: "
                         "the engine never decodes a larger batch")
    largest = max(args.batch_sizes + args.beside_prompt_batches + args.hybrid_batches)
    if largest > config.max_num_seqs:
        raise ValueError(f"a decode batch of {largest} > --max-num-seqs {config.max_num_seqs}: raise --max-num-seqs "
                         "(its decode graphs stop there, and a larger batch would run eagerly)")
    if config.mode != "hybrid":
        raise ValueError("rapidserve profile measures steps on one engine: leave --mode at hybrid")
    engine = LLMEngine(config)
    try:
        partitioner = make_partitioner(engine.device)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    sm_counts = _decode_sm_counts(args, partitioner.total_sms, partitioner.granularity)
    total = partitioner.total_sms
    print(f"rapidserve profile: {engine.model_name} {_dtype_label(engine)} on "
          f"{engine.device} ({total} SMs, {mechanism(engine.device)} partitioning)", flush=True)
    if not sm_counts:
        print(f"SM partitioning unavailable on {engine.device}: one partition, the whole device", flush=True)
    try:
        profile = run_profile(engine, partitioner, sm_counts, args,
                              log=lambda line: print(line, flush=True))
    finally:
        # NOTE: graphs captured on the partitions' streams go before the green contexts do.
        engine.runner.drop_graphs()
        del engine
        gc.collect()
        partitioner.close()
    profile.save(args.output)
    print(f"wrote {args.output}")
    return 0
