"""TEMPORARY: a step-cost model over the existing profile tables, to the interface agreed for
`rapidserve.resources.cost_model.StepCostModel` (being written on the costmodel branch). The
simulator uses the real one as soon as that module exists (`rapidserve.sim.costs`); delete this
file then.

What it derives, since the version-1/2 profiles measured neither hybrid steps, host overhead nor
KV transfers (each is listed in `limitations`):
- decode steps: the profile's own interpolation (batch x mean context x SMs, alone or beside a
  prefill; the full device beside a prefill is over-allocation);
- prefill steps: per SM count, a x tokens + b x attention work fitted through the profile's
  shortest and longest prompt (alone, or beside a decode where measured), attention work
  n^2 + 2 n c for n new tokens after c cached ones; the linear part never below a batch-1 decode
  step on the same SMs W (every step reads all the weights once): max(W, a N) + b A;
- hybrid steps: the decode batch's step on the whole device plus the chunks' compute, a N + b A.
  NOTE: measured, not assumed: the roofline-shaped alternative (the weights read once, max(W, a N)
  + b A + D - W) under-predicted every archived H100 hybrid run (p95 TTFT -20 to -64 %, saturated
  throughput +20 to +29 %), the sum predicts them within -18 to +21 % / -5 to +14 %
  (docs/simulation.md);
- KV transfer: a fixed cost plus bytes over a bandwidth, both as measured on the H100
  (docs/benchmarks.md), not by the profile.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from rapidserve.resources.profile import Profile

# The disagg mode's KV copy as measured on the H100 (docs/benchmarks.md, "The disagg baseline":
# a line through two runs' totals, 1.15 ms + 9.4 ms/GB, i.e. 106 GB/s: the copy gathers the
# prompt's scattered blocks first). No profile measures it yet.
_KV_COPY_BYTES_PER_S = 106e9
_KV_COPY_FIXED_S = 1.15e-3
# Host time per step not hidden behind the device (the profile does not measure it).
_HOST_OVERHEAD_S = 0.0


class PrefillLoad(NamedTuple):
    tokens: int  # new tokens this step computes for one sequence
    context: int = 0  # tokens already in its KV before them


class CostError(NamedTuple):
    """A deliberate misprediction (--cost-error): steps of `kind` matching `condition` cost
    `factor` times the model's figure."""

    kind: str  # decode, prefill, hybrid, transfer
    condition: str  # "", "split", "full", "ctx>N", "ctx<N", "batch>N", "batch<N"
    factor: float


_KINDS = ("decode", "prefill", "hybrid", "transfer")
_COND = re.compile(r"^(split|full|(ctx|batch)([<>])(\d+))$")
_FACTOR = re.compile(r"^([+-]\d+(\.\d+)?)%$")


