"""One request cannot take the engine down: fields that index the vocabulary are checked at
admission, and a request that still makes a step fail (an injected fault) ends alone with an
error while the others' tokens stay exactly what they would have been (hybrid and rapid)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import POISON_SEED, LiveServer, inject_sampling_fault, random_prompts, run_engine, served_url

from rapidserve import SamplingParams
from rapidserve.async_engine import AsyncEngine
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.serving.hybrid import LLMEngine
from rapidserve.entrypoints.openai.server import ServerConfig, build_app
from rapidserve.runner.model_runner import ModelRunner, is_device_failure

POISON = POISON_SEED  # (greedy: the seed is unused)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
MARKED = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, seed=POISON)


def _engine(tiny: str, mode: str, **kw):
    extra = {"placement": "thread"} if mode == "rapid" else {}
    return create_engine(EngineConfig(model=tiny, device="cpu", mode=mode, num_kv_blocks=64, **extra, **kw))


def _wait_all_free(engine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        engine.step()
        s = engine.stats()
        if s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0:
            return
        assert time.monotonic() < deadline, f"blocks not freed: {s}"


@pytest.fixture(scope="module")
def clean_tokens(tiny):
    prompts = random_prompts(5, seed=11, max_len=30)
    eng = _engine(tiny, "hybrid")
    outs = run_engine(eng, prompts, GREEDY)
    return prompts, [o.outputs[0].token_ids for o in outs]


# ---- validation at admission -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hybrid", "rapid"])
def test_out_of_vocabulary_stop_ids_are_refused_at_admission(tiny, mode):
    """The issue's killer request (a stop id >= the vocabulary with min_tokens >= 1) made the
    sampler raise inside a step and the engine die; it is now a ValueError naming the field,
    with or without min_tokens, and the engine serves the next request."""
    engine = _engine(tiny, mode)
    try:
        for bad in (SamplingParams(stop_token_ids=[10**6], min_tokens=1),
                    SamplingParams(stop_token_ids=[1, 256]),  # the tiny vocabulary is [0, 256)
                    SamplingParams(stop_token_ids=[2**63], min_tokens=2, max_tokens=4)):
            with pytest.raises(ValueError, match=r"^stop_token_ids .*vocabulary \[0, 256\)"):
                engine.add_request([1, 2, 3], bad)
        with pytest.raises(ValueError, match="not valid Unicode"):
            engine.add_request("caf\ud800", GREEDY)  # a lone surrogate: tokenizers raise TypeError
        assert not engine.has_unfinished_requests()
        ok = SamplingParams(temperature=0.0, max_tokens=3, min_tokens=2, stop_token_ids=[255])
        (out,) = run_engine(engine, [[1, 2, 3]], ok)
        assert len(out.outputs[0].token_ids) >= 2 and out.outputs[0].finish_reason in ("stop", "length")
    finally:
        engine.shutdown()


# ---- a failing request fails alone -----------------------------------------------------------


@pytest.mark.parametrize("mode,async_scheduling,after_tokens", [
    ("hybrid", False, 0), ("hybrid", False, 3), ("hybrid", True, 3),
    ("rapid", None, 0),  # the prefill worker's step
    ("rapid", None, 3),  # the decode worker's step
    ("rapid", True, 3),  # ... launched one step ahead (as on a GPU)
])
def test_a_request_failing_in_a_step_fails_alone(tiny, clean_tokens, monkeypatch, mode, async_scheduling,
                                                 after_tokens):
    prompts, clean = clean_tokens
    hits = inject_sampling_fault(monkeypatch, after_tokens)
    engine = _engine(tiny, mode, **({} if async_scheduling is None else {"async_scheduling": async_scheduling}))
    try:
        marked = 2
        params = [MARKED if i == marked else GREEDY for i in range(len(prompts))]
        outs = run_engine(engine, prompts, params)
        assert hits, "the fault was never injected"
        bad = outs[marked]
        assert bad.finished and bad.outputs[0].finish_reason == "error"
        assert "injected fault" in bad.error
        # a fault in a decode step comes after the tokens it had: those were delivered (with
        # async scheduling, but the one in flight, which is discarded)
        assert len(bad.outputs[0].token_ids) == after_tokens - (1 if async_scheduling and after_tokens else 0)
        for i, out in enumerate(outs):
            if i != marked:
                assert out.error is None and out.outputs[0].token_ids == clean[i], f"request {i} changed"
        _wait_all_free(engine)
        # the engine goes on
        (again,) = run_engine(engine, [prompts[0]], GREEDY)
        assert again.outputs[0].token_ids == clean[0]
    finally:
        engine.shutdown()


def test_a_device_failure_is_still_fatal(tiny, monkeypatch):
    """Only faults that can be pinned on a request are isolated: a device error, or one every
    request of a batch hits alone (the engine's own), still stops the engine."""
    engine = LLMEngine(EngineConfig(model=tiny, device="cpu", num_kv_blocks=64))
    real = ModelRunner._sampling_batch

    def device_error(self, rows):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ModelRunner, "_sampling_batch", device_error)
    engine.add_request([1, 2, 3], GREEDY)
    engine.add_request([4, 5, 6], GREEDY)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.step()

    def engine_bug(self, rows):
        raise KeyError("the engine's own bug")

    engine = LLMEngine(EngineConfig(model=tiny, device="cpu", num_kv_blocks=64))
    monkeypatch.setattr(ModelRunner, "_sampling_batch", engine_bug)
    engine.add_request([1, 2, 3], GREEDY)
    engine.add_request([4, 5, 6], GREEDY)
    with pytest.raises(KeyError, match="own bug"):
        engine.step()
    monkeypatch.setattr(ModelRunner, "_sampling_batch", real)


