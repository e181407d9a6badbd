"""The disagg topology on CPU: a prefill and a decode instance, each with its own weights and KV
pool, with a real KV copy after each prefill, give the hybrid mode's tokens; every block of both
pools ends free; transfers are counted; an injected transfer failure fails only its request."""

import json
import os
import time

import httpx
import pytest
import torch

from conftest import LiveServer, random_prompts, run_engine

from rapidserve import LLM, SamplingParams
from rapidserve.async_engine import AsyncEngine
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.entrypoints.args import engine_config_from_args
from rapidserve.entrypoints.cli import build_parser
from rapidserve.entrypoints.openai.server import ServerConfig, build_app
from rapidserve.kv.block_manager import BlockManager, blocks_needed
from rapidserve.request import Request
from rapidserve.scheduler.disagg_prefill import DisaggPrefillScheduler
from rapidserve.serving.disagg import INJECT_FAILURE_ENV, DisaggEngine, instance_config
from rapidserve.serving.rapid import WorkerError

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # tiny llama: layers, k/v, block_size, kv heads, head dim, fp32


def _wait_both_pools_free(engine: DisaggEngine, num_transfers: int | None = None, timeout_s: float = 10.0):
    """Step until the decode instance reports every block free and the prefill instance its
    pool free (and, if given, that many transfers counted); returns the final stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        engine.step()
        w, s = engine.worker_stats, engine.stats()
        t = s.kv_transfer
        if (w is not None and w.num_free_blocks == w.num_blocks and w.num_running == 0
                and w.num_prefilling == 0 and t.prefill_free_blocks == t.prefill_total_blocks
                and (num_transfers is None or t.num_transfers == num_transfers)):
            return s
        assert time.monotonic() < deadline, f"blocks not freed: {w} {t}"


@pytest.fixture(scope="module")
def reference(tiny):
    prompts = random_prompts(10)
    return prompts, [o.outputs[0].token_ids for o in LLM(model=tiny, device="cpu").generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def process_engine(tiny):
    # The prefill process inherits the environment at spawn: requests named fail-* fail there.
    old = os.environ.get(INJECT_FAILURE_ENV)
    os.environ[INJECT_FAILURE_ENV] = "fail-*"
    try:
        engine = create_engine(EngineConfig(model=tiny, device="cpu", mode="disagg"))
    finally:
        if old is None:
            del os.environ[INJECT_FAILURE_ENV]
        else:
            os.environ[INJECT_FAILURE_ENV] = old
    assert isinstance(engine, DisaggEngine) and engine.placement == "process"
    yield engine
    engine.shutdown()


def test_process_placement_matches_hybrid_and_counts_transfers(process_engine, reference):
    prompts, ref = reference
    eng = process_engine
    before = eng.stats().kv_transfer
    got = run_engine(eng, prompts, GREEDY, arrivals_every=2, timeout_s=60)
    assert [o.outputs[0].token_ids for o in got] == ref
    s = _wait_both_pools_free(eng, before.num_transfers + len(prompts))
    t = s.kv_transfer
    blocks = sum(blocks_needed(len(p), 16) for p in prompts)
    assert t.num_bytes - before.num_bytes == blocks * BLOCK_BYTES
    assert t.seconds > before.seconds and t.bucket_counts[-1] == t.num_transfers
    # 1 GiB split half and half by default
    assert s.num_total_blocks == t.prefill_total_blocks == (1 << 29) // BLOCK_BYTES


def test_injected_failure_fails_only_its_request_across_processes(process_engine, reference):
    prompts, ref = reference
    eng = process_engine
    before = eng.stats().kv_transfer.num_transfers
    ids = [f"ok-{i}" if i % 4 else f"fail-{i}" for i in range(len(prompts))]
    got = run_engine(eng, prompts, GREEDY, ids=ids, timeout_s=60)
    for i, (rid, out) in enumerate(zip(ids, got)):
        c = out.outputs[0]
        if rid.startswith("fail"):
            assert (c.finish_reason, c.token_ids, out.finished) == ("error", [], True)
            assert "injected" in out.error
        else:
            assert c.finish_reason == "length" and c.token_ids == ref[i] and out.error is None
    _wait_both_pools_free(eng, before + sum(r.startswith("ok") for r in ids))


def test_small_prefill_pool_waits_and_completes(tiny, reference, monkeypatch):
    """The prefill pool (8 blocks) holds one or two of the prompts at a time; the LLM API
    reports the injected failure of request "2" as that request's output only."""
    prompts, ref = reference
    monkeypatch.setenv(INJECT_FAILURE_ENV, "2")
    llm = LLM(model=tiny, device="cpu", mode="disagg", placement="thread",
              kv_cache_memory_bytes=10 * 8 * BLOCK_BYTES, disagg_memory_split=0.1)
    eng = llm.engine
    try:
        assert (eng.prefill_num_kv_blocks, eng.decode_num_kv_blocks) == (8, 72)
        assert sum(blocks_needed(len(p), 16) for p in prompts) > 8
        outs = llm.generate(prompts, GREEDY)
        for i, o in enumerate(outs):
            if i == 2:
                assert o.outputs[0].finish_reason == "error" and "transfer" in o.error
            else:
                assert o.outputs[0].token_ids == ref[i]
        _wait_both_pools_free(eng, len(prompts) - 1)
    finally:
        eng.shutdown()


