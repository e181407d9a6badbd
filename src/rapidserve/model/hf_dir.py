"""Read a local HF checkpoint directory: config.json, safetensors weights, tokenizer."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Any of these means the directory carries a tokenizer AutoTokenizer can build.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A checkpoint file is missing or unusable; the message names the file."""


def read_hf_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed config.json of an HF checkpoint directory."""
    path = _require_dir(model_dir) / CONFIG_FILE
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def iter_safetensors_weights(model_dir: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor in its stored dtype) for every tensor of the checkpoint.

    Every file is located and its header parsed when this is called, before anything
    is yielded, so a missing shard or a truncated file fails before the caller has
    half-built a model.
    """
    files = _checked_weight_files(_require_dir(model_dir))
    return _tensors(files)


def load_hf_tokenizer(model_dir: str | os.PathLike[str]) -> PreTrainedTokenizerBase | None:
    """The directory's tokenizer, or None when it has no tokenizer files."""
    directory = _require_dir(model_dir)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    # Imported lazily: transformers takes seconds to import and only this needs it.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory}: cannot load the tokenizer: {exc}") from exc


def _require_dir(model_dir: str | os.PathLike[str]) -> Path:
    directory = Path(model_dir)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    return directory


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from exc


def _checked_weight_files(directory: Path) -> list[tuple[Path, list[str]]]:
    """The weight files with their tensor names, after checking every one is usable."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' object naming the shards")
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path}: shard(s) named by the index are missing: "
                + ", ".join(str(directory / name) for name in missing)
            )
        files = [(directory / name, _tensor_names(directory / name)) for name in shards]
        present = {(path.name, name) for path, names in files for name in names}
        absent = [name for name, shard in weight_map.items() if (shard, name) not in present]
        if absent:
            raise CheckpointError(
                f"{index_path}: {len(absent)} tensor(s) are not in the shard the index names, "
                f"e.g. {absent[0]!r} in {directory / weight_map[absent[0]]}"
            )
        return files

    single = directory / SINGLE_WEIGHTS_FILE
    if single.is_file():
        return [(single, _tensor_names(single))]

    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    hint = ""
    if others:
        hint = f" (found {', '.join(others)}; only those two layouts are read)"
    raise CheckpointError(
        f"{directory}: no safetensors weights: expected {SINGLE_WEIGHTS_FILE} or {INDEX_FILE}{hint}"
    )


def _tensor_names(path: Path) -> list[str]:
    try:
        # Opening parses the header and checks it against the file size, which is
        # what catches truncated downloads.
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file: {exc}") from exc


def _tensors(files: list[tuple[Path, list[str]]]) -> Iterator[tuple[str, torch.Tensor]]:
    for path, names in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor data: {exc}") from exc
