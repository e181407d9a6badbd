"""Logit bias and the presence / frequency / repetition penalties (`SamplingParams`), as vLLM
applies them: bias first, then repetition, then frequency and presence, all on the raw float32
logits before temperature and the filters (so greedy decoding sees them too).

A row's history travels as host token lists (the prompt only where the repetition penalty
needs it) plus, with one-step-ahead scheduling, the token the step in flight sampled, which is
still on the device (`PendingTokens`). One padded index tensor holds a batch's histories and
one `scatter_add` turns it into counts, so a step costs one host->device copy whatever the
number of penalized rows. A batch where no request asked runs none of this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from rapidserve.sampling.transfer import to_device
from rapidserve.sampling_params import SamplingParams


class TokenHistory(NamedTuple):
    """The tokens a penalized row has seen that are on the host."""

    prompt: Sequence[int]  # empty unless the row's repetition penalty is on (1: off)
    output: Sequence[int]  # its generated tokens known on the host


class PendingTokens(NamedTuple):
    """Tokens sampled by the step in flight and not yet read back: each is the last output
    token of its row (async scheduling: the host plans the next step before it lands)."""

    rows: list[int]  # the batch rows they belong to
    tokens: torch.Tensor  # [P] int64 on the logits' device


def needs_penalties(params: Sequence[SamplingParams]) -> bool:
    """Whether any row asked for a penalty or a bias (the one test a plain batch pays)."""
    return any(p.penalized or p.logit_bias for p in params)


def logit_bias_arrays(params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """A request's logit bias as (token ids int64, biases float32), built once per
    SamplingParams and kept on it.
    NOTE: a bias may cover the whole vocabulary (49K entries fit the server's body limit): rebuilt
    from the dict every step, in Python, it cost 0.13 s per step per such row (CPU, one thread)."""
    cached = params.__dict__.get("_logit_bias_arrays")
    if cached is None:
        bias = params.logit_bias or {}
        cached = (np.fromiter(bias.keys(), dtype=np.int64, count=len(bias)),
                  np.fromiter(bias.values(), dtype=np.float32, count=len(bias)))
        object.__setattr__(params, "_logit_bias_arrays", cached)  # (a frozen dataclass; not a field)
    return cached


def apply_penalties(
    x: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory | None],
    pending: PendingTokens | None = None,
) -> None:
    """Apply each row's logit bias and penalties to x in place.

    x: [B, V] float32 logits (the sampler's own copy). histories: one per row, None for a row
    without penalties (a row with only a logit bias needs none). pending: rows whose last output
    token is still on the device; each must also have a history. Rows that asked for nothing are
    left bit-for-bit unchanged.
    """
    rows = [i for i, p in enumerate(params) if p.penalized or p.logit_bias]
    if not rows:
        return
    vocab = x.shape[1]
    device = x.device
    all_rows = len(rows) == x.shape[0]
    index = None if all_rows else to_device(rows, torch.long, device)  # [R]
    sub = x if index is None else x.index_select(0, index)  # [R, V]
    sub_params = [params[i] for i in rows]

    biased = [(r, logit_bias_arrays(p)) for r, p in enumerate(sub_params) if p.logit_bias]
    if biased:
        ids = np.concatenate([a[0] for _, a in biased])  # [N]
        # Checked on the host: an out-of-range index is a device-side assert on GPU.
        if ids.max() >= vocab:
            raise ValueError(f"logit_bias token id {int(ids.max())} is outside the vocabulary [0, {vocab})")
        owners = np.concatenate([np.full(len(a[0]), r, dtype=np.int64) for r, a in biased])  # [N]
        values = to_device(np.concatenate([a[1] for _, a in biased]), torch.float32, device)  # [N]
        where = to_device(np.stack([owners, ids]), torch.long, device)  # [2, N]
        sub.index_put_((where[0], where[1]), values, accumulate=True)

    if any(p.penalized for p in sub_params):
        local = {row: r for r, row in enumerate(rows)}
        _apply_history_penalties(sub, sub_params, [histories[i] for i in rows], pending, local)

    if index is not None:
        x.index_copy_(0, index, sub)


def _apply_history_penalties(
    x: torch.Tensor,
    params: list[SamplingParams],
    histories: list[TokenHistory | None],
    pending: PendingTokens | None,
    local: dict[int, int],
) -> None:
    """x: [R, V] float32, modified in place. local: batch row -> row of x."""
    num_rows, vocab = x.shape
    device = x.device
    # NOTE: one index row per logits row: output ids as they are, prompt ids shifted by
    # vocab + 1, padding at vocab (its count lands in a column that is dropped), and a last
    # column for the token still in flight. One scatter_add then counts both histories.
    lengths = [(len(h.output), len(h.prompt)) if h is not None else (0, 0) for h in histories]
    width = max(o + q for o, q in lengths) + 1
    ids = np.full((num_rows, width), vocab, dtype=np.int64)
    for r, (h, (n_out, n_prompt)) in enumerate(zip(histories, lengths)):
        if h is None:
            if params[r].penalized:
                raise RuntimeError("a penalized row has no token history")
            continue
        ids[r, :n_out] = h.output
        ids[r, n_out:n_out + n_prompt] = np.asarray(h.prompt, dtype=np.int64) + (vocab + 1)
    # The engine only admits ids in the vocabulary; this keeps a broken history from being a
    # device-side assert (an index past the counts).
    if ids.min() < 0 or ids.max() > 2 * vocab + 1:
        raise ValueError(f"a token history holds an id outside the vocabulary [0, {vocab})")
    index = to_device(ids, torch.long, device)  # [R, W]
    if pending is not None:
        mine = [(local[row], k) for k, row in enumerate(pending.rows) if row in local]
        if mine:
            at = to_device([[r for r, _ in mine], [k for _, k in mine]], torch.long, device)  # [2, P]
            index[at[0], -1] = pending.tokens.index_select(0, at[1])
    counts = torch.zeros(num_rows, 2 * (vocab + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    output_counts = counts[:, :vocab]  # [R, V]
    table = to_device(
        [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params], torch.float32, device
    )  # [R, 3]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = (output_counts > 0) | (counts[:, vocab + 1: 2 * vocab + 1] > 0)  # [R, V]
        r = table[:, 0:1]
        # Rows with r == 1 are unchanged: x / 1 and x * 1 are exact.
        x.copy_(torch.where(seen, torch.where(x > 0, x / r, x * r), x))
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        x.sub_(table[:, 1:2] * output_counts + table[:, 2:3] * (output_counts > 0))
