"""Triton paged-attention kernels against the torch reference (torch_ref).

Without CUDA the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1
before triton_ops is imported), so the CPU cases are small; the bigger ones are gpu-marked.

Every cache slot that no sequence owns, and every padding entry of the block tables (which
points at a never-assigned block), holds NaN: a kernel that reads a key it should not see
(past seq_len, past the causal diagonal, in the table's padding) turns its output into NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from rapidserve.attention import torch_ref, triton_ops
from rapidserve.attention.metadata import AttentionMetadata

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter keeps bf16 as raw uint16 bits and its tl.dot multiplies those bits as
# integers (triton 3.9), so bf16 attention is checked on the GPU only.
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass
class Case:
    q: torch.Tensor  # [T, Hq, D]
    k_new: torch.Tensor  # [T, Hkv, D]
    v_new: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]; prefix written, new tokens not
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_case(
    q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, seed: int = 0, device: str = DEVICE,
) -> Case:
    """A batch whose sequence i has seq_lens[i] tokens of context, the last q_lens[i] new.

    Blocks are handed out in a random order (non-contiguous tables); the cached prefix is
    written with the reference write_kv.
    """
    assert all(0 <= q <= s for q, s in zip(q_lens, seq_lens))
    gen = torch.Generator().manual_seed(seed)
    n_blocks = [_cdiv(s, block_size) for s in seq_lens]
    num_blocks = sum(n_blocks) + 3  # spare blocks: one is the padding target
    max_blocks = max(n_blocks, default=0) + 2  # padded tables
    perm = torch.randperm(num_blocks, generator=gen)
    poison = int(perm[-1])
    tables = torch.full((len(seq_lens), max_blocks), poison, dtype=torch.int32)
    used = 0
    for i, n in enumerate(n_blocks):
        tables[i, :n] = perm[used:used + n].to(torch.int32)
        used += n

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    slots_all = [
        (tables[i, torch.arange(s) // block_size].long() * block_size + torch.arange(s) % block_size)
        for i, s in enumerate(seq_lens)
    ]
    new_slots, qsl = [], [0]
    for i, (q_len, s) in enumerate(zip(q_lens, seq_lens)):
        prefix = s - q_len
        if prefix:
            k = torch.randn(prefix, num_kv_heads, head_dim, generator=gen).to(dtype)
            v = torch.randn(prefix, num_kv_heads, head_dim, generator=gen).to(dtype)
            torch_ref.write_kv(k, v, k_cache, v_cache, slots_all[i][:prefix])
        new_slots.append(slots_all[i][prefix:])
        qsl.append(qsl[-1] + q_len)
    total = qsl[-1]
    q = torch.randn(total, num_heads, head_dim, generator=gen).to(dtype)
    k_new = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(new_slots) if new_slots else torch.zeros(0, dtype=torch.long),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        query_start_loc_host=qsl,
        seq_lens_host=list(seq_lens),
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )
    case = Case(q, k_new, v_new, k_cache, v_cache, meta, 1.0 / math.sqrt(head_dim))
    return _to(case, device)


def _to(c: Case, device: str) -> Case:
    m = c.meta
    meta = AttentionMetadata(
        slot_mapping=m.slot_mapping.to(device), query_start_loc=m.query_start_loc.to(device),
        seq_lens=m.seq_lens.to(device), block_tables=m.block_tables.to(device),
        query_start_loc_host=m.query_start_loc_host, seq_lens_host=m.seq_lens_host,
        max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
    )
    return Case(c.q.to(device), c.k_new.to(device), c.v_new.to(device), c.k_cache.to(device),
                c.v_cache.to(device), meta, c.scale)


def reference(c: Case, q: torch.Tensor | None = None) -> torch.Tensor:
    """torch_ref.paged_attention in fp32 on the same (dtype-rounded) inputs."""
    q = c.q if q is None else q
    return torch_ref.paged_attention(q.float(), c.k_cache.float(), c.v_cache.float(), c.meta,
                                     c.scale)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# write_kv
# ----------------------------------------------------------------------------------------------


# write_kv only copies, so bf16 works under the interpreter too.
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (1, 128, 32), (3, 80, 16)])
def test_write_kv_matches_reference_and_skips_negative_slots(dtype, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(1)
    num_blocks, tokens = 6, 40
    # k / v are strided views into one fused qkv projection output, as in the model.
    qkv = torch.randn(tokens, 2 + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k, v = qkv[:, 2:2 + num_kv_heads], qkv[:, 2 + num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    slots[torch.randperm(tokens, generator=gen)[:7].to(DEVICE)] = -1  # padding tokens
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    triton_ops.write_kv(k, v, k_cache, v_cache, slots)
    keep = slots >= 0
    torch_ref.write_kv(k[keep], v[keep], k_ref, v_ref, slots[keep])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_empty_batch():
    cache = torch.zeros(2, 16, 1, 32, device=DEVICE)
    empty = torch.zeros(0, 1, 32, device=DEVICE)
    triton_ops.write_kv(empty, empty, cache, cache.clone(), torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert not cache.any()


# ----------------------------------------------------------------------------------------------
# extend_attention
# ----------------------------------------------------------------------------------------------

# (q_len, seq_len): pure prompts, prompts over a cached prefix (chunked prefill), single tokens
# with and without context, a sequence with no new tokens, block-aligned and partial blocks.
MIXED = [(37, 37), (1, 1), (0, 20), (20, 45), (1, 33), (16, 32), (5, 21)]


def _run_extend(c: Case) -> torch.Tensor:
    m = c.meta
    # The new tokens' K/V go in first, as in the layer.
    torch_ref.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, m.slot_mapping)
    return triton_ops.extend_attention(c.q, c.k_cache, c.v_cache, m.query_start_loc, m.seq_lens,
                                       m.block_tables, m.max_query_len, c.scale)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "group,num_kv_heads,head_dim,block_size",
    [(1, 2, 64, 16), (4, 1, 128, 32), (8, 1, 64, 32), (2, 1, 80, 16), (1, 1, 32, 8)],
)
def test_extend_matches_reference(dtype, group, num_kv_heads, head_dim, block_size):
    q_lens, seq_lens = zip(*MIXED)
    c = make_case(list(q_lens), list(seq_lens), group * num_kv_heads, num_kv_heads, head_dim,
                  block_size, dtype, seed=group + head_dim)
    out = _run_extend(c)
    assert out.dtype == dtype and out.shape == c.q.shape
    assert_close(out, reference(c), dtype)


def test_extend_with_gpu_tile_sizes(monkeypatch):
    """The GPU's 128 x 64 tiles, interpreted: query blocks larger than some prompts."""
    monkeypatch.setattr(triton_ops, "_extend_config",
                        lambda *a: triton_ops.ExtendConfig(block_m=128, block_n=64, num_warps=4,
                                                           num_stages=2))
    q_lens, seq_lens = zip(*[(150, 150), (3, 70), (64, 200), (0, 5), (1, 1)])
    c = make_case(list(q_lens), list(seq_lens), 4, 2, 64, 16, torch.float32, seed=3)
    assert_close(_run_extend(c), reference(c), torch.float32)


