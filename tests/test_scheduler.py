from rapidserve.kv.block_manager import BlockManager
from rapidserve.request import Request, RequestStatus
from rapidserve.sampling_params import SamplingParams
from rapidserve.scheduler.chunked import ChunkedScheduler, SchedulerConfig

import pytest


def make(rid: str, n_prompt: int, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(temperature=0.0), max_tokens)


def run_step(sched: ChunkedScheduler, token: int = 7):
    """Schedule a step and 'sample' a token for every request that samples."""
    out = sched.schedule()
    for s in out.scheduled:
        if s.samples:
            s.request.append_token(token)
    return out


def test_budget_split_into_prefill_chunks():
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(100, 4))
    a, b = make("a", 25), make("b", 6)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled] == [("a", 0, 10, False)]
    assert out.num_batched_tokens == 10 and a.num_computed_tokens == 10
    out = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 10)]
    out = run_step(sched)  # a's last 5 prompt tokens, then b's first 5
    assert [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled] == [
        ("a", 20, 5, True), ("b", 0, 5, False)]
    out = run_step(sched)  # a decodes first, then b's last prompt token
    assert [(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled] == [
        ("a", 1, True), ("b", 1, True)]
    assert a.num_output_tokens == 2 and b.num_output_tokens == 1


def test_decodes_go_before_unfinished_prefills():
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4), BlockManager(100, 4))
    a = make("a", 2)
    sched.add(a)
    run_step(sched)  # a prefilled (2 tokens), samples
    b = make("b", 10)
    sched.add(b)
    run_step(sched)  # a decode (1) + b chunk (3)
    assert b.num_computed_tokens == 3
    # put b first in the running list to check the order is restored
    sched.running.reverse()
    out = run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert out.scheduled[1].num_new_tokens == 3


def test_max_num_seqs_limits_running():
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), BlockManager(100, 4))
    reqs = [make(str(i), 3) for i in range(4)]
    for r in reqs:
        sched.add(r)
    out = run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["0", "1"]
    assert len(sched.running) == 2 and len(sched.waiting) == 2
    sched.finish(reqs[0], RequestStatus.FINISHED_STOPPED)
    out = run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["1", "2"]


def test_preemption_takes_the_latest_and_recomputes():
    bm = BlockManager(num_blocks=4, block_size=2)  # 8 token slots
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    a, b = make("a", 4), make("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, 5 tokens each after sampling
    assert bm.num_free_blocks == 0
    out = run_step(sched)  # a needs a 3rd block for its 5th token -> b is preempted
    assert out.preempted == [b]
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and not bm.has("b")
    assert b.num_preemptions == 1
    # once a finishes, b is recomputed over its prompt and its sampled token
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    out = run_step(sched)
    assert [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled] == [("b", 0, 5, True)]
    assert bm.num_free_blocks == 4 - 3


def test_a_request_preempts_itself_when_alone_without_room():
    bm = BlockManager(num_blocks=2, block_size=2)
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    a = make("a", 4)
    sched.add(a)
    run_step(sched)
    out = run_step(sched)
    assert out.preempted == [a] and out.scheduled == []
    assert bm.num_free_blocks == 2


def test_no_admission_in_a_step_with_preemption():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    a, b = make("a", 4), make("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    c = make("c", 1)
    sched.add(c)
    out = run_step(sched)
    assert out.preempted and c not in [s.request for s in out.scheduled]


def test_finish_and_abort_free_blocks_from_any_queue():
    bm = BlockManager(num_blocks=10, block_size=2)
    sched = ChunkedScheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100), bm)
    a, b = make("a", 3), make("b", 3)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)  # waiting
    sched.finish(a, RequestStatus.FINISHED_ABORTED)  # running
    assert bm.num_free_blocks == 10 and sched.num_unfinished == 0
    assert a.status is RequestStatus.FINISHED_ABORTED


def test_duplicate_request_id_rejected():
    sched = ChunkedScheduler(SchedulerConfig(), BlockManager(10, 2))
    sched.add(make("a", 2))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make("a", 2))


def test_config_validation():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)
