"""`rapidserve bench throughput`: an offline workload submitted at once, run to completion.

The default is the workload of GPU_FACTS.md: 256 requests, prompts of random token ids with
lengths uniform in [512, 1536], 256 output tokens each with EOS ignored, on the Llama-3.1-8B
preset with dummy bf16 weights. Besides the usual rates it times every step, so decode-only
steps and prefill-heavy steps can be set against their floors (bench/floors.py), and it can run
transformers' own continuous batching on the same prompts in the same process (`--peer`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from rapidserve.bench.floors import (
    DeviceRates,
    ModelCost,
    decode_step_floor_s,
    measure_device_rates,
    model_cost,
    prefill_flops,
    step_weight_bytes_read,
)
from rapidserve.entrypoints.args import add_engine_args, engine_config_from_args
from rapidserve.ops.fp8 import resolve_kv_cache_dtype


# The engine flags' defaults for benchmarks: the model shape of GPU_FACTS.md, no checkpoint.
BENCH_ENGINE_DEFAULTS: Mapping[str, Any] = {
    "model": "preset:llama-3.1-8b",
    "load_format": "dummy",
    "dtype": "bfloat16",
}
# A step is prefill-heavy when prefill tokens are at least this share of its tokens: the few
# decodes riding along then barely change its cost.
PREFILL_HEAVY_SHARE = 0.9
DEFAULT_PEER_ATTENTION = "paged|sdpa"  # what GPU_FACTS.md's peer figures were measured with

_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass(frozen=True)
class Workload:
    num_prompts: int = 256
    input_len_min: int = 512
    input_len_max: int = 1536
    output_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if not 1 <= self.input_len_min <= self.input_len_max:
            raise ValueError(
                f"need 1 <= --input-len-min <= --input-len-max, got {self.input_len_min} and "
                f"{self.input_len_max}"
            )
        if self.output_len < 1:
            raise ValueError(f"--output-len must be at least 1, got {self.output_len}")

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """Random token ids, the same for a given seed and vocabulary (the peer gets these)."""
        rng = random.Random(self.seed)
        lens = [rng.randint(self.input_len_min, self.input_len_max) for _ in range(self.num_prompts)]
        return [[rng.randrange(vocab_size) for _ in range(n)] for n in lens]


class StepRecord(NamedTuple):
    seconds: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_decode_kv_tokens: int


class EngineRun(NamedTuple):
    elapsed_s: float
    output_tokens: int
    steps: list[StepRecord]
    num_preemptions: int


class DecodeFigures(NamedTuple):
    """Steps that carried no prefill token."""

    num_steps: int
    mean_step_s: float
    mean_batch: float
    mean_context: float  # tokens of KV per decoding sequence
    achieved_bytes_per_s: float  # weights + KV the mean step must read, per second
    floor_s: float | None  # decode_step_floor_s at the mean batch and context
    floor_ratio: float | None  # mean_step_s / floor_s (1 = at the floor)


class PrefillFigures(NamedTuple):
    """Prefill-heavy steps (PREFILL_HEAVY_SHARE), decodes riding along counted as tokens."""

    num_steps: int
    tokens_per_s: float
    achieved_flops_per_s: float  # the layers' matmul FLOPs per second (attention excluded)
    floor_tokens_per_s: float | None  # the matmul rate / the layers' FLOPs per token
    fraction_of_floor: float | None  # tokens_per_s / floor_tokens_per_s


class SerialFloor(NamedTuple):
    """The whole workload with nothing overlapping: every prefill at the matmul rate, then the
    decodes at the copy bandwidth, in as many steps as the engine's decode batching needed."""

    prefill_s: float
    decode_s: float
    decode_batch: float
    total_s: float
    full_batch: float  # the same at the largest batch the engine allows ...
    full_batch_total_s: float  # ... which GPU_FACTS.md quotes


