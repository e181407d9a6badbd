"""Pure-torch paged attention: runs on CPU and GPU, and is the oracle for faster kernels."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

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
    # index_copy_: one pass of row copies (an indexed assignment takes the general, several
    # times slower scatter path on CPU).
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


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
    return _paged_attention(q, k_cache, v_cache, meta, scale, torch.empty_like(q), (), kv_scales)


def batched_paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scales: KVScales | None = None,  # an FP8 cache's scales
) -> torch.Tensor:  # [T, Hq, D]
    """`paged_attention` as the CPU's fast path: the step's leading one-token sequences
    (`meta.num_decodes`, as the runner counts them for the Triton decode kernel) in one batched
    pass (`decode_attention`, its gather index built once per step), the others one by one
    through SDPA's fused kernel with the query heads of a KV head grouped (no K/V copy per
    query head). Same results as the reference up to rounding."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd < 2 or min(meta.seq_lens_host[:nd]) == 0:
        nd = 0
    else:  # rows 0..nd-1 of q are those sequences' tokens
        gather = meta.decode_gather
        if not isinstance(gather, DecodeGather):
            gather = meta.decode_gather = DecodeGather.build(meta.block_tables[:nd], meta.seq_lens_host[:nd],
                                                             k_cache.shape[1])
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens_host[:nd],
                                    scale, kv_scales, gather)
    return _paged_attention(q, k_cache, v_cache, meta, scale, out, range(nd), kv_scales, grouped=True)


def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, out: torch.Tensor, skip: Collection[int],
                     kv_scales: KVScales | None = None, grouped: bool = False) -> torch.Tensor:
    """The reference's loop over sequences (those in `skip` left as they are in `out`).

    grouped: SDPA on 4-D inputs with its GQA flag, which its fused CPU kernel takes; the
    reference (False) copies K/V per query head and runs the 3-D call (the textbook path)."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = meta.query_start_loc_host
    for i, seq_len in enumerate(meta.seq_lens_host):
        s, e = starts[i], starts[i + 1]
        if e == s or i in skip:
            continue
        q_len = e - s
        k = gather_kv(k_cache, meta.block_tables[i], seq_len)
        v = gather_kv(v_cache, meta.block_tables[i], seq_len)
        if is_fp8(k_cache.dtype):
            if kv_scales is None:
                raise ValueError("an FP8 KV cache needs kv_scales (k_scale, v_scale)")
            k, v = dequantize_kv(k, kv_scales[0], q.dtype), dequantize_kv(v, kv_scales[1], q.dtype)
        if group > 1 and not grouped:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if q_len == seq_len:
            # A whole prompt: the plain causal mask, which SDPA's fused CPU kernel takes (an
            # explicit mask sends it to the slow path).
            mask, causal = None, True
        else:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            k_pos = torch.arange(seq_len, device=q.device)
            mask, causal = k_pos[None, :] <= q_pos[:, None], False  # [q_len, seq_len]
        qs, ks, vs = q[s:e].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, len, D]
        if grouped:
            o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, is_causal=causal,
                                               scale=scale, enable_gqa=group > 1)[0]
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


class DecodeGather(NamedTuple):
    """Where a step's decodes' K/V lie in the cache, padded to the longest context: built once
    per step (every layer reads the same positions of its own cache)."""

    slots: torch.Tensor  # [B * L] int64: the cache slot of position l of sequence b
    mask: torch.Tensor  # [B, 1, 1, L] bool: True where l < the sequence's length
    max_len: int  # L

    @classmethod
    def build(cls, block_tables: torch.Tensor, seq_lens: list[int], block_size: int) -> DecodeGather:
        # NOTE: a position past a sequence's length reads the sequence's own last token, never
        # another block's slot: those keys are masked, but their values still enter the product
        # with weight 0, and 0 x NaN is NaN. The sequence's own tokens are finite unless its own
        # output is not (a stale or unwritten slot may hold anything: a failed request's NaN).
        device = block_tables.device
        max_len = max(seq_lens)
        lens = torch.tensor(seq_lens, device=device)
        pos = torch.arange(max_len, device=device)[None, :]  # [1, L]
        own = torch.minimum(pos, lens[:, None] - 1)  # [B, L]
        slots = block_tables.long().gather(1, own // block_size) * block_size + own % block_size
        return cls(slots.reshape(-1), (pos < lens[:, None])[:, None, None, :], max_len)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]: one query per sequence, at its last position
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, >= max blocks] int32
    seq_lens: list[int],  # [B] context lengths, this step's token included
    scale: float,
    kv_scales: KVScales | None = None,  # an FP8 cache's scales
    gather: DecodeGather | None = None,  # the step's, when the caller has built it
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of B single-token queries over their whole contexts, batched: each context
    gathered token by token into [B, L, Hkv, D] (one row copy per token, no block padding), then
    SDPA's fused kernel on the strided head-major view with the query heads of a KV head grouped
    and the positions past each sequence's length masked."""
    b, num_heads, d = q.shape
    num_kv_heads = k_cache.shape[2]
    if gather is None:
        gather = DecodeGather.build(block_tables, seq_lens, k_cache.shape[1])
    k, v = (_gather_tokens(c, gather, b, kv_scales, i, q.dtype) for i, c in enumerate((k_cache, v_cache)))
    o = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),  # [B, Hq, 1, D]
                                       attn_mask=gather.mask, scale=scale, enable_gqa=num_heads != num_kv_heads)
    return o.view(b, num_heads, d)


def _gather_tokens(cache: torch.Tensor, gather: DecodeGather, b: int, kv_scales: KVScales | None, which: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The gathered positions' K or V, [B, L, Hkv, D] contiguous in `dtype` (an FP8 cache's E4M3
    gathered as bytes, then scaled per head)."""
    num_blocks, block_size, num_kv_heads, d = cache.shape
    fp8 = is_fp8(cache.dtype)
    src = cache.view(torch.uint8) if fp8 else cache
    x = src.view(num_blocks * block_size, num_kv_heads, d).index_select(0, gather.slots)
    x = x.view(b, gather.max_len, num_kv_heads, d)
    if fp8:
        if kv_scales is None:
            raise ValueError("an FP8 KV cache needs kv_scales (k_scale, v_scale)")
        x = (x.view(cache.dtype).float() * kv_scales[which].view(1, 1, -1, 1)).to(dtype)
    return x
