"""The engine end to end on CPU: chunking, preemption, stops, sampling, errors."""

import json

import pytest

from conftest import random_prompts

from rapidserve import LLM, SamplingParams
from rapidserve.engine import LLMEngine
from rapidserve.config import EngineConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_output_does_not_depend_on_chunk_size(tiny):
    prompts = random_prompts(8)
    results = [
        _tokens(LLM(model=tiny, device="cpu", max_num_batched_tokens=budget), prompts)
        for budget in (16, 64, 100_000)
    ]
    assert results[0] == results[1] == results[2]


def test_preemption_under_a_tiny_cache_gives_identical_tokens(tiny):
    prompts = random_prompts(8)
    ref = _tokens(LLM(model=tiny, device="cpu"), prompts)
    small = LLM(model=tiny, device="cpu", num_kv_blocks=12, block_size=16, max_num_batched_tokens=64)
    assert _tokens(small, prompts) == ref
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.blocks.num_free_blocks == 12


def test_max_num_seqs_gives_identical_tokens(tiny):
    prompts = random_prompts(6)
    ref = _tokens(LLM(model=tiny, device="cpu"), prompts)
    assert _tokens(LLM(model=tiny, device="cpu", max_num_seqs=2), prompts) == ref


def test_requests_arriving_mid_run(tiny):
    prompts = random_prompts(5)
    ref = _tokens(LLM(model=tiny, device="cpu"), prompts)
    eng = LLMEngine(EngineConfig(model=tiny, device="cpu", max_num_batched_tokens=32))
    done, ids = {}, []
    for p in prompts:
        ids.append(eng.add_request(p, GREEDY))
        for out in eng.step() + eng.step():  # others progress between arrivals
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[i] for i in ids] == ref


def test_abort_frees_blocks(tiny):
    eng = LLMEngine(EngineConfig(model=tiny, device="cpu", num_kv_blocks=64))
    a = eng.add_request([1, 2, 3] * 10, GREEDY)
    b = eng.add_request([4, 5, 6] * 10, GREEDY)
    eng.step()
    assert eng.blocks.num_free_blocks < 64
    assert eng.abort_request(a) and not eng.abort_request("nope")
    eng.abort_request(b)
    assert eng.blocks.num_free_blocks == 64 and not eng.has_unfinished_requests()


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    llm = LLM(model=tiny, device="cpu")
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12, ignore_eos=True)
    alone = _tokens(llm, [[1, 2, 3]], p)[0]
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    mixed = llm.generate([[9, 9], [1, 2, 3], [7]], [others, p, others])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=43, max_tokens=12, ignore_eos=True)
    assert _tokens(llm, [[1, 2, 3]], other_seed)[0] != alone


def test_max_tokens_and_stop_token_ids(tiny):
    llm = LLM(model=tiny, device="cpu")
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))[0]
    toks = out.outputs[0].token_ids
    assert len(toks) == 7 and out.outputs[0].finish_reason == "length"
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True,
                                                   stop_token_ids=[stop_at]))[0]
    assert out.outputs[0].token_ids == toks[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at


def test_min_tokens_bans_stop_tokens(tiny):
    llm = LLM(model=tiny, device="cpu")
    toks = _tokens(llm, [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    p = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=4, stop_token_ids=[toks[0]], ignore_eos=True)
    out = llm.generate([[5, 6, 7]], p)[0].outputs[0].token_ids
    assert len(out) >= 4 and toks[0] not in out[:4]


def test_max_model_len_caps_generation(tiny):
    llm = LLM(model=tiny, device="cpu", max_model_len=20)
    out = llm.generate([[1] * 15], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


# ---- errors --------------------------------------------------------------------------------

def test_bad_prompts_are_rejected(tiny):
    llm = LLM(model=tiny, device="cpu", max_model_len=32, num_kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="maximum context length is 32"):
        llm.generate([[1] * 32])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        llm.generate([[1, 256]])
    with pytest.raises(ValueError, match="more than the whole cache"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello")
    # a failed batch leaves nothing behind
    assert not llm.engine.has_unfinished_requests() and llm.engine.blocks.num_free_blocks == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(seed="x"), "seed"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(model=str(tmp_path), device="cpu", load_format="dummy")


def test_missing_and_corrupt_weights(tiny, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny, d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(model=str(d), device="cpu")
    weights.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLM(model=str(d), device="cpu")
    with pytest.raises(ValueError, match="model not found"):
        LLM(model=str(tmp_path / "nothing"), device="cpu")


def test_engine_config_errors():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="unknown mode"):
        EngineConfig(mode="fancy")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=0)


def test_preset_needs_dummy_and_runs_with_it():
    with pytest.raises(ValueError, match="load-format dummy"):
        LLM(model="preset:llama-3.1-8b", device="cpu")
