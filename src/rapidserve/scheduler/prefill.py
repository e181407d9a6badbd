"""The prefill worker's scheduler (rapid topology): whole prompts, first come first served.

It owns no KV blocks: the decode worker allocates a prompt's blocks before handing the request
over (paper §4.4), and the prefill worker only writes into them. Plain Python, no torch.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from rapidserve.request import Request
from rapidserve.scheduler.chunked import ScheduledRequest


class PrefillJob(NamedTuple):
    request: Request
    block_ids: list[int]  # blocks the decode worker allocated for all of request.all_token_ids


class PrefillTables:
    """Read-only block tables of the jobs in flight, in the shape the model runner reads
    (`block_table(request_id)`, `block_size`)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def set(self, request_id: str, block_ids: list[int]) -> None:
        self._tables[request_id] = block_ids

    def drop(self, request_id: str) -> None:
        self._tables.pop(request_id, None)


class PrefillScheduler:
    def __init__(self, max_num_batched_tokens: int, block_size: int) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {max_num_batched_tokens}")
        self.budget = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.tables = PrefillTables(block_size)

    def add(self, job: PrefillJob) -> None:
        need = -(-job.request.num_tokens // self.tables.block_size)
        if len(job.block_ids) < need:
            raise ValueError(
                f"request {job.request.request_id!r} needs {need} blocks for its "
                f"{job.request.num_tokens} tokens, got {len(job.block_ids)}"
            )
        self.tables.set(job.request.request_id, job.block_ids)
        self.waiting.append(job.request)

    def drop(self, request_id: str) -> bool:
        """Forget a request that has not run yet (an abort); False if it is not waiting."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self.tables.drop(request_id)
                return True
        return False

    def schedule(self) -> list[ScheduledRequest]:
        """Whole prompts in arrival order up to the token budget; a prompt longer than the
        budget runs alone (prompts are never chunked here)."""
        out: list[ScheduledRequest] = []
        used = 0
        while self.waiting:
            req = self.waiting[0]
            n = req.num_tokens - req.num_computed_tokens
            if out and used + n > self.budget:
                break
            self.waiting.popleft()
            out.append(ScheduledRequest(req, req.num_computed_tokens, n, True))
            req.num_computed_tokens += n
            used += n
        return out

    def finish(self, request_id: str) -> None:
        """The request's prompt KV is written and its token sampled: release its table."""
        self.tables.drop(request_id)
