"""Sampled-token logprobs (`SamplingParams.logprobs`) against HF transformers on the same weights:
the sampled token's logprob and rank and the top-k of each step equal `log_softmax` of HF's raw
logits, in every topology; requests that did not ask get none."""

from __future__ import annotations


import pytest
import torch

from conftest import POISON_SEED, inject_sampling_fault, random_prompts, run_engine

from rapidserve import LLM, Logprob, SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.sampling import SamplingBatch, Sampler, compute_logprobs
from rapidserve.sampling.logprobs import unpack

ATOL = 1e-4
GREEDY5 = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)


def hf_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), V]: log_softmax of HF's logits at each step that produced an output token,
    given the tokens before it (one forward over prompt + output)."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # [T, V]
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(output) - 1], dim=-1)


def check_against_hf(out, model, prompt: list[int], k: int, greedy: bool = True, atol: float = ATOL) -> None:
    """Every generated token's logprobs against HF's at its step (fp32, atol 1e-4 on CPU)."""
    c = out.outputs[0]
    assert out.error is None and c.finish_reason == "length" and len(c.token_ids) == 6, (out.error, c)
    ref = hf_logprobs(model, prompt, c.token_ids)
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    for step, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[step]
        assert next(iter(entry)) == token, "the sampled token comes first"
        rank = entry[token].rank
        if greedy:
            assert rank == 1
        # Its rank counts the tokens at least as likely (ties within the tolerance either way).
        assert int((row > row[token] + atol).sum()) + 1 <= rank <= int((row >= row[token] - atol).sum())
        by_rank = sorted(entry.items(), key=lambda kv: kv[1].rank)
        assert [t for t, _ in by_rank[:k]] == row.topk(k).indices.tolist(), step
        assert [lp.rank for _, lp in by_rank[:k]] == list(range(1, k + 1))
        for t, lp in entry.items():
            assert abs(lp.logprob - float(row[t])) < atol, (step, t, lp.logprob, float(row[t]))
        assert len(entry) == (k if token in row.topk(k).indices.tolist() else k + 1)
    assert c.cumulative_logprob == pytest.approx(sum(float(ref[i, t]) for i, t in enumerate(c.token_ids)), abs=1e-3)


def test_sampling_params_logprobs_range():
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20
    assert SamplingParams().logprobs is None
    for bad in (-1, 21, 2.0, True, "3"):
        with pytest.raises(ValueError, match="^logprobs"):
            SamplingParams(logprobs=bad)


def test_compute_logprobs_only_for_rows_that_asked():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.5, top_k=2), SamplingParams(temperature=0.0, logprobs=0)]
    assert compute_logprobs(logits, logits.argmax(-1), [params[0], params[2]]) is None
    sampled = Sampler()(logits, SamplingBatch.from_params(params))
    t = compute_logprobs(logits, sampled, params)
    assert t.rows == [1, 3] and t.num == [3, 0] and tuple(t.packed.shape) == (2, 2 + 2 * 3)
    got = unpack(t, t.packed.tolist(), 4)
    assert got[0] is None and got[2] is None
    ref = torch.log_softmax(logits, -1)
    assert got[1].logprob == pytest.approx(float(ref[1].max()), abs=1e-6) and got[1].rank == 1
    assert list(got[1].top_ids) == ref[1].topk(3).indices.tolist()
    assert got[3].top_ids == () and got[3].top_logprobs == () and got[3].rank == 1


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama")


