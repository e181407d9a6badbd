"""Engine-wide settings: what the CLI flags and `LLM(...)` keyword arguments fill in."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODES = ("hybrid", "rapid", "disagg")
PLACEMENTS = ("process", "thread")
LOAD_FORMATS = ("auto", "dummy", "gguf", "safetensors")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("fp8",)  # model/quant.py
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # ops/fp8.py
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def parse_bytes(text: str | int | None) -> int | None:
    """'2GiB', '512M', '1e9' or an int -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a size in bytes (examples: 2GiB, 512M, 1000000)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def parse_disagg_devices(text: str) -> tuple[int, int]:
    """'0,1' -> (prefill device index, decode device index)."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"disagg_devices must be two CUDA device indices 'P,D' (e.g. 0,1), got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    tokenizer: str | None = None  # a directory or .gguf to take the tokenizer from
    load_format: str = "auto"
    dtype: str = "auto"
    # Weight format: None (the checkpoint's / dtype) or "fp8" (E4M3 projections, per-channel
    # scales). FP8 checkpoints are detected from their config.json without the flag.
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8: E4M3 KV with per-head scales
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0
    mode: str = "hybrid"
    placement: str = "process"  # rapid / disagg mode: workers as two processes or two threads
    mps: str = "auto"  # rapid mode, process placement on NVIDIA: use/start an MPS daemon
    # rapid / disagg mode, process placement: a worker that sends no heartbeat for this long is
    # taken as dead (stopped or hung) and the engine fails; 0: no such check
    worker_heartbeat_timeout_s: float = 5.0
    # every mode: a step (one turn of a rapid / disagg worker's loop; one LLMEngine.step() of the
    # hybrid mode's engine thread under an AsyncEngine) that has run this long is taken as wedged
    # (a kernel that never ends, a deadlock) and the engine fails; 0: no such check. Generous: a
    # first Triton compile is inside a step, and so are a hybrid CPU prefill chunk and a disagg
    # prefill instance's CPU prefill of long prompts (the rapid prefill worker's runs in short
    # layer groups).
    step_timeout_s: float = 300.0
    # rapid / disagg mode, shutdown: how long the workers may take to stop when asked, before
    # SIGTERM (then SIGKILL) ends them
    worker_shutdown_timeout_s: float = 10.0
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides the sizing from memory
    kv_cache_memory_bytes: int | None = None  # KV memory on CPU (default 1 GiB) or a fixed GPU amount
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    served_model_name: str | None = None
    chat_template: str | None = None  # a Jinja template (file path or inline) instead of the tokenizer's
    enforce_eager: bool = False  # no CUDA graphs
    attention_backend: str = "auto"  # auto: triton on CUDA, torch on CPU
    disagg_memory_split: float = 0.5  # disagg mode: the prefill instance's share of the memory
    disagg_decode_sms: int | None = None  # disagg mode on one GPU: SMs of the decode instance (None: half)
    disagg_devices: str | None = None  # disagg mode: "P,D" CUDA devices of prefill and decode
    # Plan and launch step N+1 before reading step N's tokens back (None: on CUDA only, where
    # the GPU then never waits for the host; on CPU there is nothing to overlap).
    async_scheduling: bool | None = None
    step_timeline: str | None = None  # a directory: each worker writes when its steps ran (diagnostic)
    # rapid mode: how the SMs are split between the phases each step (resources/policy.py)
    partition_policy: str = "off"  # rapid, nexus, static:N, full, off
    profile: str | None = None  # the JSON of `rapidserve profile` (rapid and nexus need it)
    slo_itl_ms: float | None = None  # the ITL SLO the rapid and nexus policies keep
    # rapid/nexus: they aim each decode step at (1 - headroom) x slo_itl_ms. The profile gives a
    # step's median; the goodput judges each request's p95 ITL (measured on the H100, arxiv-like
    # at 2 req/s: aiming at the SLO itself left half the requests' p95 over it; at 0.84x, none).
    slo_itl_headroom: float = 0.15
    slo_ttft_ms: float | None = None  # nexus: the time to drain waiting prompts it aims at
    # rapid/nexus: correct the profile's decode predictions from the measured steps and guard the
    # measured p95 ITL (resources/feedback.py); False: open loop, as the paper
    closed_loop: bool = True
    # rapid mode with a policy that switches partitions: the prefill worker runs a prompt's forward
    # in groups of layers of about this many ms, and follows a switch between two groups (0: whole
    # steps). 20 ms: an 8K-token Llama-3.1-8B prompt on 100 of the H100's SMs took 296 ms (the
    # 2026-11-23 profile), 9 ms a layer, so groups of 2 layers; about half a decode step at the
    # SLOs measured (40-50 ms), so the prefill side is on a new partition within about one step.
    prefill_max_step_ms: float = 20.0

    @property
    def use_cuda_graphs(self) -> bool:
        return not self.enforce_eager

    def resolve_async_scheduling(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.async_scheduling is None else self.async_scheduling

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        object.__setattr__(self, "kv_cache_memory_bytes", parse_bytes(self.kv_cache_memory_bytes))
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; available: {', '.join(MODES)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; available: {', '.join(PLACEMENTS)}")
        if self.mps not in ("auto", "on", "off"):
            raise ValueError(f"unknown mps setting {self.mps!r}; available: auto, on, off")
        from rapidserve.serving.liveness import check_heartbeat_timeout, check_step_timeout

        check_heartbeat_timeout(self.worker_heartbeat_timeout_s)
        check_step_timeout(self.step_timeout_s)
        if not self.worker_shutdown_timeout_s >= 0:  # NaN too
            raise ValueError(f"worker_shutdown_timeout_s must be >= 0, got {self.worker_shutdown_timeout_s}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"unknown load format {self.load_format!r}; available: {', '.join(LOAD_FORMATS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; available: {', '.join(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; available: {', '.join(QUANTIZATIONS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; available: {', '.join(KV_CACHE_DTYPES)}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"unknown attention backend {self.attention_backend!r}; available: auto, torch, triton"
            )
        from rapidserve.resources.policy import parse_policy

        policy = parse_policy(self.partition_policy)
        if policy.kind != "off" and self.mode != "rapid":
            raise ValueError(f"partition_policy {self.partition_policy!r} applies to the rapid mode, not {self.mode!r}")
        if policy.kind in ("rapid", "nexus") and (self.profile is None or self.slo_itl_ms is None):
            raise ValueError(f"the {policy.kind} partition policy needs a profile (--profile PATH, from "
                             "`rapidserve profile`) and an ITL SLO (--slo-itl-ms)")
        for name in ("slo_itl_ms", "slo_ttft_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if not self.prefill_max_step_ms >= 0 or self.prefill_max_step_ms == float("inf"):
            raise ValueError(f"prefill_max_step_ms must be a finite number >= 0 (0: whole steps), "
                             f"got {self.prefill_max_step_ms}")
        if not 0.0 <= self.slo_itl_headroom < 1.0:
            raise ValueError(f"slo_itl_headroom must be in [0, 1), got {self.slo_itl_headroom}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu or cuda[:N]")
        if self.disagg_decode_sms is not None and (self.mode != "disagg" or self.disagg_decode_sms < 1):
            raise ValueError(f"disagg_decode_sms must be a positive SM count of the disagg mode, got "
                             f"{self.disagg_decode_sms} in the {self.mode} mode")
        if not 0.0 < self.disagg_memory_split < 1.0:
            raise ValueError(f"disagg_memory_split must be in (0, 1), got {self.disagg_memory_split}")
        if self.disagg_devices is not None:
            parse_disagg_devices(self.disagg_devices)
            if self.mode != "disagg":
                raise ValueError(f"disagg_devices applies to the disagg mode, not {self.mode!r}")
            if self.device == "cpu":
                raise ValueError("disagg_devices names CUDA devices; it cannot go with device cpu")
