"""CUDA graphs: whole decode steps per padded batch size, and the layers between attention
calls (piecewise) per padded token count for steps that carry prefill tokens.

NOTE: a graph bakes in every address it touches: the static input buffers here, the KV cache
and the weights. Inputs are copied into the static buffers before each replay; nothing a graph
reads may be reallocated after capture. A graph also keeps the SM partition (stream) it was
captured on, so a partitioned topology captures one set per partition.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from rapidserve.attention.metadata import AttentionMetadata, forward_context
from rapidserve.model.llama import CausalLM
from rapidserve.runner.inputs import StepInputs

log = logging.getLogger("rapidserve.engine")


def decode_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to max_num_seqs (as vLLM)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


def token_buckets(max_tokens: int, step: int = 256) -> list[int]:
    """Padded token counts for piecewise graphs: 16 .. 128 by powers of two, then multiples of step."""
    sizes = [s for s in (16, 32, 64, 128) if s < max_tokens] + list(range(step, max_tokens + 1, step))
    if not sizes or sizes[-1] < max_tokens:
        sizes.append(max_tokens)
    return sorted(set(sizes))


def pick(sizes: list[int], n: int) -> int | None:
    for s in sizes:
        if s >= n:
            return s
    return None


class StaticInputs:
    """Device buffers a graph reads; sized for the largest graph."""

    def __init__(self, max_tokens: int, max_seqs: int, table_width: int, device: torch.device) -> None:
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_tokens, **i64)
        self.positions = torch.zeros(max_tokens, **i64)
        self.slot_mapping = torch.full((max_tokens,), -1, **i64)
        self.query_start_loc = torch.zeros(max_seqs + 1, **i32)
        self.seq_lens = torch.zeros(max_seqs, **i32)
        self.block_tables = torch.zeros(max_seqs, table_width, **i32)

    def load(self, inp: StepInputs, n_tokens: int, n_seqs: int) -> None:
        """Copy a padded StepInputs (numpy) into the first n_tokens / n_seqs rows."""
        pairs = (
            (self.input_ids[:n_tokens], inp.input_ids),
            (self.positions[:n_tokens], inp.positions),
            (self.slot_mapping[:n_tokens], inp.slot_mapping),
            (self.query_start_loc[: n_seqs + 1], inp.query_start_loc),
            (self.seq_lens[:n_seqs], inp.seq_lens),
            (self.block_tables[:n_seqs], inp.block_tables),
        )
        for dst, src in pairs:
            dst.copy_(torch.from_numpy(src), non_blocking=True)

    def decode_metadata(self, n: int, num_splits: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:n], query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n], block_tables=self.block_tables[:n],
            query_start_loc_host=[], seq_lens_host=[], max_query_len=1, max_seq_len=0,
            is_decode=True, num_splits=num_splits,
        )


def decode_num_splits(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Enough KV splits to give every SM about two programs, at most 32."""
    want = (2 * num_sms + batch * num_kv_heads - 1) // (batch * num_kv_heads)
    return max(1, min(32, want))


class DecodeGraphs:
    """One graph per padded batch size, each running embed → layers → logits."""

    def __init__(self, model: CausalLM, static: StaticInputs, sizes: list[int], vocab: int,
                 pool: object, device: torch.device, num_sms: int | None = None,
                 logits: torch.Tensor | None = None) -> None:
        self.model, self.static, self.sizes = model, static, sizes
        # NOTE: sets captured for several SM partitions share the static inputs, the output
        # buffer and the memory pool: only one set runs at a time (one decode worker).
        self.logits = torch.zeros(sizes[-1], vocab, dtype=torch.float32, device=device) if logits is None else logits
        # The SMs the graphs will run on (a partition's decode group): sets the KV split count.
        self.num_sms = num_sms or torch.cuda.get_device_properties(device).multi_processor_count
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = pool

    def num_splits(self, batch: int) -> int:
        return decode_num_splits(batch, self.model.config.num_kv_heads, self.num_sms)

    def _run(self, n: int) -> None:
        s = self.static
        with forward_context(s.decode_metadata(n, self.num_splits(n))):
            hidden = self.model(s.input_ids[:n], s.positions[:n])
            self.logits[:n].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def capture(self, stream: torch.cuda.Stream | None = None) -> None:
        """Capture on `stream` (default: torch's capture stream); a graph keeps the SM partition
        of the stream it was captured on."""
        for n in reversed(self.sizes):  # largest first: later ones reuse its pool memory
            self._run(n)  # warm-up: compiles kernels outside the capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, stream=stream):
                self._run(n)
            self.graphs[n] = g

    def replay(self, n: int) -> torch.Tensor:
        """Replay the graph of padded size n (inputs already loaded); logits [n, vocab]."""
        self.graphs[n].replay()
        return self.logits[:n]


class PiecewiseGraphs:
    """The model as L + 1 graphs per padded token count, with attention run eagerly between
    them (its work depends on the batch's lengths, which a graph cannot follow)."""

    def __init__(self, model: CausalLM, static: StaticInputs, sizes: list[int], pool: object,
                 device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.config
        self.model, self.static, self.sizes, self.pool = model, static, sizes, pool
        n = sizes[-1]
        self.h = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=device)
        self.q = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.o = torch.zeros_like(self.q)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def _pieces(self, n: int) -> list[Callable[[], None]]:
        m, s = self.model, self.static
        ids, pos = s.input_ids[:n], s.positions[:n]
        h, q, k, v, o = self.h[:n], self.q[:n], self.k[:n], self.v[:n], self.o[:n]
        layers = list(m.layers)

        def start(layer_h: torch.Tensor, i: int) -> None:
            h.copy_(layer_h)
            qi, ki, vi = layers[i].before_attention(pos, layer_h)
            q.copy_(qi)
            k.copy_(ki)
            v.copy_(vi)

        pieces: list[Callable[[], None]] = [lambda: start(m.embed_tokens(ids), 0)]
        for i in range(1, len(layers)):
            pieces.append(lambda i=i: start(layers[i - 1].after_attention(o, h), i))
        pieces.append(lambda: h.copy_(m.norm(layers[-1].after_attention(o, h))))
        return pieces

    @torch.inference_mode()
    def capture(self, stream: torch.cuda.Stream | None = None) -> None:
        for n in reversed(self.sizes):
            graphs = []
            for piece in self._pieces(n):
                piece()  # warm-up
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    piece()
                graphs.append(g)
            self.graphs[n] = graphs

    def run(self, n: int, num_tokens: int, meta: AttentionMetadata) -> torch.Tensor:
        """Forward of num_tokens real tokens padded to n (inputs loaded); hidden [n, hidden]."""
        graphs = self.graphs[n]
        t = num_tokens
        with forward_context(meta):
            for i, layer in enumerate(self.model.layers):
                graphs[i].replay()
                layer.self_attn.attn(self.q[:t], self.k[:t], self.v[:t], out=self.o[:t])
            graphs[-1].replay()
        return self.h[:n]
