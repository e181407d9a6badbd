"""The device's ceilings and the floors they put under a model's steps.

A floor is the time a step cannot beat on this device: a decode step must read the weights
and the KV of its batch at the copy bandwidth; a prefill must do its matmul FLOPs at the
measured bf16 matmul rate. Benchmarks print each measured time next to its floor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from rapidserve.model.config import ModelConfig, expected_distinct_experts

log = logging.getLogger("rapidserve.bench")

_COPY_BYTES = 1 << 30  # per buffer: large enough that launch overhead is noise
_MATMUL_N = 8192
_TRIALS = 3


class DeviceRates(NamedTuple):
    device_name: str
    copy_bytes_per_s: float  # device-to-device copy: bytes read + bytes written, per second
    matmul_flops_per_s: float  # bf16 n×n·n×n matmul
    matmul_n: int  # 0 when the rates were given, not measured

    @classmethod
    def given(cls, bandwidth_tbps: float, matmul_tflops: float) -> DeviceRates:
        """Rates taken from the user (e.g. GPU_FACTS.md's), instead of measured."""
        if bandwidth_tbps <= 0 or matmul_tflops <= 0:
            raise ValueError("--bandwidth-tbps and --matmul-tflops must both be positive")
        return cls("given", bandwidth_tbps * 1e12, matmul_tflops * 1e12, 0)


class ModelCost(NamedTuple):
    """What a model's steps must move and compute, from its config alone."""

    num_params: int  # every parameter: embedding, layers, final norm, lm_head unless tied
    weight_bytes: int  # num_params at the run's dtype
    step_weight_bytes: int  # what every forward must read: all but an untied embedding table,
    # of which a step reads only its batch's rows
    kv_bytes_per_token: int  # K and V of one token, all layers
    linear_flops_per_token: int  # 2 × the decoder layers' matmul parameters
    lm_head_flops_per_token: int  # 2 × hidden × vocab, paid only for tokens that sample
    attention_flops_per_pair: int  # QK^T and PV for one (query, key) pair, all layers and heads
    # Mixture of experts (all 0 for a dense model). A step reads only the routed experts its
    # tokens touch: step_weight_bytes counts them all, step_weight_bytes_read() the expected.
    routed_expert_bytes: int = 0  # every routed expert of every MoE layer, at the run's dtype
    num_experts: int = 0
    experts_per_token: int = 0
    # As model cards count "active" parameters: all but the routed experts a token skips.
    active_params_per_token: int = 0


def model_cost(cfg: ModelConfig, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> ModelCost:
    """kv_dtype: the KV cache's (default: dtype). With cfg.quantization == "fp8" the decoder's
    projections count one byte per weight plus a float32 scale per output channel."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv_itemsize = torch.empty((), dtype=kv_dtype or dtype).element_size()
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    attention = h * (q + 2 * kv) + q * h  # qkv, o
    linear = attention + 3 * h * inter  # + gate/up, down
    biases = (q + 2 * kv if cfg.qkv_bias else 0) + (h if cfg.o_bias else 0)
    biases += 2 * inter + h if cfg.mlp_bias else 0
    norms = 2 * h + (2 * cfg.head_dim if cfg.qk_norm else 0)
    embed = cfg.vocab_size * h
    lm_head = 0 if cfg.tie_word_embeddings else embed
    num_params = embed + cfg.num_layers * (linear + biases + norms) + h + lm_head
    active_linear = cfg.num_layers * linear  # matmul parameters one token uses, all layers
    routed = 0
    if cfg.is_moe:
        shared = cfg.shared_expert_intermediate_size
        # A sparse layer: router [E, h], E experts, the shared expert and its gate.
        sparse_dense = h * cfg.num_experts + (3 * h * shared + h if shared else 0)
        n_sparse = cfg.num_moe_layers
        routed = n_sparse * cfg.num_experts * cfg.expert_params
        num_params += n_sparse * (sparse_dense - 3 * h * inter - (2 * inter + h if cfg.mlp_bias else 0)) + routed
        active_linear += n_sparse * (
            sparse_dense + cfg.experts_per_token * cfg.expert_params - 3 * h * inter
        )
    weight_bytes = num_params * itemsize
    if cfg.quantization == "fp8":
        # FP8 projections (one byte per weight, a float32 scale per output channel): attention in
        # every layer, the dense MLPs and shared experts; routed experts stay in the model's dtype.
        n_sparse = cfg.num_moe_layers if cfg.is_moe else 0
        n_dense = cfg.num_layers - n_sparse
        shared = cfg.shared_expert_intermediate_size if cfg.is_moe else 0
        fp8_params = cfg.num_layers * attention + n_dense * 3 * h * inter + n_sparse * 3 * h * shared
        scales = cfg.num_layers * (q + 2 * kv + h) + n_dense * (2 * inter + h) + (n_sparse * (2 * shared + h) if shared else 0)
        weight_bytes -= fp8_params * (itemsize - 1) - scales * 4
    return ModelCost(
        num_params=num_params,
        weight_bytes=weight_bytes,
        step_weight_bytes=weight_bytes - (embed * itemsize if lm_head else 0),
        kv_bytes_per_token=cfg.num_layers * 2 * kv * kv_itemsize,
        linear_flops_per_token=2 * active_linear,
        lm_head_flops_per_token=2 * embed,
        attention_flops_per_pair=4 * cfg.num_layers * q,
        routed_expert_bytes=routed * itemsize,
        num_experts=cfg.num_experts,
        experts_per_token=cfg.experts_per_token,
        active_params_per_token=num_params - routed + routed * cfg.experts_per_token // max(1, cfg.num_experts),
    )


def step_weight_bytes_read(cost: ModelCost, num_tokens: float | None = None) -> float:
    """Weight bytes a forward over `num_tokens` tokens reads: step_weight_bytes, less the
    routed experts no token is expected to touch (MoE; uniform routing). None: all of them."""
    if not cost.num_experts or num_tokens is None:
        return float(cost.step_weight_bytes)
    n = max(0, round(num_tokens))
    share = expected_distinct_experts(cost.num_experts, cost.experts_per_token, n) / cost.num_experts
    return cost.step_weight_bytes - cost.routed_expert_bytes * (1.0 - share)


def decode_step_floor_s(
    cost: ModelCost, rates: DeviceRates, kv_tokens: int, batch: float | None = None
) -> float:
    """A decode step over a batch whose sequences hold `kv_tokens` KV entries in all: the
    weights and that KV must be read once (activations and the new KV are noise). For an MoE
    model give `batch`: only the experts its tokens touch are read (see step_weight_bytes_read)."""
    weights = step_weight_bytes_read(cost, batch)
    return (weights + kv_tokens * cost.kv_bytes_per_token) / rates.copy_bytes_per_s


def prefill_flops(cost: ModelCost, prompt_len: int, context: int = 0) -> int:
    """FLOPs of prefilling `prompt_len` tokens after `context` cached ones, sampling one
    token: the layers' matmuls, causal attention, and the lm_head for the last token."""
    pairs = prompt_len * context + prompt_len * (prompt_len + 1) // 2
    return (
        cost.linear_flops_per_token * prompt_len
        + cost.attention_flops_per_pair * pairs
        + cost.lm_head_flops_per_token
    )


def prefill_floor_s(cost: ModelCost, rates: DeviceRates, prompt_len: int, context: int = 0) -> float:
    return prefill_flops(cost, prompt_len, context) / rates.matmul_flops_per_s


def measure_device_rates(device: torch.device | str | None = None) -> DeviceRates | None:
    """Copy bandwidth and bf16 matmul rate of a CUDA device, in about a second; None on CPU
    (there the floors would describe nothing the engine is tuned for)."""
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if dev.type != "cuda":
        return None
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(dev):
        free, _ = torch.cuda.mem_get_info(dev)
        # Leave most free memory alone: a server (or the peer) may be sized after this.
        nbytes = min(_COPY_BYTES, free // 8) // (1 << 20) * (1 << 20)
        if nbytes < 1 << 24:
            raise ValueError(f"only {free / 2**30:.2f} GiB free on {dev}: too little to measure rates")
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_s = _best_time(lambda: dst.copy_(src))
        src = dst = None  # freed before the matmul's buffers are made
        n = _MATMUL_N
        while n > 1024 and 3 * n * n * 2 > free // 4:
            n //= 2
        a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
        c = torch.empty(n, n, dtype=torch.bfloat16, device=dev)
        matmul_s = _best_time(lambda: torch.matmul(a, b, out=c))
        a = b = c = None
        torch.cuda.empty_cache()
    rates = DeviceRates(torch.cuda.get_device_name(dev), 2 * nbytes / copy_s, 2 * n**3 / matmul_s, n)
    log.info(
        "device rates on %s: copy %.2f TB/s (read + write), bf16 matmul %d³ %.0f TFLOP/s",
        rates.device_name, rates.copy_bytes_per_s / 1e12, n, rates.matmul_flops_per_s / 1e12,
    )
    return rates


def _best_time(fn: Callable[[], object], budget_s: float = 0.4) -> float:
    """Seconds per call of a GPU operation: the best of a few trials of back-to-back calls
    between CUDA events (best, as the ceiling is what the floors need)."""
    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    iters = max(3, min(1000, int(budget_s / _TRIALS / once)))
    best = float("inf")
    for _ in range(_TRIALS):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    return best
