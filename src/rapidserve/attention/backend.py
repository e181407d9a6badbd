"""Attention backends behind one interface: the torch reference and the Triton kernels."""

from __future__ import annotations

from typing import Protocol

import torch

from rapidserve.attention import torch_ref
from rapidserve.attention.metadata import AttentionMetadata

BACKENDS = ("auto", "torch", "triton")


class AttentionBackend(Protocol):
    name: str
    # Whether a decode step can be captured in a CUDA graph (no host reads of batch data).
    graph_safe: bool

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,  # [T, Hq, D], written in place when given
        # An FP8 cache's (k_scale [Hkv], v_scale [Hkv]) float32; None for a cache in q's dtype.
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor: ...


class TorchAttention:
    name = "torch"
    graph_safe = False

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, out=None, kv_scales=None):  # type: ignore[no-untyped-def]
        torch_ref.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        o = torch_ref.batched_paged_attention(q, k_cache, v_cache, meta, scale, kv_scales)
        if out is not None:
            out.copy_(o)
            return out
        return o


class TritonAttention:
    name = "triton"
    graph_safe = True

    def __init__(self) -> None:
        import rapidserve.attention.triton_ops  # noqa: F401 - fail here if triton is missing

    @property
    def ops(self):  # type: ignore[no-untyped-def]
        # NOTE: looked up, not stored: the backend travels with the model to the prefill
        # process under the rapid topology, and a module cannot be pickled.
        from rapidserve.attention import triton_ops

        return triton_ops

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, out=None, kv_scales=None):  # type: ignore[no-untyped-def]
        self.ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        if meta.is_decode:
            return self.ops.decode_attention(
                q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                num_splits=meta.num_splits, out=out, kv_scales=kv_scales,
            )
        nd = meta.num_decodes
        if nd == 0:
            return self.ops.extend_attention(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                meta.max_query_len, scale, out=out, kv_scales=kv_scales,
            )
        # NOTE: the scheduler puts decodes first, so their rows are q[:nd]. The extend kernel
        # indexes q by absolute query offsets, so it takes the tail of query_start_loc as is.
        out = torch.empty_like(q) if out is None else out
        self.ops.decode_attention(
            q[:nd], k_cache, v_cache, meta.seq_lens[:nd], meta.block_tables[:nd], scale,
            num_splits=meta.num_splits, out=out[:nd], kv_scales=kv_scales,
        )
        if nd < meta.seq_lens.shape[0]:
            self.ops.extend_attention(
                q, k_cache, v_cache, meta.query_start_loc[nd:], meta.seq_lens[nd:],
                meta.block_tables[nd:], meta.max_query_len, scale, out=out, kv_scales=kv_scales,
            )
        return out


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention()
    try:
        return TritonAttention()
    except ImportError as e:
        if name == "triton":
            raise ValueError(f"the triton attention backend needs triton: {e}") from e
        return TorchAttention()
