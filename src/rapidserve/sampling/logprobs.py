"""Sampled-token log-probabilities (`SamplingParams.logprobs`): what a step computes on the
device for the rows that asked, and the small host record each sampled token then travels with.

As vLLM's default (`raw_logprobs`): `log_softmax` of the model's raw logits, before temperature,
top-k/top-p/min-p and min_tokens' bans, so a token's logprob does not depend on how it was
picked. The rank of the sampled token counts the tokens at least as likely as it (1: the most
likely), as vLLM counts it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from rapidserve.sampling.transfer import to_device
from rapidserve.sampling_params import SamplingParams


class TokenLogprobs(NamedTuple):
    """One sampled token's log-probabilities, as a worker reports them (plain and picklable: it
    rides in the rapid and disagg topologies' messages)."""

    logprob: float  # the sampled token's
    rank: int  # 1 = the most likely token of its step
    top_ids: tuple[int, ...]  # the request's k most likely tokens, best first
    top_logprobs: tuple[float, ...]


class LogprobsTensors(NamedTuple):
    """A step's logprobs on the device, for the sampling rows that asked."""

    rows: list[int]  # the sampling rows (positions in the step's sampled tokens) they belong to
    num: list[int]  # each row's k
    # [R, 2 + 2K] float32: the sampled token's logprob, its rank, K top ids, K top logprobs.
    # NOTE: one tensor, so reading a step back costs one copy; ids and ranks are exact in float32
    # below 2**24 (any vocabulary).
    packed: torch.Tensor


def compute_logprobs(logits: torch.Tensor, sampled: torch.Tensor,
                     params: Sequence[SamplingParams]) -> LogprobsTensors | None:
    """The logprobs of the rows whose request asked, or None (nothing computed: a batch where no
    request asked costs only this test). logits: [B, V] (the raw logits the sampler got; not
    modified), sampled: [B] int64, both on one device. Nothing is read back to the host."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    num = [params[i].logprobs or 0 for i in rows]
    k = max(num)
    if len(rows) == logits.shape[0]:
        x, tokens = logits, sampled
    else:
        index = to_device(rows, torch.long, logits.device)  # [R]
        x, tokens = logits.index_select(0, index), sampled.index_select(0, index)
    return LogprobsTensors(rows, num, pack_logprobs(x, tokens, k))


def pack_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """[R, 2 + 2k] float32 from logits [R, V] and one token per row [R]: the token's logprob
    (log_softmax of the raw logits), its rank, the k top ids and their logprobs, best first."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    token_lp = lp.gather(1, tokens.view(-1, 1))  # [R, 1]
    rank = (lp >= token_lp).sum(dim=-1, keepdim=True).float()  # [R, 1]
    parts = [token_lp, rank]
    if k > 0:
        top_lp, top_ids = lp.topk(k, dim=-1)  # [R, k] each, best first
        parts += [top_ids.float(), top_lp]
    return torch.cat(parts, dim=1)  # [R, 2 + 2k]


def unpack(tensors: LogprobsTensors, packed: list[list[float]], num_rows: int) -> list[TokenLogprobs | None]:
    """The host records of a step's `num_rows` sampling rows (None for rows that did not ask)
    from `packed` (the LogprobsTensors' packed tensor, read back as lists)."""
    out: list[TokenLogprobs | None] = [None] * num_rows
    k = (len(packed[0]) - 2) // 2 if packed else 0
    for row, n, values in zip(tensors.rows, tensors.num, packed):
        out[row] = TokenLogprobs(
            values[0], int(values[1]),
            tuple(int(t) for t in values[2:2 + n]), tuple(values[2 + k:2 + k + n]),
        )
    return out