def test_extend_preallocated_out_and_only_decode_tokens():
    q_lens, seq_lens = [1, 1, 1], [1, 17, 40]
    c = make_case(q_lens, seq_lens, 2, 2, 64, 16, torch.float32, seed=4)
    out = torch.full_like(c.q, float("nan"))
    torch_ref.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, c.meta.slot_mapping)
    m = c.meta
    got = triton_ops.extend_attention(c.q, c.k_cache, c.v_cache, m.query_start_loc, m.seq_lens,
                                      m.block_tables, 1, c.scale, out=out)
    assert got is out
    assert_close(out, reference(c), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size",
                         [(1, 8, 128, 16), (4, 8, 128, 32), (8, 4, 64, 16), (4, 2, 80, 32)])
def test_extend_matches_reference_large(dtype, group, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(7)
    pairs = [(1000, 1000), (1, 1), (0, 300), (517, 1800), (1, 2047), (128, 128), (129, 640)]
    pairs += [(int(q), int(q) + int(p)) for q, p in zip(torch.randint(1, 300, (9,), generator=gen),
                                                       torch.randint(0, 900, (9,), generator=gen))]
    q_lens, seq_lens = zip(*pairs)
    c = make_case(list(q_lens), list(seq_lens), group * num_kv_heads, num_kv_heads, head_dim,
                  block_size, dtype, seed=head_dim)
    assert_close(_run_extend(c), reference(c), dtype)


# ----------------------------------------------------------------------------------------------
# decode_attention
# ----------------------------------------------------------------------------------------------


def _decode_case(seq_lens: list[int], group: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, seed: int = 0) -> Case:
    """One new token per row; rows with seq_len 0 are padding (their q still gets a row)."""
    q_lens = [1 if s else 0 for s in seq_lens]
    c = make_case(q_lens, seq_lens, group * num_kv_heads, num_kv_heads, head_dim, block_size,
                  dtype, seed=seed)
    torch_ref.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, c.meta.slot_mapping)
    # Padding rows get a q row too: decode's q is [B, Hq, D].
    q = torch.randn(len(seq_lens), group * num_kv_heads, head_dim).to(dtype).to(c.q.device)
    real = torch.tensor([s > 0 for s in seq_lens], device=c.q.device)
    q[real] = c.q
    c.q = q
    return c


