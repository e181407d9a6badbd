"""The rapid topology on CPU: prefill and decode workers (threads or processes) sharing one model
and one KV cache give the hybrid mode's tokens; preemption, aborts, load and a killed worker."""

import os
import random
import signal
import time

import pytest

from conftest import random_prompts, run_engine

from rapidserve import LLM, SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.serving.rapid import RapidEngine, WorkerError

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _tokens(engine, prompts, params, arrivals_every: int = 0, timeout_s: float = 120.0) -> list[list[int]]:
    """Each request's tokens, in submission order (see conftest.run_engine)."""
    outs = run_engine(engine, prompts, params, arrivals_every=arrivals_every, timeout_s=timeout_s)
    return [o.outputs[0].token_ids for o in outs]


def _wait_all_free(engine: RapidEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        engine.step()
        s = engine.worker_stats
        if s is not None and s.num_free_blocks == s.num_blocks and s.num_running == 0 and s.num_prefilling == 0:
            return
        assert time.monotonic() < deadline, f"blocks not freed: {s}"


@pytest.fixture(scope="module")
def reference(tiny):
    prompts = random_prompts(10)
    return prompts, [o.outputs[0].token_ids for o in LLM(model=tiny, device="cpu").generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def process_engine(tiny):
    engine = create_engine(EngineConfig(model=tiny, device="cpu", mode="rapid", placement="process"))
    yield engine
    engine.shutdown()


def _thread_engine(tiny, **kw) -> RapidEngine:
    return create_engine(EngineConfig(model=tiny, device="cpu", mode="rapid", placement="thread", **kw))


@pytest.mark.parametrize("arrivals_every", [0, 2])
def test_thread_placement_matches_hybrid(tiny, reference, arrivals_every):
    prompts, ref = reference
    engine = _thread_engine(tiny)
    try:
        assert _tokens(engine, prompts, GREEDY, arrivals_every) == ref
        _wait_all_free(engine)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("arrivals_every", [0, 3])
def test_process_placement_matches_hybrid(process_engine, reference, arrivals_every):
    prompts, ref = reference
    assert _tokens(process_engine, prompts, GREEDY, arrivals_every) == ref
    _wait_all_free(process_engine)


def test_preemption_under_a_tiny_cache(tiny, reference):
    prompts, ref = reference
    engine = _thread_engine(tiny, num_kv_blocks=12, block_size=16)
    try:
        assert _tokens(engine, prompts, GREEDY) == ref
        _wait_all_free(engine)
        assert engine.worker_stats.num_preemptions > 0
    finally:
        engine.shutdown()


def test_aborts_during_prefill_and_decode(process_engine):
    eng = process_engine
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    a = eng.add_request([1] * 90, long)  # aborted before it can have run
    b = eng.add_request([2] * 10, long)  # aborted while decoding
    c = eng.add_request([3] * 10, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert eng.abort_request(a)
    got_b = 0
    finished = {}  # c may finish in the same batch of events as b's third token
    deadline = time.monotonic() + 30
    while got_b < 3:
        assert time.monotonic() < deadline
        outs = eng.step()
        got_b += sum(len(o.delta_token_ids) for o in outs if o.request_id == b)
        finished.update({o.request_id: o for o in outs if o.finished})
    assert eng.abort_request(b) and not eng.abort_request(b)
    while eng.has_unfinished_requests():
        assert time.monotonic() < deadline
        finished.update({o.request_id: o for o in eng.step() if o.finished})
    assert set(finished) == {c} and len(finished[c].outputs[0].token_ids) == 5
    _wait_all_free(eng)


def test_many_concurrent_short_requests(process_engine, tiny):
    prompts = random_prompts(200, seed=9, max_len=30)
    rng = random.Random(1)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 9), ignore_eos=True) for _ in prompts]
    ref = [o.outputs[0].token_ids for o in LLM(model=tiny, device="cpu").generate(prompts, params)]
    assert _tokens(process_engine, prompts, params, timeout_s=180) == ref  # nothing lost, nothing duplicated, in order
    _wait_all_free(process_engine)


