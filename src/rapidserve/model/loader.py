"""Builds a ready model on a device from a user's model argument."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterator, NamedTuple

import torch

from rapidserve.model.config import ModelConfig
from rapidserve.model.llama import CausalLM
from rapidserve.model.quant import apply_kv_scales, checkpoint_quantization, fp8_weights, resolve_quantization
from rapidserve.model.source import ModelSource, load_source, resolve_model

log = logging.getLogger("rapidserve.engine")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadedModel(NamedTuple):
    model: CausalLM
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, or None (token-id prompts only)
    source: ModelSource
    dtype: torch.dtype
    max_model_len: int


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _TORCH_DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    # As vLLM: the checkpoint's dtype, except that float32 checkpoints run in bf16 on GPU.
    if cfg.config_dtype in ("bfloat16", "float16"):
        return _TORCH_DTYPES[cfg.config_dtype]
    return torch.bfloat16


def resolve_max_model_len(requested: int | None, cfg: ModelConfig) -> int:
    limit = cfg.max_position_embeddings
    if requested is not None and requested > limit:
        raise ValueError(
            f"max_model_len {requested} exceeds the model's max_position_embeddings ({limit})"
        )
    length = requested or limit
    if cfg.sliding_window is not None and length > cfg.sliding_window:
        # Sliding-window attention is not implemented; below the window it is exact.
        log.warning("capping max_model_len at the sliding window (%d)", cfg.sliding_window)
        length = cfg.sliding_window
    return length


def model_config(hf_config: dict[str, Any], quantization: str | None) -> ModelConfig:
    """The model's config with its weight format: the flag's, or the checkpoint's FP8."""
    cfg = ModelConfig.from_hf(hf_config)
    quant = resolve_quantization(quantization, checkpoint_quantization(hf_config))
    return dataclasses.replace(cfg, quantization=quant)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_tokenizer(path: str) -> Any:
    from rapidserve.model.gguf_file import load_gguf_tokenizer
    from rapidserve.model.hf_dir import load_hf_tokenizer

    if path.endswith(".gguf") and os.path.isfile(path):
        return load_gguf_tokenizer(path)
    if os.path.isdir(path):
        tok = load_hf_tokenizer(path)
        if tok is not None:
            return tok
    raise ValueError(f"no tokenizer found at {path!r} (give an HF model directory or a .gguf file)")


def load_model(
    model: str | None,
    load_format: str,
    dtype: str,
    device: torch.device,
    max_model_len: int | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    quantization: str | None = None,
) -> LoadedModel:
    source = resolve_model(model)
    loaded = load_source(source, load_format)
    cfg = model_config(loaded.config, quantization)
    checkpoint_quant = checkpoint_quantization(loaded.config)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    length = resolve_max_model_len(max_model_len, cfg)
    with torch.device(device), _default_dtype(torch_dtype):
        net = CausalLM(cfg, max_positions=length)
    if loaded.weights is None:
        net.init_dummy_weights(seed)
    elif cfg.quantization == "fp8":
        kv_scales: dict[str, torch.Tensor] = {}
        net.load_weights(fp8_weights(loaded.weights, checkpoint_quant, device, kv_scales))
        if apply_kv_scales(net.attention_layers, kv_scales):
            log.info("KV cache scales from the checkpoint (%d tensors)", len(kv_scales))
    else:
        net.load_weights(loaded.weights)
    net.eval()
    tok = load_tokenizer(tokenizer) if tokenizer else loaded.tokenizer
    log.info(
        "loaded %s (%s, %d layers) as %s%s on %s, max_model_len %d",
        source.display_name, cfg.architecture, cfg.num_layers, torch_dtype,
        " with fp8 weights" if cfg.quantization == "fp8" else "", device, length,
    )
    return LoadedModel(net, cfg, tok, source, torch_dtype, length)
