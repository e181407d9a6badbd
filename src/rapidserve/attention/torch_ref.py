"""Pure-torch paged attention: runs on CPU and GPU, and is the oracle for faster kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rapidserve.attention.metadata import AttentionMetadata
from rapidserve.ops.fp8 import is_fp8, to_fp8

# An FP8 cache's (k_scale [Hkv], v_scale [Hkv]) float32 scales: stored = round(x / scale).
KVScales = tuple[torch.Tensor, torch.Tensor]


def quantize_kv(
    k: torch.Tensor, v: torch.Tensor, cache_dtype: torch.dtype, kv_scales: KVScales | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k/v [T, Hkv, D] in the cache's dtype: E4M3 with per-head scales for an FP8 cache."""
    if not is_fp8(cache_dtype):
        return k, v
    if kv_scales is None:
        raise ValueError("an FP8 KV cache needs kv_scales (k_scale, v_scale)")
    k_scale, v_scale = kv_scales
    return to_fp8(k, k_scale.view(1, -1, 1)), to_fp8(v, v_scale.view(1, -1, 1))


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached x [N, Hkv, D] (E4M3) -> dtype, times its per-head scale [Hkv]."""
    return (x.float() * scale.view(1, -1, 1)).to(dtype)


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
    kv_scales: KVScales | None = None,  # an FP8 cache's scales
) -> None:
    k, v = quantize_kv(k, v, k_cache.dtype, kv_scales)
    if is_fp8(k_cache.dtype):
        # NOTE: E4M3 moves as bytes: indexed writes on float8 dtypes are not defined everywhere.
        k, v, k_cache, v_cache = (t.view(torch.uint8) for t in (k, v, k_cache, v_cache))
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slot_mapping] = v


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first seq_len cached tokens of one sequence: [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    if is_fp8(cache.dtype):  # gathered as bytes, as write_kv writes
        return gather_kv(cache.view(torch.uint8), block_table, seq_len).view(cache.dtype)
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scales: KVScales | None = None,  # an FP8 cache's scales
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new tokens over its whole cached context.

    The new tokens of a sequence are its last ones: query i of a sequence with L new tokens
    and context length S sits at position S - L + i and sees keys 0 .. S - L + i.
    """
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = meta.query_start_loc_host
    for i, seq_len in enumerate(meta.seq_lens_host):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        q_len = e - s
        k = gather_kv(k_cache, meta.block_tables[i], seq_len)
        v = gather_kv(v_cache, meta.block_tables[i], seq_len)
        if is_fp8(k_cache.dtype):
            if kv_scales is None:
                raise ValueError("an FP8 KV cache needs kv_scales (k_scale, v_scale)")
            k, v = dequantize_kv(k, kv_scales[0], q.dtype), dequantize_kv(v, kv_scales[1], q.dtype)
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),  # [Hq, q_len, D]
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        )
        out[s:e] = o.transpose(0, 1)
    return out
