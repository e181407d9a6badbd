"""Triton paged-attention kernels: KV write, extend (prefill / chunked prefill) and decode.

Layout (see torch_ref.py, which is the oracle for everything here):
  q            [T, Hq, D]      a step's new tokens of B sequences, flattened
  k/v_cache    [num_blocks, block_size, Hkv, D]   (any strides; one layer's views)
  query_start_loc [B + 1] int32, seq_lens [B] int32, block_tables [B, max_blocks] int32

Sequence i's new tokens are its LAST q_len_i = qsl[i+1] - qsl[i] tokens, so its query j sits
at position seq_lens[i] - q_len_i + j and sees keys 0 .. that position, all read from the
paged cache (write_kv runs first).

The kernels only use long-stable triton.language APIs (no descriptors / TMA), so they run on
CUDA and under TRITON_INTERPRET=1 on CPU. The wrappers never read device values on the host
(no .item(), no .tolist()): decode runs inside CUDA graph capture, and extend takes its only
data-dependent launch parameter (max_query_len) as a host int.

FP8 KV cache (E4M3, one float32 scale per KV head, stored = round(x / scale)): write_kv
quantizes in torch before its kernel copies (the same rounding as the reference, and Triton's
interpreter rounds fp32 -> fp8 wrongly where the mantissa carries into the exponent); the
attention kernels load E4M3 tiles, widen them to q's dtype (exact) and fold the scales into the
softmax scale (K) and the output (V), so a tile costs half the bytes and no extra multiply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rapidserve.attention.torch_ref import KVScales, quantize_kv
from rapidserve.ops.fp8 import is_fp8

# exp(x) == exp2(x * LOG2E): the kernels fold LOG2E into the softmax scale and use exp2.
_LOG2E = 1.4426950408889634
# NOTE: the running max starts finite, not -inf: a fully masked tile then gives
# exp2(-inf - _M_INIT) == 0 instead of exp2(-inf - -inf) == NaN.
_M_INIT = -1.0e30

# tl.dot needs every dimension >= 16.
_MIN_DOT = 16


def _block_d(head_dim: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would default to TF32 on tensor cores (~1e-3 relative error): the fp32 path
    # exists for exactness checks, so ask for IEEE there. Ignored for fp16 / bf16 inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def _kv_scale_args(
    k_cache: torch.Tensor, kv_scales: KVScales | None, fallback: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k_scale, v_scale, KV_SCALED) kernel arguments; unscaled caches pass a never-read tensor."""
    if not is_fp8(k_cache.dtype):
        return fallback, fallback, False
    if kv_scales is None:
        raise ValueError("an FP8 KV cache needs kv_scales (k_scale, v_scale)")
    num_kv_heads = k_cache.shape[2]
    for name, t in zip(("k_scale", "v_scale"), kv_scales):
        if t.shape != (num_kv_heads,) or t.dtype != torch.float32 or t.device != k_cache.device:
            raise ValueError(f"{name} must be [{num_kv_heads}] float32 on {k_cache.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    return kv_scales[0], kv_scales[1], True


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"k/v cache shapes differ or are not 4-D: {k_cache.shape} {v_cache.shape}")
    if k_cache.stride() != v_cache.stride():
        # NOTE: the kernels address k and v with one set of strides.
        raise ValueError("k_cache and v_cache must have the same strides")
    block_size = k_cache.shape[1]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")


# ----------------------------------------------------------------------------------------------
# write_kv
# ----------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: copies its [Hkv, D] K and V rows into the cache slot.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # NOTE: slot < 0 marks a padding token (padded CUDA-graph batches): nothing is written.
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)  # [BLOCK_H, BLOCK_D]
        t64 = t.to(tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                    mask=mask)
        v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                    mask=mask)
        dst = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
               + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64; < 0: padding, skipped
    kv_scales: KVScales | None = None,  # an FP8 cache's (k_scale, v_scale), [Hkv] fp32 each
) -> None:
    """Writes each new token's K/V into its cache slot (block * block_size + offset)."""
    _check_cache(k_cache, v_cache)
    k, v = quantize_kv(k, v, k_cache.dtype, kv_scales)
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k {k.shape} / v {v.shape} do not fit the cache {k_cache.shape}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {slot_mapping.shape} does not match {num_tokens} tokens")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(),
        num_kv_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


