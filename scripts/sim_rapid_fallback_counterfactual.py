"""Counterfactual for the simulated frontier under the known split bias (docs/benchmarks.md,
issue 16): when no decode split is predicted to meet the ITL SLO beside a prefill, the rapid
policy runs the largest decode split (every decode step during the prefill then misses, by a
little). The what-if: the whole device, over-allocated, instead (the prefill ends soonest, so
fewer decode steps miss, each by far more). Not a mode of the engine: a what-if of the policy's
fallback only, on the derived Qwen2.5-32B H200 profile, lmsys-like, rapid-rapid.

    python scripts/sim_rapid_fallback_counterfactual.py SLO_MS RATES OUT_DIR [COST_ERROR] [full]
    python scripts/sim_rapid_fallback_counterfactual.py 34.618 0.5,1,1.5 /tmp/fb decode:split:+40%% full
    EXTRA_SPLITS=80 python scripts/sim_rapid_fallback_counterfactual.py 34.618 0.5,0.75 /tmp/fb decode:split:+40%%

EXTRA_SPLITS (decode SM counts, comma-separated): offer the policy these splits too, past the
profile's measured ones (priced by the step-cost model's fit: an extrapolation).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import os

from rapidserve.entrypoints.cli import main
from rapidserve.resources.partition import Partition
from rapidserve.resources.policy import RapidPolicy, StepState
from rapidserve.resources.profile import Profile

PROFILE = str(Path(__file__).resolve().parents[1] / "docs/results/2026-11-30-sim/profiles/qwen2.5-32b-h200.json")


def decide_full_when_none_meets(self: RapidPolicy, state: StepState) -> Partition:
    """RapidPolicy.decide with the one change: none meets -> FULL, not the largest split."""
    if self.overallocate(state):
        return Partition.FULL
    for p in self.splits:
        if self.guard_allows(p, state) and self._meets(p, state):
            return p
    return Partition.FULL


def run(slo_ms: str, rates: str, out: str, cost_error: str = "", fallback: str = "split") -> int:
    if fallback == "full":
        RapidPolicy.decide = decide_full_when_none_meets  # type: ignore[method-assign]
    elif fallback != "split":
        sys.exit(f"fallback must be split or full, got {fallback!r}")
    extra = tuple(int(n) for n in os.environ.get("EXTRA_SPLITS", "").split(",") if n.strip())
    if extra:
        measured = Profile.split_sm_counts.fget
        Profile.split_sm_counts = property(lambda self: measured(self) + extra)  # type: ignore[method-assign]
    return main(["simulate", "--profile", PROFILE, "--configs", "rapid-rapid", "--request-rates", rates,
                 "--dataset-name", "lmsys-like", "--num-prompts", "200", "--seed", "0", "--slo-itl-ms", slo_ms,
                 "--jobs", "1", "--quiet", "--no-plots", "--output-dir", out]
                + (["--cost-error", cost_error] if cost_error else []))


if __name__ == "__main__":
    if not 4 <= len(sys.argv) <= 6:
        sys.exit(__doc__)
    sys.exit(run(*sys.argv[1:]))
