"""The prefill instance's scheduler (disagg topology): whole prompts, first come first served, up
to the token budget, into blocks of the instance's *own* KV pool.

Unlike the rapid prefill worker, which writes into blocks the decode worker lent it, the prefill
instance has a pool of its own: a prompt runs into its own blocks, is copied into the blocks the
decode instance allocated for it (its destination), and then frees its own blocks. A prompt that
does not fit in what is free waits for the blocks of the batch before it; one larger than the
whole pool can never run and is handed back as unplaceable (the caller fails it).

NOTE: the BlockManager here is this instance's alone (one writer: its worker); the destination
block ids belong to the decode instance's pool and are only carried along.
Plain Python, no torch.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from rapidserve.kv.block_manager import BlockManager, blocks_needed
from rapidserve.request import Request
from rapidserve.scheduler.chunked import ScheduledRequest


class PrefillBatch(NamedTuple):
    scheduled: list[ScheduledRequest]  # whole prompts, own blocks allocated
    unplaceable: list[Request]  # need more blocks than the whole pool has: to be failed


class DisaggPrefillScheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {max_num_batched_tokens}")
        self.blocks = blocks
        self.budget = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self._dest: dict[str, list[int]] = {}  # request id -> the decode instance's blocks

    def add(self, request: Request, dest_block_ids: list[int]) -> None:
        need = blocks_needed(request.num_tokens, self.blocks.block_size)
        if len(dest_block_ids) != need:
            raise ValueError(
                f"request {request.request_id!r} needs {need} blocks for its {request.num_tokens} "
                f"tokens, the decode instance gave {len(dest_block_ids)}"
            )
        self._dest[request.request_id] = list(dest_block_ids)
        self.waiting.append(request)

    def drop(self, request_id: str) -> bool:
        """Forget a request that has not run yet (an abort); False if it is not waiting."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._dest.pop(request_id, None)
                return True
        return False

    def schedule(self) -> PrefillBatch:
        """Whole prompts in arrival order while the token budget and the free blocks last; a
        prompt longer than the budget runs alone (prompts are never chunked here)."""
        out: list[ScheduledRequest] = []
        unplaceable: list[Request] = []
        used = 0
        while self.waiting:
            req = self.waiting[0]
            if blocks_needed(req.num_tokens, self.blocks.block_size) > self.blocks.num_blocks:
                self.waiting.popleft()
                self._dest.pop(req.request_id, None)
                unplaceable.append(req)
                continue
            n = req.num_tokens - req.num_computed_tokens
            if out and used + n > self.budget:
                break
            if not self.blocks.allocate(req.request_id, req.num_tokens):
                break  # the pool is full: waits for this batch's blocks
            self.waiting.popleft()
            out.append(ScheduledRequest(req, req.num_computed_tokens, n, True))
            req.num_computed_tokens += n
            used += n
        return PrefillBatch(out, unplaceable)

    def transfer_plan(self, request_id: str) -> tuple[list[int], list[int]]:
        """(own blocks, the decode instance's blocks) of a prefilled request, pairwise."""
        return list(self.blocks.block_table(request_id)), self._dest[request_id]

    def finish(self, request_id: str) -> None:
        """The request's KV was copied out (or failed to be): free its own blocks."""
        self.blocks.free(request_id)
        self._dest.pop(request_id, None)
