"""The step-cost model: predicted device time of any step the engine runs, from a profile.

One model for everything that prices a step: the partitioning policies (rapid, nexus), the
simulator (`rapidserve simulate`) and the closed loop that corrects predictions from measured
steps. It predicts, in seconds of device time:

- a hybrid (chunked-prefill) step on the whole device: prefill chunks at their context offsets
  plus a decode batch over its total KV tokens (`hybrid_step_s`);
- a decode step on n SMs, alone or beside a running prefill of given loads; on the whole device
  beside a prefill is over-allocation: both phases on every SM (`decode_step_s`);
- a prefill step on n SMs, alone or beside decode steps running on the rest (`prefill_step_s`);
- a KV transfer of a number of bytes, for the disagg topology (`kv_transfer_s`);
- and a per-step host overhead (the host time of a step not overlapped with the device).

How: each measured table of the profile gets a least-squares fit (in relative error, with
non-negative coefficients) on roofline-shaped features: weight bytes and KV bytes streamed by the
SMs a step has (the bandwidth a share of the SMs can draw saturates at some share: "SM
saturation", fitted), FLOPs of the linear layers and of attention over those SMs, and a fixed
per-step cost. The model's shapes (weight bytes, KV bytes per token, FLOPs per token; for a
mixture of experts the routed experts a step's tokens touch, under uniform routing) come from
the profile (schema version 3) or, for older profiles, from the preset its metadata names; where
neither is known the features are shape-free counts (tokens, KV tokens) and `limitations` says
so. At a measured point a prediction is the measurement; elsewhere it is the fit times its
residual (measured / fitted) interpolated between the measured points around and held at the
nearest edge past the grid. So it follows the profile where it measured, and past that (longer
contexts, larger batches, other SM counts, prompt batches and chunk offsets the grid never
measured) it extrapolates along the physical shape, not a straight line through the last two
points.
`fit_errors` holds each fit's largest relative error on the profile's points.

Tables a profile lacks are derived from what it has, and `limitations` says which (for the
version 1/2 profiles: a hybrid step is the decode batch's step on the whole device plus the
chunks' compute, as measured on the H100, not the roofline's "weights read once"; a KV transfer
is priced as the engine's copy measured on the H100; the host overhead is a default).

`--cost-error` (`parse_cost_error`) makes the model mispredict on purpose: a model built with
errors is the "truth" a simulator runs, while the policies predict with the clean one.
"""

from __future__ import annotations

import bisect
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from rapidserve.resources.profile import ModelShape, Profile, _interp, _interp_sms

# Used where the profile did not measure it (versions 1 and 2).
DEFAULT_HOST_OVERHEAD_S = 0.0005
# The disagg copy as measured on the H100 (docs/benchmarks.md, "The disagg baseline": a line
# through two runs' totals, 1.15 ms + 9.4 ms/GB).
DEFAULT_KV_TRANSFER_FIXED_S = 1.15e-3
DEFAULT_KV_TRANSFER_BYTES_PER_S = 106e9


class PrefillLoad(NamedTuple):
    tokens: int  # new tokens this step computes for one sequence (a prompt, a chunk, a recompute)
    context: int = 0  # tokens already in its KV before them (0 for a whole prompt; a chunk's offset)


# ---- deliberate error (--cost-error) -------------------------------------------------------------

ERROR_KINDS = ("decode", "prefill", "hybrid", "transfer", "all")
_FLAGS = {"split": ("decode", "prefill", "all"), "full": ("decode", "prefill", "all"),
          "beside": ("decode", "prefill", "all"), "alone": ("decode", "prefill", "all")}
_VARIABLES = ("ctx", "batch", "tokens", "sms")
_COND = re.compile(r"^(ctx|batch|tokens|sms)\s*(>=|<=|>|<|=)\s*(\d+)([kK]?)$")
_FACTOR = re.compile(r"^(?:([+-]\d+(?:\.\d+)?)%|[xX*](\d+(?:\.\d+)?))$")


class CostError(NamedTuple):
    """A deliberate misprediction: steps of `kind` that meet every condition cost `factor` times
    what the model predicts (1.4: 40 % slower). Parsed from --cost-error by `parse_cost_error`."""

    kind: str  # decode | prefill | hybrid | transfer | all
    factor: float
    # (variable, operator, value) with variable ctx | batch | tokens | sms, or (flag, "", 0) with
    # flag split | full | beside | alone
    conditions: tuple[tuple[str, str, int], ...] = ()

    def __str__(self) -> str:
        conds = [f"{v}{op}{n}" if op else v for v, op, n in self.conditions]
        pct = (self.factor - 1) * 100
        return ":".join([self.kind, *conds, f"{pct:+g}%"])


class _StepFacts(NamedTuple):
    """What a step's error conditions test."""

    kind: str
    ctx: float  # decode: mean context; prefill: the longest load's end; hybrid: decode's mean, else prefill's
    batch: int  # decode sequences (prefill: prompts)
    tokens: int  # prefill tokens in (or beside) the step
    sms: int
    split: bool
    beside: bool


