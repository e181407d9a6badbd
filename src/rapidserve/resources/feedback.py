"""Closed-loop correction of a partition policy's decode-step predictions.

The rapid and nexus policies predict a decode step's latency in each partition from a profile (open
loop). On the H100 those predictions were 30-45 % low for split decode steps at ~8.5K-token
contexts (the profile measured 1024/2560) and nothing corrected them while the server ran. Here the
decode worker's measured step times come back (`observe`) and two mechanisms act on them:

- **Residuals.** measured / predicted per (partition, context bucket, beside a prefill or alone),
  an exponentially weighted moving average over about `window` steps. A prediction is multiplied by
  its residual once that has `min_samples` observations; a split not yet measured in a bucket
  borrows the mean residual of the splits that were (the misprediction is mostly the profile's
  context model, shared by every split), a slowdown only, never a speed-up. The over-allocated
  full device has its own residuals only (its contention is of another kind: decode competes
  with the prefill for SMs).
- **ITL guard.** Over the last `window` decode steps a partition ran beside a prefill, the
  measured p95 is compared with the ITL SLO. Above it, the guard *trips*: it raises a floor under
  the decode share (no over-allocation beside a prefill, and only splits larger than the one that
  missed). Once the p95 has stayed below (1 - hysteresis) x SLO for `release_windows` windows,
  the floor is lowered one split. A trip that follows a release doubles the calm time the next
  release needs (up to 64 windows), so a floor that is needed is not released and re-tripped
  every few windows.

Plain Python: no torch, no device; times in seconds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from rapidserve.resources.partition import Partition

_MAX_CALM_WINDOWS = 64


@dataclass(frozen=True)
class FeedbackConfig:
    window: int = 16  # steps: a residual's EWMA span and the ITL guard's window
    min_samples: int = 2  # observations before a residual corrects a prediction
    max_residual: float = 4.0  # residuals are clamped to [1/max, max] (one wild step cannot flip a policy)
    guard_hysteresis: float = 0.2  # the guard releases below (1 - this) x SLO
    release_windows: int = 2  # calm windows in a row before the guard lowers its floor

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"the feedback window must be at least 1 step, got {self.window}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples}")
        if not self.max_residual > 1.0:
            raise ValueError(f"max_residual must be above 1, got {self.max_residual}")
        if not 0.0 <= self.guard_hysteresis < 1.0:
            raise ValueError(f"guard_hysteresis must be in [0, 1), got {self.guard_hysteresis}")
        if self.release_windows < 1:
            raise ValueError(f"release_windows must be at least 1, got {self.release_windows}")

    @property
    def alpha(self) -> float:
        """The EWMA's weight of a new observation (span `window`)."""
        return 2.0 / (self.window + 1)


def context_bucket(context: float) -> int:
    """The power of two at or below a mean context length (1 for anything under 2 tokens)."""
    return 1 << max(0, int(max(1.0, context)).bit_length() - 1)


def bucket_label(bucket: int) -> str:
    return f"{bucket // 1024}K" if bucket >= 1024 else str(bucket)


class ResidualKey(NamedTuple):
    partition: Partition
    bucket: int  # context_bucket of the step's mean context
    beside: bool  # a prefill was running or waiting (StepState.prefill_active)

    def labels(self) -> tuple[str, str, str]:
        """(partition, context bucket, "beside" or "alone"), e.g. ("D32/P100", "8K", "beside")."""
        return str(self.partition), bucket_label(self.bucket), "beside" if self.beside else "alone"


class _Ewma:
    __slots__ = ("value", "samples")

    def __init__(self, value: float) -> None:
        self.value = value
        self.samples = 1


class ResidualTracker:
    """measured / predicted decode step time per (partition, context bucket, beside)."""

    def __init__(self, config: FeedbackConfig) -> None:
        self.config = config
        self._residuals: dict[ResidualKey, _Ewma] = {}

    def observe(self, key: ResidualKey, measured_s: float, predicted_s: float) -> float:
        """Fold in one step; returns its (clamped) ratio."""
        if not predicted_s > 0:
            raise ValueError(f"predicted_s must be positive, got {predicted_s}")
        if not measured_s >= 0 or math.isinf(measured_s):
            raise ValueError(f"measured_s must be a finite time >= 0, got {measured_s}")
        hi = self.config.max_residual
        ratio = min(hi, max(1.0 / hi, measured_s / predicted_s))
        r = self._residuals.get(key)
        if r is None:
            self._residuals[key] = _Ewma(ratio)
        else:
            r.value += self.config.alpha * (ratio - r.value)
            r.samples += 1
        return ratio

    def factor(self, key: ResidualKey) -> float:
        """What to multiply the open-loop prediction by (1.0 where nothing was learnt)."""
        need = self.config.min_samples
        own = self._residuals.get(key)
        if own is not None and own.samples >= need:
            return own.value
        if key.partition.is_full:
            return 1.0
        # NOTE: a split not measured in this bucket borrows its siblings' mean slowdown; otherwise
        # a policy leaving a slow split for the next one would have to find the next one slow too,
        # one split at a time, while every split shares the profile's context error. Never a
        # speed-up: a split predicted too slow is taken only once it was measured fast itself.
        sibs = [r.value for k, r in self._residuals.items()
                if k.bucket == key.bucket and k.beside == key.beside and not k.partition.is_full
                and r.samples >= need]
        return max(1.0, sum(sibs) / len(sibs)) if sibs else 1.0

    def snapshot(self) -> dict[tuple[str, str, str], float]:
        """Every residual with enough samples to be used, by ResidualKey.labels()."""
        return {k.labels(): r.value for k, r in self._residuals.items() if r.samples >= self.config.min_samples}


