"""LLMEngine: the synchronous engine over the hybrid topology (one worker, chunked prefill)."""

from __future__ import annotations

import itertools
import logging
from typing import Any, NamedTuple

import torch

from rapidserve.config import EngineConfig
from rapidserve.attention.backend import select_backend
from rapidserve.kv.block_manager import BlockManager, blocks_needed
from rapidserve.kv.cache import KVCache, KVCacheSpec
from rapidserve.model.loader import LoadedModel, load_model
from rapidserve.outputs import CompletionOutput, RequestOutput
from rapidserve.request import Request, RequestStatus
from rapidserve.runner.model_runner import ModelRunner
from rapidserve.sampling import IncrementalDetokenizer, find_stop
from rapidserve.sampling_params import SamplingParams
from rapidserve.scheduler.chunked import ChunkedScheduler, ScheduledRequest, SchedulerConfig

log = logging.getLogger("rapidserve.engine")

_CPU_KV_BYTES = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA GPU")
    return device


class _TextState:
    """Per-request output text: incremental detokenization and stop-string cutting."""

    def __init__(self, detokenizer: IncrementalDetokenizer | None) -> None:
        self.detokenizer = detokenizer
        self.text = ""
        self.emitted_tokens = 0  # output tokens already reported in a delta


class StepStats(NamedTuple):
    """What the last `step()` ran, for benchmarks and metrics (`LLMEngine.last_step_stats`)."""

    num_prefill_tokens: int  # prompt tokens (or tokens recomputed after a preemption)
    num_decode_tokens: int  # one per request that advanced by one token past its prompt
    num_decode_kv_tokens: int  # KV entries those decodes attend over: the sum of their lengths

    @classmethod
    def of(cls, scheduled: list[ScheduledRequest]) -> StepStats:
        prefill = decode = decode_kv = 0
        for s in scheduled:
            # A one-token step past the prompt costs what a decode costs (the whole context
            # read, one KV entry written), even as the tail of a recompute after a preemption.
            if s.num_new_tokens == 1 and s.start >= s.request.num_prompt_tokens:
                decode += 1
                decode_kv += s.start + 1
            else:
                prefill += s.num_new_tokens
        return cls(prefill, decode, decode_kv)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.last_step_stats = StepStats(0, 0, 0)  # what the last step() ran
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        loaded: LoadedModel = load_model(
            config.model, config.load_format, config.dtype, self.device,
            config.max_model_len, config.tokenizer, config.seed,
        )
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        self.max_model_len = loaded.max_model_len
        self.model_name = config.served_model_name or loaded.source.display_name
        self.backend = select_backend(config.attention_backend, self.device)
        self.use_graphs = (
            config.use_cuda_graphs and self.device.type == "cuda" and self.backend.graph_safe
        )
        spec = KVCacheSpec.for_model(loaded.config, config.block_size, loaded.dtype)
        num_blocks = self._num_kv_blocks(spec, loaded)
        self.cache = KVCache(spec, num_blocks, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.eos_token_ids = self._eos_ids(loaded)
        self.runner = ModelRunner(
            loaded.model, self.cache, self.blocks, self.device, self.eos_token_ids, self.backend,
            self.max_model_len,
        )
        if self.use_graphs:
            self.runner.capture_graphs(config.max_num_seqs, config.max_num_batched_tokens)
        self.scheduler = ChunkedScheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks
        )
        self._text: dict[str, _TextState] = {}
        self._ids = itertools.count()
        log.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, config.block_size,
            self.cache.nbytes / 2**30,
        )

    # ---- set-up ------------------------------------------------------------------------------

    def _eos_ids(self, loaded: LoadedModel) -> tuple[int, ...]:
        ids = set(loaded.config.eos_token_ids)
        tok = loaded.tokenizer
        if tok is not None and getattr(tok, "eos_token_id", None) is not None:
            ids.add(int(tok.eos_token_id))
        return tuple(sorted(ids))

    def _num_kv_blocks(self, spec: KVCacheSpec, loaded: LoadedModel) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory_bytes is not None:
            n = spec.blocks_for_bytes(cfg.kv_cache_memory_bytes)
        elif self.device.type == "cpu":
            n = spec.blocks_for_bytes(_CPU_KV_BYTES)
        else:
            n = spec.blocks_for_bytes(self._profile_free_gpu_memory(spec, loaded))
        if n < 1:
            raise ValueError(
                f"no memory left for the KV cache (one block needs {spec.bytes_per_block} bytes); "
                "raise --gpu-memory-utilization or --kv-cache-memory-bytes, or use a smaller model"
            )
        return n

    def _profile_free_gpu_memory(self, spec: KVCacheSpec, loaded: LoadedModel) -> int:
        """Memory the KV cache may take: the utilization target minus what the weights and a
        forward at the largest step (activations, logits) use at their peak."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        _, total = torch.cuda.mem_get_info(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        n_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        probe_blocks = blocks_needed(n_tokens, spec.block_size)
        probe = KVCache(spec, probe_blocks, self.device)
        probe_mgr = BlockManager(probe_blocks, spec.block_size)
        runner = ModelRunner(loaded.model, probe, probe_mgr, self.device, (), self.backend, n_tokens)
        req = Request("profile", [0] * n_tokens, SamplingParams(temperature=0.0), 1)
        probe_mgr.allocate(req.request_id, n_tokens)
        runner.execute([ScheduledRequest(req, 0, n_tokens, True)])
        # Logits of the widest sampling step.
        with torch.inference_mode():
            h = torch.zeros(self.config.max_num_seqs, loaded.config.hidden_size, dtype=loaded.dtype, device=self.device)
            loaded.model.compute_logits(h)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del probe, runner, h
        torch.cuda.empty_cache()
        free_after, _ = torch.cuda.mem_get_info(self.device)
        # Memory used outside torch's allocator (CUDA context, other processes).
        non_torch = (total - free_after) - torch.cuda.memory_allocated(self.device)
        budget = int(total * self.config.gpu_memory_utilization) - peak - max(non_torch, 0)
        if self.use_graphs:
            # The graphs' private pool holds about one more step's activations.
            budget -= peak - weights
        log.info(
            "GPU memory: total %.1f GiB, weights %.2f GiB, peak with a step %.2f GiB, other %.2f GiB"
            " -> KV %.2f GiB", total / 2**30, weights / 2**30, peak / 2**30, non_torch / 2**30,
            budget / 2**30,
        )
        return max(budget, 0)

    # ---- requests ----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            if self.tokenizer is None:
                raise ValueError(
                    "this model has no tokenizer (a preset or a directory without one): pass "
                    "token ids, or give --tokenizer"
                )
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=True))
        ids = list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is not in the vocabulary [0, {vocab})")
        return None, ids

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        text, ids = self.encode_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but the maximum context length is "
                f"{self.max_model_len} (prompt plus at least one generated token)"
            )
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        need = blocks_needed(len(ids) + max_tokens, self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"the request needs up to {len(ids) + max_tokens} tokens of KV cache, more than the "
                f"whole cache holds ({self.blocks.num_blocks * self.blocks.block_size}); lower "
                "max_tokens or give the cache more memory"
            )
        if request_id is None:
            request_id = str(next(self._ids))
        req = Request(request_id, ids, params, max_tokens, prompt=text)
        self.scheduler.add(req)
        detok = None
        if params.detokenize and self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        self._text[request_id] = _TextState(detok)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        req = self.scheduler.get(request_id)
        if req is None:
            return False
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        self._text.pop(request_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns an output for each request that got a token."""
        out = self.scheduler.schedule()
        self.last_step_stats = StepStats.of(out.scheduled)
        if not out.scheduled:
            if self.has_unfinished_requests():
                # Cannot happen for requests add_request accepted; never spin silently.
                raise RuntimeError(f"the scheduler could not place any of {self.scheduler.num_unfinished} requests")
            return []
        tokens = iter(self.runner.execute(out.scheduled))
        results = []
        for s in out.scheduled:
            if s.samples:
                results.append(self._process_token(s.request, next(tokens)))
        return results

    def _finish(self, req: Request, status: RequestStatus, reason: int | str | None = None) -> None:
        req.stop_reason = reason
        self.scheduler.finish(req, status)
        self.runner.release(req.request_id)

    def _process_token(self, req: Request, token: int) -> RequestOutput:
        req.append_token(token)
        state = self._text[req.request_id]
        p = req.params
        prev_len = len(state.text)
        if state.detokenizer is not None:
            state.text += state.detokenizer.add([token])
        n_out = req.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                self._finish(req, RequestStatus.FINISHED_STOPPED)
            elif token in p.stop_token_ids:
                self._finish(req, RequestStatus.FINISHED_STOPPED, token)
            elif p.stop and state.detokenizer is not None:
                hit = find_stop(state.text[:prev_len], state.text[prev_len:], p.stop, p.include_stop_str_in_output)
                if hit is not None:
                    state.text = state.text[: hit.cut]
                    self._finish(req, RequestStatus.FINISHED_STOPPED, hit.stop)
        if not req.status.finished and n_out >= req.max_tokens:
            self._finish(req, RequestStatus.FINISHED_LENGTH)
        if req.status.finished and req.stop_reason not in p.stop and state.detokenizer is not None:
            # Release a character the last token left incomplete (shown as U+FFFD).
            state.text += state.detokenizer.flush()
        return self._output(req, prev_len)

    def _output(self, req: Request, prev_text_len: int) -> RequestOutput:
        state = self._text[req.request_id]
        finished = req.status.finished
        if finished:
            del self._text[req.request_id]
        out_ids = req.output_token_ids
        new_ids = out_ids[state.emitted_tokens:]
        state.emitted_tokens = len(out_ids)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=state.text,
                    token_ids=out_ids,
                    finish_reason=req.status.value if finished else None,
                    stop_reason=req.stop_reason,
                )
            ],
            finished=finished,
            delta_text=state.text[prev_text_len:],
            delta_token_ids=new_ids,
        )

    # ---- helpers for the front ends ----------------------------------------------------------

    def chat_prompt(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"each message needs a string role and a content, got {m!r}")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        # The template already holds any BOS it wants: add no special tokens again.
        return list(self.tokenizer.encode(text, add_special_tokens=False))
