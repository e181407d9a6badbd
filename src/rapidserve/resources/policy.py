"""Partitioning policies: which SM split the next step runs in.

One call per decode step: the decode worker builds a `StepState` and asks `policy.decide(state)`
for the `Partition` of its next step, then takes its stream from `partitioner.streams(...)`;
the prefill worker follows at its own next step. Partitions therefore change only at step
boundaries, and a policy may pick only from `policy.partitions()` (precreated at start-up).

- `off`: no partitioning at all (plain streams on the whole device).
- `full`: both phases always on the whole device (over-allocation, the paper's P100-D100).
- `static:N`: decode always on N SMs, prefill on the rest.
- `rapid` (the paper, §4.5.3): over-allocate while the decode load is light (the batch is at or
  below a threshold, or the profile says decode beside a running prefill on the full device
  still meets the ITL SLO); above that, the fewest decode SMs whose profiled step latency beside
  a running prefill meets the ITL SLO, prefill gets the rest; if none does, the largest split.
- `nexus` (beyond the paper, after Nexus, arXiv 2507.06608): the step-cost model
  (resources/cost_model.py: SMs, batch, context, contention from the other phase) predicts each
  candidate's ITL and the time to drain the waiting prompts; it picks the candidate that meets
  the ITL SLO with the least pressure on either SLO, proactively from the queue state, and
  switches only for a clear gain after a minimum hold (hysteresis), except to stop an ITL miss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from rapidserve.resources.cost_model import (
    PREFILL_CONTENTION_FULL,
    PREFILL_CONTENTION_SPLIT,
    PrefillLoad,
    StepCostModel,
)
from rapidserve.resources.feedback import Feedback, FeedbackConfig, FeedbackStats
from rapidserve.resources.partition import Partition, round_to_granularity
from rapidserve.resources.profile import Profile

log = logging.getLogger("rapidserve.decode")


class StepState(NamedTuple):
    """What a policy decides from, built by the decode worker before each step."""

    decode_batch: int  # sequences in the coming decode step
    mean_context_len: float  # their mean KV length (tokens)
    max_context_len: int
    waiting_prefill_tokens: int  # prompt tokens waiting for (or in) prefill
    prefill_running: bool  # the prefill worker has a step in flight

    @property
    def prefill_active(self) -> bool:
        return self.prefill_running or self.waiting_prefill_tokens > 0


class PartitionPolicy(Protocol):
    name: str
    partitioned: bool  # False: no partitioning mechanism at all (policy `off`)

    def partitions(self) -> tuple[Partition, ...]:
        """Every partition `decide` may return (the partitioner precreates them)."""
        ...

    def decide(self, state: StepState) -> Partition:
        """The partition of the next step (called once per decode step)."""
        ...


class ClosedLoopPolicy(Protocol):
    """A policy that learns from measured decode steps (rapid, nexus; `closed_loop`)."""

    def observe(self, partition: Partition, state: StepState, measured_s: float) -> None:
        """A decode step decided from `state` ran in `partition` for `measured_s` on the device."""
        ...

    def feedback_stats(self) -> FeedbackStats | None: ...


# ---- the simple ones -----------------------------------------------------------------------------


class OffPolicy:
    name = "off"
    partitioned = False

    def partitions(self) -> tuple[Partition, ...]:
        return (Partition.FULL,)

    def decide(self, state: StepState) -> Partition:
        return Partition.FULL


class FullPolicy(OffPolicy):
    name = "full"
    partitioned = True


class StaticPolicy:
    partitioned = True

    def __init__(self, decode_sms: int, total_sms: int) -> None:
        self.partition = Partition.split(decode_sms, total_sms)
        self.name = f"static:{decode_sms}"

    def partitions(self) -> tuple[Partition, ...]:
        return (self.partition,)

    def decide(self, state: StepState) -> Partition:
        return self.partition


# ---- the closed loop (resources/feedback.py) --------------------------------------------------


class _ClosedLoop:
    """The prediction hook of the rapid and nexus policies: every decode prediction goes through
    `decode_ms`, the open-loop one (`base_decode_ms`) times the measured residual; `observe` feeds
    the residuals and the ITL guard. Without feedback (None) the policy is open loop."""

    feedback: Feedback | None
    profile: Profile

    def _init_feedback(self, config: FeedbackConfig | None, slo_itl_ms: float) -> None:
        self.feedback = None if config is None else Feedback(config, slo_itl_ms, self.profile.split_sm_counts)

    def base_decode_ms(self, p: Partition, state: StepState) -> float:
        """The open-loop prediction of a decode step of `state` in partition `p` (ms)."""
        raise NotImplementedError

    def decode_ms(self, p: Partition, state: StepState) -> float:
        """The prediction the policy decides on: open loop, corrected by what was measured."""
        ms = self.base_decode_ms(p, state)
        if self.feedback is not None:
            ms *= self.feedback.factor(p, state.mean_context_len, state.prefill_active)
        return ms

    def guard_allows(self, p: Partition, state: StepState) -> bool:
        return self.feedback is None or self.feedback.allows(p, state.prefill_active)

    def observe(self, partition: Partition, state: StepState, measured_s: float) -> None:
        if self.feedback is None or state.decode_batch <= 0:
            return
        predicted_s = self.base_decode_ms(partition, state) / 1e3
        self.feedback.observe(partition, state.mean_context_len, state.prefill_active, measured_s, predicted_s)

    def feedback_stats(self) -> FeedbackStats | None:
        return None if self.feedback is None else self.feedback.stats()


# ---- rapid (the paper) ---------------------------------------------------------------------------


def _itl_target(slo_itl_ms: float, headroom: float) -> float:
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"the ITL headroom must be in [0, 1), got {headroom}")
    return slo_itl_ms * (1.0 - headroom)


def _kv_tokens(state: StepState) -> int:
    return round(state.decode_batch * state.mean_context_len)


def _prefill_beside(state: StepState) -> tuple[PrefillLoad, ...]:
    """The prefill a decode step runs beside: the prompt tokens waiting or prefilling (one load:
    the state does not say how they split into prompts)."""
    return (PrefillLoad(max(1, state.waiting_prefill_tokens)),) if state.prefill_active else ()


def overallocation_profiled(profile: Profile, state: StepState) -> bool:
    """Whether the profile measured over-allocated decode beside prefill steps as long as the
    prompt tokens now waiting (or prefilling): it times decode beside `prefill_tokens_beside`.

    NOTE: over-allocated decode competes with the prefill for SMs, and a longer prefill step
    holds them longer. Beside 8K-token prompts on the H100 (arxiv-like, 2026-11-23) the
    over-allocated decode's p95 ITL was 78-130 ms where the profile, measured beside 2K-token
    prefills and extended in context, predicted at most 41."""
    return state.waiting_prefill_tokens <= profile.metadata.prefill_tokens_beside


class RapidPolicy(_ClosedLoop):
    """The paper's Adaptive Resource Manager, on the profile's measured splits (closed loop:
    its predictions corrected by the measured steps, and the ITL guard's floor respected)."""

    name = "rapid"
    partitioned = True

    def __init__(self, profile: Profile, slo_itl_ms: float, overalloc_max_batch: int | None = None,
                 itl_headroom: float = 0.0, model: StepCostModel | None = None,
                 feedback: FeedbackConfig | None = FeedbackConfig()) -> None:
        """itl_headroom: the predicted decode step must fit (1 - itl_headroom) x slo_itl_ms. The
        step-cost model returns the profile's measurements inside its range, so on a measured
        point this is the paper's lookup; past it (longer contexts) the fit's extrapolation.
        feedback: the closed loop's settings (None: open loop)."""
        if slo_itl_ms <= 0:
            raise ValueError(f"the ITL SLO must be positive, got {slo_itl_ms} ms")
        if overalloc_max_batch is not None and overalloc_max_batch < 0:
            raise ValueError(f"the over-allocation batch threshold must be >= 0, got {overalloc_max_batch}")
        self.profile = profile
        self.slo_itl_ms = slo_itl_ms
        self.itl_target_ms = _itl_target(slo_itl_ms, itl_headroom)
        self.overalloc_max_batch = overalloc_max_batch
        self.model = model or StepCostModel.from_profile(profile)
        total = profile.total_sms
        self.splits = tuple(Partition.split(n, total) for n in profile.split_sm_counts)
        self._init_feedback(feedback, slo_itl_ms)

    def partitions(self) -> tuple[Partition, ...]:
        return (Partition.FULL, *self.splits)

    def base_decode_ms(self, p: Partition, state: StepState) -> float:
        # The paper's rule: decode beside the running prefill (decide asks only while one runs).
        # NOTE: a step with no prefill beside is priced alone, as it runs: its residual (observe)
        # is then measured / predicted of the same thing. Priced beside a profiled prefill, every
        # decode-alone residual sat at the clamp (0.25 on the simulated 32B at 0.5 req/s) and
        # /metrics reported nonsense.
        return 1e3 * self.model.decode_step_s(state.decode_batch, _kv_tokens(state), p.decode_sms,
                                              _prefill_beside(state))

    def _meets(self, p: Partition, state: StepState) -> bool:
        """The decode step beside the prefill meets the ITL target in partition p (closed loop:
        the prediction corrected by what was measured).
        NOTE: with a relative tolerance of 1e-9, so that a step measured exactly at the target
        meets it whatever the unit conversions rounded."""
        return self.decode_ms(p, state) <= self.itl_target_ms * (1 + 1e-9)

    def overallocate(self, state: StepState) -> bool:
        """Both phases on the whole device: no prompt is waiting or prefilling (decode alone
        would leave the prefill side idle: the paper over-allocates so that "when either decode or
        prefill is not running, the GPU is not underutilized", §6), decode is light (threshold
        flag), or the profile says over-allocated decode beside a prefill still meets the SLO at
        this batch and context, beside prompts no longer than those it measured that beside
        (`overallocation_profiled`)."""
        if state.decode_batch == 0 or not self.splits or not state.prefill_active:
            return True
        if not self.guard_allows(Partition.FULL, state):  # the ITL guard tripped
            return False
        if self.overalloc_max_batch is not None:
            return state.decode_batch <= self.overalloc_max_batch
        if not overallocation_profiled(self.profile, state):
            return False
        return self._meets(Partition.FULL, state)

    def decide(self, state: StepState) -> Partition:
        if self.overallocate(state):
            return Partition.FULL
        for p in self.splits:  # fewest decode SMs first
            if self.guard_allows(p, state) and self._meets(p, state):
                return p
        return self.splits[-1]  # none meets it: the largest decode partition


# ---- nexus (beyond the paper) --------------------------------------------------------------------


class NexusPolicy(_ClosedLoop):
    """Proactive partitioning from a fitted cost model, with hysteresis (closed loop: its decode
    predictions corrected by the measured steps, and the ITL guard's floor respected)."""

    name = "nexus"
    partitioned = True

    def __init__(
        self,
        profile: Profile,
        slo_itl_ms: float,
        slo_ttft_ms: float = 1000.0,
        switch_margin: float = 0.15,
        min_hold_steps: int = 8,
        confirm_steps: int = 4,
        model: StepCostModel | None = None,
        itl_headroom: float = 0.0,
        feedback: FeedbackConfig | None = FeedbackConfig(),
    ) -> None:
        """slo_ttft_ms: the time the waiting prompts may take to prefill (by default 1 s, the
        goodput rule's ceiling for a prompt of up to 1000 tokens). switch_margin: a switch must
        lower the score by this fraction; min_hold_steps: steps a partition is kept before a
        switch for a gain; confirm_steps: consecutive steps the same better partition must be the
        target before it is taken (an input that swings every step never is). A switch to stop
        an ITL miss waits for neither. itl_headroom: a decode step is predicted to meet the SLO
        when it fits (1 - itl_headroom) x slo_itl_ms. feedback: the closed loop's settings (None:
        open loop)."""
        if slo_itl_ms <= 0:
            raise ValueError(f"the ITL SLO must be positive, got {slo_itl_ms} ms")
        if slo_ttft_ms <= 0:
            raise ValueError(f"the TTFT SLO must be positive, got {slo_ttft_ms} ms")
        if not 0 <= switch_margin < 1 or min_hold_steps < 0 or confirm_steps < 1:
            raise ValueError("need 0 <= switch_margin < 1, min_hold_steps >= 0 and confirm_steps >= 1")
        self.profile = profile
        self.model = model or StepCostModel.from_profile(profile)
        self.slo_itl_ms = slo_itl_ms
        self.itl_target_ms = _itl_target(slo_itl_ms, itl_headroom)
        self.slo_ttft_ms = slo_ttft_ms
        self.switch_margin = switch_margin
        self.min_hold_steps = min_hold_steps
        self.confirm_steps = confirm_steps
        total = profile.total_sms
        self.splits = tuple(Partition.split(n, total) for n in profile.split_sm_counts)
        self.current = Partition.FULL
        self._held = 0  # steps since the last switch
        self._wanted = Partition.FULL  # the target of the last steps...
        self._streak = 0  # ...for this many steps in a row
        self._init_feedback(feedback, slo_itl_ms)
        log.info("nexus cost model: largest relative error on the profile %.1f %% (%s)",
                 100 * max(self.model.fit_errors.values(), default=0.0),
                 ", ".join(f"{k} {100 * v:.1f} %" for k, v in self.model.fit_errors.items()))
        meta = profile.metadata
        if profile.has_prefill_beside_decode:
            log.info("nexus cost model: prefill beside a decode as profiled (decode batch %d at context %d)",
                     meta.decode_batch_beside, meta.decode_context_beside)
        else:
            log.info("nexus cost model: the profile did not measure prefill beside a decode; assuming it "
                     "%.0f %% slower on a split, %.0f %% over-allocated (run `rapidserve profile` again to "
                     "measure it)", 100 * PREFILL_CONTENTION_SPLIT, 100 * PREFILL_CONTENTION_FULL)

    def partitions(self) -> tuple[Partition, ...]:
        return (Partition.FULL, *self.splits)

    def base_decode_ms(self, p: Partition, state: StepState) -> float:
        return 1e3 * self.model.decode_step_s(state.decode_batch, _kv_tokens(state), p.decode_sms,
                                              _prefill_beside(state))

    def predict(self, p: Partition, state: StepState) -> tuple[float, float]:
        """(decode step ms, ms to prefill the waiting prompts as one load) in partition p."""
        kv = _kv_tokens(state)
        itl = self.decode_ms(p, state) if state.decode_batch else 0.0
        waiting = (PrefillLoad(state.waiting_prefill_tokens),) if state.waiting_prefill_tokens > 0 else ()
        drain = 1e3 * self.model.prefill_step_s(waiting, p.prefill_sms,
                                                 (state.decode_batch, kv) if state.decode_batch else None)
        return itl, drain

    def score(self, p: Partition, state: StepState) -> tuple[bool, float]:
        """(meets the ITL SLO, the larger of the two latencies as a fraction of its SLO)."""
        itl, drain = self.predict(p, state)
        pressure = max(itl / self.itl_target_ms, drain / self.slo_ttft_ms)
        return itl <= self.itl_target_ms, pressure

    def allowed(self, p: Partition, state: StepState) -> bool:
        """Over-allocation beside a prefill only where the profile measured it (see
        `overallocation_profiled`); every split always; both only above the ITL guard's floor."""
        if not self.guard_allows(p, state):
            return False
        return not p.is_full or not state.prefill_active or overallocation_profiled(self.profile, state)

    def target(self, state: StepState) -> Partition:
        """The best partition for this state, without hysteresis."""
        if state.decode_batch == 0 or not state.prefill_active or not self.splits:
            return Partition.FULL  # one phase alone: it gets every SM
        best: tuple[float, Partition] | None = None
        fallback: tuple[float, Partition] | None = None
        for p in self.partitions():
            if not self.allowed(p, state):
                continue
            ok, pressure = self.score(p, state)
            itl = self.predict(p, state)[0]
            if fallback is None or itl < fallback[0]:
                fallback = (itl, p)
            if ok and (best is None or pressure < best[0]):
                best = (pressure, p)
        assert fallback is not None
        return best[1] if best is not None else fallback[1]  # none meets the SLO: the fastest decode

    def decide(self, state: StepState) -> Partition:
        want = self.target(state)
        self._held += 1
        self._streak = self._streak + 1 if want == self._wanted else 1
        self._wanted = want
        if want == self.current:
            return self.current
        ok_now, now = self.score(self.current, state)
        _, then = self.score(want, state)
        # the current partition would miss the ITL SLO, or over-allocates beside a longer prompt
        # than the profile measured
        urgent = state.decode_batch > 0 and (not ok_now or not self.allowed(self.current, state))
        idle = state.decode_batch == 0 or not state.prefill_active
        settled = self._held >= self.min_hold_steps and self._streak >= self.confirm_steps
        if urgent or (settled and (idle or then < now * (1 - self.switch_margin))):
            self.current = want
            self._held = 0
        return self.current


# ---- the --partition-policy strings ------------------------------------------------------------

POLICY_NAMES = ("rapid", "nexus", "static:N", "full", "off")


@dataclass(frozen=True)
class PolicySpec:
    kind: str  # rapid, nexus, static, full, off
    decode_sms: int | None = None  # static only

    def __str__(self) -> str:
        return f"static:{self.decode_sms}" if self.kind == "static" else self.kind


def parse_policy(text: str) -> PolicySpec:
    """'rapid', 'nexus', 'static:N' (N decode SMs), 'full' or 'off'."""
    t = text.strip().lower()
    if t in ("rapid", "nexus", "full", "off"):
        return PolicySpec(t)
    if t == "static" or t.startswith("static:"):
        n = t.partition(":")[2].strip()
        if not n:
            raise ValueError("the static policy needs a decode SM count: static:N, e.g. static:40")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"static:N needs a positive whole number N of decode SMs, got {n!r}")
        return PolicySpec("static", int(n))
    raise ValueError(f"unknown partition policy {text!r}; available: {', '.join(POLICY_NAMES)} "
                     "(N = decode SMs)")


