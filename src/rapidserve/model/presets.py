"""Built-in config.json files of public models, for running with dummy weights.

They let the engine be sized and benchmarked at a real model's shape without having
the checkpoint; the JSON lives in the package so it ships inside the wheel.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

_SUFFIX = ".json"


def _preset_dir() -> Traversable:
    return resources.files("rapidserve.model").joinpath("presets")


def list_presets() -> list[str]:
    """Names accepted by load_preset (and by `--model preset:NAME`), sorted."""
    return sorted(
        entry.name[: -len(_SUFFIX)]
        for entry in _preset_dir().iterdir()
        if entry.is_file() and entry.name.endswith(_SUFFIX)
    )


def load_preset(name: str) -> dict[str, Any]:
    """A fresh copy of the named preset's config dict (callers may mutate it)."""
    available = list_presets()
    if name not in available:
        raise ValueError(f"unknown preset {name!r} (available: {', '.join(available)})")
    text = _preset_dir().joinpath(name + _SUFFIX).read_text(encoding="utf-8")
    return json.loads(text)
