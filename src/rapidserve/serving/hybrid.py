"""The hybrid topology (the paper's first baseline, Sarathi / vLLM v1's chunked prefill): one
worker in this process whose steps mix running decodes with prefill chunks up to a token budget."""

from __future__ import annotations

import logging
from typing import Any

from rapidserve.config import EngineConfig
from rapidserve.kv.block_manager import BlockManager
from rapidserve.outputs import RequestOutput
from rapidserve.request import Request
from rapidserve.runner.model_runner import ModelRunner, StepResult
from rapidserve.runner.setup import device_memory_bytes, prepare_model
from rapidserve.runner.timeline import StepTimeline
from rapidserve.scheduler.chunked import ChunkedScheduler, SchedulerConfig
from rapidserve.serving.front import EngineFront, EngineStats, StepStats
from rapidserve.serving.liveness import inject_step_hang

log = logging.getLogger("rapidserve.engine")


class LLMEngine(EngineFront):
    """The hybrid topology: one worker; each step mixes running decodes with prefill chunks.

    Its steps run on the caller's thread: under a server, the AsyncEngine's engine thread, which
    the AsyncEngine watches (`caller_step_role`: the step watch's "engine"). An offline caller
    (`LLM`, `rapidserve generate`) is that thread itself: nothing watches it."""

    caller_step_role = "engine"

    def __init__(self, config: EngineConfig) -> None:
        if config.mode != "hybrid":
            raise ValueError(f"LLMEngine runs the hybrid mode; use create_engine() for {config.mode!r}")
        super().__init__(config)
        prepared = prepare_model(config)
        loaded = prepared.loaded
        self.device = prepared.device
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        self.max_model_len = loaded.max_model_len
        self.model_name = config.served_model_name or loaded.source.display_name
        self.backend = prepared.backend
        self.use_graphs = prepared.use_graphs
        self.cache = prepared.cache
        self.num_kv_blocks, self.block_size = self.cache.num_blocks, config.block_size
        blocks = BlockManager(self.num_kv_blocks, config.block_size)
        self.eos_token_ids = prepared.eos_token_ids
        runner = ModelRunner(
            loaded.model, self.cache, blocks, self.device, self.eos_token_ids, self.backend,
            self.max_model_len,
        )
        if self.use_graphs:
            runner.capture_graphs(config.max_num_seqs, config.max_num_batched_tokens)
        self._init_steps(config, blocks, runner, config.resolve_async_scheduling(self.device))
        inject_step_hang(self.caller_step_role, self.runner)
        if config.step_timeline:
            self.runner.timeline = StepTimeline("hybrid", self.device)

    def _init_steps(self, config: EngineConfig, blocks: BlockManager, runner: Any, async_scheduling: bool) -> None:
        """What `step` runs on: the scheduler over `blocks` and a runner (a ModelRunner; the
        simulator's prices steps on a virtual clock instead, rapidserve.sim)."""
        self.blocks = blocks
        self.runner = runner
        self.scheduler = ChunkedScheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), blocks)
        self.async_scheduling = async_scheduling
        self._in_flight: StepResult | None = None  # the launched step not yet read back

    def _submit(self, req: Request) -> None:
        self.scheduler.add(req)

    def shutdown(self) -> None:
        if self.config.step_timeline and self.runner.timeline is not None:
            self.runner.timeline.dump(self.config.step_timeline)
            self.runner.timeline = None

    def stats(self) -> EngineStats:
        return EngineStats(
            len(self.scheduler.running), len(self.scheduler.waiting), self.blocks.num_free_blocks,
            self.blocks.num_blocks, self.scheduler.num_preemptions, memory_bytes=device_memory_bytes(self.device),
        )

    def _release(self, req: Request, decided_by_worker: bool) -> None:
        self.scheduler.finish(req, req.status)
        self.runner.release(req.request_id)

    def _step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns an output for each request that got a token.

        With async scheduling the outputs are those of the previous step: this one is planned
        and launched first, so the GPU is never idle while the host reads tokens back, checks
        stops and detokenizes (a request that stopped at that step wasted one token of this
        step, which is discarded)."""
        out = self.scheduler.schedule()
        self.last_step_stats = StepStats.of(out.scheduled)
        prev, self._in_flight = self._in_flight, None
        failures: list[RequestOutput] = []
        if out.scheduled:
            launched, failed = self.runner.submit_isolated(out.scheduled, prev)
            for f in failed:
                if (o := self._fail_request(f.scheduled.request, f.message)) is not None:
                    failures.append(o)
            if self.async_scheduling:
                for s in launched.scheduled:
                    if s.samples:
                        s.request.num_pending += 1
                self._in_flight = launched
            else:
                prev = launched
        elif prev is None and self.has_unfinished_requests():
            # Cannot happen for requests add_request accepted; never spin silently.
            raise RuntimeError(
                f"the scheduler could not place any of {self.scheduler.num_unfinished} requests"
            )
        return failures + ([] if prev is None else self._take(prev))

    def _take(self, result: StepResult) -> list[RequestOutput]:
        """The tokens of a finished step, for the requests still unfinished."""
        outputs = []
        tokens = result.tokens()
        prompt_logprobs = result.prompt_logprobs()
        for s in result.scheduled if prompt_logprobs else ():
            req = s.request
            chunk = prompt_logprobs.get(req.request_id)
            if chunk is not None and not req.status.finished:
                if (out := self._take_prompt_logprobs(req, chunk)) is not None:
                    outputs.append(out)
        for s, token, logprobs in zip((s for s in result.scheduled if s.samples), tokens, result.logprobs()):
            req = s.request
            if self.async_scheduling:
                req.num_pending -= 1
            if req.status.finished:
                continue  # stopped, aborted or failed after this step was launched: discarded
            if (out := self._take_token(req, token, logprobs=logprobs)) is not None:
                outputs.append(out)
        return outputs
