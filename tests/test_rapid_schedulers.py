"""The rapid topology's schedulers: prefill (whole prompts, FCFS) and decode (owns the blocks)."""

import pytest

from rapidserve.kv.block_manager import BlockManager
from rapidserve.request import Request, RequestStatus
from rapidserve.sampling_params import SamplingParams
from rapidserve.scheduler.chunked import SchedulerConfig
from rapidserve.scheduler.decode import DecodeScheduler
from rapidserve.scheduler.prefill import PrefillJob, PrefillScheduler


def make(rid: str, n: int) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(temperature=0.0), 16)


# ---- prefill -------------------------------------------------------------------------------

def test_prefill_runs_whole_prompts_up_to_the_budget():
    ps = PrefillScheduler(max_num_batched_tokens=10, block_size=4)
    for rid, n in (("a", 4), ("b", 5), ("c", 3), ("d", 12)):
        ps.add(PrefillJob(make(rid, n), list(range(-(-n // 4)))))
    assert [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in ps.schedule()] == [
        ("a", 0, 4, True), ("b", 0, 5, True)]
    assert [s.request.request_id for s in ps.schedule()] == ["c"]
    # longer than the budget: runs alone, unchunked
    assert [(s.request.request_id, s.num_new_tokens) for s in ps.schedule()] == [("d", 12)]
    assert ps.schedule() == []


def test_prefill_tables_and_drop():
    ps = PrefillScheduler(100, 4)
    ps.add(PrefillJob(make("a", 5), [7, 3]))
    assert ps.tables.block_table("a") == [7, 3] and ps.tables.block_size == 4
    assert ps.drop("a") and not ps.drop("a")
    with pytest.raises(KeyError):
        ps.tables.block_table("a")
    with pytest.raises(ValueError, match="needs 2 blocks"):
        ps.add(PrefillJob(make("b", 5), [1]))


# ---- decode --------------------------------------------------------------------------------

def _decode(num_blocks=16, block_size=4, max_num_seqs=8) -> DecodeScheduler:
    return DecodeScheduler(SchedulerConfig(max_num_seqs=max_num_seqs), BlockManager(num_blocks, block_size))


def _prefill(ds: DecodeScheduler, token: int = 9) -> list[str]:
    """Play the prefill worker: finish every job handed over."""
    done = []
    for job in ds.hand_over():
        req = ds.prefill_done(job.request.request_id)
        if req is not None:
            req.append_token(token)
            done.append(req.request_id)
    return done


def test_request_flow_and_block_ownership():
    ds = _decode()
    a, b = make("a", 5), make("b", 3)
    ds.add(a)
    ds.add(b)
    jobs = ds.hand_over()
    assert [j.request.request_id for j in jobs] == ["a", "b"]
    assert jobs[0].block_ids == ds.blocks.block_table("a") and len(jobs[0].block_ids) == 2
    assert set(ds.prefilling) == {"a", "b"} and ds.schedule().scheduled == []
    ds.prefill_done("a").append_token(9)
    out = ds.schedule()  # a joins the batch; b is still prefilling
    assert [(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("a", 5, 1)]
    assert a.num_computed_tokens == 6 and len(ds.blocks.block_table("a")) == 2
    ds.finish(a, RequestStatus.FINISHED_STOPPED)
    assert not ds.blocks.has("a")


def test_seats_limit_handover():
    ds = _decode(max_num_seqs=2)
    for i in range(3):
        ds.add(make(str(i), 2))
    assert [j.request.request_id for j in ds.hand_over()] == ["0", "1"]
    assert ds.hand_over() == []


def test_preemption_sends_the_latest_back_through_prefill():
    ds = _decode(num_blocks=4, block_size=2)  # 8 slots
    a, b = make("a", 4), make("b", 4)
    ds.add(a)
    ds.add(b)
    assert _prefill(ds) == ["a", "b"]  # 2 blocks each, all taken
    out = ds.schedule()  # a needs a 3rd block for its 5th token: b is preempted
    assert out.preempted == [b] and [s.request.request_id for s in out.scheduled] == ["a"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and ds.waiting[0] is b
    assert not ds.blocks.has("b") and ds.num_preemptions == 1
    ds.finish(a, RequestStatus.FINISHED_LENGTH)
    jobs = ds.hand_over()  # b goes back with prompt + its sampled token
    assert jobs[0].request is b and len(jobs[0].block_ids) == 3 and b.num_tokens == 5


def test_abort_in_each_state_frees_blocks_exactly_once():
    ds = _decode()
    reqs = {rid: make(rid, 3) for rid in "wprx"}
    for r in reqs.values():
        ds.add(r)
    ds.hand_over()  # all four in prefill
    ds.prefill_done("r").append_token(1)
    ds.schedule()  # r running
    ds.prefill_done("x").append_token(1)  # x ready
    assert ds.abort("p") is True  # in the prefill worker: only marked
    assert ds.blocks.has("p")
    assert ds.prefill_done("p") is None and not ds.blocks.has("p")  # settled when it reports
    assert ds.abort("r") is False and not ds.blocks.has("r")
    assert ds.abort("x") is False and not ds.blocks.has("x")
    assert ds.abort("w") is True  # still in the prefill worker
    ds.prefill_dropped("w")
    assert ds.blocks.num_free_blocks == ds.blocks.num_blocks and ds.num_unfinished == 0
    assert ds.abort("nope") is False


def test_abort_while_waiting():
    ds = _decode(num_blocks=1, block_size=4)
    a, b = make("a", 4), make("b", 4)
    ds.add(a)
    ds.add(b)
    ds.hand_over()  # only a fits
    assert ds.abort("b") is False and not ds.waiting