class ThroughputFigures(NamedTuple):
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    num_steps: int
    num_preemptions: int
    decode: DecodeFigures | None
    prefill: PrefillFigures | None
    serial_floor: SerialFloor | None
    serial_floor_ratio: float | None  # elapsed_s / serial_floor.total_s


class PeerFigures(NamedTuple):
    name: str
    attn_implementation: str
    elapsed_s: float
    output_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float


# ---- running ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_workload(engine: Any, prompts: Sequence[list[int]], output_len: int) -> EngineRun:
    """Submit every prompt, step to completion, time each step. `engine` is an LLMEngine."""
    from rapidserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    preempted_before = engine.scheduler.num_preemptions
    steps: list[StepRecord] = []
    output_tokens = 0
    _sync(engine.device)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    # NOTE: step() returns once a step's tokens are on the host, so it has waited for the
    # device: a step's time is the gap between two returns, without an extra synchronize. With
    # one-step-ahead scheduling a call launches the next step and reads back the one before it,
    # so the time goes to that earlier step's figures.
    ahead = getattr(engine, "async_scheduling", False)
    launched = None
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        dt, t = now - t, now
        st = engine.last_step_stats
        done, launched = (launched, st) if ahead else (st, None)
        if done is not None:
            steps.append(StepRecord(dt, done.num_prefill_tokens, done.num_decode_tokens, done.num_decode_kv_tokens))
        output_tokens += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
    _sync(engine.device)
    elapsed = time.perf_counter() - t0
    return EngineRun(elapsed, output_tokens, steps, engine.scheduler.num_preemptions - preempted_before)


