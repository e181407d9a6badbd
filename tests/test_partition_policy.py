"""Partitioning policies on synthetic profiles, the --partition-policy strings, and the
partition metrics (resources/policy.py)."""

import itertools
from collections.abc import Callable

import pytest

from rapidserve.resources.cost_model import PrefillLoad, StepCostModel
from rapidserve.resources.partition import Partition
from rapidserve.resources.policy import (
    FullPolicy,
    NexusPolicy,
    OffPolicy,
    PartitionMetrics,
    REACTION_BUCKETS,
    PolicySpec,
    RapidPolicy,
    StaticPolicy,
    StepState,
    make_policy,
    parse_policy,
)
from rapidserve.resources.profile import (
    DecodeTable,
    PrefillTable,
    Profile,
    ProfileMetadata,
)

TOTAL = 132
SPLITS = (16, 24, 32, 40, 48, 56, 64)
CONTEXTS = (1024, 4096)
BATCHES = (1, 8, 32, 64, 128)
PROMPTS = (512, 2048, 8192)


def _base(b: int, ctx: int) -> float:
    return 4.0 + 0.01 * b + 1e-5 * b * ctx  # weights + per-sequence work + KV read


def decode_alone(s: int, b: int, ctx: int) -> float:
    return _base(b, ctx) * (1 + 16 / s)


def decode_beside(s: int, b: int, ctx: int) -> float:
    if s == TOTAL:  # over-allocated: decode waits behind prefill kernels, longer with the batch
        return decode_alone(s, b, ctx) + 2.0 + 0.15 * b
    return decode_alone(s, b, ctx) * 1.3  # bandwidth contention


def prefill_ms(s: int, n: int) -> float:
    return 1.0 + 0.02 * n * TOTAL / s


def prefill_beside_2x(s: int, n: int) -> float:
    return 2 * prefill_ms(s, n)  # a decode beside halves prefill's speed, split or over-allocated


def synthetic_profile(prefill_beside: Callable[[int, int], float] | None = None, **meta) -> Profile:
    """The profile of the functions above; with `prefill_beside`, a schema version 2 profile that
    measured prefill beside a decode (batch 64 at context 1024)."""
    sms = SPLITS + (TOTAL,)
    psms = tuple(sorted({TOTAL - s for s in SPLITS} | {TOTAL}))
    if prefill_beside is not None:
        meta = {"decode_batch_beside": 64, "decode_context_beside": 1024, **meta}
    return Profile(
        ProfileMetadata(**{"gpu_name": "Synthetic H100", "total_sms": TOTAL, "sm_granularity": 8,
                           "partitioning": "green-contexts", "model": "synthetic", "dtype": "bfloat16",
                           "created": "2026-01-01T00:00:00+00:00", "rapidserve_version": "0.1.0",
                           "prefill_tokens_beside": 2048, **meta}),
        DecodeTable(sms, CONTEXTS, BATCHES,
                    tuple(tuple(tuple(decode_alone(s, b, c) for b in BATCHES) for c in CONTEXTS) for s in sms),
                    tuple(tuple(tuple(decode_beside(s, b, c) for b in BATCHES) for c in CONTEXTS) for s in sms)),
        PrefillTable(psms, PROMPTS, tuple(tuple(prefill_ms(s, n) for n in PROMPTS) for s in psms),
                     None if prefill_beside is None else
                     tuple(tuple(prefill_beside(s, n) for n in PROMPTS) for s in psms)),
    )


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


def state(batch: int, ctx: float = 1024, waiting: int = 0, running: bool = True) -> StepState:
    return StepState(batch, ctx, int(ctx), waiting, running)


def split(n: int) -> Partition:
    return Partition.split(n, TOTAL)


# ---- rapid ---------------------------------------------------------------------------------------


def test_rapid_overallocates_below_the_batch_threshold(profile):
    policy = RapidPolicy(profile, slo_itl_ms=8.0, overalloc_max_batch=32)
    assert policy.decide(state(1)) == Partition.FULL
    assert policy.decide(state(32)) == Partition.FULL  # at the threshold: still light
    assert policy.decide(state(33)) != Partition.FULL
    assert policy.decide(state(0)) == Partition.FULL  # nothing to decode


