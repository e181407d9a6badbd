"""Parallel sampling (`SamplingParams.n` > 1): the engine front fans a request out into n
children and folds their outputs back (serving/parallel.py), in every topology. The server's
`n` is tested in tests/test_server.py."""

from __future__ import annotations


import pytest

from conftest import POISON_SEED, hf_greedy, inject_sampling_fault, random_prompts, run_engine

from rapidserve import LLM, SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.outputs import CompletionOutput, RequestOutput
from rapidserve.serving.hybrid import LLMEngine
from rapidserve.serving.parallel import ParentRequest, child_params

SEEDED = SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=6, ignore_eos=True)
GREEDY2 = SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama[0], device="cpu", dtype="float32", max_num_batched_tokens=64)


def _tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def test_sampling_params_n_range():
    assert SamplingParams().n == 1 and SamplingParams(n=128).n == 128
    for bad in (0, -1, 129, 2.0, True, "2"):
        with pytest.raises(ValueError, match="^n must"):
            SamplingParams(n=bad)


def test_child_params_and_fold():
    """Child i: n=1, seed + i (None stays None); the fold: one event per child output (the
    parent's id, the child's index and delta), the final after the last child's end with all n in
    index order; a child's error ends the parent at once (one that never reported: "abort")."""
    assert [child_params(SamplingParams(n=3, seed=10), i).seed for i in range(3)] == [10, 11, 12]
    assert child_params(SamplingParams(n=3), 2) == SamplingParams()

    def child(parent, i, tokens, reason=None, error=None):
        return RequestOutput(parent.child_ids[i], None, [1], [CompletionOutput(0, "x", tokens, reason)],
                             finished=reason is not None, delta_token_ids=tokens[-1:], error=error)

    p = ParentRequest("r", 2, None, [1])
    (ev,) = p.fold(child(p, 1, [5]))
    assert (ev.request_id, ev.outputs[0].index, ev.delta_token_ids, ev.finished) == ("r", 1, [5], False)
    assert len(p.fold(child(p, 1, [5, 6], "length"))) == 1 and p.unfinished == {p.child_ids[0]}
    ev, final = p.fold(child(p, 0, [7], "stop"))
    assert ev.outputs[0].finish_reason == "stop" and not ev.finished
    assert final.finished and final.delta_token_ids == [] and final.error is None
    assert [(c.index, c.token_ids, c.finish_reason) for c in final.outputs] == [(0, [7], "stop"), (1, [5, 6], "length")]
    assert p.fold(child(p, 0, [7, 8])) == []  # nothing after the final

    p = ParentRequest("r", 3, None, [1])
    p.fold(child(p, 0, [5]))
    (final,) = p.fold(child(p, 2, [], "error", error="boom"))
    assert final.finished and final.error == "boom"
    assert [(c.index, c.finish_reason) for c in final.outputs] == [(0, "abort"), (1, "abort"), (2, "error")]
    assert final.outputs[1].token_ids == [] and final.outputs[0].token_ids == [5]


def test_seeded_children_differ_reproducibly_and_equal_single_requests(llm):
    """Child i samples with seed + i (vLLM's rule): n=3 gives 3 different completions, the same
    run to run, each what one request with the child's seed gives; one RequestOutput per prompt."""
    prompts = random_prompts(2, seed=11, min_len=3, max_len=80)  # one longer than the chunk
    first = llm.generate(prompts, SEEDED)
    again = llm.generate(prompts, SEEDED)
    assert len(first) == 2
    for p, out, out2 in zip(prompts, first, again):
        assert out.finished and out.error is None and out.prompt_token_ids == p
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in out.outputs)
        assert len({tuple(t) for t in _tokens(out)}) == 3, "the children must differ"
        assert _tokens(out) == _tokens(out2), "a seeded parallel request is reproducible"
    singles = llm.generate([prompts[0]] * 3, [SamplingParams(seed=7 + i, temperature=1.0, max_tokens=6,
                                                              ignore_eos=True) for i in range(3)])
    assert [s.outputs[0].token_ids for s in singles] == _tokens(first[0])


def test_unseeded_children_sample_independently(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True))[0]
    assert len({tuple(t) for t in _tokens(out)}) > 1


def test_greedy_children_are_identical_and_equal_hf(llm, tiny_llama):
    _, hf = tiny_llama
    prompt = random_prompts(1, seed=2, min_len=4, max_len=30)[0]
    out = llm.generate(prompt, GREEDY2)[0]
    assert _tokens(out) == [hf_greedy(hf, prompt, 6)] * 2


def _run(engine, prompts, params):
    """Run to the end; returns each request's final output and every output seen."""
    seen = []
    return run_engine(engine, prompts, params, seen=seen), seen


