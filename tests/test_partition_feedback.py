"""The closed loop of the rapid and nexus policies on synthetic step times (resources/feedback.py):
residual corrections per (partition, context bucket) and the ITL guard with hysteresis."""

import pytest

from test_partition_policy import TOTAL, decode_beside, split, state, synthetic_profile

from rapidserve.resources.feedback import (
    Feedback,
    FeedbackConfig,
    ItlGuard,
    ResidualKey,
    ResidualTracker,
    context_bucket,
    p95,
)
from rapidserve.resources.partition import Partition
from rapidserve.resources.policy import NexusPolicy, RapidPolicy, StepState
from test_rapid_partitioning import fake_mechanism  # noqa: F401 (a fixture)

B, CTX, WAITING = 64, 4096, 8192  # beside prompts longer than the profile measured: rapid splits


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


def busy(batch: int = B, ctx: float = CTX) -> StepState:
    return state(batch, ctx, waiting=WAITING)


def run_steps(policy, steps: int, slowdown, st: StepState | None = None) -> list[Partition]:
    """Decide and 'run' `steps` decode steps; each takes the policy's open-loop prediction times
    slowdown(partition). Returns the partitions the steps ran in."""
    st = st or busy()
    ran = []
    for _ in range(steps):
        p = policy.decide(st)
        ran.append(p)
        policy.observe(p, st, slowdown(p) * policy.base_decode_ms(p, st) / 1e3)
    return ran


# ---- residuals ---------------------------------------------------------------------------------


def test_context_buckets():
    assert [context_bucket(c) for c in (0, 1, 1023, 1024, 1500, 8448, 8192.5)] == [1, 1, 512, 1024, 1024, 8192, 8192]


def test_residual_ewma_min_samples_and_clamp():
    t = ResidualTracker(FeedbackConfig(window=3, min_samples=2, max_residual=4.0))  # alpha 0.5
    k = ResidualKey(split(32), 8192, True)
    t.observe(k, 1.4, 1.0)
    assert t.factor(k) == 1.0  # one sample is not enough
    t.observe(k, 1.0, 1.0)
    assert t.factor(k) == pytest.approx(1.2)
    assert t.observe(k, 100.0, 1.0) == 4.0  # clamped: one wild step
    assert t.factor(k) == pytest.approx(2.6)
    assert t.snapshot() == {("D32/P100", "8K", "beside"): pytest.approx(2.6)}


def test_an_unmeasured_split_borrows_its_siblings_residual_but_not_the_full_device():
    t = ResidualTracker(FeedbackConfig(min_samples=1))
    t.observe(ResidualKey(split(32), 8192, True), 1.4, 1.0)
    t.observe(ResidualKey(split(48), 8192, True), 1.2, 1.0)
    assert t.factor(ResidualKey(split(40), 8192, True)) == pytest.approx(1.3)
    assert t.factor(ResidualKey(split(40), 1024, True)) == 1.0  # another context bucket
    assert t.factor(ResidualKey(split(40), 8192, False)) == 1.0  # decode alone
    assert t.factor(ResidualKey(Partition.FULL, 8192, True)) == 1.0  # over-allocation: its own only


@pytest.mark.parametrize("kw", [{"window": 0}, {"min_samples": 0}, {"max_residual": 1.0},
                                {"guard_hysteresis": 1.0}, {"release_windows": 0}])