def make_policy(
    spec: PolicySpec | str,
    total_sms: int,
    granularity: int = 1,
    profile: Profile | None = None,
    slo_itl_ms: float | None = None,
    slo_ttft_ms: float | None = None,
    overalloc_max_batch: int | None = None,
    itl_headroom: float = 0.0,
    feedback: FeedbackConfig | None = FeedbackConfig(),
) -> PartitionPolicy:
    """The policy a spec names, on a device of `total_sms` SMs split in multiples of
    `granularity` (a partitioner's `total_sms` and `granularity`); rapid and nexus aim a decode
    step at (1 - itl_headroom) x slo_itl_ms and correct their predictions from the measured steps
    with `feedback` (None: open loop)."""
    if isinstance(spec, str):
        spec = parse_policy(spec)
    if spec.kind == "off":
        return OffPolicy()
    if spec.kind == "full":
        return FullPolicy()
    if spec.kind == "static":
        assert spec.decode_sms is not None
        if total_sms < 2 * granularity:
            raise ValueError(f"{spec} needs SM partitioning; this device has {total_sms} SM(s) "
                             "and no partitioning: use off or full")
        n = round_to_granularity(spec.decode_sms, granularity, total_sms)
        if n != spec.decode_sms:
            log.warning("%s: decode SMs rounded to %d (multiples of %d, below %d)", spec, n, granularity, total_sms)
        return StaticPolicy(n, total_sms)
    if profile is None:
        raise ValueError(f"the {spec.kind} policy needs a profile (--profile PATH, made by `rapidserve profile`)")
    if slo_itl_ms is None:
        raise ValueError(f"the {spec.kind} policy needs an ITL SLO (--slo-itl-ms)")
    if profile.total_sms != total_sms:
        raise ValueError(f"the profile was measured on {profile.metadata.gpu_name} with {profile.total_sms} "
                         f"SMs; this device has {total_sms}: profile it here")
    model = StepCostModel.from_profile(profile)
    for note in model.limitations:
        log.info("step-cost model: %s", note)
    if spec.kind == "rapid":
        return RapidPolicy(profile, slo_itl_ms, overalloc_max_batch, itl_headroom=itl_headroom, model=model,
                           feedback=feedback)
    return NexusPolicy(profile, slo_itl_ms, 1000.0 if slo_ttft_ms is None else slo_ttft_ms,
                       itl_headroom=itl_headroom, model=model, feedback=feedback)


