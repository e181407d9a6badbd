"""Paged KV cache bookkeeping: which cache blocks each request owns. Plain Python, no torch.

NOTE: one writer. In the hybrid topology the engine's scheduler owns it; in the rapid
topology the decode worker does. Blocks carry reference counts so that a block can later be
shared between requests (prefix caching, forks): a block returns to the free list only when
its last holder lets go.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class BlockTables(Protocol):
    """What the model runner reads of block ownership: the BlockManager, or the prefill
    worker's read-only copy of the tables it was handed."""

    block_size: int

    def block_table(self, request_id: str) -> list[int]: ...


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # NOTE: with a step in flight on another stream than the one that next writes a block
        # (the rapid topology: decode launches step N+1, then frees a request that stopped at
        # N, whose blocks N+1 still writes, while the prefill worker may be handed them), freed
        # blocks are held back until that step is known to be done (`retire`).
        self._fence: int | None = None  # the latest launched step that may still write blocks
        self._held: deque[tuple[int, int]] = deque()  # (step, block), steps in increasing order

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_held_blocks(self) -> int:
        """Freed, but a step in flight may still write them."""
        return len(self._held)

    def fence(self, step: int) -> None:
        """Step `step` was launched: blocks freed from now on wait until it is retired."""
        self._fence = step

    def retire(self, step: int) -> None:
        """Every step up to `step` is done: the blocks freed while they ran are free now."""
        while self._held and self._held[0][0] <= step:
            self._free.appendleft(self._held.popleft()[1])
        if self._fence is not None and self._fence <= step:
            self._fence = None

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks still to allocate so that the request's table covers num_tokens tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(self.block_table(request_id)))

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to cover num_tokens tokens. All or nothing: on False
        (not enough free blocks) nothing changed."""
        table = self._tables.get(request_id)
        if table is not None and len(table) * self.block_size >= num_tokens:
            return True  # the common case, a decode step inside its last block: once per sequence per step
        need = self.num_new_blocks(request_id, num_tokens)
        if need > len(self._free):
            return False
        table = self._tables.setdefault(request_id, [])
        for _ in range(need):
            block = self._free.popleft()
            self._ref_counts[block] = 1
            table.append(block)
        return True

    def share(self, src_request_id: str, dst_request_id: str, num_blocks: int) -> None:
        """Let dst start with the first num_blocks blocks of src (a shared prefix)."""
        if dst_request_id in self._tables:
            raise ValueError(f"request {dst_request_id!r} already has blocks")
        src = self.block_table(src_request_id)
        if num_blocks > len(src):
            raise ValueError(f"request {src_request_id!r} has only {len(src)} blocks, not {num_blocks}")
        for block in src[:num_blocks]:
            self._ref_counts[block] += 1
        self._tables[dst_request_id] = list(src[:num_blocks])

    def free(self, request_id: str) -> None:
        """Release every block the request holds (a no-op for an unknown request)."""
        for block in reversed(self._tables.pop(request_id, [])):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._fence is not None:
                    self._held.append((self._fence, block))
                else:
                    # Recently freed blocks go to the front: their memory is likely still warm.
                    self._free.appendleft(block)
