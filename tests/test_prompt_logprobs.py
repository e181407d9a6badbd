"""Prompt logprobs (`SamplingParams.prompt_logprobs`) against HF transformers on the same weights:
each prompt token's logprob, rank and its position's top k equal `log_softmax` of HF's raw logits
at the position before it, whatever the chunking, in every topology; requests that did not ask
get none."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import POISON_SEED, inject_sampling_fault, random_prompts, run_engine

from rapidserve import LLM, SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.sampling.prompt_logprobs import PromptLogprobsPlan, rows_per_chunk
from rapidserve.scheduler.chunked import ScheduledRequest
from rapidserve.request import Request

ATOL = 1e-4


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), V]: row i = log_softmax of HF's logits at position i (predicting token i + 1)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].float()  # [T, V]
    return torch.log_softmax(logits, dim=-1)


def check_prompt_logprobs(out, model, prompt: list[int], k: int, atol: float = ATOL) -> None:
    """Every prompt token's entry against HF's: its logprob and rank, its position's top k."""
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt), (None if plp is None else len(plp), len(prompt))
    assert plp[0] is None
    ref = hf_prompt_logprobs(model, prompt)
    for i in range(1, len(prompt)):
        row, token, entry = ref[i - 1], prompt[i], plp[i]
        assert next(iter(entry)) == token, "the prompt token comes first"
        rank = entry[token].rank
        # Its rank counts the tokens at least as likely (ties within the tolerance either way).
        assert int((row > row[token] + atol).sum()) + 1 <= rank <= int((row >= row[token] - atol).sum()), i
        top = row.topk(k).indices.tolist() if k else []
        by_rank = sorted(((t, lp) for t, lp in entry.items() if t != token or lp.rank <= k), key=lambda kv: kv[1].rank)
        assert [t for t, _ in by_rank[:k]] == top, i
        for t, lp in entry.items():
            assert abs(lp.logprob - float(row[t])) < atol, (i, t, lp.logprob, float(row[t]))
        assert len(entry) == (k if token in top else k + 1), i


def test_sampling_params_prompt_logprobs_range():
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20
    assert SamplingParams().prompt_logprobs is None
    for bad in (-1, 21, 2.0, True, "3"):
        with pytest.raises(ValueError, match="^prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_plan_scores_each_prompt_token_once():
    """A chunk's positions score the next tokens (its last one the next chunk's first); the
    prompt's last position scores nothing (it samples); positions scored before a preemption are
    not scored again; chunks are bounded in rows."""
    req = Request("a", list(range(10)), SamplingParams(prompt_logprobs=2), 4)
    other = Request("b", list(range(5)), SamplingParams(), 4)
    plan = PromptLogprobsPlan([ScheduledRequest(other, 0, 5, True), ScheduledRequest(req, 0, 4, False)])
    assert plan.rows.tolist() == [5, 6, 7, 8] and plan.targets.tolist() == [1, 2, 3, 4]
    plan.launched()
    assert req.num_prompt_logprobs == 4
    plan = PromptLogprobsPlan([ScheduledRequest(req, 4, 6, True)])
    assert plan.rows.tolist() == [0, 1, 2, 3, 4] and plan.targets.tolist() == [5, 6, 7, 8, 9]
    plan.launched()
    req.reset_for_recompute()  # preempted: computed again from position 0, nothing scored twice
    assert not PromptLogprobsPlan([ScheduledRequest(req, 0, 10, True)])
    split = PromptLogprobsPlan([ScheduledRequest(Request("c", [1, 2, 3], SamplingParams(prompt_logprobs=1), 2),
                                                 0, 3, True),
                                ScheduledRequest(Request("d", [4, 5], SamplingParams(prompt_logprobs=3), 2),
                                                 0, 2, True)])
    assert split.k == 3
    packed = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)  # [R, 2 + 2K]
    chunks = split.split(packed)
    assert chunks["c"].first == 1 and chunks["c"].k == 1 and chunks["c"].packed.tolist() == [[0, 1, 2, 5], [8, 9, 10, 13]]
    assert chunks["d"].first == 1 and chunks["d"].k == 3 and chunks["d"].packed.tolist() == [list(range(16, 24))]
    assert rows_per_chunk(150_000) == 111 and rows_per_chunk(256) > 10_000


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama")


