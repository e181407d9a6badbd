"""Pure-torch paged attention: runs on CPU and GPU, and is the oracle for faster kernels."""

from __future__ import annotations

from collections.abc import Collection

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
    return _paged_attention(q, k_cache, v_cache, meta, scale, torch.empty_like(q), (), kv_scales)


def batched_paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scales: KVScales | None = None,  # an FP8 cache's scales
) -> torch.Tensor:  # [T, Hq, D]
    """`paged_attention` with the step's leading one-token sequences (`meta.num_decodes`, as the
    runner counts them for the Triton decode kernel) in one batched pass (`decode_attention`):
    the reference's loop costs a dozen small ops per sequence per layer, most of a CPU decode
    step's time. The others as in the reference."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd < 2 or min(meta.seq_lens_host[:nd]) == 0:
        nd = 0
    else:  # rows 0..nd-1 of q are those sequences' tokens
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens_host[:nd],
                                    scale, kv_scales)
    return _paged_attention(q, k_cache, v_cache, meta, scale, out, range(nd), kv_scales)


def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, out: torch.Tensor, skip: Collection[int],
                     kv_scales: KVScales | None = None) -> torch.Tensor:
    """The reference's loop over sequences (those in `skip` left as they are in `out`)."""
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
        if group > 1:
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
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),  # [Hq, q_len, D]
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
        )
        out[s:e] = o.transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]: one query per sequence, at its last position
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, >= max blocks] int32
    seq_lens: list[int],  # [B] context lengths, this step's token included
    scale: float,
    kv_scales: KVScales | None = None,  # an FP8 cache's scales
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of B single-token queries over their whole contexts, batched: the contexts
    gathered padded to the longest, keys past each sequence's length masked, the query heads of
    a KV head grouped (no copy of K/V per query head)."""
    b, num_heads, d = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = max(seq_lens)
    nb = (max_len + block_size - 1) // block_size
    # Table entries past a sequence's own blocks are padding (any value): clamped to a real
    # block, whose keys are masked below and whose values are zeroed (NaN * 0 is NaN).
    blocks = block_tables[:, :nb].reshape(-1).long().clamp(0, k_cache.shape[0] - 1)
    # Head-major contiguous copies ([B, Hkv, L, D]): batched matmuls over them run several
    # times faster on CPU than over strided views (and index_select than advanced indexing).
    k, v = (_gather_head_major(c, blocks, b, max_len, kv_scales, i, q.dtype) for i, c in enumerate((k_cache, v_cache)))
    qg = q.reshape(b, num_kv_heads, group, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    lens = torch.tensor(seq_lens, device=q.device)
    pad = torch.arange(max_len, device=q.device)[None, :] >= lens[:, None]  # [B, L]
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    v.masked_fill_(pad[:, None, :, None], 0.0)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, num_heads, d)


def _gather_head_major(cache: torch.Tensor, blocks: torch.Tensor, b: int, max_len: int,
                       kv_scales: KVScales | None, which: int, dtype: torch.dtype) -> torch.Tensor:
    """The blocks' first max_len tokens per sequence, [B, Hkv, L, D] contiguous, in `dtype`
    (an FP8 cache's E4M3 gathered as bytes, then scaled per head)."""
    num_blocks, block_size, num_kv_heads, d = cache.shape
    fp8 = is_fp8(cache.dtype)
    src = cache.view(torch.uint8) if fp8 else cache
    x = src.index_select(0, blocks).view(b, -1, num_kv_heads, d)[:, :max_len]
    if fp8:
        if kv_scales is None:
            raise ValueError("an FP8 KV cache needs kv_scales (k_scale, v_scale)")
        x = (x.view(cache.dtype).float() * kv_scales[which].view(1, 1, -1, 1)).to(dtype)
    return x.transpose(1, 2).contiguous()
