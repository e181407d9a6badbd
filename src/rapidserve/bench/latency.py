"""`rapidserve bench latency`: the time of one decode step at fixed batch sizes and contexts,
and of one long prefill, each against its floor (bench/floors.py).

For each (batch, context) point the batch is filled with requests whose prompts have that many
tokens; their prefills run untimed, then N decode steps run back to back and each is timed as
the gap between two `step()` returns: in steady state that gap is paced by the device (a step
waits for the tokens it reads back), and with one-step-ahead scheduling the host's work between
steps overlaps the device, as when serving. While the last prompts prefill, the first requests already decode, so the timed
contexts run a little past the nominal one: the floor uses the KV the timed steps really read.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from rapidserve.bench.floors import (
    DeviceRates,
    ModelCost,
    decode_step_floor_s,
    model_cost,
    prefill_flops,
    prefill_floor_s,
    step_weight_bytes_read,
)
from rapidserve.bench.throughput import (
    BENCH_ENGINE_DEFAULTS,
    add_rates_args,
    as_json,
    rates_from_args,
    rates_line,
    secs,
)
from rapidserve.entrypoints.args import add_engine_args, engine_config_from_args
from rapidserve.ops.fp8 import resolve_kv_cache_dtype
from rapidserve.kv.block_manager import blocks_needed


class DecodePoint(NamedTuple):
    batch_size: int
    context_len: int  # the prompts' length
    mean_context: float | None  # KV entries per sequence, over the timed steps
    median_s: float | None
    p90_s: float | None
    floor_s: float | None  # decode_step_floor_s at the timed steps' mean KV
    floor_ratio: float | None  # median_s / floor_s (1 = at the floor)
    achieved_bytes_per_s: float | None  # weights + KV the step must read, per median step
    skipped: str | None  # why the point was not measured


class PrefillPoint(NamedTuple):
    prompt_len: int
    median_s: float
    tokens_per_s: float
    achieved_flops_per_s: float  # prefill_flops / median_s
    floor_s: float | None  # prefill_floor_s: matmuls + attention at the matmul rate
    fraction_of_matmul_rate: float | None  # floor_s / median_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)]  # nearest rank


def _random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def _skip_reason(engine: Any, batch: int, context: int, max_tokens: int, cost: ModelCost) -> str | None:
    cfg = engine.config
    if batch > cfg.max_num_seqs:
        return f"batch {batch} > --max-num-seqs {cfg.max_num_seqs}"
    if cfg.max_num_batched_tokens < batch:
        # Decodes are scheduled first: with a smaller budget the last prefills would starve.
        return f"--max-num-batched-tokens {cfg.max_num_batched_tokens} < batch {batch}"
    if context + max_tokens > engine.max_model_len:
        return f"context {context} + {max_tokens} tokens > max_model_len {engine.max_model_len}"
    bs = engine.blocks.block_size
    need = batch * blocks_needed(context + max_tokens, bs)
    have = engine.blocks.num_free_blocks
    if need > have:
        gib = bs * cost.kv_bytes_per_token / 2**30
        return (
            f"needs {need} KV blocks ({need * gib:.1f} GiB) for {batch} sequences of up to "
            f"{context + max_tokens} tokens, the cache has {have} free ({have * gib:.1f} GiB): give "
            "it more memory (--gpu-memory-utilization, --kv-cache-memory-bytes, --num-kv-blocks) "
            "or drop this point"
        )
    return None


def measure_decode(
    engine: Any,
    batch: int,
    context: int,
    num_steps: int,
    warmup_steps: int,
    cost: ModelCost,
    rates: DeviceRates | None,
    rng: random.Random,
) -> DecodePoint:
    """`engine` is an idle LLMEngine; it is idle again afterwards."""
    from rapidserve.sampling_params import SamplingParams

    budget = engine.config.max_num_batched_tokens
    # Every step makes at least budget - (batch - 1) prefill tokens of progress, so the first
    # requests decode at most this many tokens before the last one has its first token.
    fill_steps = math.ceil(batch * context / max(1, budget - batch + 1))
    max_tokens = fill_steps + warmup_steps + num_steps + 1
    reason = _skip_reason(engine, batch, context, max_tokens, cost)
    if reason is not None:
        return DecodePoint(batch, context, None, None, None, None, None, None, reason)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    ids = [engine.add_request(p, params) for p in _random_prompts(rng, batch, context, engine.model_config.vocab_size)]
    try:
        started: set[str] = set()
        while len(started) < batch:
            started.update(o.request_id for o in engine.step())
        for _ in range(warmup_steps):
            engine.step()
        times: list[float] = []
        kv: list[int] = []
        # NOTE: no sync between steps: a step's time is the gap between two step() returns in
        # steady state, which is paced by the device (step() waits for a step's tokens); with
        # one-step-ahead scheduling the host work then overlaps the device, as when serving.
        t = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
            now = time.perf_counter()
            times.append(now - t)
            t = now
            st = engine.last_step_stats
            if st.num_prefill_tokens or st.num_decode_tokens != batch:
                raise RuntimeError(
                    f"a timed step at batch {batch} ran {st.num_decode_tokens} decodes and "
                    f"{st.num_prefill_tokens} prefill tokens (preempted?)"
                )
            kv.append(st.num_decode_kv_tokens)
    finally:
        for rid in ids:
            engine.abort_request(rid)
    median = statistics.median(times)
    mean_kv = sum(kv) / len(kv)
    floor = decode_step_floor_s(cost, rates, round(mean_kv), batch) if rates is not None else None
    moved = step_weight_bytes_read(cost, batch) + mean_kv * cost.kv_bytes_per_token
    return DecodePoint(
        batch, context, mean_kv / batch, median, _p90(times), floor,
        median / floor if floor else None, moved / median, None,
    )


def measure_prefill(
    engine: Any, prompt_len: int, repeats: int, cost: ModelCost, rates: DeviceRates | None, rng: random.Random
) -> PrefillPoint:
    """One prompt alone, to its first token (several steps if it exceeds the step budget);
    one untimed run first."""
    from rapidserve.sampling_params import SamplingParams

    if prompt_len + 1 > engine.max_model_len:
        raise ValueError(f"--prefill-len {prompt_len} does not fit max_model_len {engine.max_model_len}")
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    times: list[float] = []
    for i in range(repeats + 1):
        prompt = _random_prompts(rng, 1, prompt_len, engine.model_config.vocab_size)[0]
        _sync(engine.device)
        t = time.perf_counter()
        engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        _sync(engine.device)
        if i:
            times.append(time.perf_counter() - t)
    median = statistics.median(times)
    floor = prefill_floor_s(cost, rates, prompt_len) if rates is not None else None
    return PrefillPoint(
        prompt_len, median, prompt_len / median, prefill_flops(cost, prompt_len) / median, floor,
        floor / median if floor is not None else None,
    )


# ---- command ---------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("points")
    g.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 64, 256], help="comma-separated")
    g.add_argument("--context-lens", type=_int_list, default=[1024, 4096],
                   help="comma-separated prompt lengths the decodes run at")
    g.add_argument("--num-steps", type=int, default=20, help="timed decode steps per point")
    g.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps before them")
    g.add_argument("--prefill-len", type=int, default=2048, help="prompt length of the prefill timing (0: skip)")
    g.add_argument("--prefill-repeats", type=int, default=3, help="timed runs of the long prefill (the median is reported)")
    g.add_argument("--output-json", default=None, help="write every figure to this file")
    add_rates_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=main, **BENCH_ENGINE_DEFAULTS)


def _decode_row(p: DecodePoint) -> str:
    head = f"{p.batch_size:>6} {p.context_len:>8}"
    if p.skipped is not None or p.median_s is None or p.p90_s is None:
        return f"{head}  skipped: {p.skipped}"
    floor = (f"{p.floor_s * 1e3:>9.3f} {p.floor_ratio:>8.2f}"
             if p.floor_s is not None and p.floor_ratio is not None else f"{'-':>9} {'-':>8}")
    achieved = (p.achieved_bytes_per_s or 0.0) / 1e9
    return (f"{head} {p.mean_context:>9.0f} {p.median_s * 1e3:>10.3f} {p.p90_s * 1e3:>8.3f} {floor} "
            f"{achieved:>8.1f}")


def main(args: argparse.Namespace) -> int:
    from rapidserve.serving.hybrid import LLMEngine
    from rapidserve.runner.setup import resolve_device

    if args.num_steps < 1 or args.warmup_steps < 0 or args.prefill_repeats < 1 or args.prefill_len < 0:
        raise ValueError("need --num-steps >= 1, --warmup-steps >= 0, --prefill-repeats >= 1, --prefill-len >= 0")
    config = engine_config_from_args(args)
    rates = rates_from_args(args, resolve_device(config.device))
    engine = LLMEngine(config)
    cost = model_cost(engine.model_config, engine.dtype, resolve_kv_cache_dtype(config.kv_cache_dtype, engine.dtype))
    rng = random.Random(config.seed)
    print(f"rapidserve bench latency: {engine.model_name} {str(engine.dtype).replace('torch.', '')} on "
          f"{engine.device}, KV {engine.blocks.num_blocks} blocks of {engine.blocks.block_size}")
    print(rates_line(rates))
    prefill = measure_prefill(engine, args.prefill_len, args.prefill_repeats, cost, rates, rng) if args.prefill_len else None
    if prefill is not None:
        floor = (f"; floor {secs(prefill.floor_s)}: {100 * prefill.fraction_of_matmul_rate:.1f} % of the "
                 "matmul rate" if prefill.floor_s is not None and prefill.fraction_of_matmul_rate is not None else "")
        print(f"prefill of {prefill.prompt_len} tokens: {secs(prefill.median_s)} median of "
              f"{args.prefill_repeats} ({prefill.tokens_per_s:.0f} tok/s, "
              f"{prefill.achieved_flops_per_s / 1e12:.2f} TFLOP/s){floor}")
    print(f"decode step, wall time between step() returns over {args.num_steps} steps after {args.warmup_steps} warm-up:")
    print(f"{'batch':>6} {'context':>8} {'mean ctx':>9} {'median ms':>10} {'p90 ms':>8} {'floor ms':>9} "
          f"{'× floor':>8} {'GB/s':>8}")
    points: list[DecodePoint] = []
    for context in args.context_lens:
        for batch in args.batch_sizes:
            p = measure_decode(engine, batch, context, args.num_steps, args.warmup_steps, cost, rates, rng)
            points.append(p)
            print(_decode_row(p), flush=True)
    if args.output_json:
        result = {
            "command": "bench latency", "model": engine.model_name,
            "dtype": str(engine.dtype).replace("torch.", ""), "device": str(engine.device),
            "kv_blocks": engine.blocks.num_blocks, "block_size": engine.blocks.block_size,
            "num_steps": args.num_steps, "warmup_steps": args.warmup_steps,
            "rates": as_json(rates), "model_cost": as_json(cost),
            "prefill": as_json(prefill), "decode": as_json(points),
        }
        with open(args.output_json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0
