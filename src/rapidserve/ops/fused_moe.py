"""The routed experts of an MoE layer in two grouped-GEMM Triton kernels.

  fused_experts(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k])
      -> [T, H] = sum_j topk_weights[t, j] * w2[e] @ (silu(g) * u),  g, u = w13[e] @ x[t],
         e = topk_ids[t, j]

The T*k (token, slot) pairs are grouped by expert, each expert's group padded to a multiple of
the kernels' BLOCK_M (`align_by_expert`, a third small kernel), so every row tile of a kernel
reads one expert's weights: a decode batch reads each touched expert once per tile of its
tokens, not once per token. Kernel 1 multiplies a tile of pairs by the expert's gate and up rows in one pass and
writes silu(gate) * up; kernel 2 multiplies that by the expert's down projection and scales
each row by its routing weight; a torch sum over the k slots gives the output.

NOTE: graph-safe: no value is read on the host and every shape depends on (T, k, E, H, I) only:
the padded pair count is its upper bound T*k + E*(BLOCK_M - 1), and tiles past an expert's
padded end (or past the last expert) return at once. So a captured decode graph replays
whatever the routing. The wrappers allocate only temporaries of those static shapes.

Rounding follows the torch reference (rapidserve.model.moe.experts_reference, which does
what transformers' default experts do): products accumulate in fp32; gate and up are rounded
to the activation dtype before silu, silu and the product each rounded, as torch does op by
op; the down output is rounded, then scaled by the routing weight in the promoted dtype of
the two (Mixtral's fp32 weights: kept fp32; Qwen's rounded weights: rounded again); the k
slots are summed in fp32 and rounded once. Left to differ: the matmuls' fp32 summation order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rapidserve.ops.triton_fused import _cast


class TileConfig(NamedTuple):
    block_m: int  # pairs per tile (>= 16: tl.dot's minimum)
    block_n: int  # output columns per tile
    block_k: int  # reduction step
    num_warps: int
    num_stages: int


def tile_config(num_pairs: int, num_experts: int, itemsize: int = 2) -> TileConfig:
    """The tile shape for T*k = num_pairs routed pairs over num_experts experts.

    Chosen for Hopper (H100/H200: 227 KB of shared memory per block) from the expected rows
    per expert: decode batches give an expert a handful of rows, so a 16-row tile wastes least
    and a deep K tile streams the weights; prefills fill 64- or 128-row tiles. Budgets:
    the gate/up kernel holds two BLOCK_M x BLOCK_N fp32 accumulators (<= 64 registers a
    thread here) and stages an A tile plus two weight tiles per pipeline stage (<= 144 KB in
    all); fp32 operands halve BLOCK_K to stay within it.
    NOTE: not yet swept on the GPU (owed); this table is the place to tune.
    """
    rows = num_pairs / max(1, num_experts)
    if rows <= 16:
        cfg = TileConfig(16, 64, 128, 4, 4)
    elif rows <= 128:
        cfg = TileConfig(32, 128, 64, 4, 4)
    elif rows <= 1024:
        cfg = TileConfig(64, 64, 64, 4, 3)
    else:
        cfg = TileConfig(128, 64, 64, 8, 3)
    if itemsize >= 4:
        cfg = cfg._replace(block_k=max(32, cfg.block_k // 2))
    return cfg


class ExpertAlignment(NamedTuple):
    sorted_pairs: torch.Tensor  # [P] int32: pair index t * k + j, grouped by expert; T*k = padding
    block_expert: torch.Tensor  # [P // block_m] int32: each tile's expert; num_experts = no work


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Group the (token, slot) pairs by expert, each group padded to a multiple of block_m.

    Counts and offsets are torch ops; the scatter is `_align_kernel`, one program per expert
    (no sort: CUB's sorts can fail inside CUDA graph capture at some sizes). Pairs keep their
    order within an expert. No host sync (see the module NOTE).
    """
    flat = topk_ids.reshape(-1)  # [N]
    n = flat.numel()
    device = flat.device
    padded_len = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    counts.scatter_add_(0, flat.to(torch.int64), torch.ones(n, dtype=torch.int32, device=device))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0, dtype=torch.int32)  # [E]
    sorted_pairs = torch.full((padded_len,), n, dtype=torch.int32, device=device)
    if n:
        _align_kernel[(num_experts,)](
            flat.to(torch.int32), padded_end - padded, sorted_pairs, n, BLOCK=_ALIGN_BLOCK
        )
    starts = torch.arange(0, padded_len, block_m, dtype=torch.int32, device=device)
    block_expert = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)
    return ExpertAlignment(sorted_pairs, block_expert)


_ALIGN_BLOCK = 1024  # pairs one align program scans per step


