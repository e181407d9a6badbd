"""The hybrid-batching scheduler (Sarathi / vLLM v1 style), plain Python.

There is no phase: each request has `num_computed_tokens`, and each step spends a token budget
bringing requests up to date — running decodes first, then prefill chunks in arrival order.
When the cache runs out of blocks, the most recently admitted running request is preempted
and later recomputed from scratch (its prompt and the tokens it already produced).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from rapidserve.kv.block_manager import BlockManager
from rapidserve.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )


class ScheduledRequest(NamedTuple):
    request: Request
    start: int  # num_computed_tokens before this step: the first new token's position
    num_new_tokens: int
    samples: bool  # the step reaches the request's last token (known or pending): it produces a new one


class SchedulerOutput(NamedTuple):
    scheduled: list[ScheduledRequest]
    preempted: list[Request]
    num_batched_tokens: int


def _entry(req: Request, n: int) -> ScheduledRequest:
    start = req.num_computed_tokens
    return ScheduledRequest(req, start, n, start + n == req.num_tokens + req.num_pending)


class ChunkedScheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self.num_preemptions = 0  # since start, for metrics

    # ---- queue changes -----------------------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues for good and free its blocks."""
        assert status.finished
        if self._by_id.pop(request.request_id, None) is None:
            return
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.blocks.free(request.request_id)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._by_id)

    # ---- one step ----------------------------------------------------------------------------

    def _preempt(self, victim: Request) -> None:
        self.blocks.free(victim.request_id)
        victim.reset_for_recompute()
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens. Advances `num_computed_tokens` of every scheduled request
        as if the step had run (the runner reads `start` for positions), so the next step can
        be planned before this one finishes: a request's token still being sampled on the device
        (`num_pending`) is scheduled like a known one."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # Running requests, decodes before unfinished prefills; order otherwise kept.
        self.running.sort(key=lambda r: not r.is_decoding)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and req.at_max_tokens:
                i += 1  # its token in flight is its last
                continue
            n = min(req.num_uncomputed_tokens, budget)
            while not self.blocks.allocate(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()  # lowest priority: admitted last
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(_entry(req, n))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: no room for anything else

        # New (or preempted) requests in arrival order, while budget, seats and blocks last.
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                if req.num_pending:
                    break  # preempted with a token in flight: back once it has landed
                n = min(req.num_uncomputed_tokens, budget)
                if not self.blocks.allocate(req.request_id, req.num_computed_tokens + n):
                    break
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                scheduled.append(_entry(req, n))
                budget -= n

        for s in scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        used = self.config.max_num_batched_tokens - budget
        return SchedulerOutput(scheduled, preempted, used)
