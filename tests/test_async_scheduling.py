"""One-step-ahead (async) scheduling: step N+1 is planned and launched before step N's tokens
are read back. Tokens must equal the synchronous engine's in every topology, a request that
stopped at step N must not emit the token step N+1 made for it, and no block may be reused
while a step in flight can still write it."""

import random
import time

import numpy as np
import pytest

from conftest import random_prompts, run_engine

from rapidserve import LLM, SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.serving.hybrid import LLMEngine
from rapidserve.kv.block_manager import BlockManager
from rapidserve.request import Request, RequestStatus
from rapidserve.runner.inputs import StepInputs
from rapidserve.scheduler.chunked import ChunkedScheduler, SchedulerConfig
from rapidserve.scheduler.decode import DecodeScheduler

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _ends(outs) -> list[tuple[list[int], str]]:
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


def _outs(llm: LLM, prompts, params) -> list[tuple[list[int], str]]:
    return _ends(llm.generate(prompts, params))


# ---- the pieces ------------------------------------------------------------------------------


def test_scheduler_schedules_a_pending_token_like_a_known_one():
    blocks = BlockManager(16, 4)
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    req = Request("a", [1, 2, 3], GREEDY, max_tokens=2)
    sched.add(req)
    (first,) = sched.schedule().scheduled
    assert (first.start, first.num_new_tokens, first.samples) == (0, 3, True)
    req.num_pending = 1  # its first token is being sampled on the device
    (second,) = sched.schedule().scheduled
    assert (second.start, second.num_new_tokens, second.samples) == (3, 1, True)
    req.num_pending = 2 - 1  # the first landed...
    req.append_token(7)
    # ...and the second is in flight: it is the last (max_tokens 2), so nothing is scheduled.
    assert req.at_max_tokens and sched.schedule().scheduled == []


def test_a_request_preempted_with_a_token_in_flight_waits_for_it():
    blocks = BlockManager(2, 4)
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    a, b = Request("a", [1] * 4, GREEDY, 16), Request("b", [2] * 3, GREEDY, 16)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    a.num_pending = b.num_pending = 1
    out = sched.schedule()  # a needs a second block: b is preempted
    assert out.preempted == [b] and [s.request for s in out.scheduled] == [a]
    assert b.num_pending == 1 and b in sched.waiting
    a.num_pending = 2  # a still has a token in flight; b is not admitted before its own lands
    assert all(s.request is not b for s in sched.schedule().scheduled)


def test_decode_scheduler_finishes_a_waiting_request():
    blocks = BlockManager(4, 4)
    sched = DecodeScheduler(SchedulerConfig(4, 64), blocks)
    req = Request("a", [1, 2], GREEDY, 4)
    sched.add(req)
    sched.finish(req, RequestStatus.FINISHED_STOPPED)
    assert not sched.waiting and sched.num_unfinished == 0


def test_block_manager_holds_blocks_freed_while_a_step_runs():
    blocks = BlockManager(4, 4)
    assert blocks.allocate("a", 8) and blocks.allocate("b", 4)
    blocks.fence(1)
    blocks.free("a")  # step 1 may still write a's blocks
    assert (blocks.num_free_blocks, blocks.num_held_blocks) == (1, 2)
    blocks.fence(2)
    blocks.free("b")  # step 2 may still write b's
    blocks.retire(1)
    assert (blocks.num_free_blocks, blocks.num_held_blocks) == (3, 1)
    assert not blocks.allocate("c", 16)  # held blocks are not handed out
    blocks.retire(2)
    assert (blocks.num_free_blocks, blocks.num_held_blocks) == (4, 0)
    assert blocks.allocate("c", 4)
    blocks.free("c")  # nothing in flight: free at once
    assert blocks.num_free_blocks == 4


def test_step_inputs_mark_the_pending_token():
    blocks = BlockManager(8, 4)
    a, b = Request("a", [5, 6, 7], GREEDY, 8), Request("b", [9, 9, 9, 9, 9], GREEDY, 8)
    blocks.allocate("a", 4)
    blocks.allocate("b", 5)
    a.num_computed_tokens, a.num_pending = 3, 1
    from rapidserve.scheduler.chunked import ScheduledRequest

    inp = StepInputs([ScheduledRequest(a, 3, 1, True), ScheduledRequest(b, 0, 5, True)], blocks)
    assert inp.pending_index.tolist() == [0] and inp.pending_request_ids == ["a"]
    assert inp.input_ids.tolist() == [0, 9, 9, 9, 9, 9] and inp.positions[0] == 3
    np.testing.assert_array_equal(inp.logits_indices, [0, 5])


