"""`create_engine`: the engine of the configured topology. The three live side by side in
rapidserve.serving (hybrid.py, rapid.py, disagg.py) over the front they share (front.py); this
module only picks one, so nothing below it imports it back."""

from __future__ import annotations

from rapidserve.config import EngineConfig
from rapidserve.serving.disagg import DisaggEngine
from rapidserve.serving.front import EngineFront, EngineStats
from rapidserve.serving.hybrid import LLMEngine
from rapidserve.serving.rapid import RapidEngine

__all__ = ["EngineFront", "EngineStats", "LLMEngine", "create_engine"]


def create_engine(config: EngineConfig) -> EngineFront:
    """The engine of the configured topology (`config.mode`)."""
    if config.mode == "rapid":
        return RapidEngine(config)
    if config.mode == "disagg":
        return DisaggEngine(config)
    return LLMEngine(config)