def parse_cost_error(text: str) -> tuple[CostError, ...]:
    """'decode:ctx>4096:+40%,prefill:+10%,decode:split:+25%' -> CostErrors; a ValueError names
    the bad part."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        fields = part.split(":")
        if len(fields) not in (2, 3) or fields[0] not in _KINDS:
            raise ValueError(f"--cost-error: {part!r}: expected KIND[:CONDITION]:+N% with KIND one of "
                             f"{', '.join(_KINDS)}")
        cond = fields[1] if len(fields) == 3 else ""
        if cond and not _COND.match(cond):
            raise ValueError(f"--cost-error: {part!r}: condition {cond!r} is not split, full, ctx>N, ctx<N, "
                             "batch>N or batch<N")
        m = _FACTOR.match(fields[-1])
        if not m:
            raise ValueError(f"--cost-error: {part!r}: {fields[-1]!r} is not a signed percentage like +40%")
        factor = 1.0 + float(m.group(1)) / 100.0
        if factor <= 0:
            raise ValueError(f"--cost-error: {part!r}: a step cannot take {fields[-1]} of its time")
        out.append(CostError(fields[0], cond, factor))
    return tuple(out)


def _matches(cond: str, split: bool, ctx: float, batch: int) -> bool:
    if not cond:
        return True
    if cond == "split":
        return split
    if cond == "full":
        return not split
    m = _COND.match(cond)
    assert m is not None
    value = ctx if m.group(2) == "ctx" else batch
    bound = int(m.group(4))
    return value > bound if m.group(3) == ">" else value < bound


class InterimStepCostModel:
    """TEMPORARY stand-in for rapidserve.resources.cost_model.StepCostModel (see the module)."""

    def __init__(self, profile: Profile, errors: Sequence[CostError] = ()) -> None:
        self.profile = profile
        self.total_sms = profile.total_sms
        self.host_overhead_s = _HOST_OVERHEAD_S
        self.errors = tuple(errors)
        self.fit_errors: dict[str, float] = {}
        self.limitations = [
            "interim cost model (rapidserve.sim.interim_cost), to be replaced by resources/cost_model.py",
            "hybrid steps: derived (the decode batch's step on the whole device + the chunks' compute); the "
            "profile has no hybrid table",
            f"host overhead: {_HOST_OVERHEAD_S * 1e3:g} ms per step (not measured by the profile)",
            f"KV transfer: {_KV_COPY_FIXED_S * 1e3:g} ms + bytes at {_KV_COPY_BYTES_PER_S / 1e9:g} GB/s, as "
            "measured on the H100 (docs/benchmarks.md), not by the profile",
            f"decode beside a prefill: as measured beside {profile.metadata.prefill_tokens_beside}-token "
            "prompts, whatever the prompts beside",
            *profile.limitations(),
        ]
        if not profile.has_prefill_beside_decode:
            self.limitations.append("prefill beside a decode: not in the profile, priced as alone")
        self._prefill_fits: dict[tuple[int, bool], tuple[float, float]] = {}

    @classmethod
    def from_profile(cls, profile: Profile, errors: Sequence[CostError] = ()) -> InterimStepCostModel:
        return cls(profile, errors)

    def _error(self, kind: str, seconds: float, split: bool, ctx: float, batch: int) -> float:
        for e in self.errors:
            if e.kind == kind and _matches(e.condition, split, ctx, batch):
                seconds *= e.factor
        return seconds

    # ---- prefill -----------------------------------------------------------------------------

    def _prefill_fit(self, sms: int, beside: bool) -> tuple[float, float]:
        """(ms per token, ms per unit of attention work n^2) on `sms` SMs."""
        key = (sms, beside)
        fit = self._prefill_fits.get(key)
        if fit is None:
            p = self.profile
            beside = beside and p.has_prefill_beside_decode
            n0, n1 = p.prefill.prompt_tokens[0], p.prefill.prompt_tokens[-1]
            t0 = p.prefill_ms(sms, n0, beside)
            if n1 == n0:
                fit = (t0 / n0, 0.0)
            else:
                t1 = p.prefill_ms(sms, n1, beside)
                # t = a n + b n^2 through both points
                b = (t1 / n1 - t0 / n0) / (n1 - n0)
                b = max(b, 0.0)
                fit = ((t0 - b * n0 * n0) / n0, b)
            self._prefill_fits[key] = fit
        return fit

    def _prefill_parts_ms(self, prompts: Sequence[PrefillLoad], sms: int, beside: bool) -> tuple[float, float]:
        """(linear layers, attention) of these prompts on `sms` SMs, ms."""
        a, b = self._prefill_fit(sms, beside)
        tokens = sum(p.tokens for p in prompts)
        attention = sum(p.tokens * p.tokens + 2 * p.tokens * p.context for p in prompts)
        return a * tokens, b * attention

    def _weights_ms(self, sms: int) -> float:
        """A step that only reads the weights: a one-sequence decode step at the shortest context."""
        return self.profile.decode_ms(sms, 1, 1, False)

    def prefill_step_s(self, prompts: Sequence[PrefillLoad], sms: int | None = None,
                       decode_beside: tuple[int, int] | None = None) -> float:
        if not prompts:
            return 0.0
        n = self.total_sms if sms is None else sms
        beside = decode_beside is not None and decode_beside[0] > 0
        linear, attention = self._prefill_parts_ms(prompts, n, beside)
        ms = max(self._weights_ms(n), linear) + attention
        ctx = max((p.context + p.tokens for p in prompts), default=0)
        return self._error("prefill", ms / 1e3, sms is not None and sms < self.total_sms, ctx, len(prompts))

    # ---- decode ------------------------------------------------------------------------------

    def decode_step_s(self, batch: int, kv_tokens: int, sms: int | None = None,
                      beside: Sequence[PrefillLoad] = ()) -> float:
        if batch <= 0:
            return 0.0
        n = self.total_sms if sms is None else sms
        ctx = kv_tokens / batch
        ms = self.profile.decode_ms(n, batch, ctx, bool(beside))
        return self._error("decode", ms / 1e3, n < self.total_sms, ctx, batch)

    # ---- hybrid ------------------------------------------------------------------------------

    def hybrid_step_s(self, prefill: Sequence[PrefillLoad], decode_batch: int, decode_kv_tokens: int) -> float:
        total = self.total_sms
        if decode_batch > 0:
            ms = self.profile.decode_ms(total, decode_batch, decode_kv_tokens / decode_batch, False)
            if prefill:
                linear, attention = self._prefill_parts_ms(prefill, total, False)
                ms += linear + attention
        elif prefill:
            return self.prefill_step_s(prefill)
        else:
            return 0.0
        ctx = decode_kv_tokens / decode_batch
        return self._error("hybrid", ms / 1e3, False, ctx, decode_batch)

    # ---- KV transfer -------------------------------------------------------------------------

    def kv_transfer_s(self, num_bytes: int) -> float:
        s = _KV_COPY_FIXED_S + num_bytes / _KV_COPY_BYTES_PER_S
        return self._error("transfer", s, False, 0.0, 0)
