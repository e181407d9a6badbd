"""`rapidserve bench interference`: decode inter-token latency while long prefills stream in.

The paper's motivating measurement (§3.1): a batch of requests is decoding steadily; then long
prompts (8K tokens by default) arrive back to back. In the hybrid mode their chunks share the
decodes' steps, so every decode step grows with the chunk size; in the rapid mode the prefill
worker runs them beside the decode worker. The run, in one engine of any mode:

1. `--num-decodes` requests with `--decode-prompt-len`-token prompts start and decode until each
   has produced a few tokens;
2. the decode ITL alone is measured over `--alone-steps` steps;
3. `--num-prefills` prompts of `--prefill-len` tokens (one output token each) are submitted,
   keeping `--prefill-concurrency` of them in flight, until all are done (the window);
4. the decode requests are aborted.

ITL is the gap between consecutive tokens of a decode request as the caller of `step()` sees
them (what a server would stream); only gaps that end inside the window count. It prints the
ITL percentiles alone and under prefill, the decode token rate, the prefills' TTFT and prefill
token rate (against the matmul floor), and with `--step-timeline DIR` how much the decode and
prefill workers' steps overlapped on the device (rapid mode).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from rapidserve.bench.floors import model_cost, prefill_floor_s
from rapidserve.bench.throughput import BENCH_ENGINE_DEFAULTS, add_rates_args, rates_from_args, rates_line
from rapidserve.entrypoints.args import add_engine_args, engine_config_from_args
from rapidserve.sampling_params import SamplingParams


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class LatencyStats(NamedTuple):
    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, gaps_s: Sequence[float]) -> LatencyStats:
        ms = [g * 1e3 for g in gaps_s]
        if not ms:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)
        return cls(len(ms), statistics.fmean(ms), percentile(ms, 50), percentile(ms, 95), percentile(ms, 99), max(ms))


def gaps_within(token_times: dict[str, list[float]], since_s: float, until_s: float) -> list[float]:
    """Gaps between consecutive tokens of each request whose later token falls in [since, until]."""
    gaps = []
    for times in token_times.values():
        gaps.extend(b - a for a, b in zip(times, times[1:]) if since_s <= b <= until_s)
    return gaps


class InterferenceResult(NamedTuple):
    mode: str
    decode_alone: LatencyStats
    decode_under_prefill: LatencyStats
    decode_tokens_per_s: float  # decode tokens made during the window / window
    prefill_ttft: LatencyStats
    prefill_tokens_per_s: float  # prompt tokens prefilled / window
    prefill_floor_ratio: float | None  # window / matmul floor of those prefills
    window_s: float
    num_preemptions: int
    overlap: dict[str, float] | None  # from the step timeline (rapid mode)
    kv_transfer: dict[str, float] | None  # the disagg mode: KV copies of the whole run
    memory: dict[str, Any]  # GPU memory of the engine / decode process and the disagg prefill one over the run
    profiled: dict[str, float] | None  # rapid mode with --profile and one partition: the profile's step times


def run(engine: Any, num_decodes: int, decode_prompt_len: int, prefill_len: int, num_prefills: int,
        prefill_concurrency: int, alone_steps: int, seed: int, vocab: int,
        timeout_s: float = 3600.0, memory: list[tuple[float, int, int]] | None = None,
        at_window_start: list[Any] | None = None,
        ) -> tuple[dict[str, list[float]], list[float], tuple[float, float, float], int]:
    """Drive the engine through the three phases. Returns the decode requests' token times, the
    prefills' TTFTs, (alone-window start, window start, window end) and prefill tokens made;
    appends (time, engine bytes, prefill-instance bytes) of GPU memory after every step to
    `memory`, and the engine's stats when the prefills start to `at_window_start`."""
    rng = random.Random(seed)
    prompt = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    # As many tokens as one request may have: within the context length and the whole cache (the
    # disagg mode's cache is a share of the GPU, smaller than a long-context model's length).
    room = min(engine.max_model_len, engine.num_kv_blocks * engine.block_size) - decode_prompt_len
    if room < 1:
        raise ValueError(f"decode prompts of {decode_prompt_len} tokens leave no room in a context of "
                         f"{engine.max_model_len} tokens and a cache of {engine.num_kv_blocks * engine.block_size}")
    decode_params = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)
    decodes = [engine.add_request(prompt(decode_prompt_len), decode_params) for _ in range(num_decodes)]
    times: dict[str, list[float]] = {rid: [] for rid in decodes}
    deadline = time.monotonic() + timeout_s
    submitted: dict[str, float] = {}
    ttfts: list[float] = []

    def step() -> None:
        if time.monotonic() > deadline:
            raise RuntimeError("bench interference did not finish in time")
        outs = engine.step()
        now = time.monotonic()
        if memory is not None:
            s = engine.stats()
            memory.append((now, s.memory_bytes, s.kv_transfer.prefill_memory_bytes if s.kv_transfer else 0))
        for out in outs:
            if out.request_id in times:
                times[out.request_id].extend([now] * len(out.delta_token_ids))
                if out.finished:
                    raise RuntimeError(f"decode request {out.request_id} ended early ({out.outputs[0].finish_reason}); "
                                       "give a longer --max-model-len or fewer --num-prefills")
            elif out.request_id in submitted and out.finished:
                ttfts.append(now - submitted.pop(out.request_id))

    while min(len(t) for t in times.values()) < 3:
        step()
    alone_start = time.monotonic()
    for _ in range(alone_steps):
        step()
    if at_window_start is not None:
        at_window_start.append(engine.stats())
    window_start = time.monotonic()
    prefill_params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    sent = 0
    while sent < num_prefills or submitted:
        while sent < num_prefills and len(submitted) < prefill_concurrency:
            rid = engine.add_request(prompt(prefill_len), prefill_params)
            submitted[rid] = time.monotonic()
            sent += 1
        step()
    window_end = time.monotonic()
    for rid in decodes:
        engine.abort_request(rid)
    return times, ttfts, (alone_start, window_start, window_end), num_prefills * prefill_len


