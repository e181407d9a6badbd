"""Engine flags shared by every command (named as vLLM names them)."""

from __future__ import annotations

import argparse
import dataclasses

from rapidserve.config import DTYPES, LOAD_FORMATS, MODES, PLACEMENTS, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF directory, .gguf file or preset:NAME (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="take the tokenizer from this directory or .gguf")
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="dummy: random weights from the config (for performance work)")
    g.add_argument("--dtype", default="auto", choices=DTYPES + ("bf16", "fp16", "fp32", "half"))
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", default="hybrid", choices=MODES,
                   help="hybrid: chunked prefill in one batch; rapid: concurrent prefill and decode workers")
    g.add_argument("--placement", default="process", choices=PLACEMENTS,
                   help="rapid mode: the two workers as processes (default) or threads")
    g.add_argument("--mps", default="auto", choices=("auto", "on", "off"),
                   help="rapid mode, process placement on NVIDIA: auto uses a running MPS daemon or "
                        "starts a private one (falling back to thread placement if it cannot); on "
                        "requires one; off runs without (the two processes are then time-sliced)")
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
    g.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="auto: triton on CUDA, torch on CPU")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})
