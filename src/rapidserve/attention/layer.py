"""The attention layer the model calls: writes this step's K/V into the paged cache, attends."""

from __future__ import annotations

import torch
from torch import nn

from rapidserve.attention.backend import AttentionBackend, TorchAttention
from rapidserve.attention.metadata import get_forward_context


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

    def bind(self, k_cache: torch.Tensor, v_cache: torch.Tensor, backend: AttentionBackend) -> None:
        self.k_cache, self.v_cache, self.backend = k_cache, v_cache, backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        # q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]
        meta = get_forward_context().attn
        if meta is None or self.k_cache is None or self.v_cache is None:
            raise RuntimeError("attention needs a bound KV cache and attention metadata")
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, out)