def test_hybrid_prompt_logprobs_match_hf(tiny_llama, monkeypatch):
    """Prompts longer than the chunk (several prefill chunks) and a short one, k 0 and 5,
    beside a request that did not ask (None); rows computed a few at a time (the memory bound)."""
    import rapidserve.sampling.prompt_logprobs as plp

    monkeypatch.setattr(plp, "CHUNK_LOGITS_BYTES", 7 * 4 * 256)  # 7 rows of the tiny vocabulary
    path, hf = tiny_llama
    prompts = random_prompts(3, seed=8, min_len=70, max_len=150) + [[17, 3]]
    llm = LLM(model=path, device="cpu", dtype="float32", max_num_batched_tokens=32)
    five = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=5)
    zero = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    outs = llm.generate(prompts, [five, zero, plain, five])
    check_prompt_logprobs(outs[0], hf, prompts[0], 5)
    check_prompt_logprobs(outs[1], hf, prompts[1], 0)
    assert outs[2].prompt_logprobs is None
    check_prompt_logprobs(outs[3], hf, prompts[3], 5)


def test_hybrid_preemption_scores_each_prompt_token_once(tiny_llama):
    """Under a cache too small for every request, requests are preempted (some in the middle of
    their chunked prefill, some after their first tokens) and recomputed, one step ahead: each
    still gets exactly one entry per prompt token, HF's."""
    path, hf = tiny_llama
    prompts = random_prompts(6, seed=12, min_len=40, max_len=100)
    engine = create_engine(EngineConfig(model=path, device="cpu", dtype="float32", num_kv_blocks=12, block_size=16,
                                        max_num_batched_tokens=32, async_scheduling=True))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
    outs = run_engine(engine, prompts, [params] * len(prompts))
    assert engine.scheduler.num_preemptions > 0
    for out, prompt in zip(outs, prompts):
        check_prompt_logprobs(out, hf, prompt, 2)


MODES = {
    "rapid-thread-async-preempt": dict(mode="rapid", placement="thread", async_scheduling=True,
                                       num_kv_blocks=12, block_size=16),
    "rapid-process": dict(mode="rapid", placement="process"),
    "disagg-thread": dict(mode="disagg", placement="thread"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_carries_prompt_logprobs(tiny_llama, mode):
    """The prefill side (the rapid prefill worker in its layer groups, the disagg prefill
    instance) scores the prompt; the scores reach the front with the first token, through the
    decode side, only for the requests that asked; a recompute after a preemption adds none."""
    path, hf = tiny_llama
    prompts = random_prompts(4, seed=13, min_len=30, max_len=90)
    engine = create_engine(EngineConfig(model=path, device="cpu", dtype="float32", **MODES[mode]))
    try:
        three = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=3)
        plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        outs = run_engine(engine, prompts, [three, plain, three, three])
        if "num_kv_blocks" in MODES[mode]:
            assert engine.worker_stats.num_preemptions > 0
    finally:
        engine.shutdown()
    for i in (0, 2, 3):
        check_prompt_logprobs(outs[i], hf, prompts[i], 3)
    assert outs[1].prompt_logprobs is None


def test_lm_eval_loglikelihood_request_matches_hf(tiny_llama):
    """lm-eval-harness's `local-completions` loglikelihood request (token ids, echo, logprobs 1,
    max_tokens 1, greedy) and OpenAI's score-only form (max_tokens 0): the continuation's
    logprob sum, read as lm-eval reads it, is HF's; each prompt token's top-1 says whether it
    was the greedy choice."""
    import httpx

    from conftest import LiveServer
    from rapidserve.async_engine import AsyncEngine
    from rapidserve.engine import LLMEngine
    from rapidserve.entrypoints.openai.server import ServerConfig, build_app

    path, hf = tiny_llama
    engine = AsyncEngine(LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32",
                                                max_num_batched_tokens=16)))
    server = LiveServer(build_app(engine, ServerConfig()))
    url = server.start()
    try:
        contexts = random_prompts(2, seed=21, min_len=5, max_len=40)
        continuations = random_prompts(2, seed=22, min_len=1, max_len=6)
        prompts = [c + x for c, x in zip(contexts, continuations)]
        body = {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        scored = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 0}, timeout=60).json()
    finally:
        server.stop()
        engine.shutdown()
    for choice, only, context, prompt in zip(r.json()["choices"], scored["choices"], contexts, prompts):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = hf_prompt_logprobs(hf, prompt)
        want = sum(float(ref[i - 1, prompt[i]]) for i in range(len(context), len(prompt)))
        assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(want, abs=1e-3)
        greedy = all(int(ref[i - 1].argmax()) == prompt[i] for i in range(len(context), len(prompt)))
        tops = lp["top_logprobs"][len(context):-1]
        assert greedy == all(max(top, key=top.get) == f"token_id:{t}" for top, t in zip(tops, prompt[len(context):]))
        assert only["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1]  # the prompt's alone
        assert only["finish_reason"] == "length" and only["text"] == ""  # (no tokenizer: no text)
    assert scored["usage"]["completion_tokens"] == 0


def test_positions_go_through_the_lm_head_a_bounded_number_at_a_time(monkeypatch):
    """The memory bound: never more than rows_per_chunk positions' logits at once, and the
    packed result is that of all positions at once."""
    import rapidserve.sampling.prompt_logprobs as plp

    monkeypatch.setattr(plp, "CHUNK_LOGITS_BYTES", 7 * 4 * 50)  # 7 rows of a vocabulary of 50
    torch.manual_seed(1)
    head = torch.randn(50, 8)
    seen = []

    def compute_logits(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[0])
        return h @ head.T

    prompt = [int(t) for t in torch.randint(0, 50, (40,))]
    req = Request("a", prompt, SamplingParams(prompt_logprobs=4), 2)
    plan = PromptLogprobsPlan([ScheduledRequest(req, 0, 40, True)])
    hidden = torch.randn(40, 8)
    got = plp.compute_prompt_logprobs(hidden, compute_logits, plan, 50).packed
    assert max(seen) == 7 and sum(seen) == 39
    ref = torch.log_softmax(hidden[:39] @ head.T, dim=-1)
    torch.testing.assert_close(got[:, 0], ref.gather(1, torch.tensor(prompt[1:]).view(-1, 1))[:, 0])
    assert got[:, 2:6].long().tolist() == ref.topk(4).indices.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["hybrid", "rapid"])
