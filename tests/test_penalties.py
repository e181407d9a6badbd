"""Logit bias and the presence / frequency / repetition penalties (vLLM's semantics): the
sampler's math against a direct torch reference, greedy decoding against HF transformers (its
RepetitionPenaltyLogitsProcessor, and a hand-rolled greedy loop over its logits for presence and
frequency) in every topology and with one-step-ahead scheduling, and the checks on bad values."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_prompts, run_engine

from rapidserve import SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.sampling import (
    PendingTokens, Sampler, SamplingBatch, TokenHistory, apply_penalties, compute_logprobs,
)

VOCAB = 40


def reference(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
              outputs: list[list[int]]) -> torch.Tensor:
    """The penalized logits, one row and one token at a time (the definitions, written plainly)."""
    out = logits.clone().float()
    for b, (p, prompt, output) in enumerate(zip(params, prompts, outputs)):
        row = out[b]
        for t, bias in (p.logit_bias or {}).items():
            row[t] += bias
        for t in set(prompt) | set(output):
            if p.repetition_penalty != 1.0:
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        for t in set(output):
            row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


def _random_case(seed: int, num_rows: int):
    rng = random.Random(seed)
    params, prompts, outputs = [], [], []
    for _ in range(num_rows):
        kind = rng.choice(["plain", "presence", "frequency", "repetition", "bias", "all"])
        kw = {}
        if kind in ("presence", "all"):
            kw["presence_penalty"] = rng.uniform(-2, 2)
        if kind in ("frequency", "all"):
            kw["frequency_penalty"] = rng.uniform(-2, 2)
        if kind in ("repetition", "all"):
            kw["repetition_penalty"] = rng.choice([0.5, 1.3, 2.0])
        if kind in ("bias", "all"):
            kw["logit_bias"] = {rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(3)}
        params.append(SamplingParams(temperature=0.0, **kw))
        prompts.append([rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))])
        # Repeats, so counts above 1 occur.
        outputs.append([rng.randrange(VOCAB // 4) for _ in range(rng.randrange(0, 15))])
    return params, prompts, outputs


def _histories(params, prompts, outputs):
    """What the runner builds: histories for penalized rows only, the prompt for repetition only."""
    return [TokenHistory(q if p.repetition_penalty != 1.0 else (), o) if p.penalized else None
            for p, q, o in zip(params, prompts, outputs)]


@pytest.mark.parametrize("seed", range(6))
def test_penalties_match_reference(seed):
    """All four on random logits and histories, rows with and without mixed; the sampler's
    greedy pick is the reference's argmax and the caller's logits are untouched."""
    torch.manual_seed(seed)
    params, prompts, outputs = _random_case(seed, num_rows=7)
    logits = torch.randn(7, VOCAB) * 3
    ref = reference(logits, params, prompts, outputs)
    x = logits.clone()
    apply_penalties(x, params, _histories(params, prompts, outputs))
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-5)
    for b, p in enumerate(params):
        if not (p.penalized or p.logit_bias):
            assert torch.equal(x[b], logits[b]), "a row that asked for nothing is unchanged"
    before = logits.clone()
    tokens = Sampler()(logits, SamplingBatch.from_params(params, _histories(params, prompts, outputs)))
    assert torch.equal(logits, before)
    assert tokens.tolist() == ref.argmax(-1).tolist()


def test_pending_tokens_count_as_the_last_output():
    """With async scheduling a row's last token is still on the device: it counts as if it were
    in the host history (presence, frequency and repetition alike)."""
    torch.manual_seed(1)
    params, prompts, outputs = _random_case(11, num_rows=6)
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=0.3,
                             repetition_penalty=1.5)] + params
    prompts, outputs = [[1, 2]] + prompts, [[3, 3]] + outputs
    logits = torch.randn(len(params), VOCAB) * 3
    full = [o + [3 + b] for b, o in enumerate(outputs)]  # each row's pending token: 3 + row
    ref = reference(logits, params, prompts, [f if p.penalized else o for p, f, o in zip(params, full, outputs)])
    penalized = [b for b, p in enumerate(params) if p.penalized]
    pending = PendingTokens(penalized, torch.tensor([3 + b for b in penalized]))
    x = logits.clone()
    apply_penalties(x, params, _histories(params, prompts, outputs), pending)
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-5)


def test_logprobs_stay_those_of_the_raw_logits():
    """A penalty changes the pick, not the reported logprobs (vLLM's default: raw logits)."""
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    params = [SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=4.0)]
    sampled = Sampler()(logits, SamplingBatch.from_params(params, [TokenHistory([0], [])]))
    assert sampled.tolist() == [1]  # 4 / 4 = 1 < 3
    lp = compute_logprobs(logits, sampled, params)
    assert lp.packed[0, 0].item() == pytest.approx(float(torch.log_softmax(logits, -1)[0, 1]))


