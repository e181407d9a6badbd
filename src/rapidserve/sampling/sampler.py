"""Batched next-token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds,
after min_tokens' bans and the logit bias and penalties (`rapidserve.sampling.penalties`).

Everything runs on the logits' device without reading values back to the host: which
filters to run is decided from the (host-side) `SamplingParams`, and per-row parameters
travel to the device through pinned memory with non-blocking copies.

Filter semantics (all on temperature-scaled float32 logits, in this order):

* top-k keeps the k highest-logit tokens (exactly k; ties at the boundary are broken by
  the sort order).
* top-p keeps the smallest prefix of the sorted distribution whose cumulative
  probability reaches top_p, always at least the top token. The probabilities are those
  *after* top-k, renormalized over the tokens top-k kept (as vLLM's top-k/top-p does).
* min-p drops tokens whose probability is below min_p times the top token's. The top
  token always survives the earlier filters and renormalization scales every survivor by
  the same factor, so this ratio is the same before or after renormalization; it is
  therefore computed directly in log space, without a softmax. vLLM v1 runs min-p
  *before* top-k/top-p; the only observable difference is that here top-p sees
  probabilities that min-p has not yet renormalized.

Thresholds are compared with a small slack so that a distribution that reaches a
threshold exactly in decimal (cumulative 0.5 + 0.2 vs top_p 0.7) is not cut differently
because of float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rapidserve.sampling.penalties import PendingTokens, TokenHistory, apply_penalties, needs_penalties
from rapidserve.sampling.transfer import to_device
from rapidserve.sampling_params import SamplingParams

# Slack for "cumulative probability reaches top_p" (absolute, in probability).
_TOP_P_SLACK = 1e-6
# Slack for "prob >= min_p * max prob" (in log-probability, i.e. ~1e-5 relative).
_MIN_P_LOG_SLACK = 1e-5


@dataclass
class SamplingBatch:
    """Per-row sampling inputs for one `Sampler` call; all lists have one entry per row."""

    params: list[SamplingParams]
    # The request's own generator (from `make_generator`) when it has a seed, else None.
    # It must live on the logits' device and be kept by the request across steps.
    generators: list[torch.Generator | None]
    # Token ids forced to -inf for that row before anything else (min_tokens: EOS + stop ids).
    banned_token_ids: list[tuple[int, ...]]
    # The tokens each penalized row has seen (None for rows whose request asked for no penalty);
    # None: no row did.
    histories: list[TokenHistory | None] | None = None
    # Penalized rows' last output tokens still on the device (async scheduling), or None.
    pending: PendingTokens | None = None

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams],
                    histories: list[TokenHistory | None] | None = None) -> SamplingBatch:
        """A batch with no generators and no banned tokens (mostly for tests and tools)."""
        n = len(params)
        return cls(list(params), [None] * n, [()] * n, histories)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, on the device the logits will live on.

    Seeds are reduced modulo 2**64 because `manual_seed` only takes 64-bit values; negative
    seeds therefore still give distinct, reproducible streams.
    """
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def apply_filters(
    logits: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Set the logits of tokens removed by top-k, then top-p, then min-p to -inf.

    logits: [B, V] float32, already divided by the temperature; not modified.
    top_k: [B] int (0 or less = off), top_p: [B] float (>= 1 = off), min_p: [B] float
    (0 = off), each on logits' device; None skips that filter for every row.
    Returns a new [B, V] float32 tensor.
    """
    out = logits
    if top_k is not None or top_p is not None:
        out = _apply_top_k_top_p(out, top_k, top_p)
    if min_p is not None:
        out = _apply_min_p(out, min_p)
    if out is logits:
        out = logits.clone()
    return out


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    if logits.device.type == "cpu":
        return _top_k_top_p_by_candidates(logits, top_k, top_p, CPU_CANDIDATES)
    return _top_k_top_p_sorted(logits, top_k, top_p)


# How many of the highest logits the CPU path tries, in turn, before it sorts a row whole. On
# the embedded SmolLM2 at temperature 1 a top-p of 0.95 needed more than 256 tokens on 19-27 %
# of positions and more than 4096 on none of 2,000 (English text, a chat answer).
CPU_CANDIDATES = (256, 4096)


def _top_k_top_p_by_candidates(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
    candidates: Sequence[int],
) -> torch.Tensor:
    """`_top_k_top_p_sorted`'s result without sorting whole rows where it can be helped. Both
    filters keep a prefix of the descending order, so the K highest logits (`topk`, a partial
    sort) decide a row whose prefix ends among them: top-k's k <= K, or top-p's mass reached
    within them (every later token then drops too). The rows left try the next K, then the
    full sort. Rows with neither filter are returned as they are.

    The cumulative mass is summed in float64, so where the sort's float32 sum drifts past the
    slack (~4e-6 over ~1400 terms, seen at 1 position in 1024 of SmolLM2's) the two differ by
    the one token at the threshold, and this is the exact one.

    NOTE: CPU only. Which rows are decided is read on the host (free on a CPU, a sync on a GPU,
    where the sort costs little: one sort of 32 x 49152 float32 took 112 ms on one CPU thread,
    a topk of 256 of the same 5 ms).
    """
    vocab = logits.shape[-1]
    k = torch.full((logits.shape[0],), vocab, dtype=torch.long)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).to(torch.long)
    limit = None
    active = k < vocab
    if top_p is not None:
        limit = torch.where(top_p >= 1.0, torch.full_like(top_p, 2.0), top_p - _TOP_P_SLACK).to(torch.float32)
        active |= top_p < 1.0
    out = logits.clone()
    rows = active.nonzero().flatten()
    for size in candidates:
        if rows.numel() == 0 or size >= vocab:
            break
        x, kr = logits[rows], k[rows]
        vals, idx = x.topk(size, dim=-1)  # [R, K] each, descending
        vals = vals.masked_fill(torch.arange(size)[None, :] >= kr[:, None], float("-inf"))
        done = kr <= size
        if limit is not None:
            lr = limit[rows]
            # The probabilities over top-k's survivors: all among the K when k <= K; every token
            # without top-k. NOTE: a row whose k exceeds K cannot be normalized from the K (its
            # survivors reach past them): it waits for a larger K or the sort.
            # (float64: a cumulative sum over up to 4096 float32 terms drifts by ~1e-6, the slack)
            lse = torch.where(done, vals.logsumexp(-1), x.logsumexp(-1))
            probs = (vals - lse[:, None]).double().exp()
            drop = probs.cumsum(dim=-1) - probs >= lr[:, None]
            drop[:, 0] = False  # the top token always stays
            vals = vals.masked_fill(drop, float("-inf"))
            done |= (kr == vocab) & (probs.sum(-1) >= lr)
        ended = done.nonzero().flatten()
        if ended.numel():
            filtered = torch.full((ended.numel(), vocab), float("-inf"), dtype=logits.dtype)
            out[rows[ended]] = filtered.scatter_(-1, idx[ended], vals[ended])
        rows = rows[~done]
    if rows.numel():
        out[rows] = _top_k_top_p_sorted(logits[rows], None if top_k is None else top_k[rows],
                                        None if top_p is None else top_p[rows])
    return out


def _top_k_top_p_sorted(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    vocab = logits.shape[-1]
    # One sort serves both filters: each keeps a prefix of the descending order.
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V], [B, V]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).to(torch.long)  # [B]
        positions = torch.arange(vocab, device=logits.device)  # [V]
        sorted_logits = sorted_logits.masked_fill(
            positions[None, :] >= k[:, None], float("-inf")
        )
    if top_p is not None:
        # Softmax of the top-k-masked logits = probabilities renormalized over top-k survivors.
        probs = sorted_logits.softmax(dim=-1)  # [B, V]
        mass_before = probs.cumsum(dim=-1) - probs  # [B, V] exclusive cumulative sum
        # A token is needed while the tokens ranked above it have not yet reached top_p.
        # Rows with top_p >= 1 get a threshold no cumulative sum can reach.
        limit = torch.where(
            top_p >= 1.0, torch.full_like(top_p, 2.0), top_p - _TOP_P_SLACK
        ).to(torch.float32)  # [B]
        drop = mass_before >= limit[:, None]  # [B, V]
        drop[:, 0] = False  # the top token always stays, even with a tiny top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # Undo the sort: position j of row b goes back to vocabulary index order[b, j].
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p); log(0) = -inf keeps all.
    floor = logits.amax(dim=-1, keepdim=True) + (
        min_p.to(torch.float32).log() - _MIN_P_LOG_SLACK
    )[:, None]  # [B, 1]
    return logits.masked_fill(logits < floor, float("-inf"))


class Sampler:
    """Picks one token per row of logits according to each row's `SamplingParams`.

    Stateless: all randomness comes from the default RNG of the logits' device, or from a
    row's own generator when the request is seeded.
    """

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits: [B, V], any float dtype. Returns [B] int64 token ids on logits' device."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        num_rows, vocab = logits.shape
        if not (len(batch.params) == len(batch.generators) == len(batch.banned_token_ids) == num_rows):
            raise ValueError(
                f"SamplingBatch has {len(batch.params)} params, {len(batch.generators)} generators, "
                f"{len(batch.banned_token_ids)} banned lists for {num_rows} logits rows"
            )
        if batch.histories is not None and len(batch.histories) != num_rows:
            raise ValueError(f"SamplingBatch has {len(batch.histories)} histories for {num_rows} logits rows")

        x = logits.float()  # [B, V]; a copy unless the logits already are float32
        if any(batch.banned_token_ids):
            if x is logits:
                x = x.clone()  # never write into the caller's logits
            self._ban(x, batch.banned_token_ids, vocab)
        if needs_penalties(batch.params):
            if x is logits:
                x = x.clone()
            histories = batch.histories if batch.histories is not None else [None] * num_rows
            apply_penalties(x, batch.params, histories, batch.pending)

        sampled_rows = [i for i, p in enumerate(batch.params) if not p.greedy]
        if not sampled_rows:
            return x.argmax(dim=-1)
        if len(sampled_rows) == num_rows:
            return self._sample(x, batch.params, batch.generators)

        # Mixed batch: argmax everywhere, then overwrite the sampled rows.
        out = x.argmax(dim=-1)  # [B]
        rows = to_device(sampled_rows, torch.long, x.device)  # [S]
        sampled = self._sample(
            x.index_select(0, rows),
            [batch.params[i] for i in sampled_rows],
            [batch.generators[i] for i in sampled_rows],
        )
        return out.index_copy_(0, rows, sampled)

    @staticmethod
    def _ban(x: torch.Tensor, banned: list[tuple[int, ...]], vocab: int) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for row, ids in enumerate(banned):
            for t in ids:
                # Checked on the host: an out-of-range index is a device-side assert on GPU.
                if not 0 <= t < vocab:
                    raise ValueError(f"banned token id {t} is outside the vocabulary [0, {vocab})")
                rows.append(row)
                cols.append(t)
        index = to_device([rows, cols], torch.long, x.device)  # [2, N]
        # new_full fills on the device; torch.tensor(..., device=cuda) would be a blocking copy.
        x.index_put_((index[0], index[1]), x.new_full((), float("-inf")))

    @staticmethod
    def _sample(
        x: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """x: [S, V] float32 (may be the caller's tensor: not modified). Returns [S] int64."""
        use_temperature = any(p.temperature != 1.0 for p in params)
        use_top_k = any(p.top_k > 0 for p in params)
        use_top_p = any(p.top_p < 1.0 for p in params)
        use_min_p = any(p.min_p > 0.0 for p in params)
        if use_temperature or use_top_k or use_top_p or use_min_p:
            # One host->device copy for every per-row parameter (top_k is exact in float32
            # for any vocabulary below 2**24).
            table = to_device(
                [[p.temperature, p.top_k, p.top_p, p.min_p] for p in params], torch.float32, x.device
            )  # [S, 4]
            if use_temperature:
                x = x / table[:, 0:1]  # [S, V]
            if use_top_k or use_top_p or use_min_p:
                x = apply_filters(
                    x,
                    table[:, 1].long() if use_top_k else None,
                    table[:, 2] if use_top_p else None,
                    table[:, 3] if use_min_p else None,
                )

        probs = x.softmax(dim=-1)  # [S, V]; filtered tokens have probability exactly 0
        # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) i.i.d. picks i with
        # probability p_i, using one vectorized draw and no cumulative sum.
        q = torch.empty_like(probs)  # [S, V]
        seeded = [(i, g) for i, g in enumerate(generators) if g is not None]
        if len(seeded) < len(generators):
            q.exponential_()
        # A seeded row's noise comes only from its own generator, so its token does not
        # depend on the rest of the batch or on its row position.
        for i, gen in seeded:
            q[i].exponential_(generator=gen)
        # q == 0 would turn a filtered token's 0/q into NaN, which argmax would pick.
        q.clamp_(min=torch.finfo(torch.float32).tiny)
        return probs.div_(q).argmax(dim=-1)
