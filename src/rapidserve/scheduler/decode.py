"""The decode worker's scheduler (rapid topology): it alone owns the KV blocks.

A request's way through it (paper §4.4): waiting → its prompt's blocks allocated and the request
handed to the prefill worker (prefilling) → the prefill worker reports its first token (ready)
→ it joins the running decode batch at the next step. Decode is FCFS continuous batching; when
blocks run out the most recently admitted running request is preempted and goes back through
the whole flow (its prompt and the tokens it has are recomputed by the prefill worker).

NOTE: blocks of a request in the prefill worker are never freed before that worker reports
back, since it may be writing them: an abort there is only marked, and settled then.
Plain Python, no torch.
"""

from __future__ import annotations

from collections import deque

from rapidserve.kv.block_manager import BlockManager
from rapidserve.request import Request, RequestStatus
from rapidserve.scheduler.chunked import ScheduledRequest, SchedulerConfig, SchedulerOutput
from rapidserve.scheduler.prefill import PrefillJob


class DecodeScheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.prefilling: dict[str, Request] = {}
        self.ready: deque[Request] = deque()
        self.running: list[Request] = []
        self._aborted_in_prefill: set[str] = set()
        self._by_id: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self._by_id)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def _seats_taken(self) -> int:
        return len(self.running) + len(self.prefilling) + len(self.ready)

    # ---- the request flow --------------------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def hand_over(self) -> list[PrefillJob]:
        """Allocate prompt blocks for waiting requests (FCFS, while seats and blocks last) and
        return them as jobs for the prefill worker."""
        jobs: list[PrefillJob] = []
        while self.waiting and self._seats_taken() < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted with a token in flight: handed over once it has landed
            if not self.blocks.allocate(req.request_id, req.num_tokens):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.prefilling[req.request_id] = req
            jobs.append(PrefillJob(req, list(self.blocks.block_table(req.request_id))))
        return jobs

    def prefill_done(self, request_id: str) -> Request | None:
        """The prefill worker wrote the KV of every token the request had and sampled the next
        one (the caller appends it). Returns the request, or None if it was aborted meanwhile
        (its blocks are freed now)."""
        req = self.prefilling.pop(request_id)
        if request_id in self._aborted_in_prefill:
            self._aborted_in_prefill.discard(request_id)
            self.blocks.free(request_id)
            return None
        req.num_computed_tokens = req.num_tokens
        self.ready.append(req)
        return req

    def prefill_dropped(self, request_id: str) -> None:
        """The prefill worker dropped a job before running it (after an abort)."""
        self.prefilling.pop(request_id, None)
        self._aborted_in_prefill.discard(request_id)
        self.blocks.free(request_id)

    def prefill_failed(self, request_id: str) -> Request | None:
        """The prefill side could not deliver the request's KV (the disagg topology: a failed
        transfer): its blocks are freed and it ends with an error. Returns the request, or None
        if it was aborted meanwhile."""
        req = self.prefilling.pop(request_id)
        self.blocks.free(request_id)
        if request_id in self._aborted_in_prefill:
            self._aborted_in_prefill.discard(request_id)
            return None
        del self._by_id[request_id]
        req.status = RequestStatus.FINISHED_ERROR
        return req

    def abort(self, request_id: str) -> bool:
        """Abort wherever the request is. Returns True if the prefill worker holds it (the
        caller must tell that worker; blocks are freed when it reports back)."""
        req = self._by_id.pop(request_id, None)
        if req is None:
            return False
        req.status = RequestStatus.FINISHED_ABORTED
        if request_id in self.prefilling:
            self._aborted_in_prefill.add(request_id)
            return True
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.ready:
            self.ready.remove(req)
        elif req in self.running:
            self.running.remove(req)
        self.blocks.free(request_id)
        return False

    def finish(self, request: Request, status: RequestStatus) -> None:
        """A request ended (stop token, length, stop string): free its blocks. It is running,
        ready, or waiting after a preemption (its token in flight then landed and ended it)."""
        assert status.finished
        if self._by_id.pop(request.request_id, None) is None:
            return
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.ready:
            self.ready.remove(request)
        elif request in self.waiting:  # preempted while its last token was in flight
            self.waiting.remove(request)
        self.blocks.free(request.request_id)

    # ---- one decode step ---------------------------------------------------------------------

    def _preempt(self, victim: Request) -> None:
        self.blocks.free(victim.request_id)
        victim.reset_for_recompute()
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> SchedulerOutput:
        """One token for every running request (ready ones join first), growing their block
        tables; preempts the latest admitted when blocks run out."""
        while self.ready:
            self.running.append(self.ready.popleft())
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.num_pending and req.at_max_tokens:
                i += 1  # its token in flight is its last
                continue
            if self.blocks.allocate(req.request_id, req.num_computed_tokens + 1):
                scheduled.append(ScheduledRequest(req, req.num_computed_tokens, 1, True))
                i += 1
                continue
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
        for s in scheduled:
            s.request.num_computed_tokens += 1
        return SchedulerOutput(scheduled, preempted, len(scheduled))
