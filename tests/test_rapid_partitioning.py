"""SM partitioning wired into the rapid topology, on CPU: a stand-in mechanism (16 "SMs" in
granules of 8) replaces the hardware's, so the decode worker's per-step decisions, the prefill
worker following them, the stats and the metrics are checked without a GPU."""

import time

import pytest

from conftest import random_prompts

from rapidserve import LLM, SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.serving.front import EngineStats
from rapidserve.entrypoints.openai.metrics import ServerMetrics
from rapidserve.resources.partition import Granted, Partition, PhaseStreams
from rapidserve.resources.policy import PartitionStats
from rapidserve.resources.profile import DecodeTable, PrefillTable, Profile, ProfileMetadata

TOTAL = 16


class FakePartitioner:
    """Partitions of a 16-SM device; no streams (CPU). Records what each side asked for."""

    calls: list = []

    def __init__(self, device, partitioned=True, side="both"):
        self.side, self.total_sms, self.granularity = side, TOTAL, 8
        self.prepared: list[Partition] = []

    def prepare(self, partitions):
        self.prepared = list(partitions)
        FakePartitioner.calls.append((self.side, "prepare", tuple(self.prepared)))
        return self.granted()

    def streams(self, partition):
        assert partition in self.prepared, f"{partition} was not prepared"
        FakePartitioner.calls.append((self.side, "streams", partition))
        return PhaseStreams(None, None)

    def granted(self):
        return [Granted(p, p.decode_share(TOTAL), p.prefill_share(TOTAL)) for p in self.prepared]

    def close(self):
        FakePartitioner.calls.append((self.side, "close", None))


@pytest.fixture
def fake_mechanism(monkeypatch):
    FakePartitioner.calls = []
    monkeypatch.setattr("rapidserve.serving.partitioning.make_partitioner", FakePartitioner)
    return FakePartitioner.calls


def _profile(path) -> str:
    """Full-device decode beside a prefill meets a 20 ms SLO up to batch 2 only; D8 always does."""
    batches, contexts = (1, 4, 16), (16, 1024)
    full = [[5.0, 50.0, 50.0]] * 2
    d8 = [[10.0, 10.0, 10.0]] * 2
    Profile(
        ProfileMetadata("Fake GPU", TOTAL, 8, "green-contexts", "tiny", "float32", "2026-11-22T00:00:00+00:00",
                        "0.1.0", 64),
        DecodeTable((8, TOTAL), contexts, batches, (tuple(map(tuple, d8)), tuple(map(tuple, full))),
                    (tuple(map(tuple, d8)), tuple(map(tuple, full)))),
        PrefillTable((8, TOTAL), (16, 1024), ((2.0, 40.0), (1.0, 20.0))),
    ).save(str(path))
    return str(path)


def _wait_idle(engine, timeout_s: float = 10.0, decode_sms: int | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        engine.step()
        s = engine.worker_stats
        if (s is not None and s.num_running == 0 and s.num_free_blocks == s.num_blocks
                and decode_sms in (None, s.decode_sms)):
            return s
        assert time.monotonic() < deadline


def test_rapid_policy_switches_partitions_and_the_prefill_worker_follows(tiny_model_dir, tmp_path, fake_mechanism):
    path, _ = tiny_model_dir("llama")
    prompts = random_prompts(10, min_len=4, max_len=60)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(model=path, device="cpu").generate(prompts, params)]
    engine = create_engine(EngineConfig(model=path, device="cpu", mode="rapid", placement="thread",
                                        partition_policy="rapid", profile=_profile(tmp_path / "p.json"),
                                        slo_itl_ms=20.0, prefill_max_step_ms=1e-6))  # prompts a layer at a time
    split = Partition.split(8, TOTAL)
    try:
        ids = [engine.add_request(p, params) for p in prompts[:6]]
        done, started = {}, set()
        deadline = time.monotonic() + 60
        while len(started) < 6:  # all six decoding, no prompt left: the whole device
            assert time.monotonic() < deadline
            for o in engine.step():
                started.add(o.request_id)
                if o.finished:
                    done[o.request_id] = o
        # A batch of 6 decodes with prompts to prefill: the policy splits, and the prompts are
        # prefilled beside the split decode.
        ids += [engine.add_request(p, params) for p in prompts[6:]]
        while engine.has_unfinished_requests():
            assert time.monotonic() < deadline
            done.update({o.request_id: o for o in engine.step() if o.finished})
        assert [done[i].outputs[0].token_ids for i in ids] == ref  # partitioning (and layer groups) never change tokens
        stats = _wait_idle(engine, decode_sms=TOTAL)  # no decodes: the policy gives back the whole device
    finally:
        engine.shutdown()
    both = {side: parts for side, what, parts in fake_mechanism if what == "prepare"}
    assert both["decode"] == both["prefill"] == (Partition.FULL, split)  # the same partitions on both sides
    p: PartitionStats = stats.partition
    # full (batch 1 while the first requests arrive) -> split (6 decoding, 4 prompts) -> full
    assert p.switches >= 2 and set(p.seconds) == {"full", "D8/P8"} and p.current == "full"
    assert stats.decode_sms == TOTAL
    # the prefill worker reported each move back: decision to both sides on the new partition
    assert p.reactions >= 2 and p.reaction_buckets[-1] <= p.reactions and p.reaction_max_s >= p.reaction_s / p.reactions
    # the closed loop measured the decode steps (wall time on CPU) against the profile's predictions
    assert p.feedback is not None and p.feedback.residuals
    prefill_moves = [part for side, what, part in fake_mechanism if side == "prefill" and what == "streams"]
    assert prefill_moves[0] == Partition.FULL and split in prefill_moves[1:]  # it followed onto the split
    assert ("decode", "close", None) in fake_mechanism and ("prefill", "close", None) in fake_mechanism