MODES = {
    "hybrid": dict(mode="hybrid"),
    "rapid-thread-async": dict(mode="rapid", placement="thread", async_scheduling=True),
    "rapid-process": dict(mode="rapid", placement="process"),
    "disagg-thread": dict(mode="disagg", placement="thread"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_gives_the_same_children(llm, tiny_llama, mode):
    """The fan-out is at the front: every topology runs the children as plain requests and gives
    what the hybrid engine gives (seeded children; greedy children equal HF); the events carry
    each child's index and delta, and the parent's final comes once, after them."""
    prompts = random_prompts(2, seed=5, min_len=4, max_len=40)
    want = llm.generate(prompts[:1], SEEDED)[0]
    engine = create_engine(EngineConfig(model=tiny_llama[0], device="cpu", dtype="float32", **MODES[mode]))
    try:
        (seeded, greedy), seen = _run(engine, prompts, [SEEDED, GREEDY2])
    finally:
        engine.shutdown()
    assert _tokens(seeded) == _tokens(want)
    assert _tokens(greedy) == [hf_greedy(tiny_llama[1], prompts[1], 6)] * 2
    events = [o for o in seen if o.request_id == seeded.request_id]
    assert events[-1] is seeded and all(not o.finished and len(o.outputs) == 1 for o in events[:-1])
    for i in range(3):  # each child's deltas put together are its tokens
        deltas = [t for o in events[:-1] if o.outputs[0].index == i for t in o.delta_token_ids]
        assert deltas == seeded.outputs[i].token_ids


def _engine(tiny_llama, num_kv_blocks: int = 64) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_llama[0], device="cpu", dtype="float32", num_kv_blocks=num_kv_blocks))


def test_abort_of_the_parent_ends_every_child_and_frees_their_blocks(tiny_llama):
    engine = _engine(tiny_llama)
    free = engine.blocks.num_free_blocks
    rid = engine.add_request([3, 4, 5, 6], SamplingParams(n=4, temperature=1.0, max_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 4 and engine.blocks.num_free_blocks < free
    assert engine.abort_request(rid)
    assert not engine.has_unfinished_requests() and engine.blocks.num_free_blocks == free
    assert not engine.abort_request(rid)
    # An abort by a child's id ends its parent too (a child is never left without one).
    rid = engine.add_request([3, 4, 5, 6], SamplingParams(n=2, max_tokens=40, ignore_eos=True))
    engine.step()
    assert engine.abort_request(f"{rid}#1")
    assert not engine.has_unfinished_requests() and engine.blocks.num_free_blocks == free
    assert engine.step() == []


def test_admission_refuses_the_whole_request(tiny_llama):
    """The checks apply once: a request that cannot fit admits no child; a taken id is refused."""
    engine = _engine(tiny_llama, num_kv_blocks=4)
    free = engine.blocks.num_free_blocks
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request([1, 2, 3], SamplingParams(n=3, max_tokens=4 * engine.block_size))
    assert not engine.has_unfinished_requests() and engine.blocks.num_free_blocks == free
    engine.add_request([1, 2], SamplingParams(max_tokens=2), request_id="a#1")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], SamplingParams(n=2, max_tokens=2), request_id="a")
    assert list(engine._requests) == ["a#1"]  # nothing of the refused parent was submitted
    engine.add_request([1, 2], SamplingParams(n=2, max_tokens=2), request_id="b")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], SamplingParams(max_tokens=2), request_id="b")


def test_a_failing_child_fails_the_parent(tiny_llama, monkeypatch):
    """A child whose step fails (cut out of its batch, ModelRunner.submit_isolated) ends the
    parent at once: its final carries the error, the siblings are aborted and their blocks freed;
    other requests go on."""
    inject_sampling_fault(monkeypatch, after_tokens=2)  # the marked child's third token
    engine = _engine(tiny_llama)
    free = engine.blocks.num_free_blocks
    marked = SamplingParams(n=3, seed=POISON_SEED - 1, temperature=1.0, max_tokens=8, ignore_eos=True)  # child 1's
    (parent, other), seen = _run(engine, [[7, 8, 9], [10, 11]], [marked, GREEDY2])
    assert parent.error is not None and "injected" in parent.error
    # The siblings were aborted with the parent: nothing of theirs comes out afterwards.
    assert {o.request_id for o in seen} == {parent.request_id, other.request_id}
    assert seen.index(parent) == max(i for i, o in enumerate(seen) if o.request_id == parent.request_id)
    assert [c.finish_reason for c in parent.outputs] == ["abort", "error", "abort"]
    assert len(parent.outputs[1].token_ids) == 2
    assert other.error is None and [c.finish_reason for c in other.outputs] == ["length"] * 2
    assert engine.blocks.num_free_blocks == free