@contextlib.contextmanager
def _peer_model(hf_config: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                attn_implementation: str, seed: int) -> Iterator[Any]:
    """transformers' model of the same shape with random weights on `device`, freed after."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    arch = next(iter(cfg.get("architectures") or []), None)
    model_type = cfg.pop("model_type", None) or _MODEL_TYPES.get(str(arch))
    if model_type is None:
        raise ValueError(f"cannot tell the transformers model type of architecture {arch!r}")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    # Initialized where it runs: random init of 8B parameters on the host would take minutes.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    try:
        yield model
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _peer_figures(mode: str, attn: str, elapsed: float, out: int, prompts: Sequence[list[int]]) -> PeerFigures:
    import transformers

    total = out + sum(len(p) for p in prompts)
    return PeerFigures(f"transformers {transformers.__version__} {mode}", attn, elapsed, out,
                       out / elapsed, total / elapsed)


def run_transformers_peer(
    hf_config: Mapping[str, Any],
    prompts: Sequence[list[int]],
    output_len: int,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = DEFAULT_PEER_ATTENTION,
    seed: int = 0,
    cb_options: Mapping[str, int] | None = None,
) -> PeerFigures:
    """transformers' continuous batching (`generate_batch`) on the same prompts, with random
    weights of the same shape on the same device. `cb_options` go to ContinuousBatchingConfig
    (e.g. num_blocks, max_batch_tokens); none by default, as GPU_FACTS.md measured."""
    from transformers import GenerationConfig

    # eos_token_id -1 matches no token: every request makes exactly max_new_tokens tokens.
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1)
    kwargs: dict[str, Any] = {}
    if cb_options:
        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**cb_options)
    with _peer_model(hf_config, device, dtype, attn_implementation, seed) as model:
        _sync(device)
        t0 = time.perf_counter()
        results = model.generate_batch(inputs=[list(p) for p in prompts], generation_config=gen, **kwargs)
        _sync(device)
        elapsed = time.perf_counter() - t0
    failed = [r.error for r in results.values() if getattr(r, "error", None)]
    if len(results) != len(prompts) or failed:
        raise RuntimeError(
            f"transformers' generate_batch finished {len(results)} of {len(prompts)} requests"
            + (f"; errors: {failed[:3]}" if failed else "")
        )
    out = sum(len(r.generated_tokens) for r in results.values())
    return _peer_figures("generate_batch", attn_implementation, elapsed, out, prompts)


def run_transformers_generate(
    hf_config: Mapping[str, Any],
    prompts: Sequence[list[int]],
    output_len: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PeerFigures:
    """transformers' plain `generate` on the same prompts: static batches of `batch_size`
    prompts (left-padded to the batch's longest, in the order given), each run to
    `output_len` new tokens. On a CPU it is faster than `generate_batch`."""
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError(f"--peer-batch-size must be >= 1, got {batch_size}")
    gen = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                           eos_token_id=-1, pad_token_id=0)
    out = 0
    with _peer_model(hf_config, device, dtype, attn_implementation, seed) as model:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            with torch.inference_mode():
                res = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
            out += int(res.shape[0]) * (int(res.shape[1]) - width)
        _sync(device)
        elapsed = time.perf_counter() - t0
    return _peer_figures("generate", attn_implementation, elapsed, out, prompts)


# ---- figures ---------------------------------------------------------------------------------


def summarize(
    run: EngineRun,
    prompts: Sequence[list[int]],
    output_len: int,
    cost: ModelCost,
    rates: DeviceRates | None,
    max_num_seqs: int,
) -> ThroughputFigures:
    prompt_tokens = sum(len(p) for p in prompts)
    n = len(prompts)
    floor = _serial_floor(run.steps, prompts, output_len, cost, rates, max_num_seqs)
    return ThroughputFigures(
        num_requests=n,
        prompt_tokens=prompt_tokens,
        output_tokens=run.output_tokens,
        elapsed_s=run.elapsed_s,
        requests_per_s=n / run.elapsed_s,
        output_tokens_per_s=run.output_tokens / run.elapsed_s,
        total_tokens_per_s=(prompt_tokens + run.output_tokens) / run.elapsed_s,
        num_steps=len(run.steps),
        num_preemptions=run.num_preemptions,
        decode=_decode_figures(run.steps, cost, rates),
        prefill=_prefill_figures(run.steps, cost, rates),
        serial_floor=floor,
        serial_floor_ratio=run.elapsed_s / floor.total_s if floor is not None else None,
    )


def _decode_figures(steps: Sequence[StepRecord], cost: ModelCost, rates: DeviceRates | None) -> DecodeFigures | None:
    dec = [s for s in steps if s.num_prefill_tokens == 0 and s.num_decode_tokens > 0]
    if not dec:
        return None
    mean_s = sum(s.seconds for s in dec) / len(dec)
    batch = sum(s.num_decode_tokens for s in dec) / len(dec)
    kv = sum(s.num_decode_kv_tokens for s in dec) / len(dec)
    moved = step_weight_bytes_read(cost, batch) + kv * cost.kv_bytes_per_token
    floor = decode_step_floor_s(cost, rates, round(kv), batch) if rates is not None else None
    return DecodeFigures(
        len(dec), mean_s, batch, kv / batch, moved / mean_s, floor,
        mean_s / floor if floor else None,
    )


def _prefill_figures(steps: Sequence[StepRecord], cost: ModelCost, rates: DeviceRates | None) -> PrefillFigures | None:
    heavy = [
        s for s in steps
        if s.num_prefill_tokens > 0
        and s.num_prefill_tokens >= PREFILL_HEAVY_SHARE * (s.num_prefill_tokens + s.num_decode_tokens)
    ]
    if not heavy:
        return None
    seconds = sum(s.seconds for s in heavy)
    tokens = sum(s.num_prefill_tokens + s.num_decode_tokens for s in heavy)
    rate = tokens / seconds
    floor_rate = rates.matmul_flops_per_s / cost.linear_flops_per_token if rates is not None else None
    return PrefillFigures(
        len(heavy), rate, rate * cost.linear_flops_per_token, floor_rate,
        rate / floor_rate if floor_rate else None,
    )


def _serial_floor(
    steps: Sequence[StepRecord],
    prompts: Sequence[list[int]],
    output_len: int,
    cost: ModelCost,
    rates: DeviceRates | None,
    max_num_seqs: int,
) -> SerialFloor | None:
    if rates is None:
        return None
    prefill_s = sum(prefill_flops(cost, len(p)) for p in prompts) / rates.matmul_flops_per_s
    # The first output token comes from the prefill; each later one is a decode over the
    # prompt and the tokens before it: prompt + 1 ... prompt + output_len - 1 KV entries.
    n_dec = output_len - 1
    decode_tokens = len(prompts) * n_dec
    kv_bytes = cost.kv_bytes_per_token * sum(n_dec * len(p) + n_dec * (n_dec + 1) // 2 for p in prompts)
    carrying = [s.num_decode_tokens for s in steps if s.num_decode_tokens > 0]
    batch = sum(carrying) / len(carrying) if carrying else 1.0
    full = float(min(len(prompts), max_num_seqs))

    def decode_s(b: float) -> float:
        # Weights once per decode step; the KV each decode reads, once, whatever the batching.
        return (decode_tokens / b * step_weight_bytes_read(cost, b) + kv_bytes) / rates.copy_bytes_per_s

    return SerialFloor(
        prefill_s, decode_s(batch), batch, prefill_s + decode_s(batch), full, prefill_s + decode_s(full)
    )


# ---- output ----------------------------------------------------------------------------------


def as_json(value: Any) -> Any:
    """NamedTuples (nested) as dicts, for --output-json."""
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: as_json(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value


def rates_line(rates: DeviceRates | None) -> str:
    if rates is None:
        return "device rates: none on CPU (floors skipped; give --bandwidth-tbps and --matmul-tflops to set them)"
    how = "given" if rates.matmul_n == 0 else f"measured on {rates.device_name}, matmul {rates.matmul_n}³"
    return (
        f"device rates ({how}): copy {rates.copy_bytes_per_s / 1e12:.2f} TB/s "
        f"read + write, bf16 matmul {rates.matmul_flops_per_s / 1e12:.0f} TFLOP/s"
    )


def secs(x: float) -> str:
    """A duration with a unit that suits it (a tiny CPU model's floors are nanoseconds)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x * 1e9:.2f} ns"


def _print_figures(f: ThroughputFigures) -> None:
    p = print
    p(f"elapsed              {f.elapsed_s:.2f} s")
    p(f"requests/s           {f.requests_per_s:.3f}")
    p(f"output tok/s         {f.output_tokens_per_s:.1f}  ({f.output_tokens} tokens)")
    p(f"total tok/s          {f.total_tokens_per_s:.1f}  ({f.prompt_tokens} prompt tokens)")
    p(f"steps                {f.num_steps}, preemptions {f.num_preemptions}")
    d = f.decode
    if d is not None:
        floor = (f"; floor {secs(d.floor_s)}, {d.floor_ratio:.2f}× the floor"
                 if d.floor_s is not None and d.floor_ratio is not None else "")
        p(f"decode-only step     {secs(d.mean_step_s)} mean over {d.num_steps} steps, batch "
          f"{d.mean_batch:.1f}, context {d.mean_context:.0f}; {d.achieved_bytes_per_s / 1e9:.1f} GB/s "
          f"of weights + KV read{floor}")
    else:
        p("decode-only step     none (every step carried prefill tokens)")
    pf = f.prefill
    if pf is not None:
        floor = (f"; matmul floor {pf.floor_tokens_per_s:.0f} tok/s, {100 * pf.fraction_of_floor:.1f} % of it"
                 if pf.floor_tokens_per_s is not None and pf.fraction_of_floor is not None else "")
        p(f"prefill-heavy steps  {pf.tokens_per_s:.0f} tok/s over {pf.num_steps} steps, "
          f"{pf.achieved_flops_per_s / 1e12:.2f} TFLOP/s in the layers' matmuls{floor}")
    s = f.serial_floor
    if s is not None and f.serial_floor_ratio is not None:
        p(f"serial floor         {secs(s.total_s)} = prefill {secs(s.prefill_s)} + decode {secs(s.decode_s)} "
          f"at the achieved decode batch {s.decode_batch:.1f}; elapsed is {f.serial_floor_ratio:.2f}× it "
          f"({f.output_tokens / s.total_s:.0f} output tok/s at the floor); at full batch "
          f"{s.full_batch:.0f}: {secs(s.full_batch_total_s)}")


# ---- command ---------------------------------------------------------------------------------


def add_rates_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("floors")
    g.add_argument("--bandwidth-tbps", type=float, default=None,
                   help="copy bandwidth (read + write, TB/s) for the floors instead of measuring it")
    g.add_argument("--matmul-tflops", type=float, default=None,
                   help="bf16 matmul rate (TFLOP/s) for the floors instead of measuring it")


def rates_from_args(args: argparse.Namespace, device: torch.device) -> DeviceRates | None:
    """Given rates when both flags are set, else measured (None on CPU). Call it before the
    engine takes the GPU's memory."""
    if (args.bandwidth_tbps is None) != (args.matmul_tflops is None):
        raise ValueError("give both --bandwidth-tbps and --matmul-tflops, or neither")
    if args.bandwidth_tbps is not None:
        return DeviceRates.given(args.bandwidth_tbps, args.matmul_tflops)
    return measure_device_rates(device)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=256, help="prompts of the offline workload")
    g.add_argument("--input-len-min", type=int, default=512, help="shortest prompt (tokens)")
    g.add_argument("--input-len-max", type=int, default=1536, help="longest prompt (tokens)")
    g.add_argument("--output-len", type=int, default=256, help="output tokens per request (EOS ignored)")
    g.add_argument("--warmup-prompts", type=int, default=4,
                   help="untimed requests (4 output tokens each) run first, to compile and warm up")
    g.add_argument("--peer", choices=("none", "transformers"), default="none",
                   help="also run transformers on the same prompts: its continuous batching "
                        "(generate_batch) and its plain generate, each reported; the ratio is against "
                        "the faster")
    g.add_argument("--peer-attn-implementation", default=DEFAULT_PEER_ATTENTION,
                   help="the peer's attention for generate_batch")
    g.add_argument("--peer-generate-attn-implementation", default="sdpa",
                   help="the peer's attention for generate")
    g.add_argument("--peer-batch-size", type=int, default=None,
                   help="prompts per generate call (default: --max-num-seqs, the engine's batch)")
    g.add_argument("--peer-modes", default="generate_batch,generate",
                   help="which of the peer's paths to run, comma-separated")
    g.add_argument("--peer-num-blocks", type=int, default=None,
                   help="the peer's KV blocks (default: transformers sizes them from free memory)")
    g.add_argument("--peer-max-batch-tokens", type=int, default=None,
                   help="the peer's token budget per step (default: transformers picks)")
    g.add_argument("--output-json", default=None, help="write every figure to this file")
    add_rates_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=main, **BENCH_ENGINE_DEFAULTS)