def parse_cost_error(text: str) -> tuple[CostError, ...]:
    """Comma-separated items `KIND[:COND]...:FACTOR`, e.g. "decode:ctx>4096:+40%",
    "prefill:+10%", "decode:split:+25%", "hybrid:tokens>=1024:x1.2".

    KIND: decode, prefill, hybrid, transfer or all. COND: `ctx`, `batch`, `tokens` or `sms`
    compared (>, >=, <, <=, =) with a whole number (a `k` suffix: ×1024), or a flag: split (on
    fewer SMs than the device), full (the whole device), beside (the other phase runs beside),
    alone. FACTOR: +P% / -P% (P % slower / faster than predicted) or xF (F times the prediction).
    A ValueError names the bad part."""
    if not text or not text.strip():
        raise ValueError("--cost-error: empty; expected e.g. decode:ctx>4096:+40%")
    out = []
    for item in text.split(","):
        item = item.strip()
        parts = [p.strip() for p in item.split(":")]
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"--cost-error {item!r}: expected KIND[:CONDITION]...:FACTOR, e.g. decode:ctx>4096:+40%")
        kind = parts[0].lower()
        if kind not in ERROR_KINDS:
            raise ValueError(f"--cost-error {item!r}: unknown step kind {parts[0]!r}; one of {', '.join(ERROR_KINDS)}")
        m = _FACTOR.match(parts[-1])
        if m is None:
            raise ValueError(f"--cost-error {item!r}: bad factor {parts[-1]!r}; expected +P%, -P% or xF "
                             "(e.g. +40%, -10%, x1.5)")
        factor = 1 + float(m.group(1)) / 100 if m.group(1) is not None else float(m.group(2))
        if not factor > 0 or not math.isfinite(factor):
            raise ValueError(f"--cost-error {item!r}: the factor must leave a positive cost, got {parts[-1]!r}")
        conds = []
        for c in parts[1:-1]:
            flag = c.lower()
            if flag in _FLAGS:
                if kind not in _FLAGS[flag]:
                    raise ValueError(f"--cost-error {item!r}: the condition {c!r} applies to decode and prefill "
                                     f"steps, not {kind}")
                conds.append((flag, "", 0))
                continue
            cm = _COND.match(c.replace(" ", ""))
            if cm is None:
                raise ValueError(f"--cost-error {item!r}: bad condition {c!r}; expected one of "
                                 f"{', '.join(_VARIABLES)} compared with a whole number (ctx>4096, batch<=32, "
                                 f"tokens>=8k) or a flag ({', '.join(_FLAGS)})")
            n = int(cm.group(3)) * (1024 if cm.group(4) else 1)
            conds.append((cm.group(1), cm.group(2), n))
        out.append(CostError(kind, factor, tuple(conds)))
    return tuple(out)


def add_cost_error_argument(parser: Any) -> None:
    """`--cost-error SPEC` on an argparse parser (the simulator's), parsed into CostErrors
    (default: none)."""
    import argparse

    def parse(text: str) -> tuple[CostError, ...]:
        try:
            return parse_cost_error(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument(
        "--cost-error", type=parse, default=(), metavar="SPEC",
        help="price steps off the profile's model on purpose, comma-separated KIND[:CONDITION]...:FACTOR items, "
             "e.g. decode:ctx>4096:+40%%,prefill:+10%% (KIND decode|prefill|hybrid|transfer|all; CONDITION "
             "ctx|batch|tokens|sms compared with a number, or split|full|beside|alone; FACTOR +P%%|-P%%|xF); "
             "see docs/cost-model.md")


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "=": lambda a, b: a == b}


def _applies(e: CostError, f: _StepFacts) -> bool:
    if e.kind not in (f.kind, "all"):
        return False
    for var, op, n in e.conditions:
        if not op:
            ok = {"split": f.split, "full": not f.split, "beside": f.beside, "alone": not f.beside}[var]
        else:
            ok = _OPS[op]({"ctx": f.ctx, "batch": f.batch, "tokens": f.tokens, "sms": f.sms}[var], n)
        if not ok:
            return False
    return True


# ---- fitting ---------------------------------------------------------------------------------------


def _nnls(a: np.ndarray, y: np.ndarray, iters: int = 200) -> np.ndarray:
    """min ||a x - y|| subject to x >= 0 (Lawson-Hanson active set).

    NOTE: non-negative coefficients keep every feature's cost a cost: a fit may not buy a small
    residual on the measured range with a negative slope in context or batch that would predict
    faster steps past it."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(iters):
        w = a.T @ (y - a @ x)
        cand = ~passive & (w > 1e-12 * max(1.0, float(np.abs(w).max(initial=0.0))))
        if not cand.any():
            break
        passive[int(np.argmax(np.where(cand, w, -np.inf)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], y, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


def _fit_rel(features: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Non-negative least squares in relative error (rows weighted by 1/y: short steps count as
    much as long); (coefficients, max relative error, rms relative error)."""
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    a = features / scale / y[:, None]
    coef = _nnls(a, np.ones_like(y)) / scale
    rel = np.abs(features @ coef - y) / y
    return coef, float(rel.max()), float(np.sqrt(np.mean(rel ** 2)))


class _Fit(NamedTuple):
    """One table's fit: features(s, ...) @ coef; s_bw is the SM share past which the device's
    bandwidth no longer grows (fitted)."""

    coef: np.ndarray
    s_bw: float
    max_rel_error: float
    points: int
    coef_list: list[float]


def _u(s: float, s_bw: float) -> float:
    """1 / the bandwidth share s of the SMs can draw: grows with s until s_bw saturates it."""
    return 1.0 / max(s, s_bw)


def _fit_table(build: Callable[[float], np.ndarray], y: np.ndarray, shares: np.ndarray) -> _Fit | None:
    """Fit with the bandwidth saturation share chosen among candidates (lowest rms relative
    error); None with fewer points than independent features."""
    candidates = sorted({float(v) for v in shares} | {1e-9}) if len(set(shares.tolist())) > 1 else [1e-9]
    best: tuple[float, _Fit] | None = None
    for s_bw in candidates:
        f = build(s_bw)
        # NOTE: the rank, not the column count: on one SM count the per-SM columns repeat the others
        scale = np.abs(f).max(axis=0)
        if len(y) < np.linalg.matrix_rank(f / np.where(scale > 0, scale, 1.0)):
            return None
        coef, mx, rms = _fit_rel(f, y)
        if best is None or rms < best[0] - 1e-12:
            best = (rms, _Fit(coef, s_bw, mx, len(y), coef.tolist()))
    assert best is not None
    return best[1]