class _PrefillAwarePolicy:
    """The whole device while no prompt waits or runs, a split while one does (as nexus does)."""

    name, partitioned = "prefill-aware", True

    def partitions(self):
        return (Partition.FULL, Partition.split(8, TOTAL))

    def decide(self, state):
        return Partition.split(8, TOTAL) if state.prefill_active else Partition.FULL


def test_a_prompt_is_handed_over_after_the_partition_decided_with_it(tiny_model_dir, fake_mechanism, monkeypatch):
    """A prompt arriving while decode is over-allocated must be prefilled on the split decided
    with it in view: the decode worker tells the prefill worker the new partition *before*
    handing it the prompt (its inbox is read in order), not after, when the prefill may already
    run on the whole device beside decode."""
    from rapidserve.serving import messages as m
    from rapidserve.serving.workers import DecodeWorker

    sent: list = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def put(self, msg):
            sent.append(msg)
            self.inner.put(msg)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    run = DecodeWorker.run

    def recording_run(self):
        self.to_prefill = Recording(self.to_prefill)
        run(self)

    monkeypatch.setattr(DecodeWorker, "run", recording_run)
    monkeypatch.setattr("rapidserve.serving.partitioning.make_policy", lambda *a, **k: _PrefillAwarePolicy())
    path, _ = tiny_model_dir("llama")
    engine = create_engine(EngineConfig(model=path, device="cpu", mode="rapid", placement="thread",
                                        partition_policy="static:8"))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    try:
        for prompt in random_prompts(4, min_len=4, max_len=60):  # one at a time: each arrives while decode has the whole device
            engine.add_request(prompt, params)
            while engine.has_unfinished_requests():
                engine.step()
            _wait_idle(engine, decode_sms=TOTAL)
    finally:
        engine.shutdown()
    told, handed = Partition.FULL, 0
    for msg in sent:
        if isinstance(msg, m.SetPartition):
            told = msg.partition
        elif isinstance(msg, m.PrefillWork):
            assert told == Partition.split(8, TOTAL), f"prompt {msg.request_id} handed over under {told}"
            handed += 1
    assert handed == 4


def test_static_policy_keeps_one_split(tiny_model_dir, fake_mechanism):
    path, _ = tiny_model_dir("llama")
    engine = create_engine(EngineConfig(model=path, device="cpu", mode="rapid", placement="thread",
                                        partition_policy="static:8"))
    try:
        engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        stats = _wait_idle(engine)
        assert engine.stats().decode_sms == 8 and stats.partition.switches == 0
        assert stats.partition.current == "D8/P8"
    finally:
        engine.shutdown()


def test_without_a_mechanism_the_policy_falls_back_to_off(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    engine = create_engine(EngineConfig(model=path, device="cpu", mode="rapid", placement="thread",
                                        partition_policy="static:8"))
    try:
        engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        s = engine.stats()
        assert s.decode_sms == 0 and s.partition is None
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kw,match", [
    ({"mode": "hybrid", "partition_policy": "static:8"}, "applies to the rapid mode"),
    ({"mode": "rapid", "partition_policy": "rapid"}, "needs a profile"),
    ({"mode": "rapid", "partition_policy": "nexus", "profile": "x.json"}, "needs a profile"),
    ({"mode": "rapid", "partition_policy": "sometimes"}, "unknown partition policy"),
    ({"mode": "rapid", "partition_policy": "static:8", "slo_itl_ms": -1.0}, "must be positive"),
])
def test_partition_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_partition_metrics_exported():
    m = ServerMetrics("tiny")
    empty = m.render().decode()
    assert "rapidserve:sm_partition_decode_sms" in empty and "sm_partition_seconds" not in empty
    m.update(EngineStats(1, 0, 10, 20, 0, decode_sms=40, memory_bytes=5 * 2**30,
                         partition=PartitionStats("D40/P92", {"full": 1.5, "D40/P92": 2.0}, 3, 0.86, 3.5)))
    text = m.render().decode()
    assert 'rapidserve:sm_partition_decode_sms{model_name="tiny"} 40.0' in text
    assert 'rapidserve:sm_partition_seconds_total{model_name="tiny",partition="D40/P92"} 2.0' in text
    assert 'rapidserve:sm_partition_current{model_name="tiny",partition="D40/P92"} 1.0' in text
    assert 'rapidserve:sm_partition_current{model_name="tiny",partition="full"} 0.0' in text
    assert 'rapidserve:sm_partition_switches_total{model_name="tiny"} 3.0' in text
    assert 'rapidserve:sm_partition_switches_per_second{model_name="tiny"} 0.86' in text
    assert 'rapidserve:gpu_memory_reserved_bytes{model_name="tiny",process="engine"} 5.36870912e+09' in text


def test_interference_compares_a_static_partition_with_the_profile(tiny_model_dir, tmp_path, fake_mechanism):
    from rapidserve.bench.interference import format_result, measure

    path, _ = tiny_model_dir("llama")
    config = EngineConfig(model=path, device="cpu", mode="rapid", placement="thread", partition_policy="static:8",
                          profile=_profile(tmp_path / "p.json"))
    r = measure(config, num_decodes=3, decode_prompt_len=12, prefill_len=40, num_prefills=2,
                prefill_concurrency=1, alone_steps=3)
    assert r.profiled is not None and r.profiled["decode_sms"] == 8 and r.profiled["partition"] == "D8/P8"
    assert r.profiled["alone_ms"] == pytest.approx(10.0) and r.profiled["beside_prefill_ms"] == pytest.approx(10.0)
    assert "profile, D8/P8 at batch 3" in format_result(r)