def _decode_reference(c: Case) -> torch.Tensor:
    real = c.meta.seq_lens > 0
    ref = torch.zeros(c.q.shape, dtype=torch.float32, device=c.q.device)
    ref[real] = reference(c, c.q[real])
    return ref


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4, 16])
@pytest.mark.parametrize(
    "group,num_kv_heads,head_dim,block_size",
    [(1, 2, 64, 16), (4, 1, 128, 32), (8, 1, 64, 16), (2, 2, 80, 32)],
)
def test_decode_matches_reference(dtype, num_splits, group, num_kv_heads, head_dim, block_size):
    # Padding rows (0), single keys, partial and full blocks, more splits than tiles.
    seq_lens = [70, 0, 1, 33, 16, 0, 100]
    c = _decode_case(seq_lens, group, num_kv_heads, head_dim, block_size, dtype, seed=num_splits)
    out = triton_ops.decode_attention(c.q, c.k_cache, c.v_cache, c.meta.seq_lens,
                                      c.meta.block_tables, c.scale, num_splits)
    assert out.dtype == dtype and out.shape == c.q.shape
    assert_close(out, _decode_reference(c), dtype)
    assert (out[c.meta.seq_lens == 0] == 0).all()


def test_decode_preallocated_out_and_larger_workspace(monkeypatch):
    monkeypatch.setattr(triton_ops, "_decode_block_n", lambda *a: 64)  # the GPU tile
    seq_lens = [200, 0, 65, 64, 1]
    c = _decode_case(seq_lens, 4, 2, 64, 16, torch.float32, seed=9)
    num_splits = 4
    ws = triton_ops.DecodeWorkspace.allocate(16, 8, 64, num_splits, DEVICE)  # a graph's max batch
    ws.partial_out.fill_(float("nan"))
    ws.partial_lse.fill_(float("nan"))
    out = torch.full_like(c.q, float("nan"))
    got = triton_ops.decode_attention(c.q, c.k_cache, c.v_cache, c.meta.seq_lens,
                                      c.meta.block_tables, c.scale, num_splits, out=out,
                                      workspace=ws)
    assert got is out
    assert_close(out, _decode_reference(c), torch.float32)


def test_decode_rejects_mismatched_workspace():
    c = _decode_case([5], 1, 1, 32, 16, torch.float32)
    ws = triton_ops.DecodeWorkspace.allocate(1, 1, 32, 2, DEVICE)
    with pytest.raises(ValueError):
        triton_ops.decode_attention(c.q, c.k_cache, c.v_cache, c.meta.seq_lens,
                                    c.meta.block_tables, c.scale, 4, workspace=ws)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4, 16, 32])
@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size",
                         [(1, 8, 128, 16), (4, 8, 128, 32), (8, 4, 64, 16), (4, 2, 80, 32)])
def test_decode_matches_reference_large(dtype, num_splits, group, num_kv_heads, head_dim,
                                        block_size):
    gen = torch.Generator().manual_seed(11)
    seq_lens = [int(s) for s in torch.randint(1, 3000, (29,), generator=gen)] + [0, 1, 4096]
    c = _decode_case(seq_lens, group, num_kv_heads, head_dim, block_size, dtype, seed=num_splits)
    out = triton_ops.decode_attention(c.q, c.k_cache, c.v_cache, c.meta.seq_lens,
                                      c.meta.block_tables, c.scale, num_splits)
    assert_close(out, _decode_reference(c), dtype)
    assert (out[c.meta.seq_lens == 0] == 0).all()


