"""Per-step attention metadata, and the one context object that carries it into the model.

The model's forward keeps the signature `forward(input_ids, positions)`; attention layers read
what they need about the batch from the forward context set by the runner around each call.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class AttentionMetadata:
    """Describes one step's flattened batch: B sequences, T new tokens in all."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: start of each sequence's new tokens in the batch
    seq_lens: torch.Tensor  # [B] int32: tokens in each sequence's context after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32: cache blocks of each sequence, padded
    # Host copies (no device sync needed to read them).
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    max_seq_len: int
    # Decode layout: every sequence has exactly one new token (row i of q is sequence i), and
    # rows may be padding (seq_lens 0, slot -1) when a CUDA graph runs a padded batch.
    is_decode: bool = False
    num_splits: int = 1  # KV splits of the decode kernel; fixed per captured graph
    # Leading sequences with exactly one new token. A mixed step runs them through the decode
    # kernel (one pass over each KV head group) and the rest through the extend kernel.
    num_decodes: int = 0
    # The torch backend's gather index of those decodes (torch_ref.DecodeGather), built by the
    # first layer that needs it and reused by the others: one step, one batch layout.
    decode_gather: object | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


@dataclass
class ForwardContext:
    attn: AttentionMetadata | None = None


# NOTE: the only module-level mutable state in the package. Set by the runner for the
# duration of one forward; read by the attention layers. One forward runs at a time per
# thread, so the context is thread-local (the rapid topology runs two workers as threads).
_LOCAL = threading.local()


def get_forward_context() -> ForwardContext:
    ctx = getattr(_LOCAL, "ctx", None)
    if ctx is None:
        raise RuntimeError("attention called outside a forward context")
    return ctx


@contextmanager
def forward_context(attn: AttentionMetadata | None) -> Iterator[ForwardContext]:
    prev = getattr(_LOCAL, "ctx", None)
    _LOCAL.ctx = ForwardContext(attn=attn)
    try:
        yield _LOCAL.ctx
    finally:
        _LOCAL.ctx = prev
