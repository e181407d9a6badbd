"""The TEMPORARY step-cost model of rapidserve.sim.interim_cost on a synthetic profile (goes with
it when resources/cost_model.py lands)."""

import re

import pytest

from rapidserve.resources.profile import DecodeTable, PrefillTable, Profile, ProfileMetadata
from rapidserve.sim.interim_cost import InterimStepCostModel, PrefillLoad, parse_cost_error

TOTAL = 100


def decode_ms(s: int, b: int, ctx: int) -> float:
    return 5.0 + 0.1 * b + 1e-4 * b * ctx * TOTAL / s


def prefill_ms(s: int, n: int) -> float:
    return (0.02 * n + 1e-6 * n * n) * TOTAL / s  # a n + b n^2 exactly


@pytest.fixture(scope="module")
def model():
    sms, ctx, batch, psms, prompts = (20, 40, TOTAL), (1024, 4096), (1, 64), (60, TOTAL), (1024, 8192)
    profile = Profile(
        ProfileMetadata("Synthetic 80GB", TOTAL, 10, "green-contexts", "llama-3.1-8b", "bfloat16",
                        "2026-01-01T00:00:00+00:00", "0.1.0", 2048, decode_batch_beside=64,
                        decode_context_beside=1024),
        DecodeTable(sms, ctx, batch,
                    tuple(tuple(tuple(decode_ms(s, b, c) for b in batch) for c in ctx) for s in sms),
                    tuple(tuple(tuple(1.5 * decode_ms(s, b, c) for b in batch) for c in ctx) for s in sms)),
        PrefillTable(psms, prompts, tuple(tuple(prefill_ms(s, n) for n in prompts) for s in psms),
                     tuple(tuple(1.2 * prefill_ms(s, n) for n in prompts) for s in psms)),
    )
    return InterimStepCostModel.from_profile(profile)


def test_decode_at_measured_points(model):
    assert model.decode_step_s(64, 64 * 4096, 40) == pytest.approx(decode_ms(40, 64, 4096) / 1e3)
    assert model.decode_step_s(64, 64 * 1024) == pytest.approx(decode_ms(TOTAL, 64, 1024) / 1e3)
    beside = model.decode_step_s(64, 64 * 1024, 20, beside=[PrefillLoad(2048)])
    assert beside == pytest.approx(1.5 * decode_ms(20, 64, 1024) / 1e3)
    assert model.decode_step_s(0, 0) == 0.0


def test_prefill_fit_through_the_profile_and_attention_over_context(model):
    assert model.prefill_step_s([PrefillLoad(4000)], 60) == pytest.approx(prefill_ms(60, 4000) / 1e3)
    assert model.prefill_step_s([PrefillLoad(4000)], None, (64, 65536)) == pytest.approx(
        1.2 * prefill_ms(TOTAL, 4000) / 1e3)
    # a chunk after 1000 cached tokens attends over them: n^2 + 2 n c
    chunk = model.prefill_step_s([PrefillLoad(1000, 1000)])
    assert chunk == pytest.approx((0.02 * 1000 + 1e-6 * (1000 * 1000 + 2 * 1000 * 1000)) / 1e3)
    # a tiny prompt still reads every weight: no faster than a one-sequence decode step
    assert model.prefill_step_s([PrefillLoad(1)]) == pytest.approx((decode_ms(TOTAL, 1, 1024) + 1e-6) / 1e3)


def test_hybrid_is_the_decode_step_plus_the_prefill_compute(model):
    expect = decode_ms(TOTAL, 64, 1024) + 0.02 * 512 + 1e-6 * 512 * 512
    assert model.hybrid_step_s([PrefillLoad(512)], 64, 64 * 1024) == pytest.approx(expect / 1e3)
    assert model.hybrid_step_s([PrefillLoad(512)], 0, 0) == model.prefill_step_s([PrefillLoad(512)])
    assert any("hybrid" in note for note in model.limitations)


def test_cost_errors():
    errs = parse_cost_error("decode:ctx>4096:+40%, prefill:+10%,decode:split:-25%")
    assert [(e.kind, e.condition) for e in errs] == [("decode", "ctx>4096"), ("prefill", ""), ("decode", "split")]
    assert [e.factor for e in errs] == pytest.approx([1.4, 1.1, 0.75])
    for bad, where in (("gpu:+1%", "gpu:+1%"), ("decode:ctx>:+1%", "ctx>"), ("decode:40", "40"),
                       ("decode:-100%", "-100%")):
        with pytest.raises(ValueError, match=re.escape(where)):
            parse_cost_error(bad)


def test_cost_errors_apply_where_they_match(model):
    slow = InterimStepCostModel.from_profile(model.profile, parse_cost_error("decode:ctx>2000:+40%"))
    assert slow.decode_step_s(64, 64 * 4096) == pytest.approx(1.4 * model.decode_step_s(64, 64 * 4096))
    assert slow.decode_step_s(64, 64 * 1024) == pytest.approx(model.decode_step_s(64, 64 * 1024))