def measure(config: Any, num_decodes: int, decode_prompt_len: int, prefill_len: int, num_prefills: int,
            prefill_concurrency: int, alone_steps: int, rates: Any = None,
            timeline_plot: str | None = None) -> InterferenceResult:
    from rapidserve.engine import create_engine
    from rapidserve.runner.timeline import load_spans, overlap

    if min(num_decodes, decode_prompt_len, prefill_len, num_prefills, prefill_concurrency) < 1 or alone_steps < 1:
        raise ValueError("every count and length of bench interference must be >= 1")
    engine = create_engine(config)
    mem: list[tuple[float, int, int]] = []
    before: list[Any] = []
    try:
        times, ttfts, (t_alone, t0, t1), prefill_tokens = run(
            engine, num_decodes, decode_prompt_len, prefill_len, num_prefills, prefill_concurrency,
            alone_steps, config.seed, engine.model_config.vocab_size, memory=mem, at_window_start=before)
        stats = engine.stats()
        preemptions = stats.num_preemptions
    finally:
        engine.shutdown()
    window = t1 - t0
    decode_tokens = sum(1 for ts in times.values() for t in ts if t0 < t <= t1)
    floor_ratio = None
    if rates is not None:
        cost = model_cost(engine.model_config, getattr(engine, "dtype", None) or _dtype(config))
        floor = num_prefills * prefill_floor_s(cost, rates, prefill_len)
        floor_ratio = window / floor if floor > 0 else None
    ov = None
    if config.step_timeline:
        spans = load_spans(config.step_timeline)
        if timeline_plot:
            from rapidserve.bench.plots import plot_timeline

            # About two prefills' worth of the window: long enough to show both phases, short
            # enough to see single steps.
            plot_timeline(spans, timeline_plot, t0, t0 + 2 * (t1 - t0) / num_prefills,
                          title=f"{config.mode} mode: decode and prefill steps while {prefill_len}-token prompts arrive")
        if {s.role for s in spans} >= {"decode", "prefill"}:
            o = overlap(spans, "decode", "prefill", t0, t1)
            ov = {"decode_busy_s": o.a_busy_s, "prefill_busy_s": o.b_busy_s, "both_busy_s": o.both_s,
                  "prefill_time_with_decode_running": o.fraction_of_b}
    kv = None
    if stats.kv_transfer is not None and stats.kv_transfer.num_transfers:
        t = stats.kv_transfer
        kv = {"transfers": t.num_transfers, "mean_ms": t.seconds / t.num_transfers * 1e3,
              "mean_mb": t.num_bytes / t.num_transfers / 1e6,
              "gb_per_s": t.num_bytes / t.seconds / 1e9 if t.seconds > 0 else float("nan")}
        # The long prompts' own transfers: those after the window opened (every decode request's
        # prompt was transferred before it made its first tokens, before the window).
        b = before[0].kv_transfer if before and before[0].kv_transfer is not None else None
        n = t.num_transfers - (b.num_transfers if b else 0)
        if n > 0:
            ms = (t.seconds - (b.seconds if b else 0.0)) / n * 1e3
            kv.update(prefill_transfers=n, prefill_mean_ms=ms,
                      prefill_mean_mb=(t.num_bytes - (b.num_bytes if b else 0)) / n / 1e6)
    return InterferenceResult(
        config.mode, LatencyStats.of(gaps_within(times, t_alone, t0)), LatencyStats.of(gaps_within(times, t0, t1)),
        decode_tokens / window if window > 0 else 0.0, LatencyStats.of(ttfts),
        prefill_tokens / window if window > 0 else 0.0, floor_ratio, window, preemptions, ov, kv,
        _memory_summary(mem, t_alone), _profiled(config, stats, times, decode_prompt_len, t0, t1),
    )