def test_logit_bias_forces_and_bans():
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 10.0
    params = [SamplingParams(temperature=0.0, logit_bias={17: 100}),
              SamplingParams(temperature=0.7, seed=3, logit_bias={5: -100, 9: 100})]
    assert Sampler()(logits, SamplingBatch.from_params(params)).tolist() == [17, 9]
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler()(logits, SamplingBatch.from_params([SamplingParams(logit_bias={VOCAB: 1.0})] * 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(presence_penalty=2.5), "^presence_penalty"),
    (dict(presence_penalty=float("nan")), "^presence_penalty"),
    (dict(frequency_penalty=-2.01), "^frequency_penalty"),
    (dict(frequency_penalty="1"), "^frequency_penalty"),
    (dict(repetition_penalty=0.0), "^repetition_penalty"),
    (dict(repetition_penalty=-1.0), "^repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "^repetition_penalty"),
    (dict(repetition_penalty=True), "^repetition_penalty"),
    (dict(logit_bias={1: 100.5}), "^logit_bias"),
    (dict(logit_bias={1: float("nan")}), "^logit_bias"),
    (dict(logit_bias={-1: 1.0}), "^logit_bias"),
    (dict(logit_bias={"1": 1.0}), "^logit_bias"),
    (dict(logit_bias=[(1, 1.0)]), "^logit_bias"),
])
def test_sampling_params_refuse_out_of_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_copy():
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logit_bias) == (0.0, 0.0, 1.0, None)
    assert not p.penalized and SamplingParams(logit_bias={}).logit_bias is None
    bias = {3: -2}
    q = SamplingParams(logit_bias=bias, presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.1)
    bias[4] = 1.0
    assert q.logit_bias == {3: -2} and q.penalized


# ---- end to end, against HF transformers ---------------------------------------------------