# ---- the hybrid engine -----------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(max_num_batched_tokens=16),
    dict(max_num_batched_tokens=100_000),
    dict(num_kv_blocks=12, block_size=16, max_num_batched_tokens=64),  # preemption
    dict(max_num_seqs=2),
])
def test_hybrid_async_equals_sync(tiny, kw):
    prompts = random_prompts(8)
    ref = _outs(LLM(model=tiny, device="cpu", async_scheduling=False, **kw), prompts, GREEDY)
    llm = LLM(model=tiny, device="cpu", async_scheduling=True, **kw)
    assert _outs(llm, prompts, GREEDY) == ref
    llm.engine.step()  # the last step in flight (tokens of finished requests) is read and dropped
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    if "num_kv_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0


def test_hybrid_async_stops_discard_the_extra_token(tiny):
    prompts = random_prompts(8, seed=5)
    sync = LLM(model=tiny, device="cpu", async_scheduling=False)
    free_run = _outs(sync, prompts, GREEDY)
    # Stop on tokens the requests really produce, at different steps: requests end mid-batch
    # while their next step is already launched.
    stop_ids = sorted({toks[i % 7 + 2] for i, (toks, _) in enumerate(free_run)})
    params = [
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=stop_ids, min_tokens=2),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=stop_ids),
        SamplingParams(temperature=1.0, seed=11, max_tokens=12, stop_token_ids=stop_ids[:2]),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=16, ignore_eos=True),
    ]
    params = [params[i % len(params)] for i in range(len(prompts))]
    want = _outs(sync, prompts, params)
    got = _outs(LLM(model=tiny, device="cpu", async_scheduling=True), prompts, params)
    assert got == want
    assert any(reason == "stop" for _, reason in got) and any(len(t) < 12 for t, _ in got)


def test_hybrid_async_arrivals_and_aborts(tiny):
    prompts = random_prompts(6)
    ref = _outs(LLM(model=tiny, device="cpu"), prompts, GREEDY)
    eng = LLMEngine(EngineConfig(model=tiny, device="cpu", max_num_batched_tokens=32, async_scheduling=True,
                                 num_kv_blocks=64))
    done, ids = {}, []
    for p in prompts:
        ids.append(eng.add_request(p, GREEDY))
        for out in eng.step() + eng.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
    victim = eng.add_request([7] * 40, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.abort_request(victim)  # while its next step is in flight
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id != victim
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
    assert [done[i] for i in ids] == ref
    eng.step()
    assert eng.blocks.num_free_blocks == 64


# ---- the rapid topology ----------------------------------------------------------------------


def _wait_all_free(engine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        engine.step()
        s = engine.worker_stats
        if s is not None and s.num_free_blocks == s.num_blocks and s.num_running == 0:
            return
        assert time.monotonic() < deadline, f"blocks not freed: {s}"


@pytest.mark.parametrize("placement,kw", [
    ("thread", {}),
    ("thread", dict(num_kv_blocks=12, block_size=16)),  # preemption with tokens in flight
    ("process", {}),
])
def test_rapid_async_equals_hybrid(tiny, placement, kw):
    prompts = random_prompts(10)
    rng = random.Random(2)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 17), ignore_eos=True) for _ in prompts]
    ref = _outs(LLM(model=tiny, device="cpu", **kw), prompts, params)
    stop_ids = sorted({t[len(t) // 2] for t, _ in ref if len(t) > 2})
    stopping = [SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=stop_ids) for _ in prompts]
    ref_stop = _outs(LLM(model=tiny, device="cpu", **kw), prompts, stopping)
    engine = create_engine(EngineConfig(model=tiny, device="cpu", mode="rapid", placement=placement,
                                        async_scheduling=True, **kw))
    try:
        assert _ends(run_engine(engine, prompts, params)) == ref
        assert _ends(run_engine(engine, prompts, stopping)) == ref_stop
        _wait_all_free(engine)
        if kw:
            assert engine.worker_stats.num_preemptions > 0
    finally:
        engine.shutdown()