def main(args: argparse.Namespace) -> int:
    from rapidserve.runner.setup import resolve_device
    from rapidserve.model.source import load_source, resolve_model

    workload = Workload(args.num_prompts, args.input_len_min, args.input_len_max, args.output_len, args.seed)
    config = engine_config_from_args(args)
    rates = rates_from_args(args, resolve_device(config.device))
    figures, header, dtype, device, prompts = _run_rapidserve(config, workload, rates, args.warmup_prompts)
    result: dict[str, Any] = {"command": "bench throughput", "workload": dataclasses.asdict(workload),
                              "engine": header, "rates": as_json(rates), "rapidserve": as_json(figures)}
    print(header["line"])
    print(rates_line(rates))
    _print_figures(figures)
    if args.peer == "transformers":
        cb = {k: v for k, v in (("num_blocks", args.peer_num_blocks),
                                ("max_batch_tokens", args.peer_max_batch_tokens)) if v is not None}
        hf_config = load_source(resolve_model(config.model), "dummy").config
        if device.type == "cuda":
            # Tells whether the engine really gave its memory back (the peer sizes from it).
            free, total = torch.cuda.mem_get_info(device)
            result["peer_free_gib_at_start"] = free / 2**30
            print(f"peer starts with {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        modes = [m.strip() for m in args.peer_modes.split(",") if m.strip()]
        if not modes or set(modes) - {"generate_batch", "generate"}:
            raise ValueError(f"--peer-modes: generate_batch and/or generate, got {args.peer_modes!r}")
        peers = []
        for mode in modes:
            if mode == "generate_batch":
                peer = run_transformers_peer(hf_config, prompts, workload.output_len, device, dtype,
                                             args.peer_attn_implementation, config.seed, cb)
            else:
                peer = run_transformers_generate(hf_config, prompts, workload.output_len, device, dtype,
                                                 args.peer_batch_size or config.max_num_seqs,
                                                 args.peer_generate_attn_implementation, config.seed)
            peers.append(peer)
            print(f"peer ({peer.name}, {peer.attn_implementation}): {peer.elapsed_s:.2f} s, "
                  f"{peer.output_tokens_per_s:.1f} output tok/s, {peer.total_tokens_per_s:.1f} total tok/s")
            if peer.output_tokens != figures.output_tokens:
                print(f"warning: the peer made {peer.output_tokens} output tokens, rapidserve "
                      f"{figures.output_tokens}", file=sys.stderr)
        # NOTE: against the peer's faster path, whichever it is on this device.
        peer = max(peers, key=lambda p: p.output_tokens_per_s)
        ratio = figures.output_tokens_per_s / peer.output_tokens_per_s
        result["peer"] = as_json(peer)
        result["peers"] = [as_json(p) for p in peers]
        result["rapidserve_over_peer"] = ratio
        print(f"rapidserve / peer ({peer.name}, the faster) = {ratio:.2f}×")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0


def _run_rapidserve(
    config: Any, workload: Workload, rates: DeviceRates | None, warmup_prompts: int
) -> tuple[ThroughputFigures, dict[str, Any], torch.dtype, torch.device, list[list[int]]]:
    """The engine lives only in here, so its GPU memory is free for the peer afterwards."""
    from rapidserve.serving.hybrid import LLMEngine
    engine = LLMEngine(config)
    try:
        prompts = workload.prompts(engine.model_config.vocab_size)
        longest = workload.input_len_max + workload.output_len
        if longest > engine.max_model_len:
            raise ValueError(
                f"prompts up to {workload.input_len_max} tokens + {workload.output_len} output tokens "
                f"exceed max_model_len {engine.max_model_len}"
            )
        if warmup_prompts > 0:
            run_workload(engine, prompts[:warmup_prompts], min(4, workload.output_len))
        run = run_workload(engine, prompts, workload.output_len)
        cost = model_cost(engine.model_config, engine.dtype,
                          resolve_kv_cache_dtype(config.kv_cache_dtype, engine.dtype))
        figures = summarize(run, prompts, workload.output_len, cost, rates, config.max_num_seqs)
        mean_len = sum(len(p) for p in prompts) / len(prompts)
        header = {
            "model": engine.model_name, "dtype": str(engine.dtype).replace("torch.", ""),
            "device": str(engine.device), "kv_blocks": engine.blocks.num_blocks,
            "block_size": engine.blocks.block_size, "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "model_cost": as_json(cost),
            "line": (
                f"rapidserve bench throughput: {len(prompts)} requests, prompts "
                f"{workload.input_len_min}-{workload.input_len_max} tokens (mean {mean_len:.0f}), "
                f"{workload.output_len} output tokens; {engine.model_name} "
                f"{str(engine.dtype).replace('torch.', '')} on {engine.device}, KV "
                f"{engine.blocks.num_blocks} blocks of {engine.blocks.block_size}"
            ),
        }
        return figures, header, engine.dtype, engine.device, prompts
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
