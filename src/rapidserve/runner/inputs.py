"""Host-side inputs of one step, built with numpy (no per-token Python loops)."""

from __future__ import annotations

import numpy as np

from rapidserve.kv.block_manager import BlockTables
from rapidserve.scheduler.chunked import ScheduledRequest


class StepInputs:
    """The flattened batch of a step: B sequences, T new tokens.

    With `pad_seqs` / `pad_tokens` the arrays are padded for a CUDA graph of a larger size:
    padding tokens get slot -1 (nothing written) and padding sequences context length 0.
    """

    def __init__(
        self,
        scheduled: list[ScheduledRequest],
        blocks: BlockTables,
        pad_seqs: int | None = None,
        pad_tokens: int | None = None,
        table_width: int | None = None,
    ) -> None:
        bs = blocks.block_size
        b = len(scheduled)
        n_new = np.fromiter((s.num_new_tokens for s in scheduled), dtype=np.int64, count=b)
        starts = np.fromiter((s.start for s in scheduled), dtype=np.int64, count=b)
        qsl = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(n_new, out=qsl[1:])
        t = int(qsl[-1])
        self.num_seqs, self.num_tokens = b, t
        self.max_query_len = int(n_new.max())
        # Leading one-token sequences (decodes: the scheduler orders them first).
        self.num_decodes = int(np.argmax(n_new != 1)) if (n_new != 1).any() else b
        seq_lens = starts + n_new
        self.max_seq_len = int(seq_lens.max())
        seq_index = np.repeat(np.arange(b), n_new)  # [T]
        positions = starts[seq_index] + (np.arange(t) - qsl[:-1][seq_index])
        tokens: list[int] = []
        # Tokens still being sampled by the step in flight: the runner fills them on the device.
        pending_at: list[int] = []
        self.pending_request_ids: list[str] = []
        for s in scheduled:
            known = s.request.all_token_ids[s.start : s.start + s.num_new_tokens]
            tokens.extend(known)
            if len(known) < s.num_new_tokens:
                if len(known) + 1 != s.num_new_tokens or s.request.num_pending != 1:
                    raise RuntimeError(f"{s.request!r}: only its last token may be pending")
                pending_at.append(len(tokens))
                self.pending_request_ids.append(s.request.request_id)
                tokens.append(0)
        self.pending_index = np.array(pending_at, dtype=np.int64)  # [P] flat token indices
        tables = [blocks.block_table(s.request.request_id) for s in scheduled]
        width = table_width or max(len(tb) for tb in tables)
        pb, pt = pad_seqs or b, pad_tokens or t
        block_tables = np.zeros((pb, width), dtype=np.int32)
        for i, tb in enumerate(tables):
            block_tables[i, : len(tb)] = tb
        slots = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs

        self.input_ids = np.zeros(pt, dtype=np.int64)
        self.input_ids[:t] = tokens
        self.positions = np.zeros(pt, dtype=np.int64)
        self.positions[:t] = positions
        self.slot_mapping = np.full(pt, -1, dtype=np.int64)
        self.slot_mapping[:t] = slots
        self.query_start_loc = np.full(pb + 1, t, dtype=np.int32)
        self.query_start_loc[: b + 1] = qsl
        self.seq_lens = np.zeros(pb, dtype=np.int32)
        self.seq_lens[:b] = seq_lens
        self.block_tables = block_tables
        # The hidden state to sample from: each sampling request's last new token.
        sampling = np.fromiter((s.samples for s in scheduled), dtype=bool, count=b)
        self.logits_indices = qsl[1:][sampling] - 1
