"""The step-cost model the simulator prices steps with: the one the partition policies predict
with (rapidserve.resources.cost_model), so a fix to it improves both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rapidserve.resources.cost_model import CostError, PrefillLoad, StepCostModel, parse_cost_error
from rapidserve.resources.profile import Profile

__all__ = ["CostError", "PrefillLoad", "StepCostModel", "cost_model", "limitations", "parse_cost_error"]


def cost_model(profile: Profile, errors: Sequence[CostError] = ()) -> StepCostModel:
    """The step-cost model of a profile, with deliberate errors (--cost-error) applied: the
    simulated device's truth (the policies build theirs from the profile alone)."""
    return StepCostModel.from_profile(profile, errors)


def limitations(model: Any) -> list[str]:
    """What the model derived rather than measured (the sweep's JSON keeps it)."""
    return list(getattr(model, "limitations", []))
