"""GPU checks of the engine core (skipped without CUDA; run on the device machine)."""

import pytest
import torch

from rapidserve import LLM, SamplingParams
from conftest import hf_greedy, random_prompts

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tiny_models_on_cuda_match_hf(kind, tiny_model_dir):
    path, hf = tiny_model_dir(kind)
    prompts = random_prompts(6, seed=5, max_len=90)
    llm = LLM(model=path, device="cuda", dtype="float32", max_num_batched_tokens=64,
              kv_cache_memory_bytes="64MiB")
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY)):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


def test_cuda_chunking_and_preemption_match(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    prompts = random_prompts(8, seed=5, max_len=90)
    ref = [o.outputs[0].token_ids for o in LLM(model=path, device="cuda", dtype="float32").generate(prompts, GREEDY)]
    small = LLM(model=path, device="cuda", dtype="float32", num_kv_blocks=12, max_num_batched_tokens=16)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY)] == ref
    assert small.engine.scheduler.num_preemptions > 0


def test_kv_cache_sized_from_free_memory(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    llm = LLM(model=path, device="cuda", gpu_memory_utilization=0.3)
    free, total = torch.cuda.mem_get_info()
    used_by_cache = llm.engine.cache.nbytes
    assert 0.15 * total < used_by_cache < 0.3 * total
    assert llm.engine.dtype == torch.bfloat16  # auto dtype of a float32 checkpoint on GPU


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_and_graphs_match_torch_path(dtype, tiny_model_dir):
    """Greedy tokens of the fast path (Triton kernels, decode + piecewise CUDA graphs) equal the
    torch reference path's on the same weights: exactly in fp32; in bf16 the first 4 tokens of
    every request and >= 90 % of all tokens (rounding differs between the kernels)."""
    path, _ = tiny_model_dir("qwen3")
    prompts = random_prompts(24, seed=11, max_len=90)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    common = dict(model=path, device="cuda", dtype=dtype, max_num_batched_tokens=256, max_num_seqs=16,
                  kv_cache_memory_bytes="256MiB")
    ref = LLM(attention_backend="torch", enforce_eager=True, **common)
    fast = LLM(**common)
    assert fast.engine.runner.decode_graphs is not None and fast.engine.runner.piecewise is not None
    a = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in fast.generate(prompts, params)]
    if dtype == "float32":
        assert a == b
    else:
        first = sum(x[0] == y[0] for x, y in zip(a, b))
        prefix = [next((i for i, (u, w) in enumerate(zip(x, y)) if u != w), len(x)) for x, y in zip(a, b)]
        msg = f"first tokens equal {first}/{len(a)}; agreeing prefix lengths {prefix}"
        print(msg)
        assert first >= 0.9 * len(a), msg
        assert sum(prefix) >= 0.5 * sum(len(x) for x in a), msg


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_rapid_mode_on_cuda_matches_hybrid(placement, tiny_model_dir):
    """Process placement shares the decode worker's CUDA model and cache through CUDA IPC."""
    path, _ = tiny_model_dir("llama")
    prompts = random_prompts(12, seed=3, max_len=90)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kw = dict(model=path, device="cuda", dtype="float32", kv_cache_memory_bytes="128MiB")
    ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, params)]
    llm = LLM(mode="rapid", placement=placement, **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("mode", ["hybrid", "rapid"])
def test_async_scheduling_on_cuda_matches_sync(mode, tiny_model_dir):
    """One step ahead with CUDA graphs (the default on CUDA) gives the synchronous engine's
    tokens, with requests stopping mid-batch (stop ids) and preemption under a small cache."""
    path, _ = tiny_model_dir("llama")
    prompts = random_prompts(16, seed=7, max_len=90)
    kw = dict(model=path, device="cuda", dtype="float32", num_kv_blocks=24, max_num_batched_tokens=64)
    free = [o.outputs[0].token_ids for o in LLM(async_scheduling=False, **kw).generate(prompts, GREEDY)]
    stop_ids = sorted({t[3 + i % 6] for i, t in enumerate(free)})
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=stop_ids)
    want = [o.outputs[0].token_ids for o in LLM(async_scheduling=False, **kw).generate(prompts, params)]
    llm = LLM(async_scheduling=True, mode=mode, placement="thread", **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_disagg_mode_on_cuda_matches_hybrid(placement, tiny_model_dir):
    """The KV of each prompt travels from the prefill instance's pool to the decode instance's
    (CUDA IPC under process placement), with the static half-and-half SM split."""
    path, _ = tiny_model_dir("llama")
    prompts = random_prompts(12, seed=4, max_len=90)
    kw = dict(model=path, device="cuda", dtype="float32", kv_cache_memory_bytes="128MiB")
    ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, GREEDY)]
    llm = LLM(mode="disagg", placement=placement, mps="off", **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == ref
        s = llm.engine.stats()
        assert s.kv_transfer.num_transfers == len(prompts)
        assert s.memory_bytes > 0 and s.kv_transfer.prefill_memory_bytes > 0  # each instance's own
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("policy", ["static:64", "full"])
def test_partitioned_rapid_mode_on_cuda_matches_hybrid(policy, tiny_model_dir):
    """Green-context streams and per-partition decode graphs do not change tokens."""
    path, _ = tiny_model_dir("llama")
    prompts = random_prompts(12, seed=6, max_len=90)
    kw = dict(model=path, device="cuda", dtype="float32", kv_cache_memory_bytes="128MiB")
    ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, GREEDY)]
    llm = LLM(mode="rapid", placement="thread", partition_policy=policy, **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == ref
        s = llm.engine.stats()
        assert s.decode_sms == (64 if policy == "static:64" else torch.cuda.get_device_properties(0).multi_processor_count)
    finally:
        llm.engine.shutdown()