@triton.jit
def _align_kernel(ids_ptr, start_ptr, sorted_ptr, num_pairs, BLOCK: tl.constexpr):
    # Program e writes the indices of the pairs routed to expert e, in order, from start[e].
    expert = tl.program_id(0)
    dest = tl.load(start_ptr + expert)
    for i0 in range(0, num_pairs, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        hit = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1) == expert
        rank = tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(sorted_ptr + dest + rank, offs, mask=hit)
        dest += tl.sum(hit.to(tl.int32), axis=0)


@triton.jit
def _gate_up_silu_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, num_experts, hidden, inter, top_k,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ot,
    DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[pair, n] = silu(x[tok] . w[e, n]) * (x[tok] . w[e, I + n]) for the tile's pairs
    num_n = tl.cdiv(inter, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    tokens = pairs // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < inter
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < hidden
        a = tl.load(
            x_ptr + tokens.to(tl.int64)[:, None] * stride_xt + offs_k[None, :],
            mask=valid[:, None] & mask_k[None, :], other=0.0,
        )
        w_tile = w_expert + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [K, N]
        mask_w = mask_k[:, None] & mask_n[None, :]
        gate = tl.load(w_tile, mask=mask_w, other=0.0)
        up = tl.load(w_tile + inter * stride_wn, mask=mask_w, other=0.0)
        if UPCAST:
            a, gate, up = a.to(tl.float32), gate.to(tl.float32), up.to(tl.float32)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
    # As torch: gate and up rounded to the dtype, silu rounded, the product rounded.
    g = _cast(acc_gate, DTYPE).to(tl.float32)
    u = _cast(acc_up, DTYPE).to(tl.float32)
    act = _cast(g / (1.0 + tl.exp(-g)), DTYPE).to(tl.float32)
    out = _cast(act * u, DTYPE)
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, out, mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _down_kernel(
    a_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, num_experts, hidden, inter,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[pair, n] = routing_weight[pair] * (a[pair] . w[e, n]), in OUT_DTYPE
    num_n = tl.cdiv(hidden, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hidden
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < inter
        a = tl.load(
            a_ptr + pairs.to(tl.int64)[:, None] * stride_at + offs_k[None, :],
            mask=valid[:, None] & mask_k[None, :], other=0.0,
        )
        w = tl.load(
            w_expert + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=mask_k[:, None] & mask_n[None, :], other=0.0,
        )
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    routing = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    y = _cast(acc, DTYPE).to(tl.float32) * routing[:, None]
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, _cast(y, OUT_DTYPE), mask=valid[:, None] & mask_n[None, :])


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """The routed experts' output [T, H] in x's dtype (see the module docstring)."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    if w13.shape[2] != hidden or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(
            f"expert weights w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit "
            f"x {tuple(x.shape)} (want [E, 2I, {hidden}] and [E, {hidden}, I])"
        )
    if num_tokens == 0:
        return torch.empty_like(x)
    num_pairs = num_tokens * top_k
    cfg = config or tile_config(num_pairs, num_experts, x.element_size())
    x = x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    align = align_by_expert(topk_ids, num_experts, cfg.block_m)
    weights = topk_weights.reshape(-1).contiguous()  # [N]
    # Pairs scaled by fp32 weights stay fp32 until the slot sum (as torch's type promotion).
    pair_dtype = torch.promote_types(x.dtype, topk_weights.dtype)
    dtype = _TL_DTYPES[x.dtype]
    # NOTE: fp32 products stay fp32 ("ieee"): tf32 would break the HF equivalence in fp32.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # The interpreter's 16-bit tl.dot returns garbage (triton 3.9); fp32 operands give what
    # the GPU's MMA does (16-bit products are exact in fp32, the sum is fp32 either way).
    upcast = not x.is_cuda
    if upcast:
        precision = "ieee"
    num_blocks = align.block_expert.numel()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [N, I]
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    _gate_up_silu_kernel[(num_blocks * triton.cdiv(inter, cfg.block_n),)](
        x, w13, act, align.sorted_pairs, align.block_expert,
        num_pairs, num_experts, hidden, inter, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0),
        DTYPE=dtype, PRECISION=precision, UPCAST=upcast,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **launch,
    )
    per_pair = torch.empty(num_pairs, hidden, dtype=pair_dtype, device=x.device)  # [N, H]
    _down_kernel[(num_blocks * triton.cdiv(hidden, cfg.block_n),)](
        act, w2, per_pair, weights, align.sorted_pairs, align.block_expert,
        num_pairs, num_experts, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), per_pair.stride(0),
        DTYPE=dtype, OUT_DTYPE=_TL_DTYPES[pair_dtype], PRECISION=precision, UPCAST=upcast,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **launch,
    )
    # [T, k, H] -> [T, H]: the k slots summed in fp32, rounded once.
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
