"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`): which positions of a step score a
prompt token, what the step computes for them on the device, and the small host record a run of
them then travels in.

The hidden state at position p predicts token p + 1, so a step that computes positions
[a, b) of a request scores its prompt tokens a + 1 .. b (the last position of a prefill chunk
scores the next chunk's first token; the prompt's last position predicts the first generated
token, which is the sampled token's logprobs, not the prompt's). As vLLM: `log_softmax` of the
raw logits, the prompt token's logprob and rank, the top k of its position.

NOTE: memory. A prompt's positions are never turned into logits all at once (8K positions x a
150K vocabulary in float32 is 4.9 GB): the LM head, the log_softmax and the top-k run over at
most `rows_per_chunk` positions at a time, and only [rows, 2 + 2k] per chunk is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from rapidserve.sampling.logprobs import pack_logprobs

if TYPE_CHECKING:
    from rapidserve.request import Request
    from rapidserve.scheduler.chunked import ScheduledRequest

# The float32 logits one chunk of positions may take (the log_softmax and the rank test take
# about as much again): 64 MiB is 111 rows of a 150K vocabulary, 341 of a 49K one. Each chunk
# reads the LM head once: an 8K prompt of a 150K vocabulary reads it 74 times.
CHUNK_LOGITS_BYTES = 64 << 20


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))


class PromptLogprobsChunk(NamedTuple):
    """Consecutive prompt tokens' logprobs of one request, as a worker reports them (plain and
    picklable: it rides in the rapid and disagg topologies' messages)."""

    first: int  # the index in the prompt of the first token scored (>= 1)
    # [n, 2 + 2k] float32: each token's logprob, its rank (1 = the most likely at its position),
    # the position's k top ids and their logprobs, best first.
    packed: np.ndarray

    @property
    def k(self) -> int:
        return (self.packed.shape[1] - 2) // 2


_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_ROWS.flags.writeable = False


class _Segment(NamedTuple):
    request_id: str
    first: int  # the prompt index of the first token scored
    count: int
    k: int


class PromptLogprobsPlan:
    """The positions of a step that score prompt tokens, for the requests that asked: their flat
    indices in the step's hidden states and the prompt tokens they score."""

    def __init__(self, scheduled: list[ScheduledRequest]) -> None:
        self.segments: list[_Segment] = []
        rows: list[np.ndarray] = []
        targets: list[int] = []
        self._advance: list[tuple[Request, int]] = []  # (request, positions done once launched)
        offset = 0
        for s in scheduled:
            req = s.request
            k = req.params.prompt_logprobs
            if k is not None:
                # NOTE: positions a launched step already scored (before a preemption) are not
                # scored again: each prompt token gets one entry.
                a = max(s.start, req.num_prompt_logprobs)
                b = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
                if a < b:
                    begin = offset + a - s.start
                    rows.append(np.arange(begin, begin + b - a, dtype=np.int64))
                    targets.extend(req.prompt_token_ids[a + 1 : b + 1])
                    self.segments.append(_Segment(req.request_id, a + 1, b - a, k))
                    self._advance.append((req, b))
            offset += s.num_new_tokens
        # (a step where no request asked, nearly every one, builds no array)
        self.rows = np.concatenate(rows) if rows else _NO_ROWS  # [R]
        self.targets = np.array(targets, dtype=np.int64) if targets else _NO_ROWS  # [R]
        self.k = max((seg.k for seg in self.segments), default=0)

    def __bool__(self) -> bool:
        return bool(self.segments)

    def launched(self) -> None:
        """The step that computes these positions was launched: they are not to be scored again."""
        for req, done in self._advance:
            req.num_prompt_logprobs = max(req.num_prompt_logprobs, done)

    def split(self, packed: np.ndarray) -> dict[str, PromptLogprobsChunk]:
        """Each request's chunk from the step's packed rows ([R, 2 + 2K], read back)."""
        out: dict[str, PromptLogprobsChunk] = {}
        at = 0
        for seg in self.segments:
            rows = packed[at : at + seg.count]
            at += seg.count
            keep = np.concatenate([rows[:, : 2 + seg.k], rows[:, 2 + self.k : 2 + self.k + seg.k]], axis=1)
            out[seg.request_id] = PromptLogprobsChunk(seg.first, np.ascontiguousarray(keep, dtype=np.float32))
        return out


class PromptLogprobsTensors(NamedTuple):
    """A step's prompt logprobs on the device (the plan's rows, in its order)."""

    plan: PromptLogprobsPlan
    packed: torch.Tensor  # [R, 2 + 2K] float32


def compute_prompt_logprobs(hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                            plan: PromptLogprobsPlan, vocab_size: int) -> PromptLogprobsTensors:
    """The plan's positions' logprobs from the step's final hidden states [T, H] (after the
    norm), `rows_per_chunk` positions at a time. Nothing is read back to the host."""
    device = hidden.device
    rows = torch.from_numpy(plan.rows).to(device, non_blocking=True)  # [R]
    targets = torch.from_numpy(plan.targets).to(device, non_blocking=True)  # [R]
    step = rows_per_chunk(vocab_size)
    parts = []
    for at in range(0, len(plan.rows), step):
        logits = compute_logits(hidden.index_select(0, rows[at : at + step]))  # [r, V] float32
        parts.append(pack_logprobs(logits, targets[at : at + step], plan.k))  # [r, 2 + 2K]
        del logits
    return PromptLogprobsTensors(plan, torch.cat(parts) if len(parts) > 1 else parts[0])