# ----------------------------------------------------------------------------------------------
# Shared tile helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _kv_tile_offsets(
    bt_row_ptr, offs_n, key_mask,
    stride_cb, stride_cs,
    BLOCK_SIZE: tl.constexpr,
):
    """Cache offsets (minus head / dim terms) of the keys offs_n [BLOCK_N] of one sequence.

    A tile may span several cache blocks (BLOCK_N > block_size) or part of one: each key looks
    its block up in the block table, so any power-of-two block size works with any BLOCK_N.
    """
    # NOTE: masked keys read no block-table entry: the table's padding is never dereferenced.
    blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
    return blk * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs  # [BLOCK_N] int64


@triton.jit
def _online_softmax_step(acc, m_i, l_i, qk, v, DOT_PRECISION: tl.constexpr):
    """Folds one tile of log2-scaled scores qk [M, N] and values v [N, D] into (acc, m, l)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # [M]
    alpha = tl.exp2(m_i - m_new)  # [M]: rescales what was accumulated so far
    p = tl.exp2(qk - m_new[:, None])  # [M, N]; masked scores are -inf -> 0
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# ----------------------------------------------------------------------------------------------
# extend_attention
# ----------------------------------------------------------------------------------------------


@triton.jit
def _extend_tile(
    acc, m_i, l_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off, offs_d, d_mask,
    start_n, kv_end, qk_scale,
    stride_cb, stride_cs, stride_cd,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    if CAUSAL_MASK:
        key_mask = offs_n < kv_end
    else:
        # NOTE: only called for tiles wholly before the query block's first position, so
        # every key is < kv_end and visible to every row: no mask work at all.
        key_mask = offs_n >= 0
    kv_off = _kv_tile_offsets(bt_row_ptr, offs_n, key_mask, stride_cb, stride_cs, BLOCK_SIZE)
    kv_off = kv_off + kv_head_off
    # K loaded transposed: [BLOCK_D, BLOCK_N], ready for q @ k^T.
    k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None] * stride_cd,
                mask=d_mask[:, None] & key_mask[None, :], other=0.0).to(q.dtype)  # E4M3: widened
    qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if CAUSAL_MASK:
        visible = (offs_n[None, :] <= q_pos[:, None]) & key_mask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    # NOTE: V is masked too (other=0): p == 0 times a garbage (even NaN) value would be NaN.
    v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd,
                mask=key_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
    return _online_softmax_step(acc, m_i, l_i, qk, v, DOT_PRECISION)


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_bt,
    head_dim,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, M_INIT: tl.constexpr, KV_SCALED: tl.constexpr,
):
    # Grid: (query head, query block, sequence). Heads vary fastest so that the GROUP query
    # heads sharing one KV head run side by side and hit the same K/V tiles in L2.
    head = tl.program_id(0)
    m_block = tl.program_id(1)
    seq = tl.program_id(2)

    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    m_start = m_block * BLOCK_M
    # The grid is sized by the batch's longest query: shorter ones (and 0-token ones) stop here.
    if m_start < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        prefix = seq_len - q_len  # tokens cached before this step's
        offs_m = m_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the sequence
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < head_dim
        q_pos = prefix + offs_m  # [BLOCK_M]; padded rows get positions >= seq_len (never stored)

        tok = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

        kv_head_off = (head // GROUP).to(tl.int64) * stride_ch
        bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
        v_scale = 1.0  # unused unless KV_SCALED
        if KV_SCALED:
            qk_scale = qk_scale * tl.load(k_scale_ptr + head // GROUP)
            v_scale = tl.load(v_scale_ptr + head // GROUP)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + M_INIT
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        # Keys 0 .. kv_end-1 are visible to at least one row of this block: later key tiles
        # are skipped. Tiles ending at or before the first row's position need no mask.
        first_pos = prefix + m_start
        kv_end = tl.minimum(prefix + m_start + BLOCK_M, seq_len)
        unmasked_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
        for start_n in range(0, unmasked_end, BLOCK_N):
            acc, m_i, l_i = _extend_tile(
                acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
                offs_d, d_mask, start_n, kv_end, qk_scale, stride_cb, stride_cs, stride_cd,
                BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
            )
        for start_n in range(unmasked_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _extend_tile(
                acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
                offs_d, d_mask, start_n, kv_end, qk_scale, stride_cb, stride_cs, stride_cd,
                BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
            )

        # NOTE: every stored row saw key 0 (its position is >= 0), so l_i > 0.
        if KV_SCALED:
            acc = acc * (v_scale / l_i)[:, None]
        else:
            acc = acc / l_i[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
                 acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@dataclass(frozen=True)
class ExtendConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _extend_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> ExtendConfig:
    """Tile sizes for extend_attention. Tests may monkeypatch this to force other tiles."""
    if device.type != "cuda":
        # Triton interpreter: small tiles, so the tests cover multi-tile query and key loops
        # on short sequences.
        return ExtendConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        # fp32 tiles take twice the registers / shared memory of 16-bit ones; keep q + staged
        # K/V tiles well under H100's 227 KiB of shared memory per block.
        if block_d > 128:
            return ExtendConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
        return ExtendConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if block_d <= 64:
        return ExtendConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return ExtendConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)
    return ExtendConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D], q's dtype
    kv_scales: KVScales | None = None,  # an FP8 cache's (k_scale, v_scale), [Hkv] fp32 each
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new tokens over its whole (paged) context.

    Handles any mix of prompts, chunked prefills over a cached prefix, single tokens and
    sequences with no new tokens. Rows of out past query_start_loc[B] are left untouched.

    NOTE: max_query_len (a host int, so no device sync) must be >= every sequence's number of
    new tokens: it sizes the grid, and query rows beyond it would not be computed.
    """
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {q.shape} does not fit the cache {k_cache.shape}")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] < num_seqs:
        raise ValueError("query_start_loc / block_tables do not match seq_lens")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out {out.shape} {out.dtype} must match q {q.shape} {q.dtype}")
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out

    k_scale, v_scale, kv_scaled = _kv_scale_args(k_cache, kv_scales, seq_lens)
    cfg = _extend_config(head_dim, q.dtype, q.device)
    grid = (num_heads, triton.cdiv(max_query_len, cfg.block_m), num_seqs)
    _extend_kernel[grid](
        q, k_cache, v_cache, out,
        query_start_loc, seq_lens, block_tables, k_scale, v_scale,
        scale * _LOG2E,
        *q.stride(), *out.stride(), *k_cache.stride(),
        block_tables.stride(0),
        head_dim,
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=_block_d(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
        M_INIT=_M_INIT,
        KV_SCALED=kv_scaled,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


# ----------------------------------------------------------------------------------------------
# decode_attention (split-KV / flash-decoding)
# ----------------------------------------------------------------------------------------------


@dataclass
class DecodeWorkspace:
    """Per-split partial results of decode_attention; preallocate once for CUDA graphs.

    Rows may outnumber the batch (a graph's max batch size): only the first B are used.
    """

    partial_out: torch.Tensor  # [max_B, Hq, num_splits, D] fp32: each split's normalized output
    partial_lse: torch.Tensor  # [max_B, Hq, num_splits] fp32: its log2-sum-exp2; -inf if empty

    @staticmethod
    def allocate(
        max_batch: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device | str
    ) -> "DecodeWorkspace":
        return DecodeWorkspace(
            partial_out=torch.empty(max_batch, num_heads, num_splits, head_dim,
                                    dtype=torch.float32, device=device),
            partial_lse=torch.empty(max_batch, num_heads, num_splits,
                                    dtype=torch.float32, device=device),
        )


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, po_ptr, plse_ptr,
    seq_lens_ptr, bt_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_bt,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_lb, stride_lh, stride_ls,
    head_dim, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, M_INIT: tl.constexpr, KV_SCALED: tl.constexpr,
):
    # Grid: (sequence, KV head, split). One program attends all GROUP query heads of its KV
    # head over one contiguous key range, so each K/V tile is loaded once for the group.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # Splits are sized from seq_lens on the device (the grid is data independent): the keys are
    # cut into num_splits ranges of whole BLOCK_N tiles; trailing splits may be empty.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    split_start = split * tiles_per_split * BLOCK_N
    split_end = tl.minimum(split_start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, BLOCK_G)  # [BLOCK_G] query head within the group (padded)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < head_dim
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads (q head h uses KV head h // GROUP)

    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
                + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    kv_head_off = kv_head.to(tl.int64) * stride_ch
    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
    v_scale = 1.0
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) + M_INIT
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    # The query is the sequence's last token: it sees every key, so only the range end masks.
    for start_n in range(split_start, split_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_mask = offs_n < split_end
        kv_off = _kv_tile_offsets(bt_row_ptr, offs_n, key_mask, stride_cb, stride_cs, BLOCK_SIZE)
        kv_off = kv_off + kv_head_off
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None] * stride_cd,
                    mask=d_mask[:, None] & key_mask[None, :], other=0.0).to(q.dtype)  # [BLOCK_D, BLOCK_N]
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        qk = tl.where(key_mask[None, :], qk, float("-inf"))
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd,
                    mask=key_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, DOT_PRECISION)

    # NOTE: an empty split (l_i == 0, e.g. a padding row with seq_len 0, or more splits than
    # tiles) stores out 0 and lse -inf, which the reduction weighs 0.
    nonempty = l_i > 0.0
    if KV_SCALED:
        out = acc * (v_scale / tl.where(nonempty, l_i, 1.0))[:, None]
    else:
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))

    po = (po_ptr + seq.to(tl.int64) * stride_pob + heads[:, None] * stride_poh
          + split * stride_pos + offs_d[None, :] * stride_pod)
    tl.store(po, out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(plse_ptr + seq.to(tl.int64) * stride_lb + heads * stride_lh + split * stride_ls,
             lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    po_ptr, plse_ptr, out_ptr,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid: (sequence, query head). Merges the splits' (out, lse) pairs.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < head_dim

    lse = tl.load(plse_ptr + seq * stride_lb + head * stride_lh + offs_s * stride_ls,
                  mask=s_mask, other=float("-inf"))  # [BLOCK_S]
    lse_max = tl.max(lse, 0)
    # NOTE: all splits empty (padding row, seq_len 0) -> every weight 0 -> output 0, no NaN.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)  # [BLOCK_S]
    denom = tl.sum(w, 0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    po = tl.load(po_ptr + seq * stride_pob + head * stride_poh + offs_s[:, None] * stride_pos
                 + offs_d[None, :] * stride_pod,
                 mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    # Empty splits have w == 0 and po == 0; a masked-out split has po == 0 too.
    out = tl.sum(po * w[:, None], 0) / denom  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _decode_block_n(head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # interpreter: exercise several tiles per split on short sequences
    # Memory bound: 64 keys x D per tile keeps enough bytes in flight per program. fp32 halves
    # it so that 3 pipeline stages of K and V tiles (2 x 3 x 32 KiB at D = 128) fit in shared
    # memory.
    return 32 if dtype == torch.float32 else 64


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    seq_lens: torch.Tensor,  # [B] int32; 0: padding row (output zeros)
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [B, Hq, D], q's dtype
    workspace: DecodeWorkspace | None = None,
    kv_scales: KVScales | None = None,  # an FP8 cache's (k_scale, v_scale), [Hkv] fp32 each
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of each sequence's one new token over its whole cached context (flash-decoding).

    Graph safe: the launch grids depend only on shapes and num_splits, and nothing is read back
    to the host. Under CUDA graph capture pass `out` and `workspace`, preallocated.
    """
    _check_cache(k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {q.shape} does not fit the cache {k_cache.shape}")
    if seq_lens.shape != (batch,) or block_tables.shape[0] < batch:
        raise ValueError("seq_lens / block_tables do not match q")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out {out.shape} {out.dtype} must match q {q.shape} {q.dtype}")
    if workspace is None:
        workspace = DecodeWorkspace.allocate(batch, num_heads, head_dim, num_splits, q.device)
    po, plse = workspace.partial_out, workspace.partial_lse
    if (po.shape[0] < batch or po.shape[1:] != (num_heads, num_splits, head_dim)
            or plse.shape[0] < batch or plse.shape[1:] != (num_heads, num_splits)
            or po.dtype != torch.float32 or plse.dtype != torch.float32):
        raise ValueError(f"workspace {po.shape} / {plse.shape} does not fit this decode")
    if batch == 0:
        return out

    k_scale, v_scale, kv_scaled = _kv_scale_args(k_cache, kv_scales, seq_lens)
    group = num_heads // num_kv_heads
    block_d = _block_d(head_dim)
    # GQA: the group's query heads are the rows of one tl.dot, padded to >= 16 (tl.dot's
    # minimum). Padding rows are masked loads (no memory traffic); decode is memory bound, so
    # the wasted MMA work on them is free, and each K/V tile is read once per group.
    block_g = max(_MIN_DOT, triton.next_power_of_2(group))
    on_cuda = q.device.type == "cuda"
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, po, plse,
        seq_lens, block_tables, k_scale, v_scale,
        scale * _LOG2E,
        *q.stride(), *k_cache.stride(),
        block_tables.stride(0),
        *po.stride(), *plse.stride(),
        head_dim, num_splits,
        GROUP=group,
        BLOCK_G=block_g,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=_decode_block_n(head_dim, q.dtype, q.device),
        BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        M_INIT=_M_INIT,
        KV_SCALED=kv_scaled,
        num_warps=(8 if block_d > 128 else 4) if on_cuda else 1,
        num_stages=(2 if block_d > 128 else 3) if on_cuda else 1,
    )
    _decode_reduce_kernel[(batch, num_heads)](
        po, plse, out,
        *po.stride(), *plse.stride(), *out.stride(),
        head_dim, num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=block_d,
        num_warps=4 if on_cuda else 1,
    )
    return out