def test_rapid_gives_decode_the_whole_gpu_while_no_prompt_runs(profile):
    """A split while nothing prefills only leaves SMs idle (measured on the H100: ITL alone 16.5 ms
    on rapid's split against 10.0 on the whole device)."""
    policy = RapidPolicy(profile, slo_itl_ms=1.0, overalloc_max_batch=0)  # splits whenever it can
    assert policy.decide(state(128, 4096)) != Partition.FULL
    assert policy.decide(state(128, 4096, running=False)) == Partition.FULL
    assert policy.decide(state(128, 4096, waiting=1, running=False)) != Partition.FULL  # a prompt is coming


def test_rapid_threshold_from_the_profile(profile):
    # Without the flag: over-allocate while the profile says over-allocated decode beside a
    # prefill meets the SLO (at batch 1, context 1024), not beyond.
    slo = decode_beside(TOTAL, 1, 1024) + 0.01
    policy = RapidPolicy(profile, slo_itl_ms=slo)
    assert policy.decide(state(1)) == Partition.FULL
    assert policy.decide(state(64)) != Partition.FULL


def test_rapid_splits_beside_prompts_longer_than_the_profile_measured(profile):
    """Over-allocated decode beside a prefill was measured beside prefill steps of
    `prefill_tokens_beside` (2048) tokens: beside more prompt tokens than that it splits."""
    slo = decode_beside(TOTAL, 1, 1024) + 0.01
    policy = RapidPolicy(profile, slo_itl_ms=slo)
    assert profile.metadata.prefill_tokens_beside == 2048
    assert policy.decide(state(1, waiting=2048)) == Partition.FULL
    assert policy.decide(state(1, waiting=2049)) != Partition.FULL
    assert policy.decide(state(1, waiting=8192, running=False)) != Partition.FULL


def test_rapid_picks_the_fewest_decode_sms_meeting_the_slo(profile):
    b, ctx = 64, 4096
    slo = decode_beside(32, b, ctx)  # D32 meets it exactly, D24 does not
    policy = RapidPolicy(profile, slo_itl_ms=slo, overalloc_max_batch=0)
    assert policy.decide(state(b, ctx)) == split(32)  # exactly at the SLO counts as meeting it
    assert RapidPolicy(profile, slo * 0.999, overalloc_max_batch=0).decide(state(b, ctx)) == split(40)
    assert RapidPolicy(profile, 1000.0, overalloc_max_batch=0).decide(state(b, ctx)) == split(16)


def test_rapid_takes_the_largest_split_when_none_meets_the_slo(profile):
    policy = RapidPolicy(profile, slo_itl_ms=1.0, overalloc_max_batch=0)
    assert policy.decide(state(128, 4096)) == split(64)
    assert policy.partitions() == (Partition.FULL, *(split(n) for n in SPLITS))


def test_rapid_uses_the_context_length(profile):
    slo = decode_beside(24, 64, 1024)
    policy = RapidPolicy(profile, slo_itl_ms=slo, overalloc_max_batch=0)
    short, long_ = policy.decide(state(64, 1024)), policy.decide(state(64, 4096))
    assert short == split(24)
    assert long_.decode_sms is not None and long_.decode_sms > 24
    # between measured batches: interpolated, still monotone
    mid = policy.decide(state(48, 1024))
    assert mid.decode_sms is not None and mid.decode_sms <= 24


def test_static_full_off():
    assert StaticPolicy(40, TOTAL).decide(state(64)) == Partition(40, 92)
    assert StaticPolicy(40, TOTAL).partitions() == (Partition(40, 92),)
    assert FullPolicy().decide(state(256, waiting=9999)) == Partition.FULL
    assert FullPolicy().partitioned and not OffPolicy().partitioned
    assert OffPolicy().decide(state(1)) == Partition.FULL


# ---- nexus ---------------------------------------------------------------------------------------


