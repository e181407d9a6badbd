"""The attention layer the model calls: writes this step's K/V into the paged cache, attends."""

from __future__ import annotations

import torch
from torch import nn

from rapidserve.attention.backend import AttentionBackend, TorchAttention
from rapidserve.attention.metadata import get_forward_context
from rapidserve.ops.fp8 import is_fp8


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # NOTE: views into the shared KV cache and the backend, bound by the runner.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend = TorchAttention()
        # Scales of an FP8 KV cache, one per KV head (stored = round(k / k_scale)): 1.0 unless the
        # checkpoint carries them (model/quant.py). Buffers, so they move with the model; not
        # parameters, so the loader does not require them.
        self.register_buffer("k_scale", torch.ones(num_kv_heads, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(num_kv_heads, dtype=torch.float32), persistent=False)

    def bind(self, k_cache: torch.Tensor, v_cache: torch.Tensor, backend: AttentionBackend) -> None:
        self.k_cache, self.v_cache, self.backend = k_cache, v_cache, backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        # q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]
        meta = get_forward_context().attn
        if meta is None or self.k_cache is None or self.v_cache is None:
            raise RuntimeError("attention needs a bound KV cache and attention metadata")
        kv_scales = (self.k_scale, self.v_scale) if is_fp8(self.k_cache.dtype) else None
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, out, kv_scales)