def test_a_prompt_larger_than_the_prefill_pool_fails_alone(tiny):
    eng = create_engine(EngineConfig(model=tiny, device="cpu", mode="disagg", placement="thread",
                                     num_kv_blocks=4))
    try:
        # the front admits only what fits in both pools (here 4 blocks each)
        with pytest.raises(ValueError, match="more than the whole cache"):
            eng.add_request([1] * 60, GREEDY)
        got = run_engine(eng, [[1] * 40, [2] * 5], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                         timeout_s=60)
        assert all(o.outputs[0].finish_reason == "length" for o in got)
        _wait_both_pools_free(eng)
    finally:
        eng.shutdown()


def test_killing_the_prefill_process_fails_pending_requests(tiny):
    eng = create_engine(EngineConfig(model=tiny, device="cpu", mode="disagg", placement="process"))
    workers = dict(eng.workers)
    try:
        for p in random_prompts(3):
            eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        eng.step()
        workers["prefill"].kill()
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="prefill"):
            while time.monotonic() - t0 < 20:
                eng.step()
        assert time.monotonic() - t0 < 10
    finally:
        eng.shutdown()
    for w in workers.values():
        w.join(timeout=10)
        assert not w.is_alive()


# ---- the server ------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_server_serves_disagg_and_fails_only_the_failed_request(tiny, monkeypatch):
    # The server names a completion's engine requests cmpl-<hex>-<prompt index>: the second
    # prompt of every completion fails its transfer.
    monkeypatch.setenv(INJECT_FAILURE_ENV, "cmpl-*-1")
    eng = AsyncEngine(create_engine(EngineConfig(model=tiny, device="cpu", mode="disagg",
                                                 placement="thread", num_kv_blocks=64)))
    live = LiveServer(build_app(eng, ServerConfig()))
    url = live.start()
    try:
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "ignore_eos": True, "temperature": 0}
        ok = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
        two = {**body, "prompt": [[5, 6, 7, 8], [9, 10, 11]]}
        bad = httpx.post(url + "/v1/completions", json=two, timeout=60)
        assert bad.status_code == 500 and "KV transfer" in bad.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/completions", json={**two, "stream": True}, timeout=60) as r:
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and "KV transfer" in json.loads(events[-2])["error"]["message"]
        again = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(url + "/metrics").text
            if (_metric(text, "rapidserve:kv_cache_free_blocks") == 64
                    and _metric(text, "rapidserve:prefill_kv_cache_free_blocks") == 64
                    and _metric(text, "rapidserve:kv_transfer_total") >= 4):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert _metric(text, "rapidserve:prefill_kv_cache_total_blocks") == 64
        n = _metric(text, "rapidserve:kv_transfer_total")
        assert n == _metric(text, "rapidserve:kv_transfer_seconds_count")
        assert _metric(text, "rapidserve:kv_transfer_bytes_total") == n * BLOCK_BYTES  # one block each
        assert eng.healthy
    finally:
        live.stop()
        eng.shutdown()


# ---- configuration and the prefill instance's scheduler ----------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"disagg_memory_split": 0.0}, "disagg_memory_split"),
    ({"disagg_memory_split": 1.0}, "disagg_memory_split"),
    ({"disagg_memory_split": -0.5}, "disagg_memory_split"),
    ({"disagg_devices": "0"}, "two CUDA device indices"),
    ({"disagg_devices": "a,b"}, "two CUDA device indices"),
    ({"disagg_devices": "0,1,2"}, "two CUDA device indices"),
    ({"disagg_devices": "0,1", "device": "cpu"}, "cannot go with device cpu"),
    ({"disagg_devices": "0,1", "mode": "rapid"}, "applies to the disagg mode"),
    ({"disagg_decode_sms": 0}, "disagg_decode_sms"),
    ({"disagg_decode_sms": 40, "mode": "rapid"}, "disagg_decode_sms"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**{"mode": "disagg", **kw})


