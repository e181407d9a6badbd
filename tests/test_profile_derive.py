"""rapidserve profile --derive-from: a profile for another model / GPU from a measured one."""

from __future__ import annotations

import json

import pytest

from rapidserve.resources.profile import load_profile
from rapidserve.resources.profile_derive import (
    derive_profile,
    is_derived,
    preset_target,
)

H100 = "docs/results/2026-11-23-h100/profile.json"


@pytest.fixture(scope="module")
def measured():
    return load_profile(H100)


def _close(a, b, rel=1e-9):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, rel)
    else:
        assert a == pytest.approx(b, rel=rel)


def test_self_derivation_gives_back_the_measured_points(measured):
    d = derive_profile(measured, preset_target("preset:llama-3.1-8b"))
    _close(d.decode.alone_ms, measured.decode.alone_ms)
    _close(d.decode.beside_prefill_ms, measured.decode.beside_prefill_ms)
    _close(d.prefill.latency_ms, measured.prefill.latency_ms)
    _close(d.prefill.beside_decode_ms, measured.prefill.beside_decode_ms)
    assert is_derived(d) and not is_derived(measured)


def test_32b_is_slower_by_its_weights_and_flops_and_marked_derived(measured, tmp_path):
    t = preset_target("preset:qwen2.5-32b")
    d = derive_profile(measured, t)
    # batch 1 on the whole device: at least the weight read at the H100's peak 3.35 TB/s
    assert d.decode.alone_ms[-1][0][0] / 1e3 >= t.shape.weight_bytes / 3.35e12
    # prefill is compute: the FLOPs ratio (~4.3x), the same SMs
    ratio = d.prefill.latency_ms[-1][-1] / measured.prefill.latency_ms[-1][-1]
    assert 3.5 < ratio < 5.0
    for grid_new, grid_old in ((d.decode.alone_ms, measured.decode.alone_ms),
                               (d.decode.beside_prefill_ms, measured.decode.beside_prefill_ms)):
        for a, b in zip(json.loads(json.dumps(grid_new)), json.loads(json.dumps(grid_old))):
            assert all(x > y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert d.metadata.model == "qwen2.5-32b" and d.model_shape == t.shape
    assert any("not measured" in line and "DERIVED" in line for line in d.limitations())
    path = tmp_path / "p.json"
    d.save(path)
    assert load_profile(path).metadata.notes == d.metadata.notes


def test_bandwidth_scale_speeds_decode_not_prefill(measured):
    h100 = derive_profile(measured, preset_target("preset:qwen2.5-32b"))
    h200 = derive_profile(measured, preset_target("preset:qwen2.5-32b", gpu_name="NVIDIA H200 141GB HBM3e",
                                                  bandwidth_scale=4.8 / 3.35))
    assert h200.metadata.gpu_name == "NVIDIA H200 141GB HBM3e"
    full_new, full_old = h200.decode.alone_ms[-1][0][0], h100.decode.alone_ms[-1][0][0]
    assert full_new < full_old and full_new > full_old / (4.8 / 3.35) * 0.99
    _close(h200.prefill.latency_ms, h100.prefill.latency_ms)


def test_bad_input(measured):
    with pytest.raises(ValueError, match="--model"):
        preset_target("no-such-model")
    with pytest.raises(ValueError, match="--bandwidth-scale"):
        derive_profile(measured, preset_target("preset:qwen2.5-32b", bandwidth_scale=0))


def test_cli_writes_a_profile_the_simulator_loads(tmp_path):
    from rapidserve.entrypoints.cli import main
    from rapidserve.sim.topology import gpu_memory_from_name

    out = tmp_path / "h200.json"
    assert main(["profile", "--derive-from", H100, "--model", "preset:qwen2.5-32b", "--output", str(out),
                 "--bandwidth-scale", "1.433", "--gpu-name", "NVIDIA H200 141GB HBM3e"]) == 0
    p = load_profile(out)
    assert is_derived(p) and gpu_memory_from_name(p.metadata.gpu_name) == 141 << 30


def test_derived_contexts_match_held_out_measured_points():
    """Derived at a context the source never measured: the one-context 2026-11-22 profile, derived
    (same model) at 2560, against the 2026-11-23 profile's measured 2560 points (40, alone and
    beside a prefill): the step-cost model's held-out error (docs/cost-model.md: 7.2 % mean, 22 % max)."""
    src, truth = load_profile("docs/results/2026-11-22-h100/profile.json"), load_profile(H100)
    d = derive_profile(src, preset_target("preset:llama-3.1-8b"), context_lens=[1024, 2560])
    assert d.decode.context_lens == (1024, 2560)
    _close([g[0] for g in d.decode.alone_ms], [g[0] for g in src.decode.alone_ms])  # measured: given back
    errs = [abs(a[1][k] - b[1][k]) / b[1][k]
            for new, old in ((d.decode.alone_ms, truth.decode.alone_ms),
                             (d.decode.beside_prefill_ms, truth.decode.beside_prefill_ms))
            for a, b in zip(new, old) for k in range(len(truth.decode.batch_sizes))]
    assert len(errs) == 40
    assert sum(errs) / len(errs) < 0.09 and max(errs) < 0.25
    with pytest.raises(ValueError, match=">= 1"):
        derive_profile(src, preset_target("preset:llama-3.1-8b"), batch_sizes=[0, 4])
