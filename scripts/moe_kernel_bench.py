"""The fused MoE kernel alone at a model's expert shapes: time per layer against its floor.

For each token count T: one MoE layer's routed experts (random router, top-k), timed as a CUDA
graph replay (as the decode graphs run it) and, for comparison, the torch reference loop
eagerly. The floor of a layer is the bytes of the experts the batch touches (read once) over
the copy bandwidth, or its FLOPs over the bf16 matmul rate, whichever is larger; the device's
rates are measured first (bench/floors.py).

    python scripts/moe_kernel_bench.py                       # Mixtral-8x7B's experts, bf16
    python scripts/moe_kernel_bench.py --preset qwen3-30b-a3b --tokens 1,8,64,512
    python scripts/moe_kernel_bench.py --device cpu --hidden 64 --inter 32 --tokens 1,4   # smoke test

Prints one line per T and writes JSON with --output-json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rapidserve.bench.floors import measure_device_rates
from rapidserve.model.config import ModelConfig
from rapidserve.model.moe import experts_reference, route
from rapidserve.model.presets import load_preset
from rapidserve.ops.fused_moe import fused_experts


def _time_s(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn()."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--hidden", type=int, default=None, help="override the preset's hidden size")
    ap.add_argument("--inter", type=int, default=None, help="override the expert intermediate size")
    ap.add_argument("--tokens", default="1,32,128,2048")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()

    cfg = ModelConfig.from_hf(load_preset(args.preset))
    if not cfg.is_moe:
        raise SystemExit(f"preset {args.preset} is not an MoE model")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hidden, inter = args.hidden or cfg.hidden_size, args.inter or cfg.moe_intermediate_size
    experts, top_k = cfg.num_experts, cfg.experts_per_token
    gen = torch.Generator(device=device).manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype, generator=gen) * 0.02
    w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype, generator=gen) * 0.02
    router = torch.randn(experts, hidden, device=device, dtype=dtype, generator=gen) * 0.02
    rates = measure_device_rates(device) if device.type == "cuda" else None
    expert_bytes = 3 * hidden * inter * w13.element_size()
    print(f"{args.preset} experts: {experts} x top-{top_k}, hidden {hidden}, intermediate {inter}, "
          f"{args.dtype} on {device}; {expert_bytes / 2**20:.1f} MiB per expert")
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(n, hidden, device=device, dtype=dtype, generator=gen)
        weights, ids = route(torch.nn.functional.linear(x, router), top_k, cfg.norm_topk_prob)
        touched = int(torch.unique(ids).numel())
        fused_experts(x, w13, w2, weights, ids)  # compile
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fused_experts(x, w13, w2, weights, ids)
            fused_s = _time_s(graph.replay, device, args.repeats)
        else:
            fused_s = _time_s(lambda: fused_experts(x, w13, w2, weights, ids), device, args.repeats)
        ref_s = _time_s(lambda: experts_reference(x, w13, w2, weights, ids), device, max(3, args.repeats // 4))
        flops = 2 * n * top_k * 3 * hidden * inter
        row = {"tokens": n, "experts_touched": touched,
               "expected_touched": round(cfg.expected_experts_touched(n), 2),
               "fused_ms": fused_s * 1e3, "torch_loop_ms": ref_s * 1e3,
               "gb_per_s": touched * expert_bytes / fused_s / 1e9, "tflops": flops / fused_s / 1e12}
        if rates is not None:
            floor = max(touched * expert_bytes / rates.copy_bytes_per_s, flops / rates.matmul_flops_per_s)
            row |= {"floor_ms": floor * 1e3, "x_floor": fused_s / floor}
        rows.append(row)
        floor_txt = f", floor {row['floor_ms']:.3f} ms ({row['x_floor']:.2f}x)" if rates is not None else ""
        print(f"T {n:5d}: {touched}/{experts} experts, fused {row['fused_ms']:.3f} ms{floor_txt}, "
              f"{row['gb_per_s']:.0f} GB/s of experts, {row['tflops']:.1f} TFLOP/s; "
              f"torch loop {row['torch_loop_ms']:.3f} ms")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"preset": args.preset, "dtype": args.dtype, "hidden": hidden, "inter": inter,
                       "rates": rates._asdict() if rates is not None else None, "points": rows}, f, indent=1)


if __name__ == "__main__":
    main()
