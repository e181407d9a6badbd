"""FP8 KV cache: the Triton kernels (KV write, extend, split-KV decode) against the torch
reference on random shapes, with per-head scales. Under the Triton interpreter on CPU.

The cache's never-owned slots hold NaN (E4M3 has a NaN), as in test_triton_attention: a kernel
reading a key it should not see turns its output into NaN.
"""

from __future__ import annotations

import pytest
import torch

from rapidserve.attention import torch_ref, triton_ops
from rapidserve.ops.fp8 import FP8_DTYPE, to_fp8
from test_triton_attention import DEVICE, Case, assert_close, make_case  # noqa: I001

DTYPES = [torch.float32, torch.float16]


def _scales(num_kv_heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head scales far from 1, so a kernel that ignores them (or mixes heads) is caught."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.rand(num_kv_heads, generator=gen) * 0.05 + 0.05
    v = torch.rand(num_kv_heads, generator=gen) * 3.0 + 0.5
    return k.to(DEVICE), v.to(DEVICE)


def _to_fp8_case(c: Case, scales: tuple[torch.Tensor, torch.Tensor]) -> Case:
    """The same batch over an FP8 cache holding the prefix quantized with `scales`."""
    k_s, v_s = scales
    c.k_cache = to_fp8(c.k_cache, k_s.view(1, 1, -1, 1))
    c.v_cache = to_fp8(c.v_cache, v_s.view(1, 1, -1, 1))
    return c


def _fp8_reference(c: Case, scales, q: torch.Tensor | None = None) -> torch.Tensor:
    q = c.q if q is None else q
    return torch_ref.paged_attention(q.float(), c.k_cache, c.v_cache, c.meta, c.scale, scales)


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (3, 80, 8)])
def test_write_kv_fp8_matches_reference_and_skips_padding(num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(5)
    tokens, num_blocks = 30, 5
    k = (torch.randn(tokens, num_kv_heads, head_dim, generator=gen) * 4).to(DEVICE)
    v = (torch.randn(tokens, num_kv_heads, head_dim, generator=gen) * 900).to(DEVICE)  # saturates
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    slots[:5] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.zeros(shape, dtype=FP8_DTYPE, device=DEVICE)
    v_cache = torch.zeros(shape, dtype=FP8_DTYPE, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    scales = _scales(num_kv_heads, 1)
    triton_ops.write_kv(k, v, k_cache, v_cache, slots, scales)
    keep = slots >= 0
    torch_ref.write_kv(k[keep], v[keep], k_ref, v_ref, slots[keep], scales)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    # Stored values are x / scale rounded to E4M3 (relative error <= 2^-4), saturated at 448.
    flat = k_ref.view(-1, num_kv_heads, head_dim)[slots[keep]].float() * scales[0].view(1, -1, 1)
    torch.testing.assert_close(flat, k[keep], rtol=2**-4, atol=scales[0].max().item() * 2**-9)
    assert v_ref.float().abs().max() == 448.0
    with pytest.raises(ValueError, match="kv_scales"):
        triton_ops.write_kv(k, v, k_cache, v_cache, slots)


@pytest.mark.parametrize("dtype,group,num_kv_heads,head_dim,block_size",
                         [(torch.float32, 1, 2, 64, 16), (torch.float16, 4, 2, 32, 8),
                          (torch.float32, 2, 1, 80, 16)])
def test_extend_fp8_matches_reference(dtype, group, num_kv_heads, head_dim, block_size):
    q_lens, seq_lens = zip(*[(37, 37), (1, 1), (0, 20), (20, 45), (1, 33), (5, 21)])
    c = make_case(list(q_lens), list(seq_lens), group * num_kv_heads, num_kv_heads, head_dim,
                  block_size, dtype, seed=group + head_dim)
    scales = _scales(num_kv_heads, group)
    c = _to_fp8_case(c, scales)
    m = c.meta
    triton_ops.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, m.slot_mapping, scales)
    out = triton_ops.extend_attention(c.q, c.k_cache, c.v_cache, m.query_start_loc, m.seq_lens,
                                      m.block_tables, m.max_query_len, c.scale, kv_scales=scales)
    assert out.dtype == dtype
    assert_close(out, _fp8_reference(c, scales), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits,group,num_kv_heads,head_dim,block_size",
                         [(1, 1, 2, 64, 16), (4, 8, 1, 64, 8), (3, 2, 2, 80, 32)])
def test_decode_fp8_matches_reference(dtype, num_splits, group, num_kv_heads, head_dim, block_size):
    seq_lens = [70, 0, 1, 33, 16, 100]
    q_lens = [1 if s else 0 for s in seq_lens]
    c = make_case(q_lens, seq_lens, group * num_kv_heads, num_kv_heads, head_dim, block_size,
                  dtype, seed=num_splits + group)
    scales = _scales(num_kv_heads, num_splits)
    c = _to_fp8_case(c, scales)
    triton_ops.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, c.meta.slot_mapping, scales)
    q = torch.randn(len(seq_lens), group * num_kv_heads, head_dim).to(dtype).to(DEVICE)
    real = c.meta.seq_lens > 0
    q[real] = c.q
    out = triton_ops.decode_attention(q, c.k_cache, c.v_cache, c.meta.seq_lens, c.meta.block_tables,
                                      c.scale, num_splits, kv_scales=scales)
    ref = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    ref[real] = _fp8_reference(c, scales, q[real])
    assert_close(out, ref, dtype)
    assert (out[~real] == 0).all()