# ---- features: one row per step -----------------------------------------------------------------


def _decode_row(shape: ModelShape, s: float, b: float, kv: float, s_bw: float,
                routed_tokens: float | None = None) -> list[float]:
    """A decode step of b sequences over kv KV tokens on share s of the SMs: fixed cost, per
    sequence cost, KV bytes at the device's bandwidth, weights and KV streamed by s of the SMs
    (saturating at s_bw), FLOPs (linear layers and the LM head per sequence) over s of the SMs,
    and the routed experts' bytes at the device's bandwidth (MoE: the experts b tokens touch;
    `routed_tokens` for another count, e.g. a prefill's tokens with nothing to decode).

    NOTE: a dense model's weights are the same every step, so the fixed cost carries their read
    at the device's bandwidth (collinear with it); a MoE model's routed experts grow with the
    tokens routed, so they have a column of their own, always 0 for a dense model (its fit is
    unchanged: NNLS leaves a zero column at 0)."""
    kvb = shape.kv_bytes_per_token * kv
    u = _u(s, s_bw)
    n = b if routed_tokens is None else routed_tokens
    return [1.0, b, kvb, shape.weight_bytes_read(n) * u, kvb * u, (shape.flops_per_token + shape.lm_head_flops) * b / s,
            shape.routed_bytes_read(n)]


def _decode_full_row(shape: ModelShape, b: float, kv: float) -> list[float]:
    return [1.0, b, shape.kv_bytes_per_token * kv, shape.routed_bytes_read(b)]


def _pairs(loads: Sequence[PrefillLoad]) -> float:
    """(query, key) pairs of causal attention: each new token attends to the context and the new
    tokens up to itself."""
    return float(sum(n.tokens * (n.context + (n.tokens + 1) / 2) for n in loads))


def _prefill_row(shape: ModelShape, s: float, loads: Sequence[PrefillLoad], s_bw: float) -> list[float]:
    """Linear-layer and attention FLOPs, each in a part that scales with the SMs a prefill has and
    a part that does not (measured on the H100: 68 SMs step a 2K prompt only 1.5x slower than
    132). No fixed cost: a prefill is compute-bound past a few hundred tokens, and below that
    `_prefill_anchored` holds it at the weight read (the roofline's memory-bound side)."""
    flops, attn = _prefill_flops(shape, loads)
    return [flops, attn, flops / s, attn / s]


def _prefill_full_row(shape: ModelShape, loads: Sequence[PrefillLoad]) -> list[float]:
    return list(_prefill_flops(shape, loads))


def _prefill_flops(shape: ModelShape, loads: Sequence[PrefillLoad]) -> tuple[float, float]:
    n = float(sum(x.tokens for x in loads))
    return (shape.flops_per_token * n + shape.lm_head_flops * len(loads),
            shape.attention_flops_per_pair * _pairs(loads))


def _hybrid_row(shape: ModelShape, loads: Sequence[PrefillLoad], b: float, kv: float) -> list[float]:
    """A hybrid step on the whole device: fixed cost (dense weights read once), per decode
    sequence, decode KV bytes, linear FLOPs over every row, prefill attention FLOPs, and the
    routed experts the chunk's and the decode rows' tokens touch (MoE; 0 for a dense model)."""
    n = float(sum(x.tokens for x in loads))
    return [1.0, b, shape.kv_bytes_per_token * kv,
            shape.flops_per_token * (n + b) + shape.lm_head_flops * (len(loads) + b),
            shape.attention_flops_per_pair * _pairs(loads), shape.routed_bytes_read(n + b)]


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _bracket(xs: Sequence[float], x: float) -> tuple[int, int, float]:
    """(i, j, w): x, clamped to the axis, lies between xs[i] and xs[j] at weight w on xs[j]."""
    if x <= xs[0] or len(xs) == 1:
        return 0, 0, 0.0
    if x >= xs[-1]:
        n = len(xs) - 1
        return n, n, 0.0
    j = bisect.bisect_right(xs, x)
    i = j - 1
    return i, j, (x - xs[i]) / (xs[j] - xs[i])


def _interp_lin(axes: Sequence[Sequence[int]], grid: list, point: Sequence[float]) -> float:
    """grid[axis 0][axis 1]... at point: linear in each axis, each coordinate clamped to its range.
    NOTE: only the two entries around the point on each axis are read (a policy calls this for
    every candidate partition at every decode step)."""
    brackets = [_bracket(xs, x) for xs, x in zip(axes, point)]

    def at(g: list, k: int) -> float:
        if k == len(brackets):
            return float(g)  # type: ignore[arg-type]
        i, j, w = brackets[k]
        lo = at(g[i], k + 1)
        return lo if w == 0.0 else lo * (1 - w) + at(g[j], k + 1) * w

    return at(grid, 0)


def _interp_clamped(sm_axis: Sequence[int], axes: Sequence[Sequence[int]], grid: list, sms: int,
                    point: Sequence[float]) -> float:
    """grid[sm][axis 0][axis 1]... at (sms, point): linear in each axis (in 1/SMs between SM
    counts, as the profile interpolates), every coordinate clamped to its measured range."""
    return _interp_sms(sm_axis, int(_clamp(sms, sm_axis[0], sm_axis[-1])), lambda i: _interp_lin(axes, grid[i], point))


# ---- the model ---------------------------------------------------------------------------------------