def test_killing_the_prefill_process_fails_pending_requests(tiny):
    eng = create_engine(EngineConfig(model=tiny, device="cpu", mode="rapid", placement="process"))
    workers = dict(eng.workers)
    try:
        for p in random_prompts(4):
            eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        eng.step()
        os.kill(workers["prefill"].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="prefill worker"):
            while time.monotonic() - t0 < 20:
                eng.step()
        assert time.monotonic() - t0 < 10
        with pytest.raises(WorkerError):
            eng.add_request([1, 2, 3], GREEDY)
    finally:
        eng.shutdown()
    for w in workers.values():
        w.join(timeout=10)
        assert not w.is_alive()


def test_interrupted_start_stops_the_workers(tiny, monkeypatch):
    """SIGTERM (the server turns it into SystemExit) or Ctrl-C while the workers start: they are
    stopped, not orphaned holding their share of the GPU."""
    started = []
    real = RapidEngine._next_message

    def interrupted(self, timeout):
        msg = real(self, timeout)
        if msg is None:
            return None
        started.extend(self.workers.values())  # up and running (Ready): interrupted now
        raise SystemExit(143)

    monkeypatch.setattr(RapidEngine, "_next_message", interrupted)
    with pytest.raises(SystemExit):
        create_engine(EngineConfig(model=tiny, device="cpu", mode="rapid", placement="process"))
    monkeypatch.setattr(RapidEngine, "_next_message", real)
    assert len(started) == 2
    for w in started:
        w.join(timeout=15)
        assert not w.is_alive()


def test_rapid_mode_stop_strings_and_chat_match_hybrid(smollm2_llm):
    hybrid = smollm2_llm  # the embedded model in the hybrid mode (tests/conftest.py)
    q = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=20, stop=["Paris"], include_stop_str_in_output=True)
    want = hybrid.chat(q, params)[0].outputs[0]
    rapid = LLM(device="cpu", mode="rapid", placement="thread")
    try:
        got = rapid.chat(q, params)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
            want.text, want.token_ids, want.finish_reason, want.stop_reason)
        assert got.text.endswith("Paris")
        _wait_all_free(rapid.engine)
    finally:
        rapid.engine.shutdown()


def test_stats_have_the_same_shape_in_both_modes(tiny):
    hybrid = create_engine(EngineConfig(model=tiny, device="cpu", num_kv_blocks=50))
    rapid = _thread_engine(tiny, num_kv_blocks=50)
    try:
        for eng in (hybrid, rapid):
            eng.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
            deadline = time.monotonic() + 10
            while eng.stats().num_running == 0:
                assert time.monotonic() < deadline
                eng.step()
            s = eng.stats()
            assert s.num_total_blocks == 50 and s.num_free_blocks < 50 and 0 < s.kv_cache_usage < 1
    finally:
        rapid.shutdown()


def test_generate_command_stops_the_workers_on_an_error(tiny):
    import multiprocessing

    from rapidserve.entrypoints.cli import main

    before = set(multiprocessing.active_children())  # other tests' engines may be running
    # A text prompt for a model without a tokenizer: refused after the workers have started.
    assert main(["generate", "--model", tiny, "--device", "cpu", "--mode", "rapid", "--placement", "process",
                 "--prompt", "hello"]) == 2
    assert not set(multiprocessing.active_children()) - before


def _threads_in_a_worker(q):
    import torch

    from rapidserve.serving.workers import _worker_setup

    _worker_setup(EngineConfig(device="cpu"))
    q.put(torch.get_num_threads())


def test_a_worker_process_takes_half_the_cores():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_threads_in_a_worker, args=(q,))
    p.start()
    try:
        assert q.get(timeout=60) == max(1, (os.cpu_count() or 2) // 2)
    finally:
        p.join(30)