# ---- metrics ---------------------------------------------------------------------------------------


# Upper bounds (s) of the reaction-time histogram: a switch decided to both sides on it.
REACTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class PartitionStats(NamedTuple):
    current: str  # the partition in force ("full", "D40/P92"); "" before the first step
    seconds: dict[str, float]  # time spent in each partition
    switches: int
    switches_per_s: float  # over the whole time recorded
    elapsed_s: float
    # Reaction: from a switch's decision to the prefill worker on the new partition (the decode
    # worker's next step is already there).
    reactions: int = 0
    reaction_s: float = 0.0  # their sum
    reaction_max_s: float = 0.0
    reaction_buckets: tuple[int, ...] = ()  # cumulative counts at REACTION_BUCKETS
    feedback: FeedbackStats | None = None  # the closed loop's (rapid and nexus policies)


class PartitionMetrics:
    """Which partition each step ran in: the decode worker calls `record` once per step with the
    partition of the coming step; time is charged to a partition until the next call. `react`
    adds a switch's reaction time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start: float | None = None
        self._since = 0.0
        self.current: Partition | None = None
        self.switches = 0
        self._seconds: dict[Partition, float] = {}
        self._reactions: list[int] = [0] * len(REACTION_BUCKETS)  # per bucket, not cumulative
        self._reaction_n = 0
        self._reaction_sum = 0.0
        self._reaction_max = 0.0

    def react(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self._reaction_n += 1
        self._reaction_sum += seconds
        self._reaction_max = max(self._reaction_max, seconds)
        for i, bound in enumerate(REACTION_BUCKETS):
            if seconds <= bound:
                self._reactions[i] += 1
                break

    def record(self, partition: Partition) -> None:
        now = self._clock()
        if self.current is None:
            self._start = now
        elif partition != self.current:
            self._charge(now)
            self.switches += 1
        else:
            return
        self.current = partition
        self._since = now

    def _charge(self, now: float) -> None:
        assert self.current is not None
        self._seconds[self.current] = self._seconds.get(self.current, 0.0) + now - self._since
        self._since = now

    def snapshot(self) -> PartitionStats:
        now = self._clock()
        seconds = {str(p): s for p, s in self._seconds.items()}
        cumulative = tuple(sum(self._reactions[: i + 1]) for i in range(len(REACTION_BUCKETS)))
        reactions = (self._reaction_n, self._reaction_sum, self._reaction_max, cumulative)
        if self.current is None or self._start is None:
            return PartitionStats("", seconds, 0, 0.0, 0.0, *reactions)
        key = str(self.current)
        seconds[key] = seconds.get(key, 0.0) + now - self._since
        elapsed = now - self._start
        return PartitionStats(key, seconds, self.switches, self.switches / elapsed if elapsed > 0 else 0.0, elapsed,
                              *reactions)
