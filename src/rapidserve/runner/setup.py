"""Builds what a worker runs: the model on its device, the attention backend and the KV cache
(sized from memory). Shared by the hybrid engine and the rapid topology's decode worker."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from rapidserve.attention.backend import AttentionBackend, select_backend
from rapidserve.config import EngineConfig
from rapidserve.kv.block_manager import BlockManager, blocks_needed
from rapidserve.kv.cache import KVCache, KVCacheSpec
from rapidserve.model.loader import LoadedModel, load_model
from rapidserve.ops.fp8 import resolve_kv_cache_dtype
from rapidserve.request import Request
from rapidserve.runner.model_runner import ModelRunner
from rapidserve.sampling_params import MAX_LOGPROBS, SamplingParams
from rapidserve.scheduler.chunked import ScheduledRequest

log = logging.getLogger("rapidserve.engine")

_CPU_KV_BYTES = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA GPU")
    return device


def device_memory_bytes(device: torch.device) -> int:
    """GPU memory this process holds on the device (torch's reserved pools; 0 on CPU). No sync."""
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    ids = set(loaded.config.eos_token_ids)
    tok = loaded.tokenizer
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return tuple(sorted(ids))


class PreparedModel(NamedTuple):
    loaded: LoadedModel
    device: torch.device
    backend: AttentionBackend
    use_graphs: bool
    cache: KVCache
    eos_token_ids: tuple[int, ...]


def prepare_model(config: EngineConfig) -> PreparedModel:
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    loaded = load_model(
        config.model, config.load_format, config.dtype, device,
        config.max_model_len, config.tokenizer, config.seed, config.quantization,
    )
    backend = select_backend(config.attention_backend, device)
    _check_fp8_kv(config, device, backend)
    use_graphs = config.use_cuda_graphs and device.type == "cuda" and backend.graph_safe
    spec = KVCacheSpec.for_model(loaded.config, config.block_size,
                                 resolve_kv_cache_dtype(config.kv_cache_dtype, loaded.dtype))
    num_blocks = num_kv_blocks(config, spec, loaded, device, backend, use_graphs)
    cache = KVCache(spec, num_blocks, device)
    log.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s)", num_blocks, config.block_size,
             cache.nbytes / 2**30, str(spec.dtype).removeprefix("torch."))
    return PreparedModel(loaded, device, backend, use_graphs, cache, eos_token_ids(loaded))


def _check_fp8_kv(config: EngineConfig, device: torch.device, backend: AttentionBackend) -> None:
    """Triton's E4M3 type (fp8e4nv) exists on compute capability >= 8.9 only."""
    if (config.kv_cache_dtype != "auto" and backend.name == "triton" and device.type == "cuda"
            and torch.cuda.get_device_capability(device) < (8, 9)):
        raise ValueError(
            "kv_cache_dtype fp8 with the triton attention backend needs a GPU of compute capability "
            ">= 8.9 (Ada, Hopper or newer); use --attention-backend torch or --kv-cache-dtype auto"
        )


def num_kv_blocks(
    config: EngineConfig, spec: KVCacheSpec, loaded: LoadedModel, device: torch.device,
    backend: AttentionBackend, use_graphs: bool,
) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_bytes is not None:
        n = spec.blocks_for_bytes(config.kv_cache_memory_bytes)
    elif device.type == "cpu":
        n = spec.blocks_for_bytes(_CPU_KV_BYTES)
    else:
        n = spec.blocks_for_bytes(_free_gpu_memory(config, spec, loaded, device, backend, use_graphs))
    if n < 1:
        raise ValueError(
            f"no memory left for the KV cache (one block needs {spec.bytes_per_block} bytes); "
            "raise --gpu-memory-utilization or --kv-cache-memory-bytes, or use a smaller model"
        )
    return n


def _free_gpu_memory(
    config: EngineConfig, spec: KVCacheSpec, loaded: LoadedModel, device: torch.device,
    backend: AttentionBackend, use_graphs: bool,
) -> int:
    """Memory the KV cache may take: the utilization target minus what the weights and a
    forward at the largest step (activations, logits) use at their peak."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    _, total = torch.cuda.mem_get_info(device)
    weights = torch.cuda.memory_allocated(device)
    n_tokens = min(config.max_num_batched_tokens, loaded.max_model_len)
    probe_blocks = blocks_needed(n_tokens, spec.block_size)
    probe = KVCache(spec, probe_blocks, device)
    probe_mgr = BlockManager(probe_blocks, spec.block_size)
    runner = ModelRunner(loaded.model, probe, probe_mgr, device, (), backend, n_tokens)
    # With prompt logprobs: their chunks of positions' logits are part of a step's peak.
    req = Request("profile", [0] * n_tokens, SamplingParams(temperature=0.0, prompt_logprobs=MAX_LOGPROBS), 1)
    probe_mgr.allocate(req.request_id, n_tokens)
    runner.execute([ScheduledRequest(req, 0, n_tokens, True)])
    # Logits of the widest sampling step.
    with torch.inference_mode():
        h = torch.zeros(config.max_num_seqs, loaded.config.hidden_size, dtype=loaded.dtype, device=device)
        loaded.model.compute_logits(h)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del probe, runner, h
    torch.cuda.empty_cache()
    free_after, _ = torch.cuda.mem_get_info(device)
    # Memory used outside torch's allocator (CUDA context, other processes).
    non_torch = (total - free_after) - torch.cuda.memory_allocated(device)
    budget = int(total * config.gpu_memory_utilization) - peak - max(non_torch, 0)
    if use_graphs:
        # The graphs' private pool holds about one more step's activations.
        budget -= peak - weights
    log.info(
        "GPU memory: total %.1f GiB, weights %.2f GiB, peak with a step %.2f GiB, other %.2f GiB"
        " -> KV %.2f GiB", total / 2**30, weights / 2**30, peak / 2**30, non_torch / 2**30,
        budget / 2**30,
    )
    return max(budget, 0)