class StepCostModel:
    """Predicted device time (seconds) of each kind of step, from a profile (see the module doc)."""

    total_sms: int
    host_overhead_s: float
    fit_errors: dict[str, float]
    limitations: list[str]

    def __init__(self, profile: Profile, shape: ModelShape, shape_source: str,
                 errors: Sequence[CostError] = ()) -> None:
        self.profile = profile
        self.shape = shape
        self.shape_source = shape_source  # "profile", "preset NAME" or "none" (shape-free)
        self.errors = tuple(errors)
        self.total_sms = profile.total_sms
        self.fit_errors = {}
        self.limitations = profile.limitations()
        if shape_source == "none":
            self.limitations.append(
                f"the profile does not record the model's shapes and {profile.metadata.model!r} is no preset: the "
                "cost model's features are shape-free counts (tokens, KV tokens) rather than bytes and FLOPs")
        if shape.is_moe:
            self.limitations.append(
                f"the routed experts a step reads ({shape.num_experts} per MoE layer, top-{shape.experts_per_token}) are "
                "counted under uniform routing: a trained router is skewed, so a small batch touches fewer experts "
                "than priced (an upper-ish estimate past the measured batches)")
        d = self.profile.decode
        self._decode_sms = d.sm_counts
        self._split_sms = tuple(n for n in d.sm_counts if n < self.total_sms)
        self._fits: dict[str, _Fit | None] = {}
        # measured / fitted at each measured point, [sm][...] over the fit's SM counts
        self._ratios: dict[str, list] = {}
        self._fit_decode()
        self._fit_prefill()
        self._derive_rest()

    @classmethod
    def from_profile(cls, profile: Profile, errors: Sequence[CostError] = ()) -> StepCostModel:
        shape, source = profile.model_shape_or_preset()
        if shape is None:
            shape, source = ModelShape.unit(), "none"
        return cls(profile, shape, source, errors)

    def with_errors(self, errors: Sequence[CostError]) -> StepCostModel:
        """The same fits (not fitted again), mispredicting by `errors` instead of this model's."""
        clone = object.__new__(StepCostModel)
        clone.__dict__.update(self.__dict__)
        clone.errors = tuple(errors)
        return clone

    def without_errors(self) -> StepCostModel:
        """The same fits, predicting without the deliberate errors (what a policy sees)."""
        return self.with_errors(())

    # ---- fitting -----------------------------------------------------------------------------------

    def _record(self, name: str, fit: _Fit | None) -> None:
        self._fits[name] = fit
        if fit is not None:
            self.fit_errors[name] = fit.max_rel_error

    def _fit_decode(self) -> None:
        d, total, shape = self.profile.decode, self.total_sms, self.shape
        for name, grid, which in (("decode_alone", d.alone_ms, "all"),
                                  ("decode_beside_prefill", d.beside_prefill_ms, "split"),
                                  ("decode_overallocated", d.beside_prefill_ms, "full")):
            pts = [(n / total, b, b * c, grid[i][j][k] / 1e3) for i, n in enumerate(d.sm_counts)
                   for j, c in enumerate(d.context_lens) for k, b in enumerate(d.batch_sizes)
                   if which == "all" or (which == "split") == (n < total)]
            if not pts:
                self._record(name, None)
                continue
            a = np.array(pts, dtype=np.float64)
            if which == "full":
                fit = _fit_table(lambda s_bw: np.array([_decode_full_row(shape, b, kv) for _, b, kv, _ in pts]),
                                 a[:, 3], a[:, 0])
            else:
                fit = _fit_table(lambda s_bw: np.array([_decode_row(shape, s, b, kv, s_bw) for s, b, kv, _ in pts]),
                                 a[:, 3], a[:, 0])
            self._record(name, fit)
            if fit is not None:
                axis = self._decode_which(total if which == "full" else d.sm_counts[0], which != "all")[1] \
                    if which != "all" else d.sm_counts
                self._ratios[name] = [
                    [[grid[d.sm_counts.index(n)][j][k] / 1e3 / self._decode_fit_s(name, n / total, b, b * c)
                      for k, b in enumerate(d.batch_sizes)] for j, c in enumerate(d.context_lens)] for n in axis]

    def _fit_prefill(self) -> None:
        p, total, shape = self.profile.prefill, self.total_sms, self.shape
        grids = [("prefill_alone", p.latency_ms, "all")]
        if p.beside_decode_ms is not None:
            grids += [("prefill_beside_decode", p.beside_decode_ms, "split"),
                      ("prefill_overallocated", p.beside_decode_ms, "full")]
        for name, grid, which in grids:
            pts = [(n / total, t, grid[i][j] / 1e3) for i, n in enumerate(p.sm_counts)
                   for j, t in enumerate(p.prompt_tokens) if which == "all" or (which == "split") == (n < total)]
            if not pts:
                self._record(name, None)
                continue
            a = np.array(pts, dtype=np.float64)
            if which == "full":
                fit = _fit_table(lambda s_bw: np.array([_prefill_full_row(shape, [PrefillLoad(int(t))])
                                                        for _, t, _ in pts]), a[:, 2], a[:, 0])
            else:
                fit = _fit_table(lambda s_bw: np.array([_prefill_row(shape, s, [PrefillLoad(int(t))], s_bw)
                                                        for s, t, _ in pts]), a[:, 2], a[:, 0])
            self._record(name, fit)
            if fit is not None:
                axis = self._prefill_which(total if which == "full" else p.sm_counts[0], which != "all")[1] \
                    if which != "all" else p.sm_counts
                self._ratios[name] = [
                    [grid[p.sm_counts.index(n)][j] / 1e3 / self._prefill_fit_s(name, n, [PrefillLoad(t)])
                     for j, t in enumerate(p.prompt_tokens)] for n in axis]
        self._fit_prefill_whole_device()
        if p.beside_decode_ms is None:
            self.limitations.append(
                "the profile did not measure prefill beside a decode (schema version 1): a prefill beside a decode "
                f"is priced {100 * PREFILL_CONTENTION_SPLIT:.0f} % slower than alone on a split, "
                f"{100 * PREFILL_CONTENTION_FULL:.0f} % over-allocated (assumed)")
        else:
            m = self.profile.metadata
            self.limitations.append(
                f"prefill beside a decode was measured beside one decode load (batch {m.decode_batch_beside} at "
                f"context {m.decode_context_beside}): every decode load beside is priced as that one")

    def _fit_prefill_whole_device(self) -> None:
        """Linear-layer FLOPs and attention FLOPs on the whole device, fitted on its own points
        only: what prices a chunk at a context offset in a hybrid step.
        NOTE: the SM-share fit (`prefill_alone`) cannot split a prompt's time between the linear
        layers and attention on one SM count: two prompt lengths per count, shared coefficients,
        and the residual anchors only the totals. On the H100 profiles it priced attention at
        ~650 TFLOP/s, faster per FLOP than the GEMMs (~500); the whole device's 2K and 8K points
        alone give ~410 TFLOP/s attention and ~560 linear (latency.json: the prefill reached 76 %
        of the matmul rate), and a chunk at a long offset is mostly attention."""
        p, total = self.profile.prefill, self.total_sms
        if total not in p.sm_counts:
            self._record("prefill_whole_device", None)
            return
        i = p.sm_counts.index(total)
        y = np.array([p.latency_ms[i][j] / 1e3 for j in range(len(p.prompt_tokens))])
        fit = _fit_table(lambda _: np.array([_prefill_full_row(self.shape, [PrefillLoad(int(t))])
                                             for t in p.prompt_tokens]), y, np.ones(len(y)))
        self._record("prefill_whole_device", fit)
        if fit is not None:
            self._ratios["prefill_whole_device"] = [
                p.latency_ms[i][j] / 1e3 / self._eval("prefill_whole_device",
                                                      lambda _: _prefill_full_row(self.shape, [PrefillLoad(t)]))
                for j, t in enumerate(p.prompt_tokens)]

    def _chunks_compute_s(self, loads: Sequence[PrefillLoad]) -> float:
        """The compute of prefill chunks (at their offsets) on the whole device, without the
        weight-read floor: the whole-device fit times its residual at their total tokens, or the
        SM-share fit where the profile has too few whole-device points."""
        ratio = self._ratios.get("prefill_whole_device")
        if ratio is None:
            return self._prefill_anchored(loads, self.total_sms, False, floor=False)
        p = self.profile.prefill
        r = _interp_lin((p.prompt_tokens,), ratio, (sum(x.tokens for x in loads),))
        return r * self._eval("prefill_whole_device", lambda _: _prefill_full_row(self.shape, loads))

    def _derive_rest(self) -> None:
        prof = self.profile
        if prof.host_overhead_ms is not None:
            self.host_overhead_s = prof.host_overhead_ms / 1e3
        else:
            self.host_overhead_s = DEFAULT_HOST_OVERHEAD_S
            self.limitations.append(f"the profile did not measure the host overhead per step: "
                                    f"{1e3 * DEFAULT_HOST_OVERHEAD_S:g} ms assumed")
        self._fit_hybrid()
        self._contention_grid()
        self._kv_fit: np.ndarray
        if prof.kv_transfer is not None:
            kv = prof.kv_transfer
            x = np.array(kv.num_bytes, dtype=np.float64)
            y = np.array(kv.latency_ms, dtype=np.float64) / 1e3
            f = np.stack([np.ones_like(x), x], axis=1)
            if len(y) >= 2:
                coef, mx, _ = _fit_rel(f, y)
                self._kv_fit = coef
                self.fit_errors["kv_transfer"] = mx
            else:  # one size: its bandwidth, no fixed cost
                self._kv_fit = np.array([0.0, y[0] / x[0]])
            return
        # NOTE: not the decode fit's KV bandwidth: the engine's copy gathers a prompt's scattered
        # blocks layer by layer (index_select) before the IPC copy, and ran at ~100 GB/s on the
        # H100 where the decode kernel streams KV at ~3 TB/s (the decode fit's KV term reads above
        # the H100's 3.35 TB/s peak: it shares the KV cost with the per-sequence term).
        self._kv_fit = np.array([DEFAULT_KV_TRANSFER_FIXED_S, 1 / DEFAULT_KV_TRANSFER_BYTES_PER_S])
        self.limitations.append(
            f"no KV-transfer figure: a KV transfer is priced as the engine's copy measured on the H100, "
            f"{1e3 * DEFAULT_KV_TRANSFER_FIXED_S:g} ms + bytes at {DEFAULT_KV_TRANSFER_BYTES_PER_S / 1e9:g} GB/s "
            "(docs/benchmarks.md, the disagg baseline)")

    def _fit_hybrid(self) -> None:
        h = self.profile.hybrid
        if h is None:
            self.limitations.append("the profile has no hybrid-step table: a hybrid step is derived as the decode "
                                    "batch's step on the whole device plus the chunks' compute (the whole device's "
                                    "prefill fit at their offsets), as the H100's hybrid steps measured")
            return
        pts = [(n, b, c, h.latency_ms[i][j][k] / 1e3) for i, n in enumerate(h.chunk_tokens)
               for j, b in enumerate(h.decode_batches) for k, c in enumerate(h.context_lens)]
        y = np.array([p[3] for p in pts])
        fit = _fit_table(lambda _: np.array([_hybrid_row(self.shape, [PrefillLoad(n, c)], b, b * c)
                                             for n, b, c, _ in pts]), y, np.ones(len(y)))
        self._record("hybrid", fit)
        if fit is not None:
            self._ratios["hybrid"] = [[[h.latency_ms[i][j][k] / 1e3 / self._hybrid_fit_s([PrefillLoad(n, c)], b, b * c)
                                        for k, c in enumerate(h.context_lens)] for j, b in enumerate(h.decode_batches)]
                                      for i, n in enumerate(h.chunk_tokens)]

    def _hybrid_fit_s(self, loads: Sequence[PrefillLoad], b: int, kv: int) -> float:
        return self._eval("hybrid", lambda _: _hybrid_row(self.shape, loads, b, kv))

    def _contention_grid(self) -> None:
        """Decode beside prompts of several lengths: measured / predicted beside the decode
        table's prefill (`prefill_tokens_beside`), per point; 1 at that length."""
        t = self.profile.decode_beside_prompts
        self._contention: tuple[tuple[int, ...], tuple[int, ...], list] | None = None
        p0 = self.profile.metadata.prefill_tokens_beside
        if t is None:
            self.limitations.append(
                f"decode beside a prefill was measured beside {p0}-token prompts only: beside longer ones it is "
                "priced as beside those (on the H100, D16/D32 beside 8K prompts stepped 30-45 % slower than "
                "predicted)")
            return
        rows = []  # [prompt][sm][ctx][batch]
        for i in range(len(t.prompt_tokens)):
            rows.append([[[t.latency_ms[i][si][ci][bi] / 1e3 / self._decode_anchored(n, b, b * c, True)
                           for bi, b in enumerate(t.batch_sizes)] for ci, c in enumerate(t.context_lens)]
                         for si, n in enumerate(t.sm_counts)])
        prompts = list(t.prompt_tokens)
        if p0 not in prompts and 0 < p0 < prompts[0]:  # as measured in the decode table at p0
            prompts.insert(0, p0)
            rows.insert(0, [[[1.0 for _ in t.batch_sizes] for _ in t.context_lens] for _ in t.sm_counts])
        self._contention = (tuple(prompts), t.sm_counts, rows)
        k = [v for g in rows for a in g for r in a for v in r]
        self.limitations.append(
            f"decode beside prompts of {', '.join(map(str, t.prompt_tokens))} tokens measured: "
            f"{min(k):.2f}-{max(k):.2f}x the step beside {p0}-token prompts (interpolated in prompt length, SMs, "
            "context and batch; held past the longest)")

    def _contention_at(self, sms: int, batch: int, ctx: float, prompt_tokens: int) -> float:
        if self._contention is None:
            return 1.0
        prompts, sm_axis, rows = self._contention
        total = self.total_sms
        t = self.profile.decode_beside_prompts
        assert t is not None
        split_idx = [i for i, n in enumerate(sm_axis) if n < total]
        idx = [i for i, n in enumerate(sm_axis) if n >= total] if sms >= total else split_idx
        if not idx:
            return 1.0
        axis = tuple(sm_axis[i] for i in idx)

        def at_prompt(k: int) -> float:
            return _interp_clamped(axis, (t.context_lens, t.batch_sizes), [rows[k][i] for i in idx], sms, (ctx, batch))

        vals = [at_prompt(k) for k in range(len(prompts))]
        return _interp(prompts, vals, _clamp(prompt_tokens, prompts[0], prompts[-1]))

    # ---- raw fits and anchors -------------------------------------------------------------------------

    def _eval(self, name: str, row: Callable[[float], list[float]]) -> float:
        fit = self._fits[name]
        assert fit is not None
        # NOTE: plain floats: numpy's per-call overhead on six numbers is most of a policy's step
        return max(sum(a * c for a, c in zip(row(fit.s_bw), fit.coef_list)), 1e-9)

    def _decode_fit_s(self, name: str, s: float, b: float, kv: float, routed_tokens: float | None = None) -> float:
        if name == "decode_overallocated":
            return self._eval(name, lambda _: _decode_full_row(self.shape, b, kv))
        return self._eval(name, lambda s_bw: _decode_row(self.shape, s, b, kv, s_bw, routed_tokens))

    def _decode_which(self, sms: int, beside: bool) -> tuple[str, tuple[int, ...], int]:
        """(fit name, its measured SM counts, the SMs it prices at)."""
        d, total = self.profile.decode, self.total_sms
        if not beside:
            return "decode_alone", d.sm_counts, sms
        if sms >= total or not self._split_sms:
            return "decode_overallocated", (total,), total
        return "decode_beside_prefill", self._split_sms, sms

    def _decode_anchored(self, sms: int, batch: int, kv_tokens: int, beside: bool) -> float:
        """At a measured point, the measurement; elsewhere the fit times its residual (measured /
        fitted) interpolated between the measured points around, held at the nearest edge past
        the grid: the fit's physical shape carries the prediction where nothing was measured."""
        d = self.profile.decode
        name, sm_axis, sms = self._decode_which(sms, beside)
        ctx = kv_tokens / batch
        grid = d.beside_prefill_ms if beside else d.alone_ms
        if sms in sm_axis and ctx in d.context_lens and batch in d.batch_sizes:
            return grid[d.sm_counts.index(sms)][d.context_lens.index(int(ctx))][d.batch_sizes.index(batch)] / 1e3
        ratio = self._ratios.get(name)
        if ratio is None:  # not fitted: the profile's interpolation at the nearest point
            return self.profile.decode_ms(int(_clamp(sms, sm_axis[0], sm_axis[-1])),
                                          _clamp(batch, d.batch_sizes[0], d.batch_sizes[-1]),
                                          _clamp(ctx, d.context_lens[0], d.context_lens[-1]), beside) / 1e3
        r = _interp_clamped(sm_axis, (d.context_lens, d.batch_sizes), ratio, sms, (ctx, batch))
        return r * self._decode_fit_s(name, sms / self.total_sms, batch, kv_tokens)

    def _prefill_which(self, sms: int, beside: bool) -> tuple[str, tuple[int, ...], int]:
        p, total = self.profile.prefill, self.total_sms
        split_psms = tuple(n for n in p.sm_counts if n < total)
        if not beside or p.beside_decode_ms is None:
            return "prefill_alone", p.sm_counts, sms
        if sms >= total or not split_psms:
            return "prefill_overallocated", (p.sm_counts[-1],), p.sm_counts[-1]
        return "prefill_beside_decode", split_psms, sms

    def _prefill_fit_s(self, name: str, sms: int, loads: Sequence[PrefillLoad]) -> float:
        if name == "prefill_overallocated":
            return self._eval(name, lambda _: _prefill_full_row(self.shape, loads))
        return self._eval(name, lambda s_bw: _prefill_row(self.shape, sms / self.total_sms, loads, s_bw))

    def _prefill_anchored(self, loads: Sequence[PrefillLoad], sms: int, beside: bool, floor: bool = True) -> float:
        """As `_decode_anchored`, over (SMs, prompt tokens); a batch of prompts or a chunk at an
        offset takes the residual at its total tokens. floor=False: the compute alone, not held
        at the weight read (a chunk inside a hybrid step, whose decode batch reads the weights)."""
        p, total = self.profile.prefill, self.total_sms
        measured_beside = beside and p.beside_decode_ms is not None
        name, sm_axis, sms = self._prefill_which(sms, measured_beside)
        grid = p.beside_decode_ms if measured_beside else p.latency_ms
        assert grid is not None
        n = sum(x.tokens for x in loads)
        ratio = self._ratios.get(name)
        if len(loads) == 1 and loads[0].context == 0 and sms in sm_axis and n in p.prompt_tokens:
            cost = grid[p.sm_counts.index(sms)][p.prompt_tokens.index(n)] / 1e3
        elif ratio is None:
            cost = self.profile.prefill_ms(int(_clamp(sms, sm_axis[0], sm_axis[-1])),
                                           _clamp(n, p.prompt_tokens[0], p.prompt_tokens[-1]),
                                           beside_decode=measured_beside) / 1e3
        else:
            r = _interp_clamped(sm_axis, (p.prompt_tokens,), ratio, sms, (n,))
            cost = r * self._prefill_fit_s(name, sms, loads)
        if beside and not measured_beside:
            cost *= 1 + (PREFILL_CONTENTION_FULL if sms >= total else PREFILL_CONTENTION_SPLIT)
        # NOTE: never below the weight read on these SMs (the decode fit's step with nothing to
        # decode, reading the experts these tokens route to): a short prompt is memory-bound, and
        # the compute fit alone would price it near 0.
        return max(cost, self._weight_floor(sms, n)) if floor else cost

    def _weight_floor(self, sms: int, tokens: float) -> float:
        """The weight read of a forward over `tokens` tokens on `sms` SMs (a MoE model: the
        dense weights and the experts they route to)."""
        if self._fits["decode_alone"] is None:
            return 0.0
        return self._decode_fit_s("decode_alone", sms / self.total_sms, 0.0, 0.0, routed_tokens=tokens)

    def _experts_beyond_s(self, tokens: float, more: float) -> float:
        """MoE: the read of the routed experts `more` tokens touch beyond those `tokens` tokens
        touch (the decode fit's weight terms on the whole device); 0 for a dense model."""
        if not self.shape.is_moe or self._fits["decode_alone"] is None or more <= 0:
            return 0.0
        return (self._decode_fit_s("decode_alone", 1.0, 0.0, 0.0, routed_tokens=tokens + more)
                - self._decode_fit_s("decode_alone", 1.0, 0.0, 0.0, routed_tokens=tokens))

    # ---- deliberate error ---------------------------------------------------------------------------

    def _err(self, facts: _StepFacts) -> float:
        f = 1.0
        for e in self.errors:
            if _applies(e, facts):
                f *= e.factor
        return f

    # ---- the interface ------------------------------------------------------------------------------

    def decode_step_s(self, batch: int, kv_tokens: int, sms: int | None = None,
                      beside: Sequence[PrefillLoad] = ()) -> float:
        """A decode step of `batch` sequences (kv_tokens total KV) on `sms` SMs (None = the whole
        device), alone (beside=()) or while a prefill step of those loads runs on the rest of the
        device (sms None + beside non-empty = over-allocation: both on every SM)."""
        _check_counts(batch=batch, kv_tokens=kv_tokens)
        sms = self._sms(sms)
        if batch == 0:
            return 0.0
        beside = [x for x in beside if x.tokens > 0]
        t = self._decode_anchored(sms, batch, kv_tokens, bool(beside))
        p_tokens = sum(x.tokens for x in beside)
        if beside:
            t *= self._contention_at(sms, batch, kv_tokens / batch, p_tokens)
        if not self.errors:
            return t
        return t * self._err(_StepFacts("decode", kv_tokens / batch, batch, p_tokens, sms, sms < self.total_sms,
                                        bool(beside)))

    def prefill_step_s(self, prompts: Sequence[PrefillLoad], sms: int | None = None,
                       decode_beside: tuple[int, int] | None = None) -> float:
        """A prefill step (these prompts in one batch) on `sms` SMs (None = whole device), alone or
        beside decode steps of (batch, kv_tokens) running back to back on the rest."""
        loads = _check_loads(prompts)
        sms = self._sms(sms)
        if not loads:
            return 0.0
        beside = decode_beside is not None and decode_beside[0] > 0
        if decode_beside is not None:
            _check_counts(batch=decode_beside[0], kv_tokens=decode_beside[1])
        t = self._prefill_anchored(loads, sms, beside)
        if not self.errors:
            return t
        return t * self._err(_StepFacts("prefill", max(x.context + x.tokens for x in loads), len(loads),
                                        sum(x.tokens for x in loads), sms, sms < self.total_sms, beside))

    def hybrid_step_s(self, prefill: Sequence[PrefillLoad], decode_batch: int, decode_kv_tokens: int) -> float:
        """One hybrid (chunked-prefill) step on the whole device: prefill chunks plus a decode batch
        whose sequences attend over decode_kv_tokens KV entries in total."""
        loads = _check_loads(prefill)
        _check_counts(decode_batch=decode_batch, decode_kv_tokens=decode_kv_tokens)
        t = self._hybrid_derived(loads, decode_batch, decode_kv_tokens)
        ctx = decode_kv_tokens / decode_batch if decode_batch else max((x.context + x.tokens for x in loads), default=0)
        return t * self._err(_StepFacts("hybrid", ctx, decode_batch, sum(x.tokens for x in loads), self.total_sms,
                                        False, False))

    def _hybrid_derived(self, loads: Sequence[PrefillLoad], b: int, kv: int) -> float:
        total = self.total_sms
        h = self.profile.hybrid
        if h is not None and loads:
            ctx = kv / b if b else max(x.context for x in loads)
            n = sum(x.tokens for x in loads)
            if len(loads) == 1 and n in h.chunk_tokens and b in h.decode_batches and \
                    loads[0].context in h.context_lens and (b == 0 or ctx == loads[0].context):
                return h.latency_ms[h.chunk_tokens.index(n)][h.decode_batches.index(b)][
                    h.context_lens.index(loads[0].context)] / 1e3
            ratio = self._ratios.get("hybrid")
            if ratio is not None:
                r = _interp_lin((h.chunk_tokens, h.decode_batches, h.context_lens), ratio, (n, b, ctx))
                return r * self._hybrid_fit_s(loads, b, kv)
        if not loads:
            return self._decode_anchored(total, b, kv, False) if b else 0.0
        chunks = self._chunks_compute_s(loads)
        n = sum(x.tokens for x in loads)
        if b == 0:  # the chunks read the weights themselves
            return max(chunks, self._weight_floor(total, n))
        dec = self._decode_anchored(total, b, kv, False)
        # NOTE: measured, not the roofline: a hybrid step costs the decode batch's whole step plus
        # the chunks' compute. The roofline's "weights read once" (the chunks' step plus only the
        # decode rows' KV and per-sequence terms) under-priced every measured H100 hybrid step:
        # the engine runs a mixed step as piecewise graphs with the attention eager between them,
        # the decode rows' split-KV attention as its own memory-bound pass per layer after the
        # chunk's (one stream: nothing overlaps it), where a decode step alone is one graph
        # replay. Held out (`bench interference`, 32 decodes beside 8K prompts in 512/2048-token
        # chunks, docs/cost-model.md): the sum prices the prompts' TTFT within +2 %, the
        # roofline 9-25 % low. The chunks' compute is the whole device's prefill fit without the
        # weight-read floor: a short chunk is memory-bound and rides on the decode step's weight read.
        # A MoE chunk also reads the routed experts its tokens touch that the decode rows' do not:
        # every chunk of a prompt pays them again (where one prefill step reads them once).
        return dec + chunks + self._experts_beyond_s(b, n)

    def kv_transfer_s(self, num_bytes: int) -> float:
        _check_counts(num_bytes=num_bytes)
        if num_bytes == 0:
            return 0.0
        t = max(float(self._kv_fit[0] + self._kv_fit[1] * num_bytes), 1e-9)
        return t * self._err(_StepFacts("transfer", 0, 0, 0, self.total_sms, False, False))

    # ---- helpers ---------------------------------------------------------------------------------

    def _sms(self, sms: int | None) -> int:
        if sms is None:
            return self.total_sms
        if isinstance(sms, bool) or not isinstance(sms, (int, np.integer)) or not 1 <= sms <= self.total_sms:
            raise ValueError(f"sms must be a whole number of SMs in [1, {self.total_sms}], got {sms!r}")
        return int(sms)

    def describe(self) -> str:
        """The fit's errors and limitations, for logs and `python -m rapidserve.resources.cost_model`."""
        m = self.profile.metadata
        lines = [f"step-cost model: {m.model} {m.dtype} on {m.gpu_name} ({self.total_sms} SMs); model shapes from "
                 f"{self.shape_source}"]
        for name, fit in self._fits.items():
            if fit is None:
                lines.append(f"  {name:<24} not fitted (too few points): the profile's interpolation")
            else:
                sat = "" if fit.s_bw <= 1e-6 else f", bandwidth saturates at {fit.s_bw * self.total_sms:.0f} SMs"
                lines.append(f"  {name:<24} max relative error {100 * fit.max_rel_error:5.1f} % over "
                             f"{fit.points} points{sat}")
        lines.append(f"  host overhead per step   {1e3 * self.host_overhead_s:.3f} ms")
        lines += [f"  limitation: {x}" for x in self.limitations]
        if self.errors:
            lines.append("  deliberate error: " + ", ".join(map(str, self.errors)))
        return "\n".join(lines)


# A profile of schema version 1 did not measure prefill beside a decode: assumed slowdowns
# (the nexus policy's before the step-cost model).
PREFILL_CONTENTION_SPLIT = 0.3
PREFILL_CONTENTION_FULL = 0.05


def _check_counts(**counts: int) -> None:
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")


def _check_loads(loads: Sequence[PrefillLoad]) -> list[PrefillLoad]:
    out = []
    for i, x in enumerate(loads):
        t, c = x
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"prefill load [{i}]: tokens must be a whole number >= 0, got {t!r}")
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"prefill load [{i}]: context must be a whole number >= 0, got {c!r}")
        if t:
            out.append(PrefillLoad(int(t), int(c)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rapidserve.resources.cost_model PROFILE.json [--cost-error SPEC]`: print the fit."""
    import argparse

    from rapidserve.resources.profile import load_profile

    ap = argparse.ArgumentParser(prog="python -m rapidserve.resources.cost_model", description=main.__doc__)
    ap.add_argument("profile")
    add_cost_error_argument(ap)
    args = ap.parse_args(argv)
    print(StepCostModel.from_profile(load_profile(args.profile), args.cost_error).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