def test_fp8_cache_attention_is_close_to_full_precision():
    """The quantization error itself is small: E4M3 K/V (scale = amax / 448 per head) against
    the fp32 cache the same values came from."""
    q_lens, seq_lens = [40, 1, 8], [40, 90, 50]
    c = make_case(q_lens, seq_lens, 4, 2, 64, 16, torch.float32, seed=2)
    m = c.meta
    torch_ref.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, m.slot_mapping)
    exact = torch_ref.paged_attention(c.q, c.k_cache, c.v_cache, m, c.scale)
    owned = ~c.k_cache.isnan()
    amax = lambda x: torch.where(owned, x, 0).abs().amax(dim=(0, 1, 3)) / 448  # noqa: E731
    scales = (amax(c.k_cache), amax(c.v_cache))
    c = _to_fp8_case(c, scales)
    approx = triton_ops.extend_attention(c.q, c.k_cache, c.v_cache, m.query_start_loc, m.seq_lens,
                                         m.block_tables, m.max_query_len, c.scale, kv_scales=scales)
    err = (approx - exact).norm() / exact.norm()
    assert err < 0.05, err


def test_fp8_cache_rejects_bad_scales():
    c = make_case([1], [3], 2, 2, 32, 8, torch.float32)
    c = _to_fp8_case(c, _scales(2, 0))
    m = c.meta
    with pytest.raises(ValueError, match="kv_scales"):
        triton_ops.extend_attention(c.q, c.k_cache, c.v_cache, m.query_start_loc, m.seq_lens,
                                    m.block_tables, m.max_query_len, c.scale)
    bad = (torch.ones(3, device=DEVICE), torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="k_scale"):
        triton_ops.decode_attention(c.q, c.k_cache, c.v_cache, m.seq_lens, m.block_tables, c.scale, 1,
                                    kv_scales=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 8])
def test_fp8_kv_kernels_large_on_gpu(dtype, num_splits):
    """bf16 queries over an FP8 cache (the interpreter cannot run bf16 dots), GPU tile sizes."""
    gen = torch.Generator().manual_seed(3)
    seq_lens = [int(s) for s in torch.randint(1, 3000, (13,), generator=gen)] + [1, 4096]
    q_lens = [1] * len(seq_lens)
    c = make_case(q_lens, seq_lens, 32, 8, 128, 16, dtype, seed=num_splits)
    scales = _scales(8, num_splits)
    c = _to_fp8_case(c, scales)
    m = c.meta
    triton_ops.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, m.slot_mapping, scales)
    ref = _fp8_reference(c, scales)
    dec = triton_ops.decode_attention(c.q, c.k_cache, c.v_cache, m.seq_lens, m.block_tables, c.scale,
                                      num_splits, kv_scales=scales)
    ext = triton_ops.extend_attention(c.q, c.k_cache, c.v_cache, m.query_start_loc, m.seq_lens,
                                      m.block_tables, m.max_query_len, c.scale, kv_scales=scales)
    assert_close(dec, ref, dtype)
    assert_close(ext, ref, dtype)