def hf_penalized_greedy(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding over HF's logits with the penalties applied by hand in vLLM's order (HF
    has no presence/frequency processor); the repetition penalty through HF's own processor."""
    import transformers

    ids, out = list(prompt), []
    for _ in range(params.max_tokens):
        with torch.no_grad():
            scores = model(input_ids=torch.tensor([ids])).logits[:, -1].float()  # [1, V]
        for t, bias in (params.logit_bias or {}).items():
            scores[0, t] += bias
        if params.repetition_penalty != 1.0:
            scores = transformers.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(
                torch.tensor([ids]), scores)
        for t in set(out):
            scores[0, t] -= params.frequency_penalty * out.count(t) + params.presence_penalty
        out.append(int(scores.argmax()))
        ids.append(out[-1])
    return out


def hf_generate(model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """HF's own greedy `generate` (EOS ignored, as ignore_eos)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None,
                         pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


N = 8
REP = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, repetition_penalty=1.8)
PRES_FREQ = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, presence_penalty=1.5,
                           frequency_penalty=2.0, logit_bias={5: 3.0, 6: -3.0})
ALL = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, presence_penalty=-0.5,
                     frequency_penalty=0.3, repetition_penalty=0.7)
FORCED = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, logit_bias={7: 100.0})
PLAIN = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
# NOTE: these two depend on the token just sampled (the one in flight under async scheduling):
# negative penalties reward repeating it, and token 9 (not in its prompt) is picked first thanks
# to the bias and then only if its logit, divided by 100, still wins.
REPEAT = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, presence_penalty=-2.0,
                        frequency_penalty=-2.0)
ONCE = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, logit_bias={9: 50.0},
                      repetition_penalty=100.0)
BATCH = [REP, PRES_FREQ, ALL, FORCED, PLAIN, REP, REPEAT, ONCE]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def case(tiny_llama):
    """The prompts of BATCH and each one's expected tokens (HF's)."""
    _, hf = tiny_llama
    prompts = random_prompts(len(BATCH), seed=21, min_len=4, max_len=90)
    prompts[7] = [t for t in prompts[7] if t != 9]
    expected = [hf_penalized_greedy(hf, q, p) for q, p in zip(prompts, BATCH)]
    return prompts, expected


def test_reference_is_hf_generate(tiny_llama, case):
    """The hand-rolled loop agrees with HF's generate where HF has the processor, and the
    penalties change what plain greedy decoding would give (so the checks below can fail)."""
    from conftest import hf_greedy

    _, hf = tiny_llama
    prompts, expected = case
    for i in (0, 5):
        assert expected[i] == hf_generate(hf, prompts[i], N, repetition_penalty=1.8)
    assert expected[3] == [7] * N
    assert expected[4] == hf_greedy(hf, prompts[4], N)
    for i in (0, 1, 2, 6, 7):
        assert expected[i] != hf_greedy(hf, prompts[i], N), i
    # The first tokens (the prefill side's) depend on the bias and on the prompt's repetition.
    assert expected[7][0] == 9 and expected[7][1] != 9
    assert expected[2][0] != hf_greedy(hf, prompts[2], 1)[0]
    assert any(a == b for a, b in zip(expected[6], expected[6][1:])), expected[6]  # a repeat


MODES = {
    "hybrid": dict(mode="hybrid", async_scheduling=False),
    "hybrid-async": dict(mode="hybrid", async_scheduling=True),
    "rapid-thread-async": dict(mode="rapid", placement="thread", async_scheduling=True),
    "rapid-process": dict(mode="rapid", placement="process"),
    "disagg-thread": dict(mode="disagg", placement="thread"),
    # Preemption (recompute) with tokens in flight: the recomputed request's history is its
    # prompt and the outputs it had.
    "hybrid-async-preempt": dict(mode="hybrid", async_scheduling=True, num_kv_blocks=30, block_size=4),
    "rapid-thread-async-preempt": dict(mode="rapid", placement="thread", async_scheduling=True,
                                       num_kv_blocks=30, block_size=4),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_matches_hf(tiny_llama, case, mode):
    """Penalized, biased and plain greedy requests in one batch: every token equals HF's, in
    every topology (the first token sampled by the prefill side, the others by decode steps)
    and with one-step-ahead scheduling (the token in flight counted from the device); prompts
    longer than the chunk in hybrid (chunked prefill)."""
    path, _ = tiny_llama
    prompts, expected = case
    engine = create_engine(EngineConfig(model=path, device="cpu", dtype="float32", max_num_batched_tokens=64,
                                        **MODES[mode]))
    try:
        outs = run_engine(engine, prompts, BATCH)
        if "preempt" in mode:
            stats = engine.stats() if mode.startswith("hybrid") else engine.worker_stats
            assert stats.num_preemptions > 0
    finally:
        engine.shutdown()
    got = [o.outputs[0].token_ids for o in outs]
    assert all(o.error is None for o in outs)
    assert got == expected


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["hybrid", "rapid"])
def test_cuda_graphs_and_async_scheduling_match_hf(tiny_llama, case, mode):
    """On CUDA: decode graphs (the sampler runs after them, on their output buffer, which the
    penalties must not write) and one step ahead (the token in flight read on the device)."""
    path, _ = tiny_llama
    prompts, expected = case
    extra = {"placement": "thread"} if mode == "rapid" else {}
    engine = create_engine(EngineConfig(model=path, device="cuda", dtype="float32", mode=mode,
                                        kv_cache_memory_bytes="128MiB", **extra))
    try:
        if mode == "hybrid":
            assert engine.runner.decode_graphs is not None and engine.async_scheduling
        outs = run_engine(engine, prompts, BATCH)
    finally:
        engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_history_count_must_match_the_rows():
    with pytest.raises(ValueError, match="histories"):
        Sampler()(torch.zeros(2, VOCAB), SamplingBatch.from_params([PLAIN] * 2, [None]))


def test_generate_command_takes_the_penalties():
    from rapidserve.entrypoints.cli import _sampling_params, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--presence-penalty", "0.5",
                                      "--frequency-penalty", "-1", "--repetition-penalty", "1.2"])
    p = _sampling_params(args)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert not _sampling_params(build_parser().parse_args(["generate", "--prompt", "hi"])).penalized
    with pytest.raises(ValueError, match="^repetition_penalty"):
        _sampling_params(build_parser().parse_args(["generate", "--prompt", "hi", "--repetition-penalty", "0"]))


def test_logit_bias_arrays_are_built_once_per_params():
    """A bias may cover the whole vocabulary: its arrays are built once per SamplingParams (not
    per step), and a replaced copy with another bias gets its own."""
    import dataclasses

    from rapidserve.sampling.penalties import logit_bias_arrays

    p = SamplingParams(logit_bias={3: 1.5, 9: -2.0})
    ids, values = logit_bias_arrays(p)
    assert logit_bias_arrays(p)[0] is ids and ids.tolist() == [3, 9] and values.tolist() == [1.5, -2.0]
    q = dataclasses.replace(p, logit_bias={4: 7.0})
    assert logit_bias_arrays(q)[0].tolist() == [4] and q == dataclasses.replace(p, logit_bias={4: 7.0})
