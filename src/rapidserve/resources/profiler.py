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

Decode CUDA graphs keep the partition they were captured on, so they are captured again on each
partition's decode stream. Prefill runs eagerly, as the rapid topology's prefill worker does.
Without SM partitioning (CPU, or no mechanism) there is one partition, the whole device; the
profile says so (`metadata.partitioning` "none" and a note).
"""

from __future__ import annotations

import argparse
import contextlib
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
from rapidserve.resources.profile import (
    DecodeTable,
    PrefillTable,
    Profile,
    ProfileMetadata,
)
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


def _recapture(engine: Any, stream: torch.cuda.Stream | None, num_sms: int) -> None:
    """Capture the engine's decode graphs again on the decode stream of the partition to be
    measured (the runner captures on the current stream; the prompts that fill the batch then
    run eagerly)."""
    if not engine.use_graphs or stream is None:
        return
    runner = engine.runner
    runner.drop_graphs()
    gc.collect()
    torch.cuda.synchronize(engine.device)
    torch.cuda.empty_cache()
    with use_stream(stream):
        runner.use_partition(None, num_sms)
        runner.capture_graphs(engine.config.max_num_seqs, engine.config.max_num_batched_tokens, piecewise=False)


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


def run_profile(engine: Any, partitioner: Partitioner, decode_sm_counts: list[int],
                args: argparse.Namespace, log: Any = print) -> Profile:
    """Measure every table of the profile (see the module's doc) with an idle LLMEngine."""
    total = partitioner.total_sms
    parts = [Partition.split(n, total) for n in decode_sm_counts] + [Partition.FULL]
    for g in partitioner.prepare(parts):
        log(f"partition {g.partition}: decode {g.decode_sms} SMs, prefill {g.prefill_sms} SMs")
    granted = {g.partition: g for g in partitioner.granted()}
    rng = random.Random(engine.config.seed)
    prefill = _PrefillRunner(engine, max(max(args.prompt_tokens), args.beside_prefill_tokens))
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
    finally:
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
    return Profile(
        meta,
        DecodeTable(tuple(sm_counts), tuple(args.context_lens), tuple(args.batch_sizes),
                    _tup(alone), _tup(beside)),
        PrefillTable(tuple(psms), tuple(args.prompt_tokens), _tup([prefill_ms[n] for n in psms]),
                     _tup([prefill_beside_ms[n] for n in psms])),
    )


def _tup(x: Any) -> Any:
    return tuple(_tup(v) for v in x) if isinstance(x, list) else x


# ---- command ---------------------------------------------------------------------------------


def _sorted_list(text: str) -> list[int]:
    return sorted(set(_int_list(text)))


def _dtype_label(engine: Any) -> str:
    """The compute dtype, and FP8 weights / KV when on: a profile measured with them holds
    other step times."""
    label = str(engine.dtype).replace("torch.", "")
    if engine.config.quantization == "fp8":
        label += "+fp8-weights"
    if engine.config.kv_cache_dtype != "auto":
        label += "+fp8-kv"
    return label


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profile")
    g.add_argument("--output", required=True, help="write the profile (JSON) here")
    g.add_argument("--batch-sizes", type=_sorted_list, default=[1, 8, 32, 64, 128, 256],
                   help="decode batch sizes, comma-separated")
    g.add_argument("--context-lens", type=_sorted_list, default=[1024, 4096],
                   help="prompt lengths the decodes run at, comma-separated")
    g.add_argument("--sm-counts", type=_sorted_list, default=None,
                   help="decode SM counts, comma-separated (default: every multiple of the device's "
                        "granularity from two granules up to half the SMs; the whole device is always added)")
    g.add_argument("--prompt-tokens", type=_sorted_list, default=[512, 1024, 2048, 4096],
                   help="prompt lengths of the prefill timings, comma-separated")
    g.add_argument("--beside-prefill-tokens", type=int, default=2048,
                   help="prompt length of the prefill run beside the timed decode steps")
    g.add_argument("--beside-decode-batch", type=int, default=64,
                   help="sequences in the decode steps run beside the timed prefills (at the shortest "
                        "--context-lens; at most --max-num-seqs)")
    g.add_argument("--num-steps", type=int, default=10, help="timed decode steps per point")
    g.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps before them")
    g.add_argument("--prefill-repeats", type=int, default=3)
    add_engine_args(parser)
    parser.set_defaults(func=main, **BENCH_ENGINE_DEFAULTS)


def main(args: argparse.Namespace) -> int:
    from rapidserve.engine import LLMEngine

    if (args.num_steps < 1 or args.warmup_steps < 0 or args.prefill_repeats < 1 or args.beside_prefill_tokens < 1
            or args.beside_decode_batch < 1):
        raise ValueError("need --num-steps >= 1, --warmup-steps >= 0, --prefill-repeats >= 1, "
                         "--beside-prefill-tokens >= 1, --beside-decode-batch >= 1")
    config = engine_config_from_args(args)
    if args.beside_decode_batch > config.max_num_seqs:
        raise ValueError(f"--beside-decode-batch {args.beside_decode_batch} > --max-num-seqs {config.max_num_seqs}: "
                         "the engine never decodes a larger batch")
    if config.mode != "hybrid":
        raise ValueError("rapidserve profile measures steps on one engine: leave --mode at hybrid")
    engine = LLMEngine(config)
    try:
        partitioner = make_partitioner(engine.device)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    total, gran = partitioner.total_sms, partitioner.granularity
    if args.sm_counts is None:
        sm_counts = default_decode_sm_counts(total, gran) if total > 1 else []
    else:
        bad = [n for n in args.sm_counts if n % gran or n >= total]
        if bad:
            raise ValueError(f"--sm-counts {bad}: decode SM counts must be multiples of {gran} below {total}")
        sm_counts = args.sm_counts
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