@pytest.mark.gpu
def test_decode_cuda_graph_replay_with_new_lengths_and_tables():
    dtype, group, num_kv_heads, head_dim, block_size, num_splits = torch.float16, 4, 2, 128, 16, 8
    batch, max_blocks = 8, 128  # >= the widest table below (1000 keys / 16 + 2 padding)
    # Two batches over one cache: the graph is captured on the first and replayed on the second
    # after copying the second's seq_lens / block tables / q into the static input buffers.
    first = _decode_case([100, 0, 1, 700, 33, 16, 0, 512], group, num_kv_heads, head_dim,
                         block_size, dtype, seed=1)
    second = _decode_case([900, 5, 0, 64, 1000, 2, 300, 17], group, num_kv_heads, head_dim,
                          block_size, dtype, seed=2)
    k_cache = torch.cat([first.k_cache, second.k_cache])
    v_cache = torch.cat([first.v_cache, second.v_cache])
    offset = first.k_cache.shape[0]  # second's blocks follow first's in the joint cache

    def tables(c: Case, shift: int) -> torch.Tensor:
        t = torch.zeros(batch, max_blocks, dtype=torch.int32, device="cuda")
        t[:, :c.meta.block_tables.shape[1]] = c.meta.block_tables + shift
        return t

    static_q = first.q.clone()
    static_lens = first.meta.seq_lens.clone()
    static_tables = tables(first, 0)
    out = torch.empty_like(static_q)
    ws = triton_ops.DecodeWorkspace.allocate(batch, group * num_kv_heads, head_dim, num_splits,
                                             "cuda")

    def run() -> None:
        triton_ops.decode_attention(static_q, k_cache, v_cache, static_lens, static_tables,
                                    first.scale, num_splits, out=out, workspace=ws)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compiles the kernels outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, _decode_reference(first), dtype)

    static_q.copy_(second.q)
    static_lens.copy_(second.meta.seq_lens)
    static_tables.copy_(tables(second, offset))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, _decode_reference(second), dtype)
    assert (out[second.meta.seq_lens == 0] == 0).all()


# ----------------------------------------------------------------------------------------------
# the torch backend's batched decode path (CPU's fast path) against the reference loop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size", [(1, 2, 64, 16), (3, 3, 64, 16), (4, 1, 32, 8)])
def test_batched_decodes_match_the_reference(dtype, group, num_kv_heads, head_dim, block_size):
    # Decodes of different lengths (one token, partial and full blocks) mixed with prompts and
    # chunks; unused cache slots and table padding hold NaN blocks, which must not leak in.
    q_lens = [1, 1, 1, 1, 7, 0, 5, 1]
    seq_lens = [1, 40, block_size, 2 * block_size + 1, 7, 3, 30, 9]
    c = make_case(q_lens, seq_lens, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=3)
    c.meta.num_decodes = 4  # the leading one-token sequences, as the runner counts them
    torch_ref.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, c.meta.slot_mapping)
    ref = torch_ref.paged_attention(c.q, c.k_cache, c.v_cache, c.meta, c.scale)
    out = torch_ref.batched_paged_attention(c.q, c.k_cache, c.v_cache, c.meta, c.scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # Only decodes, and a single decode (the loop's path).
    for qs, ss in (([1, 1, 1], [5, 50, 17]), ([1], [33])):
        c = make_case(qs, ss, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=4)
        c.meta.num_decodes = len(qs)
        torch_ref.write_kv(c.k_new, c.v_new, c.k_cache, c.v_cache, c.meta.slot_mapping)
        torch.testing.assert_close(torch_ref.batched_paged_attention(c.q, c.k_cache, c.v_cache, c.meta, c.scale).float(),
                                   torch_ref.paged_attention(c.q, c.k_cache, c.v_cache, c.meta, c.scale).float(),
                                   atol=TOL[dtype], rtol=TOL[dtype])