def test_the_policies_predict_through_the_step_cost_model(profile):
    """One model: the policies price steps with the StepCostModel (resources/cost_model.py), which
    returns the profile's measurements inside its range (the tests of the model itself are in
    test_cost_model.py)."""
    model = StepCostModel.from_profile(profile)
    nexus = NexusPolicy(profile, slo_itl_ms=20.0, model=model)
    assert nexus.model is model
    s = state(64, 4096, waiting=2048)
    itl, drain = nexus.predict(split(40), s)
    assert itl == pytest.approx(decode_beside(40, 64, 4096))
    assert itl == 1e3 * model.decode_step_s(64, 64 * 4096, 40, [PrefillLoad(2048)])
    # the profile did not measure prefill beside a decode: the fixed contention factor
    assert drain == pytest.approx(1.3 * prefill_ms(92, 2048), rel=0.01)
    assert nexus.predict(Partition.FULL, s)[1] == pytest.approx(1.05 * prefill_ms(TOTAL, 2048), rel=0.01)
    rapid = RapidPolicy(profile, slo_itl_ms=20.0)
    assert isinstance(rapid.model, StepCostModel)


def test_nexus_drain_uses_the_measured_prefill_contention():
    measured = synthetic_profile(prefill_beside_2x)
    policy = NexusPolicy(measured, slo_itl_ms=20.0)
    for p, n in ((split(40), 512), (split(64), 3000), (Partition.FULL, 8192)):
        alone = prefill_ms(p.prefill_share(TOTAL), n)
        assert policy.predict(p, state(64, waiting=n))[1] == pytest.approx(2 * alone, rel=0.05)
        assert policy.predict(p, state(0, waiting=n))[1] == pytest.approx(alone, rel=0.05)  # nothing decodes


def test_nexus_gives_prefill_more_sms_when_prompts_wait_and_decode_has_slack(profile):
    slo = 20.0  # loose: decode has slack at batch 32 on every split
    few = NexusPolicy(profile, slo_itl_ms=slo, min_hold_steps=0).target(state(32, waiting=200))
    many = NexusPolicy(profile, slo_itl_ms=slo, min_hold_steps=0).target(state(32, waiting=60000))
    assert few == split(64)  # little to prefill: the lowest ITL
    assert many.prefill_share(TOTAL) > few.prefill_share(TOTAL)
    assert NexusPolicy(profile, slo_itl_ms=slo).predict(many, state(32, waiting=60000))[0] <= slo


def test_nexus_drain_and_choice_follow_the_measured_prefill_contention(profile, caplog):
    measured = synthetic_profile(prefill_beside_2x)
    with caplog.at_level("INFO", logger="rapidserve.decode"):
        fixed_policy = NexusPolicy(profile, slo_itl_ms=12.0, min_hold_steps=0)
        measured_policy = NexusPolicy(measured, slo_itl_ms=12.0, min_hold_steps=0)
    assert "did not measure prefill beside a decode" in caplog.text
    assert "prefill beside a decode as profiled (decode batch 64 at context 1024)" in caplog.text
    s = state(64, waiting=20000)  # over-allocated decode misses the 12 ms SLO; every split from D24 meets it
    for p in fixed_policy.partitions():
        alone = prefill_ms(p.prefill_share(TOTAL), 20000)
        assert measured_policy.predict(p, s)[1] == pytest.approx(2 * alone, rel=0.05)  # the 2x drain
        over = 1.05 if p.is_full else 1.3
        assert fixed_policy.predict(p, s)[1] == pytest.approx(over * alone, rel=0.05)
    # A slower prefill beside decode: more prefill SMs for the same queue.
    assert fixed_policy.target(s) == split(40)
    assert measured_policy.target(s) == split(24)
    assert measured_policy.predict(split(24), s)[0] <= 12.0


def test_nexus_full_device_when_one_phase_is_idle(profile):
    policy = NexusPolicy(profile, slo_itl_ms=10.0, min_hold_steps=0)
    assert policy.target(state(64, waiting=0, running=False)) == Partition.FULL
    assert policy.target(state(0, waiting=5000)) == Partition.FULL


def test_nexus_meets_the_itl_slo_or_takes_the_fastest_decode(profile):
    policy = NexusPolicy(profile, slo_itl_ms=decode_beside(48, 128, 4096) * 1.01, min_hold_steps=0)
    p = policy.target(state(128, 4096, waiting=100000))
    assert p == split(48)  # the most prefill SMs whose decode still meets the ITL SLO
    hopeless = NexusPolicy(profile, slo_itl_ms=0.5, min_hold_steps=0).target(state(128, 4096, waiting=1000))
    assert hopeless == split(64)