@pytest.mark.parametrize("error,fatal", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),  # retried alone
    (ValueError("banned token id 1000000 is outside the vocabulary [0, 256)"), False),
    (IndexError("index out of range in self"), False),
])
def test_which_step_failures_are_the_device(error, fatal):
    assert is_device_failure(error) is fatal


def test_a_failure_making_one_output_fails_that_request_only(tiny, clean_tokens, monkeypatch):
    """An exception while turning a token into output (detokenizing, stop strings) is that
    request's too."""
    prompts, clean = clean_tokens
    engine = _engine(tiny, "hybrid")
    real = LLMEngine._on_token

    def faulty(self, req, token, decided=None):
        if req.params.seed == POISON and req.num_output_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self, req, token, decided)

    monkeypatch.setattr(LLMEngine, "_on_token", faulty)
    outs = run_engine(engine, prompts[:3], [GREEDY, MARKED, GREEDY])
    assert outs[1].outputs[0].finish_reason == "error" and "injected" in outs[1].error
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [clean[0], clean[2]]
    _wait_all_free(engine)


# ---- over HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hybrid", "rapid"])
def test_the_killer_request_gets_a_400_and_the_server_stays_healthy(tiny, mode, monkeypatch):
    hits = inject_sampling_fault(monkeypatch, after_tokens=2)
    eng = AsyncEngine(_engine(tiny, mode))
    live = LiveServer(build_app(eng, ServerConfig()))
    url = live.start()
    try:
        body = {"prompt": [1, 2, 3], "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [10**6]}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "stop_token_ids" and "vocabulary" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200

        # a request a step fails (the injected fault) ends with an error event; a stream beside
        # it is untouched, and the server stays healthy
        async def both():
            async with httpx.AsyncClient(timeout=60) as http:
                good = {"prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True, "temperature": 0,
                        "stream": True}
                bad = {**good, "seed": POISON}

                async def events(b):
                    async with http.stream("POST", url + "/v1/completions", json=b) as resp:
                        return [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]

                return await asyncio.gather(events(good), events(bad))

        good, bad = asyncio.run(both())
        assert hits
        assert good[-1] == "[DONE]" and len(good) == 8 + 1
        assert all("error" not in json.loads(e) for e in good[:-1])
        assert bad[-1] == "[DONE]" and "injected fault" in json.loads(bad[-2])["error"]["message"]
        full = httpx.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 8, "seed": POISON,
                                                          "temperature": 0}, timeout=30)
        assert full.status_code == 500 and "injected fault" in full.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.post(url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while (s := eng.stats()).num_free_blocks != s.num_total_blocks or eng.num_requests:
            assert time.monotonic() < deadline, f"blocks not freed: {s}"
            time.sleep(0.05)
    finally:
        live.stop()
        eng.shutdown()


# ---- a fatal failure ends the process ----------------------------------------------------------


def test_async_engine_runs_on_fatal_after_failing_requests(tiny):
    """`fail()` (a watchdog's verdict) and a step's exception take one path: pending requests
    fail first, then the on_fatal callbacks run (the server exits on them); a plain shutdown
    runs none."""
    eng = AsyncEngine(_engine(tiny, "hybrid"))
    seen: list[tuple[str, int]] = []
    eng.on_fatal(lambda message: seen.append((message, eng.num_requests)))

    async def main():
        stream = await eng.generate([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await stream.__anext__()
        eng.fail("the decode worker stopped answering")
        with pytest.raises(Exception, match="stopped answering"):
            async for _ in stream:
                pass

    try:
        asyncio.run(main())
        eng._thread.join(10)
        assert len(seen) == 1 and "stopped answering" in seen[0][0]
        assert not eng.healthy and eng.error is not None
        late: list[str] = []
        eng.on_fatal(late.append)  # registered after the fact: called at once
        assert late and "stopped answering" in late[0]
    finally:
        eng.shutdown()
    quiet = AsyncEngine(_engine(tiny, "hybrid"))
    calls: list[str] = []
    quiet.on_fatal(calls.append)
    quiet.shutdown()
    assert calls == [] and quiet.error is None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_exits_non_zero_when_a_worker_dies(tiny):
    """A worker killed under a live stream (rapid, process placement): the stream ends with an
    error event, then the server exits 1 (a supervisor restarts it) instead of lingering with
    /health at 503; no worker is left behind."""
    from test_server import _group_workers

    proc = subprocess.Popen(
        [sys.executable, "-m", "rapidserve.entrypoints.cli", "serve", tiny, "--device", "cpu", "--port", "0",
         "--num-kv-blocks", "32", "--mode", "rapid", "--placement", "process"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = served_url(proc, 120, lambda: proc.stderr.read() if proc.poll() is not None else "slow")
        body = {"prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            workers = _group_workers(proc.pid)
            assert len(workers) == 2
            killed = time.monotonic()
            os.kill(workers[0], signal.SIGKILL)
            events = [x[6:] for x in lines if x.startswith("data: ")]
        assert events[-1] == "[DONE]" and "worker" in json.loads(events[-2])["error"]["message"]
        assert proc.wait(timeout=30) == 1
        detected = time.monotonic() - killed
        assert detected < 15, detected
        assert "the engine failed: " in proc.stderr.read()
        assert not _group_workers(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