def test_cuda_graphs_and_async_scheduling_carry_prompt_logprobs(tiny_llama, mode):
    """On CUDA, one step ahead, with graphs: a budget of 2 tokens makes one-token prefill chunks
    beside a decode (a step that looks like a decode: it must not replay a decode graph, whose
    output keeps the sampling rows only); the rapid prefill worker's piecewise graphs. Triton
    kernels in fp32: a looser tolerance."""
    path, hf = tiny_llama
    prompts = [[5, 9], [7, 1, 200, 33, 4, 90], *random_prompts(2, seed=31, min_len=20, max_len=60)]
    extra = {"placement": "thread"} if mode == "rapid" else {"max_num_batched_tokens": 2}
    engine = create_engine(EngineConfig(model=path, device="cuda", dtype="float32", mode=mode,
                                        kv_cache_memory_bytes="128MiB", **extra))
    try:
        if mode == "hybrid":
            assert engine.runner.decode_graphs is not None and engine.async_scheduling
        three = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=3)
        plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        outs = run_engine(engine, prompts, [three, three, plain, three])
    finally:
        engine.shutdown()
    for i in (0, 1, 3):
        check_prompt_logprobs(outs[i], hf, prompts[i], 3, atol=2e-3)
    assert outs[2].prompt_logprobs is None


def test_prompt_logprobs_survive_a_step_run_one_request_at_a_time(tiny_llama, monkeypatch):
    """A request that makes a step fail is cut out of it (the step runs again one request at a
    time, ModelRunner.submit_isolated): the others' prompt logprobs come from their runs alone,
    each position once; the failed request's output still carries its own."""
    path, hf = tiny_llama
    inject_sampling_fault(monkeypatch, after_tokens=2, in_company=True)  # its third token fails
    prompts = random_prompts(3, seed=14, min_len=10, max_len=40)
    two = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    marked = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, seed=POISON_SEED, prompt_logprobs=1)
    engine = create_engine(EngineConfig(model=path, device="cpu", dtype="float32"))
    outs = run_engine(engine, prompts, [two, marked, two])
    assert outs[1].error is not None
    for i in range(3):
        check_prompt_logprobs(outs[i], hf, prompts[i], 1 if i == 1 else 2)


def test_a_prefill_side_does_not_score_a_recomputed_prompt_again():
    """A request handed to a prefill side with outputs (a preempted one) had its prompt scored
    with its first token: its plan scores nothing; a fresh one is scored whole."""
    from rapidserve.serving.messages import PrefillWork
    from rapidserve.serving.workers import request_of

    params = SamplingParams(prompt_logprobs=1)
    fresh = request_of(PrefillWork("a", [1, 2, 3, 4], 4, params, 8, [0]), runner=None)
    again = request_of(PrefillWork("b", [1, 2, 3, 4, 9, 8], 4, params, 8, [0]), runner=None)
    assert PromptLogprobsPlan([ScheduledRequest(fresh, 0, 4, True)]).targets.tolist() == [2, 3, 4]
    assert not PromptLogprobsPlan([ScheduledRequest(again, 0, 6, True)])