def test_nexus_hysteresis_does_not_flap(profile):
    # The queue swings between nearly empty and full every step: the target swings with it,
    # the partition must not.
    policy = NexusPolicy(profile, slo_itl_ms=20.0, min_hold_steps=8, switch_margin=0.15)
    a, b = state(32, waiting=300), state(32, waiting=30000)
    assert policy.target(a) != policy.target(b)
    seen = [policy.decide(a if i % 2 else b) for i in range(201)]  # ends with b
    assert sum(x != y for x, y in itertools.pairwise(seen)) <= 1
    # a lasting change is followed, after the confirmation steps
    steady = [policy.decide(a) for _ in range(12)]
    assert steady[-1] == policy.target(a)
    assert steady.index(steady[-1]) >= policy.confirm_steps - 1


def test_nexus_switches_at_once_to_stop_an_itl_miss(profile):
    policy = NexusPolicy(profile, slo_itl_ms=decode_beside(64, 128, 4096) * 1.01, min_hold_steps=100)
    assert policy.decide(state(1, waiting=2000)) == Partition.FULL  # light decode: over-allocate
    # the batch grows: over-allocated decode would miss the SLO, so it switches without waiting
    # out the hold, to the only split that meets it
    assert policy.decide(state(128, 4096, waiting=100000)) == split(64)


def test_nexus_over_allocates_beside_prefill_only_as_long_as_the_profile_measured(profile):
    """The profile timed decode beside 2048-token prefill steps: beside longer prompts the whole
    device is no candidate, and a policy on it leaves at once (hold or not)."""
    policy = NexusPolicy(profile, slo_itl_ms=1000.0, min_hold_steps=100)
    assert profile.metadata.prefill_tokens_beside == 2048
    assert policy.target(state(1, waiting=2048)) == Partition.FULL
    assert policy.target(state(1, waiting=2049)) != Partition.FULL
    assert policy.decide(state(1, waiting=2000)) == Partition.FULL
    assert policy.decide(state(1, waiting=8192)) != Partition.FULL  # urgent: no hold
    assert policy.target(state(1, waiting=0, running=False)) == Partition.FULL  # decode alone: whole device


def test_the_itl_headroom_lowers_the_step_target(profile):
    b, ctx = 64, 4096
    slo = decode_beside(32, b, ctx)  # D32 meets it exactly
    assert RapidPolicy(profile, slo_itl_ms=slo).decide(state(b, ctx, waiting=5000)) == split(32)
    with_room = RapidPolicy(profile, slo_itl_ms=slo, itl_headroom=0.15)
    assert with_room.itl_target_ms == pytest.approx(0.85 * slo)
    assert with_room.decide(state(b, ctx, waiting=5000)).decode_sms > 32
    nexus = NexusPolicy(profile, slo_itl_ms=slo, itl_headroom=0.15, min_hold_steps=0)
    assert nexus.score(split(32), state(b, ctx, waiting=5000))[0] is False
    assert NexusPolicy(profile, slo_itl_ms=slo, min_hold_steps=0).score(split(32), state(b, ctx, waiting=5000))[0]
    policy = make_policy("rapid", TOTAL, 8, profile, slo_itl_ms=slo, itl_headroom=0.15)
    assert policy.itl_target_ms == pytest.approx(0.85 * slo)
    with pytest.raises(ValueError, match=r"headroom must be in \[0, 1\)"):
        RapidPolicy(profile, slo_itl_ms=slo, itl_headroom=1.0)


# ---- parsing and construction ----------------------------------------------------------------------


def test_parse_policy():
    assert parse_policy("rapid") == PolicySpec("rapid")
    assert parse_policy(" Nexus ") == PolicySpec("nexus")
    assert parse_policy("static:40") == PolicySpec("static", 40)
    assert str(parse_policy("static:40")) == "static:40"
    assert parse_policy("full").kind == "full" and parse_policy("off").kind == "off"


@pytest.mark.parametrize("text, match", [
    ("fastest", "unknown partition policy 'fastest'; available: rapid, nexus, static:N, full, off"),
    ("static", "needs a decode SM count: static:N"),
    ("static:", "needs a decode SM count"),
    ("static:abc", "positive whole number N of decode SMs, got 'abc'"),
    ("static:0", "positive whole number"),
    ("static:-8", "positive whole number"),
])
def test_parse_policy_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_policy(text)


