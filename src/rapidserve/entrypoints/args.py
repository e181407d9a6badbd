"""Engine flags shared by every command (named as vLLM names them)."""

from __future__ import annotations

import argparse
import dataclasses

from rapidserve.config import DTYPES, KV_CACHE_DTYPES, LOAD_FORMATS, MODES, PLACEMENTS, QUANTIZATIONS, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF directory, .gguf file or preset:NAME (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="take the tokenizer from this directory or .gguf")
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="dummy: random weights from the config (for performance work)")
    g.add_argument("--dtype", default="auto", choices=DTYPES + ("bf16", "fp16", "fp32", "half"))
    g.add_argument("--quantization", "-q", default=None, choices=QUANTIZATIONS,
                   help="fp8: the decoder's projections in FP8 E4M3 with per-channel scales, quantized "
                        "at load (activations per token at run time); FP8 checkpoints need no flag")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the model's dtype; fp8 (= fp8_e4m3): the paged KV cache in E4M3 with "
                        "per-head scales (the checkpoint's, else 1.0): twice the blocks for the memory")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", default="hybrid", choices=MODES,
                   help="hybrid: chunked prefill in one batch; rapid: concurrent prefill and decode workers; "
                        "disagg: prefill and decode instances with their own weights and KV pools")
    g.add_argument("--placement", default="process", choices=PLACEMENTS,
                   help="rapid and disagg modes: the two workers as processes (default) or threads")
    g.add_argument("--mps", default="auto", choices=("auto", "on", "off"),
                   help="rapid mode, process placement on NVIDIA: auto uses a running MPS daemon or "
                        "starts a private one (falling back to thread placement if it cannot); on "
                        "requires one; off runs without (the two processes are then time-sliced)")
    g.add_argument("--disagg-decode-sms", type=int, default=None,
                   help="disagg mode on one GPU: SMs of the decode instance's static split (default: half, "
                        "rounded to the granularity); the prefill instance gets the rest")
    g.add_argument("--disagg-memory-split", type=float, default=0.5,
                   help="disagg mode: the prefill instance's share of the memory (KV budget on CPU or "
                        "with --kv-cache-memory-bytes; of gpu_memory_utilization x total on one GPU)")
    g.add_argument("--disagg-devices", default=None, metavar="P,D",
                   help="disagg mode: CUDA device indices of the prefill and decode instances (default: "
                        "both on one device)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV cache size in blocks")
    g.add_argument("--kv-cache-memory-bytes", default=None,
                   help="KV cache memory, e.g. 2GiB (default on CPU: 1GiB; on GPU: sized from free memory)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step (the prefill chunk size)")
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan and launch each step before reading the previous one's tokens back "
                        "(default: on with CUDA, off on CPU)")
    g.add_argument("--partition-policy", default="off",
                   help="rapid mode: how the SMs are split between prefill and decode each step: rapid "
                        "(the paper; needs --profile and --slo-itl-ms), nexus (cost model; same), "
                        "static:N (decode on N SMs), full (both on every SM), off (no partitioning)")
    g.add_argument("--profile", default=None, metavar="PATH",
                   help="the SM-partitioning profile written by `rapidserve profile`")
    g.add_argument("--slo-itl-ms", type=float, default=None, help="the ITL SLO the rapid/nexus policies keep")
    g.add_argument("--slo-itl-headroom", type=float, default=0.15,
                   help="rapid/nexus policies: aim each decode step at (1 - this) x --slo-itl-ms, since "
                        "the profile gives a step's median and the SLO is judged on each request's p95")
    g.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="nexus policy: the time to drain the waiting prompts it aims at (default 1000)")
    g.add_argument("--step-timeline", default=None, metavar="DIR",
                   help="diagnostic: each worker writes the start and end of its steps on the device "
                        "to DIR/{role}-{pid}.json at shutdown (shows prefill/decode overlap)")
    g.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="auto: triton on CUDA, torch on CPU")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})
