"""Runs one scheduled step on the model: builds the flattened inputs, runs the forward, samples."""

from __future__ import annotations

import numpy as np
import torch

from rapidserve.attention.metadata import AttentionMetadata, forward_context
from rapidserve.kv.block_manager import BlockManager
from rapidserve.kv.cache import KVCache
from rapidserve.model.llama import CausalLM
from rapidserve.sampling import Sampler, SamplingBatch, make_generator
from rapidserve.scheduler.chunked import ScheduledRequest


class StepInputs:
    """Host-side arrays for one step, built with numpy (no per-token Python loops)."""

    def __init__(self, scheduled: list[ScheduledRequest], blocks: BlockManager) -> None:
        bs = blocks.block_size
        n_new = np.fromiter((s.num_new_tokens for s in scheduled), dtype=np.int64, count=len(scheduled))
        starts = np.fromiter((s.start for s in scheduled), dtype=np.int64, count=len(scheduled))
        self.query_start_loc = np.zeros(len(scheduled) + 1, dtype=np.int64)
        np.cumsum(n_new, out=self.query_start_loc[1:])
        total = int(self.query_start_loc[-1])
        self.seq_lens = starts + n_new
        # positions: for each request, start .. start + n - 1
        seq_index = np.repeat(np.arange(len(scheduled)), n_new)  # [T]
        self.positions = starts[seq_index] + (np.arange(total) - self.query_start_loc[:-1][seq_index])
        tokens: list[int] = []
        tables = [blocks.block_table(s.request.request_id) for s in scheduled]
        for s in scheduled:
            tokens.extend(s.request.all_token_ids[s.start : s.start + s.num_new_tokens])
        self.input_ids = np.asarray(tokens, dtype=np.int64)
        width = max(len(t) for t in tables)
        self.block_tables = np.zeros((len(scheduled), width), dtype=np.int32)
        for i, t in enumerate(tables):
            self.block_tables[i, : len(t)] = t
        self.slot_mapping = (
            self.block_tables[seq_index, self.positions // bs].astype(np.int64) * bs + self.positions % bs
        )
        # The hidden state to sample from: each sampling request's last new token.
        sampling = np.fromiter((s.samples for s in scheduled), dtype=bool, count=len(scheduled))
        self.logits_indices = self.query_start_loc[1:][sampling] - 1


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        blocks: BlockManager,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        # NOTE: per-request random streams of seeded requests; they survive preemption so a
        # recomputed request continues its stream rather than restarting it.
        self.generators: dict[str, torch.Generator] = {}
        for i, attn in enumerate(model.attention_layers):
            attn.bind_cache(*cache.layer(i))

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _to_device(self, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(a).to(dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> list[int]:
        """Run one step; returns the sampled token of each sampling request, in order."""
        inp = StepInputs(scheduled, self.blocks)
        meta = AttentionMetadata(
            slot_mapping=self._to_device(inp.slot_mapping, torch.int64),
            query_start_loc=self._to_device(inp.query_start_loc, torch.int32),
            seq_lens=self._to_device(inp.seq_lens, torch.int32),
            block_tables=self._to_device(inp.block_tables, torch.int32),
            query_start_loc_host=inp.query_start_loc.tolist(),
            seq_lens_host=inp.seq_lens.tolist(),
            max_query_len=int(np.diff(inp.query_start_loc).max()),
            max_seq_len=int(inp.seq_lens.max()),
        )
        input_ids = self._to_device(inp.input_ids, torch.int64)
        positions = self._to_device(inp.positions, torch.int64)
        with forward_context(meta):
            hidden = self.model(input_ids, positions)
        if len(inp.logits_indices) == 0:
            return []
        logits = self.model.compute_logits(hidden[self._to_device(inp.logits_indices, torch.int64)])
        return self.sampler(logits, self._sampling_batch([s for s in scheduled if s.samples])).tolist()

    def _sampling_batch(self, rows: list[ScheduledRequest]) -> SamplingBatch:
        params, gens, banned = [], [], []
        for s in rows:
            req, p = s.request, s.request.params
            params.append(p)
            gen = None
            if p.seed is not None and not p.greedy:
                gen = self.generators.get(req.request_id)
                if gen is None:
                    gen = self.generators[req.request_id] = make_generator(p.seed, self.device)
            gens.append(gen)
            if req.num_output_tokens < p.min_tokens:
                stop_ids = p.stop_token_ids + (() if p.ignore_eos else self.eos_token_ids)
                banned.append(tuple(stop_ids))
            else:
                banned.append(())
        return SamplingBatch(params=params, generators=gens, banned_token_ids=banned)
