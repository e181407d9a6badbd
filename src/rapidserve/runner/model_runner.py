"""Runs one scheduled step on the model: builds the flattened inputs, runs the forward, samples."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from rapidserve.attention.backend import AttentionBackend
from rapidserve.attention.metadata import AttentionMetadata, forward_context
from rapidserve.kv.block_manager import BlockTables, blocks_needed
from rapidserve.kv.cache import KVCache
from rapidserve.model.llama import CausalLM
from rapidserve.runner.graphs import (
    DecodeGraphs, PiecewiseGraphs, StaticInputs, decode_batch_sizes, decode_num_splits, pick,
    token_buckets,
)
from rapidserve.runner.inputs import StepInputs
from rapidserve.sampling import Sampler, SamplingBatch, make_generator
from rapidserve.scheduler.chunked import ScheduledRequest

log = logging.getLogger("rapidserve.engine")


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        blocks: BlockTables,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        backend: AttentionBackend,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.backend = backend
        self.table_width = blocks_needed(max_model_len, blocks.block_size)
        self.sampler = Sampler()
        # NOTE: per-request random streams of seeded requests; they survive preemption so a
        # recomputed request continues its stream rather than restarting it.
        self.generators: dict[str, torch.Generator] = {}
        for i, attn in enumerate(model.attention_layers):
            attn.bind(*cache.layer(i), backend)
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        )
        self.static: StaticInputs | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    # ---- CUDA graphs -------------------------------------------------------------------------

    def capture_graphs(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if self.device.type != "cuda" or not self.backend.graph_safe:
            raise ValueError("CUDA graphs need a CUDA device and the triton attention backend")
        t0 = time.perf_counter()
        dec_sizes = decode_batch_sizes(max_num_seqs)
        tok_sizes = token_buckets(max_num_batched_tokens)
        self.static = StaticInputs(max(tok_sizes[-1], dec_sizes[-1]), max(max_num_seqs, 1),
                                   self.table_width, self.device)
        pool = torch.cuda.graph_pool_handle()
        cfg = self.model.config
        self.decode_graphs = DecodeGraphs(self.model, self.static, dec_sizes, cfg.vocab_size, pool, self.device)
        self.decode_graphs.capture()
        self.piecewise = PiecewiseGraphs(self.model, self.static, tok_sizes, pool, self.device,
                                         self.cache.spec.dtype)
        self.piecewise.capture()
        torch.cuda.synchronize(self.device)
        log.info("captured decode graphs for batch sizes %s and piecewise graphs for %s tokens in %.1f s",
                 dec_sizes, tok_sizes, time.perf_counter() - t0)

    # ---- one step ----------------------------------------------------------------------------

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _metadata(self, inp: StepInputs) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._tensor(inp.slot_mapping),
            query_start_loc=self._tensor(inp.query_start_loc),
            seq_lens=self._tensor(inp.seq_lens),
            block_tables=self._tensor(inp.block_tables),
            query_start_loc_host=inp.query_start_loc.tolist(),
            seq_lens_host=inp.seq_lens.tolist(),
            max_query_len=inp.max_query_len,
            max_seq_len=inp.max_seq_len,
            **self._decode_split(inp),
        )

    def _decode_split(self, inp: StepInputs) -> dict[str, int]:
        """How a mixed step's leading decodes are run (see AttentionMetadata.num_decodes)."""
        nd = inp.num_decodes
        if nd == 0:
            return {}
        return {"num_decodes": nd,
                "num_splits": decode_num_splits(nd, self.model.config.num_kv_heads, self.num_sms)}

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> list[int]:
        """Run one step; returns the sampled token of each sampling request, in order."""
        rows = [s for s in scheduled if s.samples]
        logits = self._logits(scheduled)
        if not rows:
            return []
        return self.sampler(logits, self._sampling_batch(rows)).tolist()

    def _logits(self, scheduled: list[ScheduledRequest]) -> torch.Tensor | None:
        b = len(scheduled)
        t = sum(s.num_new_tokens for s in scheduled)
        if self.decode_graphs is not None and t == b:
            n = pick(self.decode_graphs.sizes, b)
            if n is not None:
                assert self.static is not None
                inp = StepInputs(scheduled, self.blocks, pad_seqs=n, pad_tokens=n, table_width=self.table_width)
                self.static.load(inp, n, n)
                logits = self.decode_graphs.replay(n)
                # NOTE: a one-token prefill chunk looks like a decode but does not sample.
                return logits[:b] if len(inp.logits_indices) == b else logits[self._tensor(inp.logits_indices)]
        if self.piecewise is not None:
            n = pick(self.piecewise.sizes, t)
            if n is not None:
                assert self.static is not None
                inp = StepInputs(scheduled, self.blocks, pad_tokens=n, table_width=self.table_width)
                s = self.static
                s.load(inp, n, b)
                meta = AttentionMetadata(
                    slot_mapping=s.slot_mapping[:t], query_start_loc=s.query_start_loc[: b + 1],
                    seq_lens=s.seq_lens[:b], block_tables=s.block_tables[:b],
                    query_start_loc_host=[], seq_lens_host=[],
                    max_query_len=inp.max_query_len, max_seq_len=inp.max_seq_len,
                    **self._decode_split(inp),
                )
                hidden = self.piecewise.run(n, t, meta)
                return self._select_logits(hidden, inp)
        inp = StepInputs(scheduled, self.blocks)
        with forward_context(self._metadata(inp)):
            hidden = self.model(self._tensor(inp.input_ids), self._tensor(inp.positions))
        return self._select_logits(hidden, inp)

    def _select_logits(self, hidden: torch.Tensor, inp: StepInputs) -> torch.Tensor | None:
        if len(inp.logits_indices) == 0:
            return None
        return self.model.compute_logits(hidden[self._tensor(inp.logits_indices)])

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
