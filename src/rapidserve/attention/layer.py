"""The attention layer the model calls: writes this step's K/V into the paged cache, attends."""

from __future__ import annotations

import torch
from torch import nn

from rapidserve.attention import torch_ref
from rapidserve.attention.metadata import get_forward_context


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # NOTE: views into the shared KV cache, bound by the runner once the cache exists.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]
        meta = get_forward_context().attn
        if meta is None or self.k_cache is None or self.v_cache is None:
            raise RuntimeError("attention needs a bound KV cache and attention metadata")
        torch_ref.write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return torch_ref.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