def _profiled(config: Any, stats: Any, times: dict[str, list[float]], prompt_len: int, t0: float,
              t1: float) -> dict[str, float] | None:
    """What the profile predicts for the decode steps of this run, when they ran in one partition
    the whole time (a static or full policy): the check that serving matches the profile."""
    p = stats.partition
    if not config.profile or p is None or p.switches or not stats.decode_sms:
        return None
    from rapidserve.resources.profile import load_profile

    profile = load_profile(config.profile)
    mid = (t0 + t1) / 2
    context = prompt_len + statistics.fmean(sum(1 for t in ts if t <= mid) for ts in times.values())
    batch = len(times)
    return {"partition": p.current, "decode_sms": stats.decode_sms, "batch": batch, "context": context,
            "alone_ms": profile.decode_ms(stats.decode_sms, batch, context, False),
            "beside_prefill_ms": profile.decode_ms(stats.decode_sms, batch, context, True)}


def _memory_summary(samples: list[tuple[float, int, int]], t_start: float, points: int = 200) -> dict[str, Any]:
    """Peaks, and the series thinned to about `points` samples (seconds from the alone window)."""
    if not samples:
        return {"peak_engine_gib": 0.0, "peak_prefill_gib": 0.0, "series": []}
    step = max(1, len(samples) // points)
    gib = 2**30
    return {
        "peak_engine_gib": max(s[1] for s in samples) / gib,
        "peak_prefill_gib": max(s[2] for s in samples) / gib,
        "series": [(round(t - t_start, 3), e / gib, p / gib) for t, e, p in samples[::step]],
    }


def _dtype(config: Any) -> Any:
    import torch

    return getattr(torch, config.dtype) if config.dtype != "auto" else torch.bfloat16


def format_result(r: InterferenceResult) -> str:
    def row(name: str, s: LatencyStats) -> str:
        return (f"{name:<28} {s.count:>7} {s.mean_ms:>9.2f} {s.p50_ms:>9.2f} {s.p95_ms:>9.2f} {s.p99_ms:>9.2f} "
                f"{s.max_ms:>9.2f}")

    lines = [
        f"{'':<28} {'count':>7} {'mean ms':>9} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9}",
        row("decode ITL, alone", r.decode_alone),
        row("decode ITL, under prefill", r.decode_under_prefill),
        row("prefill TTFT", r.prefill_ttft),
        f"window {r.window_s:.2f} s: decode {r.decode_tokens_per_s:.1f} tok/s, prefill {r.prefill_tokens_per_s:.1f} "
        f"tok/s" + (f" ({r.prefill_floor_ratio:.2f}x the matmul floor)" if r.prefill_floor_ratio else "")
        + f", preemptions {r.num_preemptions}",
    ]
    if r.overlap is not None:
        o = r.overlap
        lines.append(f"device overlap in the window: decode busy {o['decode_busy_s']:.2f} s, prefill busy "
                     f"{o['prefill_busy_s']:.2f} s, both {o['both_busy_s']:.2f} s "
                     f"({o['prefill_time_with_decode_running']:.0%} of prefill time with a decode step running)")
    if r.profiled is not None:
        q = r.profiled
        lines.append(f"profile, {q['partition']} at batch {q['batch']:.0f} and context {q['context']:.0f}: decode step "
                     f"{q['alone_ms']:.2f} ms alone ({r.decode_alone.p50_ms / q['alone_ms']:.2f}x measured p50), "
                     f"{q['beside_prefill_ms']:.2f} ms beside a prefill "
                     f"({r.decode_under_prefill.p50_ms / q['beside_prefill_ms']:.2f}x)")
    if r.memory["peak_engine_gib"] or r.memory["peak_prefill_gib"]:
        lines.append(f"GPU memory (torch's pools), peak: engine / decode process {r.memory['peak_engine_gib']:.2f} GiB"
                     + (f", prefill instance {r.memory['peak_prefill_gib']:.2f} GiB" if r.memory["peak_prefill_gib"] else ""))
    if r.kv_transfer is not None:
        k = r.kv_transfer
        lines.append(f"KV transfers: {k['transfers']:.0f}, {k['mean_mb']:.1f} MB and {k['mean_ms']:.2f} ms each "
                     f"({k['gb_per_s']:.1f} GB/s)")
        if "prefill_transfers" in k:
            lines.append(f"KV transfer of each long prompt: {k['prefill_mean_mb']:.1f} MB in "
                         f"{k['prefill_mean_ms']:.2f} ms ({k['prefill_transfers']:.0f} transfers), "
                         f"{k['prefill_mean_ms'] / r.prefill_ttft.mean_ms:.1%} of its mean TTFT "
                         f"({r.prefill_ttft.mean_ms:.1f} ms)")
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("load")
    g.add_argument("--num-decodes", type=int, default=32, help="requests decoding throughout")
    g.add_argument("--decode-prompt-len", type=int, default=1024,
                   help="prompt tokens of each decoding request whose ITL is measured")
    g.add_argument("--prefill-len", type=int, default=8192, help="prompt tokens of each long prefill")
    g.add_argument("--num-prefills", type=int, default=16, help="long prompts sent while the decodes run")
    g.add_argument("--prefill-concurrency", type=int, default=1,
                   help="long prompts in flight at once (1: back to back)")
    g.add_argument("--alone-steps", type=int, default=30, help="steps timed before the prefills start")
    g.add_argument("--output-json", default=None, help="write every figure to this file")
    g.add_argument("--timeline-plot", default=None, metavar="PNG",
                   help="draw the workers' steps over the first prefills (rapid mode: the overlap)")
    add_rates_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=main, **BENCH_ENGINE_DEFAULTS)


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from rapidserve.runner.setup import resolve_device

    config = engine_config_from_args(args)
    tmp = None
    if config.step_timeline is None and (config.mode == "rapid" or args.timeline_plot):
        tmp = tempfile.TemporaryDirectory(prefix="rapidserve-timeline-")
        config = dataclasses.replace(config, step_timeline=tmp.name)
    rates = rates_from_args(args, resolve_device(config.device))
    print(f"rapidserve bench interference: mode {config.mode}, budget {config.max_num_batched_tokens} tokens, "
          f"{args.num_decodes} decodes at {args.decode_prompt_len} + {args.num_prefills} prefills of "
          f"{args.prefill_len} tokens ({args.prefill_concurrency} at a time)")
    print(rates_line(rates))
    try:
        r = measure(config, args.num_decodes, args.decode_prompt_len, args.prefill_len, args.num_prefills,
                    args.prefill_concurrency, args.alone_steps, rates, args.timeline_plot)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_result(r))
    if args.output_json:
        doc = {"command": "bench interference", "config": dataclasses.asdict(config),
               "load": {k: getattr(args, k) for k in ("num_decodes", "decode_prompt_len", "prefill_len",
                                                      "num_prefills", "prefill_concurrency", "alone_steps")},
               "result": {k: (v._asdict() if hasattr(v, "_asdict") else v) for k, v in r._asdict().items()}}
        with open(args.output_json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0
