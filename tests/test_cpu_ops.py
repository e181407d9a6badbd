"""The CPU path's own pieces: oneDNN's fp32 linear (ops/linear.py) and the KV pool's lazily
zeroed pages (kv/cache.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rapidserve.ops.linear as lin
from rapidserve.kv.cache import KVCache, KVCacheSpec


@pytest.mark.parametrize("shape,out,bias", [((7, 24), 40, True), ((1, 576), 3072, False), ((3, 5, 64), 96, True),
                                            ((0, 16), 8, False)])
def test_linear_matches_f_linear(shape, out, bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(out, shape[-1], generator=gen)
    b = torch.randn(out, generator=gen) if bias else None
    y = lin.linear(x, w, b)
    assert y.shape == (*shape[:-1], out)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    # A strided input (a column slice, as the projections' splits give) reads the same values.
    wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)
    torch.testing.assert_close(lin.linear(wide[..., ::2], w, b), F.linear(wide[..., ::2], w, b), rtol=1e-5, atol=1e-4)


def test_linear_takes_onednn_on_cpu_fp32_and_f_linear_elsewhere(monkeypatch):
    calls = []
    if not lin._onednn_works():
        pytest.skip("this torch build has no oneDNN fp32 linear")
    monkeypatch.setattr(lin, "_ONEDNN", True)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    f_linear = F.linear
    monkeypatch.setattr(lin.F, "linear", lambda *a: calls.append(a[0].dtype) or f_linear(*a))
    lin.linear(x, w)
    assert calls == []  # oneDNN took it
    lin.linear(x.bfloat16(), w.bfloat16())
    assert calls == [torch.bfloat16]  # other dtypes keep F.linear
    # A build whose op refuses the call falls back for good, with the same result.
    monkeypatch.setattr(lin, "_ONEDNN", None)
    monkeypatch.setattr(lin, "_onednn_works", lambda: False)
    torch.testing.assert_close(lin.linear(x, w), x @ w.T)
    assert lin._ONEDNN is False and calls[-1] == torch.float32


def test_cpu_kv_pool_is_zeroed_lazily_and_shareable():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=3, head_dim=8, block_size=4, dtype=torch.float32)
    cache = KVCache(spec, num_blocks=5, device=torch.device("cpu"))
    assert cache.tensor.shape == (2, 2, 5, 4, 3, 8) and cache.nbytes == 2 * 2 * 5 * 4 * 3 * 8 * 4
    assert (cache.tensor == 0).all()
    k, _ = cache.layer(1)
    k[3, 2].fill_(1.5)
    assert cache.tensor.sum().item() == 1.5 * 3 * 8
    cache.tensor.share_memory_()  # the rapid topology's process placement hands it over like this
    assert cache.tensor.is_shared() and cache.tensor.sum().item() == 1.5 * 3 * 8
    fp8 = KVCache(KVCacheSpec(1, 1, 4, 2, torch.float8_e4m3fn), num_blocks=3, device=torch.device("cpu"))
    assert fp8.tensor.dtype == torch.float8_e4m3fn and (fp8.tensor.float() == 0).all()