def p95(values: list[float] | deque[float]) -> float:
    """The nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class ItlGuard:
    """A floor under the decode share, raised when the measured p95 step time beside a prefill
    passes the SLO and lowered with hysteresis (see the module docstring)."""

    def __init__(self, slo_s: float, split_sms: tuple[int, ...], config: FeedbackConfig) -> None:
        if not slo_s > 0:
            raise ValueError(f"the guard's ITL SLO must be positive, got {slo_s} s")
        self.slo_s = slo_s
        self.split_sms = tuple(sorted(split_sms))  # decode SMs of the splits, ascending
        self.config = config
        self.floor = 0  # decode SMs a step beside a prefill needs at least (0: no floor)
        self.trips = 0  # times the p95 passed the SLO (each raised the floor, if it could)
        self.releases = 0
        self.last_p95_s = 0.0
        # NOTE: a window per partition, so that a verdict is on the steps of one partition (those
        # of a split the residuals already made the policy leave do not trip the next one).
        self._times: dict[Partition, deque[float]] = {}
        self._calm = 0  # calm windows in a row at the present floor
        self._calm_needed = config.release_windows
        self._released_last = False  # the last change was a release: a trip now means it was early

    def observe(self, partition: Partition, measured_s: float) -> None:
        """One decode step that ran beside a prefill, in `partition`."""
        times = self._times.setdefault(partition, deque(maxlen=self.config.window))
        times.append(measured_s)
        if len(times) < self.config.window:
            return
        self.last_p95_s = q = p95(times)
        times.clear()
        floor = self.floor
        if q > self.slo_s:
            self.trips += 1
            self._calm = 0
            if self._released_last:
                self._calm_needed = min(_MAX_CALM_WINDOWS, 2 * self._calm_needed)
            self._released_last = False
            self.floor = self._above(partition)
        elif q < (1.0 - self.config.guard_hysteresis) * self.slo_s and self.floor:
            self._calm += 1
            if self._calm >= self._calm_needed:
                self._calm = 0
                self.releases += 1
                self._released_last = True
                lower = [n for n in self.split_sms if n < self.floor]
                self.floor = lower[-1] if lower else 0
        else:
            self._calm = 0
        if self.floor != floor:
            self._times.clear()  # NOTE: the next verdicts are on steps run under the new floor

    def _above(self, partition: Partition) -> int:
        """The floor after a miss in `partition`: the next larger split (the largest if none is)."""
        if not self.split_sms:
            return 0
        if partition.is_full:
            return max(self.floor, self.split_sms[0])
        larger = [n for n in self.split_sms if n > max(partition.decode_sms or 0, self.floor - 1)]
        return larger[0] if larger else self.split_sms[-1]

    def allows(self, partition: Partition) -> bool:
        """Whether a step beside a prefill may run in `partition` under the present floor."""
        if not self.floor:
            return True
        return not partition.is_full and (partition.decode_sms or 0) >= self.floor


class FeedbackStats(NamedTuple):
    residuals: dict[tuple[str, str, str], float]  # (partition, context bucket, beside/alone) -> measured/predicted
    guard_trips: int
    guard_releases: int
    guard_floor_sms: int  # 0: no floor
    guard_p95_s: float  # the p95 of the guard's last full window


class Feedback:
    """A policy's closed loop: residual corrections and the ITL guard. A policy multiplies each
    open-loop decode prediction by `factor`, filters candidates by `allows` and hands every
    measured step to `observe`."""

    def __init__(self, config: FeedbackConfig, slo_itl_ms: float, split_sms: tuple[int, ...]) -> None:
        self.config = config
        self.residuals = ResidualTracker(config)
        self.guard = ItlGuard(slo_itl_ms / 1e3, split_sms, config)

    @staticmethod
    def key(partition: Partition, mean_context: float, beside: bool) -> ResidualKey:
        return ResidualKey(partition, context_bucket(mean_context), beside)

    def factor(self, partition: Partition, mean_context: float, beside: bool) -> float:
        return self.residuals.factor(self.key(partition, mean_context, beside))

    def allows(self, partition: Partition, beside: bool) -> bool:
        return not beside or self.guard.allows(partition)

    def observe(self, partition: Partition, mean_context: float, beside: bool, measured_s: float,
                predicted_s: float) -> None:
        self.residuals.observe(self.key(partition, mean_context, beside), measured_s, predicted_s)
        if beside:  # NOTE: alone, decode has the whole device: no partition choice could help it
            self.guard.observe(partition, measured_s)

    def stats(self) -> FeedbackStats:
        g = self.guard
        return FeedbackStats(self.residuals.snapshot(), g.trips, g.releases, g.floor, g.last_p95_s)