def test_make_policy(profile):
    assert isinstance(make_policy("off", TOTAL), OffPolicy)
    assert isinstance(make_policy("full", 1), FullPolicy)
    assert make_policy("static:40", TOTAL, 8).partitions() == (Partition(40, 92),)
    assert make_policy("static:42", TOTAL, 8).partitions() == (Partition(40, 92),)  # rounded
    assert isinstance(make_policy("rapid", TOTAL, 8, profile, slo_itl_ms=10), RapidPolicy)
    assert isinstance(make_policy("nexus", TOTAL, 8, profile, slo_itl_ms=10), NexusPolicy)
    with pytest.raises(ValueError, match="needs a profile"):
        make_policy("rapid", TOTAL, 8, slo_itl_ms=10)
    with pytest.raises(ValueError, match="needs an ITL SLO"):
        make_policy("nexus", TOTAL, 8, profile)
    with pytest.raises(ValueError, match="132 SMs; this device has 78"):
        make_policy("rapid", 78, 8, profile, slo_itl_ms=10)
    with pytest.raises(ValueError, match="needs SM partitioning"):
        make_policy("static:40", 1)


def test_a_profile_without_splits_always_overallocates():
    cpu = Profile(
        ProfileMetadata("cpu", 1, 1, "none", "tiny", "float32", "2026-01-01", "0.1.0", 16),
        DecodeTable((1,), (8,), (1, 2), (((1.0, 1.5),),), (((2.0, 2.5),),)),
        PrefillTable((1,), (8,), ((3.0,),)),
    )
    for policy in (RapidPolicy(cpu, 0.1), NexusPolicy(cpu, 0.1)):
        assert policy.partitions() == (Partition.FULL,)
        assert policy.decide(state(2, 8, waiting=100)) == Partition.FULL


# ---- metrics -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_partition_metrics():
    clock = FakeClock()
    m = PartitionMetrics(clock)
    assert m.snapshot()[:5] == ((""), {}, 0, 0.0, 0.0)
    m.record(Partition.FULL)
    clock.t += 2.0
    m.record(Partition.FULL)  # same partition: not a switch
    clock.t += 1.0
    m.record(split(40))
    clock.t += 3.0
    m.record(Partition.FULL)
    clock.t += 4.0
    s = m.snapshot()
    assert s.current == "full"
    assert s.seconds == {"full": 7.0, "D40/P92": 3.0}
    assert s.switches == 2
    assert s.elapsed_s == 10.0
    assert s.switches_per_s == pytest.approx(0.2)
    assert (s.reactions, s.reaction_s, s.reaction_buckets[-1]) == (0, 0.0, 0)
    for seconds in (0.004, 0.03, 0.3, -0.001):  # (a clock step backwards counts as 0)
        m.react(seconds)
    s = m.snapshot()
    assert (s.reactions, s.reaction_s, s.reaction_max_s) == (4, pytest.approx(0.334), 0.3)
    assert dict(zip(REACTION_BUCKETS, s.reaction_buckets))[0.005] == 2  # cumulative, as Prometheus
    assert dict(zip(REACTION_BUCKETS, s.reaction_buckets))[0.05] == 3 and s.reaction_buckets[-1] == 4


def test_the_engine_config_gives_the_policy_its_itl_headroom(profile, tmp_path):
    from rapidserve.config import EngineConfig
    from rapidserve.serving.partitioning import build_policy

    path = tmp_path / "profile.json"
    profile.save(path)

    class Partitioner:
        total_sms, granularity = TOTAL, 8

    def config(**kw):
        return EngineConfig(model="m", mode="rapid", partition_policy="nexus", profile=str(path), slo_itl_ms=50.0, **kw)

    assert build_policy(config(), Partitioner()).itl_target_ms == pytest.approx(42.5)  # 0.15 by default
    assert build_policy(config(slo_itl_headroom=0.0), Partitioner()).itl_target_ms == 50.0
    with pytest.raises(ValueError, match=r"slo_itl_headroom must be in \[0, 1\), got 1.0"):
        config(slo_itl_headroom=1.0)