def test_cli_flags_and_missing_devices(tiny):
    args = build_parser().parse_args(["serve", "--mode", "disagg", "--disagg-memory-split", "0.25",
                                      "--disagg-devices", "0,1", "--placement", "thread", "--disagg-decode-sms", "40"])
    cfg = engine_config_from_args(args)
    assert (cfg.mode, cfg.disagg_memory_split, cfg.disagg_devices, cfg.disagg_decode_sms) == ("disagg", 0.25, "0,1", 40)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="names CUDA devices"):
            create_engine(EngineConfig(model=tiny, mode="disagg", disagg_devices="0,1"))


def test_instance_configs_split_the_memory():
    cfg = EngineConfig(mode="disagg", device="cpu", disagg_memory_split=0.25)
    p, d = instance_config(cfg, "prefill"), instance_config(cfg, "decode")
    assert (p.kv_cache_memory_bytes, d.kv_cache_memory_bytes) == (1 << 28, 3 << 28)
    assert p.enforce_eager and not d.enforce_eager
    fixed = EngineConfig(mode="disagg", device="cpu", num_kv_blocks=100)
    assert instance_config(fixed, "prefill").num_kv_blocks == instance_config(fixed, "decode").num_kv_blocks == 100
    assert instance_config(fixed, "prefill").kv_cache_memory_bytes is None


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), GREEDY, 16)


def test_prefill_scheduler_fills_its_own_pool_then_waits():
    blocks = BlockManager(4, 16)
    sched = DisaggPrefillScheduler(blocks, max_num_batched_tokens=1000)
    sched.add(_req("a", 40), [7, 8, 9])  # 3 blocks
    sched.add(_req("b", 20), [1, 2])  # 2 blocks: does not fit beside a
    sched.add(_req("huge", 80), [0] * 5)  # 5 blocks: never fits
    with pytest.raises(ValueError, match="needs 1 blocks"):
        sched.add(_req("c", 3), [1, 2])
    batch = sched.schedule()
    assert [s.request.request_id for s in batch.scheduled] == ["a"] and batch.unplaceable == []
    own, dest = sched.transfer_plan("a")
    assert len(own) == 3 and dest == [7, 8, 9] and blocks.num_free_blocks == 1
    sched.finish("a")
    assert blocks.num_free_blocks == 4
    batch = sched.schedule()
    assert [s.request.request_id for s in batch.scheduled] == ["b"]
    assert [r.request_id for r in batch.unplaceable] == ["huge"]
    sched.add(_req("d", 5), [3])
    assert sched.drop("d") and not sched.drop("b")
    sched.finish("b")
    assert blocks.num_free_blocks == 4 and not sched.waiting


@pytest.mark.parametrize("decode_sms, want", [(None, 64), (40, 40), (45, 48)])
def test_static_sm_split_of_each_instance(monkeypatch, decode_sms, want):
    """On one GPU each instance makes the same split (decode the group, prefill the remainder)
    and moves onto its side's stream; a stand-in mechanism of 132 SMs in granules of 8."""
    from rapidserve.resources.partition import Granted, Partition, PhaseStreams
    from rapidserve.serving import disagg

    made, current = [], []

    class Stream:
        def __init__(self, side):
            self.side = side

        def wait_stream(self, other):
            pass

    class Fake:
        total_sms, granularity = 132, 8

        def __init__(self, device, partitioned, side):
            self.side = side
            made.append(self)

        def prepare(self, parts):
            self.parts = list(parts)
            return [Granted(p, p.decode_sms, p.prefill_sms) for p in self.parts]

        def streams(self, p):
            return PhaseStreams(Stream("decode"), Stream("prefill"))

    monkeypatch.setattr(disagg, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(disagg, "make_partitioner", Fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "set_stream", current.append)
    cfg = EngineConfig(mode="disagg", disagg_decode_sms=decode_sms)
    for role in ("decode", "prefill"):
        assert disagg.apply_static_sm_split(cfg, role) is made[-1]
    assert [m.parts for m in made] == [[Partition.split(want, 132)]] * 2
    assert [(m.side, s.side) for m, s in zip(made, current)] == [("decode", "decode"), ("prefill", "prefill")]
