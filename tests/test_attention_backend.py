"""The Triton backend's dispatch (decode kernel for leading decodes, extend kernel for the rest)
agrees with the torch reference on a mixed step. Runs under the Triton interpreter on CPU."""

import pytest
import torch

from rapidserve.attention.backend import TorchAttention, TritonAttention, select_backend
from rapidserve.attention.metadata import AttentionMetadata


def _mixed_step(q_lens, ctx_lens, hq=4, hkv=2, d=32, block=8, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(q_lens)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    v = torch.randn(t, hkv, d, generator=g)
    cache = torch.randn(2, num_blocks, block, hkv, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g)
    width = max((c + block - 1) // block for c in ctx_lens)
    tables = torch.zeros(len(q_lens), width, dtype=torch.int32)
    slots, used = [], 0
    for i, (ql, c) in enumerate(zip(q_lens, ctx_lens)):
        n = (c + block - 1) // block
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
        for p in range(c - ql, c):
            slots.append(int(tables[i, p // block]) * block + p % block)
    qsl = [0]
    for ql in q_lens:
        qsl.append(qsl[-1] + ql)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        block_tables=tables,
        query_start_loc_host=qsl, seq_lens_host=list(ctx_lens),
        max_query_len=max(q_lens), max_seq_len=max(ctx_lens),
        num_decodes=next((i for i, ql in enumerate(q_lens) if ql != 1), len(q_lens)),
        num_splits=3,
    )
    return q, k, v, cache, meta


@pytest.mark.parametrize("q_lens, ctx_lens", [
    ([1, 1, 1, 9, 4], [17, 5, 40, 9, 30]),  # decodes, then a prompt and a chunk over a prefix
    ([1, 1], [3, 24]),  # decodes only, through the mixed path
    ([7, 1], [7, 12]),  # a prompt first: no leading decodes
])
def test_triton_backend_matches_torch_on_mixed_steps(q_lens, ctx_lens):
    q, k, v, cache, meta = _mixed_step(q_lens, ctx_lens)
    if torch.cuda.is_available():  # real kernels on the GPU, the interpreter elsewhere
        q, k, v, cache = (x.cuda() for x in (q, k, v, cache))
        for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
            setattr(meta, name, getattr(meta, name).cuda())
    c1, c2 = cache.clone(), cache.clone()
    ref = TorchAttention().forward(q, k, v, c1[0], c1[1], meta, 0.2)
    out = TritonAttention().forward(q, k, v, c2[0], c2[1], meta, 0.2)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(c2, c1)


def test_select_backend():
    assert select_backend("auto", torch.device("cpu")).name == "torch"
    assert select_backend("triton", torch.device("cpu")).name == "triton"
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("flash", torch.device("cpu"))


def test_backends_pickle():
    """The rapid topology sends the model, backends included, to the prefill process."""
    import pickle

    for backend in (TorchAttention(), TritonAttention()):
        assert pickle.loads(pickle.dumps(backend)).name == backend.name
