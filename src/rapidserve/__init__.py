"""rapidserve: an LLM serving engine with concurrent prefill and decode on one GPU."""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"

# Imported on first use, so that `import rapidserve.kv` (plain Python) stays light.
_LAZY = {
    "LLM": "rapidserve.entrypoints.llm",
    "SamplingParams": "rapidserve.sampling_params",
    "RequestOutput": "rapidserve.outputs",
    "CompletionOutput": "rapidserve.outputs",
    "Logprob": "rapidserve.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rapidserve' has no attribute {name!r}")