def test_feedback_config_errors(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        FeedbackConfig(**kw)


def test_residual_bad_input():
    t = ResidualTracker(FeedbackConfig())
    k = ResidualKey(split(32), 8192, True)
    with pytest.raises(ValueError, match="predicted_s"):
        t.observe(k, 0.01, 0.0)
    with pytest.raises(ValueError, match="measured_s"):
        t.observe(k, float("nan"), 0.01)


# ---- the policies correct their predictions ------------------------------------------------------


def _slo_for_d32() -> float:
    return decode_beside(32, B, CTX) * 1.01  # D32 is the fewest decode SMs predicted to meet it


@pytest.mark.parametrize("slow,then", [(1.4, 64), (1.15, 56)])
def test_rapid_leaves_a_split_40_percent_slower_than_predicted(profile, slow, then):
    """The H100 case: every split at this context steps ~40 % slower than the profile says."""
    slo = _slo_for_d32()
    open_loop = RapidPolicy(profile, slo, feedback=None)
    assert set(run_steps(open_loop, 20, lambda p: slow)) == {split(32)}  # open loop: it never learns
    policy = RapidPolicy(profile, slo, feedback=FeedbackConfig(min_samples=2))
    ran = run_steps(policy, 20, lambda p: slow)
    assert ran[:2] == [split(32)] * 2 and split(32) not in ran[2:]  # left after the 2 steps that measured it
    # ...at once for the fewest decode SMs whose *measured* step meets the SLO (the largest split
    # if none does: at 1.4x none does in this profile), and it stays there
    meets = [n for n in (32, 40, 48, 56, 64) if slow * decode_beside(n, B, CTX) <= slo]
    assert (meets[0] if meets else 64) == then
    assert set(ran[2:]) == {split(then)}
    stats = policy.feedback_stats()
    assert stats.residuals[("D32/P100", "4K", "beside")] == pytest.approx(slow)


def test_rapid_leaves_the_one_slow_split_and_does_not_come_back(profile):
    policy = RapidPolicy(profile, _slo_for_d32(), feedback=FeedbackConfig(min_samples=2))
    ran = run_steps(policy, 40, lambda p: 1.4 if p == split(32) else 1.0)
    first_other = next(i for i, p in enumerate(ran) if p != split(32))
    assert first_other <= 2 and split(32) not in ran[first_other:]
    assert all(p.decode_sms > 32 for p in ran[first_other:])


def test_rapid_trusts_a_split_that_is_faster_than_predicted(profile):
    slo = decode_beside(40, B, CTX) * 1.01  # D40 predicted to meet it; D32 measured 30 % faster does too
    policy = RapidPolicy(profile, slo, feedback=FeedbackConfig(min_samples=1))
    # the policy only ever measures the split it runs in: seed a measurement of D32
    policy.observe(split(32), busy(), 0.7 * policy.base_decode_ms(split(32), busy()) / 1e3)
    assert policy.decide(busy()) == split(32)


def test_residuals_are_per_context_bucket(profile):
    slo = _slo_for_d32()
    policy = RapidPolicy(profile, slo, feedback=FeedbackConfig(min_samples=1))
    run_steps(policy, 4, lambda p: 1.4)
    assert policy.decide(busy()) != split(32)
    # a short context has not been measured slow: the profile's answer again
    short = busy(ctx=1024)
    assert policy.decide(short) == RapidPolicy(profile, slo, feedback=None).decide(short)


@pytest.mark.parametrize("slow,then", [(1.4, 64), (1.15, 56)])
def test_nexus_leaves_a_split_40_percent_slower_than_predicted(profile, slow, then):
    slo = decode_beside(32, B, CTX) * 1.01
    # the TTFT SLO makes prefill pressure dominate: nexus holds the fewest decode SMs meeting the ITL SLO
    open_loop = NexusPolicy(profile, slo, slo_ttft_ms=50.0, feedback=None)
    assert set(run_steps(open_loop, 20, lambda p: slow)) == {split(32)}
    policy = NexusPolicy(profile, slo, slo_ttft_ms=50.0, feedback=FeedbackConfig(min_samples=2))
    ran = run_steps(policy, 30, lambda p: slow)
    # an urgent switch, without the hold and confirmation steps of a switch for a gain: to the
    # fewest decode SMs whose measured step meets the SLO (the fastest decode if none does)
    assert ran[:2] == [split(32)] * 2 and set(ran[2:]) == {split(then)}


@pytest.mark.parametrize("policy_class", [RapidPolicy, NexusPolicy])
def test_a_decode_step_alone_is_judged_against_decode_alone(profile, policy_class):
    """A step with no prefill beside, measured exactly as the step-cost model prices decode alone,
    leaves a residual of 1 (before: rapid priced it beside a profiled prefill, and every such
    residual sat at the clamp, 0.25, in /metrics)."""
    policy = policy_class(profile, 30.0, feedback=FeedbackConfig(min_samples=1))
    alone = state(B, CTX, running=False)  # no prompt waiting or prefilling
    for p in (Partition.FULL, split(32)):
        measured = policy.model.decode_step_s(alone.decode_batch, round(B * CTX), p.decode_sms, ())
        policy.observe(p, alone, measured)
    residuals = policy.feedback_stats().residuals
    assert len(residuals) == 2 and list(residuals.values()) == pytest.approx([1.0, 1.0])


def test_observe_is_a_no_op_open_loop_and_for_empty_steps(profile):
    policy = RapidPolicy(profile, 30.0, feedback=None)
    policy.observe(split(32), busy(), 1.0)
    assert policy.feedback_stats() is None
    closed = RapidPolicy(profile, 30.0)
    closed.observe(split(32), state(0, 0, waiting=WAITING), 1.0)  # no decode in that step
    assert closed.feedback_stats().residuals == {}


# ---- the ITL guard -------------------------------------------------------------------------------


def test_guard_trips_raises_the_floor_and_releases_with_hysteresis():
    cfg = FeedbackConfig(window=10, guard_hysteresis=0.2, release_windows=2)
    g = ItlGuard(0.030, (16, 32, 48), cfg)
    for _ in range(9):
        g.observe(split(32), 0.020)
    g.observe(split(32), 0.045)  # the p95 of 10 steps is their maximum
    assert g.trips == 1 and g.floor == 48 and g.last_p95_s == pytest.approx(0.045)
    assert not g.allows(split(32)) and not g.allows(Partition.FULL) and g.allows(split(48))
    for _ in range(30):  # in the hysteresis band (0.024-0.030 s): neither trips nor releases
        g.observe(split(48), 0.027)
    assert (g.trips, g.releases, g.floor) == (1, 0, 48)
    for _ in range(10):
        g.observe(split(48), 0.020)
    assert g.floor == 48  # one calm window is not enough
    for _ in range(10):
        g.observe(split(48), 0.020)
    assert (g.releases, g.floor) == (1, 32)
    for _ in range(40):
        g.observe(split(32), 0.020)
    assert g.floor == 0 and g.allows(Partition.FULL)


def test_guard_from_over_allocation_and_at_the_largest_split():
    cfg = FeedbackConfig(window=4)
    g = ItlGuard(0.030, (16, 32), cfg)
    for _ in range(4):
        g.observe(Partition.FULL, 0.050)
    assert g.floor == 16 and not g.allows(Partition.FULL)
    for _ in range(8):
        g.observe(split(32), 0.050)
    assert g.floor == 32 and g.trips == 3  # nothing larger: it stays on the largest split


def test_guard_does_not_oscillate():
    """Beside this prefill D32's tail misses the SLO and D48 meets it with room: each release
    that proves early doubles the calm time the next needs, so the guard settles on D48."""
    cfg = FeedbackConfig(window=16, release_windows=2)
    policy_floor = ItlGuard(0.030, (32, 48), cfg)
    on = []
    for _ in range(16 * 200):
        p = split(48) if policy_floor.floor >= 48 else split(32)  # the policy's wish is D32
        on.append(p)
        policy_floor.observe(p, 0.040 if p == split(32) else 0.018)
    switches = sum(a != b for a, b in zip(on, on[1:]))
    assert policy_floor.trips <= 8 and switches <= 2 * policy_floor.trips
    # each try of D32 came later than the one before, and most of the time it ran on D48
    tries = [i for i in range(1, len(on)) if on[i] == split(32) and on[i - 1] == split(48)]
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert len(tries) >= 3 and gaps == sorted(gaps) and gaps[-1] >= 16 * 60
    assert on.count(split(48)) / len(on) > 0.9


def test_policies_respect_the_guard(profile):
    cfg = FeedbackConfig(window=4, min_samples=100)  # residuals out of the way: the guard alone
    slo = 1000.0  # every prediction meets it: without the guard rapid over-allocates...
    policy = RapidPolicy(profile, slo, overalloc_max_batch=128, feedback=cfg)
    st = busy()
    assert policy.decide(st) == Partition.FULL
    for _ in range(4):  # ...until the measured p95 beside the prefill passes the SLO
        policy.observe(Partition.FULL, st, 2.0)
    assert policy.decide(st) == split(16)
    assert policy.decide(state(B, CTX, waiting=0, running=False)) == Partition.FULL  # decode alone: the guard has no say
    nexus = NexusPolicy(profile, slo, feedback=cfg)
    first = nexus.decide(st)
    for _ in range(4):
        nexus.observe(first, st, 2.0)
    after = nexus.decide(st)  # urgent: the floor is above the partition in force
    assert not after.is_full and after.decode_sms > (first.decode_sms or 0)
    stats = nexus.feedback_stats()
    assert stats.guard_trips == 1 and stats.guard_floor_sms == after.decode_sms


def test_feedback_guard_sees_only_steps_beside_a_prefill():
    f = Feedback(FeedbackConfig(window=2), 30.0, (16, 32))
    for _ in range(4):
        f.observe(split(16), 1024, False, 1.0, 0.01)
    assert f.stats().guard_trips == 0 and f.allows(Partition.FULL, beside=True)
    f.observe(split(16), 1024, True, 1.0, 0.01)
    f.observe(split(16), 1024, True, 1.0, 0.01)
    assert f.stats().guard_trips == 1 and f.allows(Partition.FULL, beside=False)
    assert not f.allows(Partition.FULL, beside=True)


def test_p95():
    assert p95([1.0] * 19 + [5.0]) == 1.0
    assert p95([1.0] * 18 + [5.0, 6.0]) == 5.0
    assert p95([3.0]) == 3.0


# ---- what the server and the sweep show ------------------------------------------------------------


def test_closed_loop_metrics_and_sweep_summary():
    from prometheus_client import CollectorRegistry, generate_latest

    from rapidserve.bench.sweep import feedback_summary, parse_partition_times
    from rapidserve.entrypoints.openai.metrics import _PartitionCollector
    from rapidserve.resources.feedback import FeedbackStats
    from rapidserve.resources.policy import REACTION_BUCKETS, PartitionStats

    registry, collector = CollectorRegistry(), _PartitionCollector("m")
    registry.register(collector)

    def stats(reactions, total_s, trips, residuals, buckets=None):
        buckets = buckets or (0,) * 4 + (reactions,) * (len(REACTION_BUCKETS) - 4)
        return PartitionStats("D32/P100", {"full": 1.0, "D32/P100": 2.0}, reactions, 0.1, 3.0, reactions, total_s,
                              0.012, buckets, FeedbackStats(residuals, trips, 0, 48 if trips else 0, 0.041))

    collector.stats = stats(2, 0.010, 1, {("D32/P100", "8K", "beside"): 1.38})
    text = generate_latest(registry).decode()
    assert 'rapidserve:sm_partition_decode_residual{context="8K",model_name="m",partition="D32/P100",phase="beside"} 1.38' in text
    assert 'rapidserve:sm_partition_itl_guard_trips_total{model_name="m"} 1.0' in text
    assert 'rapidserve:sm_partition_itl_guard_floor_sms{model_name="m"} 48.0' in text
    assert 'rapidserve:sm_partition_reaction_seconds_bucket{le="0.025",model_name="m"} 2.0' in text
    assert 'rapidserve:sm_partition_reaction_seconds_count{model_name="m"} 2.0' in text
    before = parse_partition_times(text)
    assert before.guard_trips == 1 and before.reactions == 2 and before.residuals == {"D32/P100@8K beside": 1.38}
    collector.stats = stats(6, 0.050, 3, {("D32/P100", "8K", "beside"): 1.40, ("D48/P84", "8K", "beside"): 1.10})
    after = parse_partition_times(generate_latest(registry).decode())
    assert feedback_summary(before, after) == ("reaction 10.0 ms mean (4 switches), max since start 12.0 ms; "
                                               "ITL guard 2 trips; residuals D32/P100@8K beside 1.40, "
                                               "D48/P84@8K beside 1.10")
    assert feedback_summary(None, None) == ""
    collector.stats = PartitionStats("full", {"full": 1.0}, 0, 0.0, 1.0)  # open loop, no switch yet
    open_loop = parse_partition_times(generate_latest(registry).decode())
    assert open_loop.guard_trips is None and feedback_summary(None, open_loop) == ""


def test_the_engine_config_turns_the_closed_loop_off(profile, tmp_path):
    from rapidserve.config import EngineConfig
    from rapidserve.serving.partitioning import build_policy

    path = tmp_path / "profile.json"
    profile.save(path)

    class Partitioner:
        total_sms, granularity = TOTAL, 8

    for kind in ("rapid", "nexus"):
        def config(**kw):
            return EngineConfig(model="m", mode="rapid", partition_policy=kind, profile=str(path), slo_itl_ms=50.0, **kw)

        assert build_policy(config(), Partitioner()).feedback is not None  # on by default
        assert build_policy(config(closed_loop=False), Partitioner()).feedback is None


# ---- the decode worker's side: each step's measured time, paired with its decision ----------------


def test_decode_partitioning_pairs_each_measured_step_with_its_decision(fake_mechanism, monkeypatch):  # noqa: F811
    """Under async scheduling a step's tokens (and time) come back after the next step was decided:
    observe() hands the policy each step's own partition and state, in launch order."""
    from types import SimpleNamespace

    import torch

    from rapidserve.config import EngineConfig
    from rapidserve.serving.partitioning import DecodePartitioning
    from test_rapid_partitioning import TOTAL as FAKE_TOTAL

    seen = []

    class Recording:
        name, partitioned = "recording", True

        def partitions(self):
            return (Partition.FULL, Partition.split(8, FAKE_TOTAL))

        def decide(self, st):
            return self.partitions()[st.decode_batch % 2]

        def observe(self, p, st, measured_s):
            seen.append((p, st.decode_batch, measured_s))

        def feedback_stats(self):
            return "stats"  # not None: a closed-loop policy

    monkeypatch.setattr("rapidserve.serving.partitioning.make_policy", lambda *a, **k: Recording())
    part = DecodePartitioning(EngineConfig(mode="rapid", partition_policy="static:8"), torch.device("cpu"))
    assert part.closed_loop
    runner = SimpleNamespace(partition_graph_keys=set(), use_partition=lambda key, sms: None, timeline=None)
    result = lambda batch, t: SimpleNamespace(scheduled=[0] * batch, device_s=lambda: t)  # noqa: E731
    part.before_step(state(3, waiting=1), runner)  # step 1 launched
    part.before_step(state(0, waiting=1), runner)  # nothing launched: no time will come back
    part.before_step(state(2, waiting=1), runner)  # step 2 launched before step 1's tokens are taken
    part.observe(result(3, 0.011))
    part.observe(result(2, 0.022))
    part.observe(result(5, 0.033))  # nothing pending: ignored
    assert seen == [(Partition.split(8, FAKE_TOTAL), 3, 0.011), (Partition.FULL, 2, 0.022)]


def test_step_results_carry_their_measured_time(tiny):
    from rapidserve.config import EngineConfig
    from rapidserve.kv.block_manager import BlockManager
    from rapidserve.request import Request
    from rapidserve.runner.model_runner import ModelRunner
    from rapidserve.runner.setup import prepare_model
    from rapidserve.sampling_params import SamplingParams
    from rapidserve.scheduler.chunked import ScheduledRequest

    prepared = prepare_model(EngineConfig(model=tiny, device="cpu", num_kv_blocks=8))
    blocks = BlockManager(8, 16)
    runner = ModelRunner(prepared.loaded.model, prepared.cache, blocks, prepared.device, prepared.eos_token_ids,
                         prepared.backend, prepared.loaded.max_model_len)
    req = Request("a", [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=2), 2)
    assert blocks.allocate("a", 4)
    batch = [ScheduledRequest(req, 0, 4, True)]
    unmeasured = runner.submit(batch)
    assert unmeasured.tokens() and unmeasured.device_s() is None
    runner.measure_steps = True
    measured = runner.submit(batch)
    assert measured.tokens() == unmeasured.tokens() and 0.0 < measured.device_s() < 10.0


def test_rapid_on_the_h100_profile_leaves_d32_at_8k_contexts():
    """The issue's case on the real profile (2026-11-23, contexts 1024/2560 measured): at batch 24
    and ~8.5K-token contexts it predicts D32 at 34 ms, under the 42.5 ms target (SLO 50, headroom
    0.15); the H100 measured such steps ~35 % slower (36-42 ms against 25-32 predicted)."""
    from pathlib import Path

    from rapidserve.resources.profile import load_profile

    h100 = load_profile(str(Path(__file__).parents[1] / "docs/results/2026-11-23-h100/profile.json"))
    st = StepState(24, 8500.0, 8600, 8192, True)
    d32 = Partition.split(32, h100.total_sms)
    open_loop = RapidPolicy(h100, 50.0, itl_headroom=0.15, feedback=None)
    assert open_loop.decide(st) == d32 and 1.35 * open_loop.base_decode_ms(d32, st) > open_loop.itl_target_ms
    policy = RapidPolicy(h100, 50.0, itl_headroom=0.15)
    ran = run_steps(policy, 12, lambda p: 1.35, st)
    assert ran[:2] == [d32] * 2 and d32 not in ran[2:]
    assert all(1.35 * policy.base_decode_ms(p, st) <= policy.itl_target_ms for p in ran[2:])