def test_hybrid_greedy_logprobs_match_hf(tiny_llama):
    """Prompts longer than the chunk (chunked prefill), greedy with logprobs=5; a seeded
    sampled request's logprobs are those of the raw logits (not temperature-scaled or top-k
    filtered); a request without logprobs beside them gets none; logprobs=0 only the token."""
    path, hf = tiny_llama
    prompts = random_prompts(3, seed=7, min_len=3, max_len=90)
    prompts.append(prompts[2])  # the same prompt with logprobs=0 and without: the same tokens
    llm = LLM(model=path, device="cpu", dtype="float32", max_num_batched_tokens=64)
    sampled = SamplingParams(temperature=1.5, top_k=3, seed=11, max_tokens=6, ignore_eos=True, logprobs=4)
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    zero = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, [GREEDY5, sampled, plain, zero])
    check_against_hf(outs[0], hf, prompts[0], 5)
    check_against_hf(outs[1], hf, prompts[1], 4, greedy=False)
    assert all(next(iter(e.values())).rank <= 3 for e in outs[1].outputs[0].logprobs)  # top_k=3 picked it
    assert outs[2].outputs[0].logprobs is None and outs[2].outputs[0].cumulative_logprob is None
    assert outs[2].outputs[0].token_ids == outs[3].outputs[0].token_ids
    ref = hf_logprobs(hf, prompts[3], outs[3].outputs[0].token_ids)
    for step, (t, entry) in enumerate(zip(outs[3].outputs[0].token_ids, outs[3].outputs[0].logprobs)):
        assert list(entry) == [t] and entry[t].rank == 1 and abs(entry[t].logprob - float(ref[step, t])) < ATOL
        assert isinstance(entry[t], Logprob) and entry[t].decoded_token is None  # no tokenizer


MODES = {
    "hybrid-async": dict(mode="hybrid", async_scheduling=True),
    "rapid-thread-async": dict(mode="rapid", placement="thread", async_scheduling=True),
    "rapid-process": dict(mode="rapid", placement="process"),
    "disagg-thread": dict(mode="disagg", placement="thread"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_carries_logprobs(tiny_llama, mode):
    """The first token (sampled by the prefill side) and the decode steps' tokens carry their
    logprobs back to the front in every topology, only for the request that asked."""
    path, hf = tiny_llama
    prompts = random_prompts(2, seed=5, min_len=4, max_len=40)
    engine = create_engine(EngineConfig(model=path, device="cpu", dtype="float32", **MODES[mode]))
    try:
        plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        outs = run_engine(engine, prompts, [GREEDY5, plain])
    finally:
        engine.shutdown()
    check_against_hf(outs[0], hf, prompts[0], 5)
    assert outs[1].outputs[0].logprobs is None


def test_logprobs_survive_a_step_run_one_request_at_a_time(tiny_llama, monkeypatch):
    """A request that makes a step fail is cut out of it (the step runs again one request at a
    time, ModelRunner.submit_isolated): the others keep their logprobs, read back per run."""
    path, hf = tiny_llama
    inject_sampling_fault(monkeypatch, after_tokens=2, in_company=True)  # its third token fails
    prompts = random_prompts(3, seed=4, min_len=4, max_len=30)
    marked = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, seed=POISON_SEED, logprobs=2)
    three = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    engine = create_engine(EngineConfig(model=path, device="cpu", dtype="float32"))
    outs = run_engine(engine, prompts, [GREEDY5, marked, three])
    assert outs[1].error is not None and len(outs[1].outputs[0].logprobs) == 2
    check_against_hf(outs[0], hf, prompts[0], 5)
    check_against_hf(outs[2], hf, prompts[2], 3)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["hybrid", "rapid"])
def test_cuda_graphs_and_async_scheduling_carry_logprobs(tiny_llama, mode):
    """On CUDA (decode graphs, one step ahead, the logprobs' pinned copy back beside the tokens')
    the logprobs still equal HF's (Triton kernels in fp32: a looser tolerance)."""
    path, hf = tiny_llama
    prompts = random_prompts(3, seed=9, min_len=4, max_len=60)
    extra = {"placement": "thread"} if mode == "rapid" else {}
    engine = create_engine(EngineConfig(model=path, device="cuda", dtype="float32", mode=mode,
                                        kv_cache_memory_bytes="128MiB", **extra))
    try:
        if mode == "hybrid":
            assert engine.runner.decode_graphs is not None and engine.async_scheduling
        plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        outs = run_engine(engine, prompts, [GREEDY5, plain, GREEDY5])
    finally:
        engine.shutdown()
    for i in (0, 2):
        check_against_hf(outs[i], hf, prompts[i], 5, atol=2e-3)
    assert outs[1].outputs[0].logprobs is None
