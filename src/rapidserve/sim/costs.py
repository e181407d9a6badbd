"""Which step-cost model the simulator prices steps with.

NOTE: the real one is rapidserve.resources.cost_model.StepCostModel (the policies and the
simulator share it). Until that module lands, the TEMPORARY rapidserve.sim.interim_cost stands in,
to the same interface; the fallback below goes away with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rapidserve.resources.profile import Profile

try:  # the shared model, once it exists
    from rapidserve.resources.cost_model import (  # type: ignore[import-not-found]
        CostError,
        PrefillLoad,
        StepCostModel,
        parse_cost_error,
    )
except ImportError:  # TEMPORARY: see rapidserve.sim.interim_cost
    from rapidserve.sim.interim_cost import CostError, PrefillLoad, parse_cost_error
    from rapidserve.sim.interim_cost import InterimStepCostModel as StepCostModel

__all__ = ["CostError", "PrefillLoad", "StepCostModel", "cost_model", "limitations", "parse_cost_error"]


def cost_model(profile: Profile, errors: Sequence[Any] = ()) -> Any:
    """The step-cost model of a profile, with deliberate errors (--cost-error) applied."""
    return StepCostModel.from_profile(profile, errors)


def limitations(model: Any) -> list[str]:
    """What the model derived rather than measured (the sweep's JSON keeps it)."""
    return list(getattr(model, "limitations", []))
