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


def test_fp8_70b_reads_half_the_weights_and_prefills_at_the_fp8_rate(measured):
    """--quantization fp8 --kv-cache-dtype fp8 from the bf16 8B profile: one byte per projection
    weight and KV entry; the linear layers' FLOPs at --fp8-flops-scale x the measured bf16 rate."""
    bf16 = derive_profile(measured, preset_target("preset:llama-3.1-70b"))
    fp8 = derive_profile(measured, preset_target("preset:llama-3.1-70b", quantization="fp8", kv_cache_dtype="fp8"))
    same_rate = derive_profile(measured, preset_target("preset:llama-3.1-70b", quantization="fp8",
                                                       kv_cache_dtype="fp8", fp8_flops_scale=1.0))
    assert fp8.metadata.dtype == "bfloat16+fp8-weights+fp8-kv" and bf16.metadata.dtype == "bfloat16"
    assert 70e9 < fp8.model_shape.weight_bytes < 71e9 and bf16.model_shape.weight_bytes > 138e9
    assert fp8.model_shape.kv_bytes_per_token * 2 == bf16.model_shape.kv_bytes_per_token
    # prefill (compute): the FP8 rate halves the linear layers' time; at scale 1 it is bf16's
    for j, n in enumerate(measured.prefill.prompt_tokens):
        r = fp8.prefill.latency_ms[-1][j] / bf16.prefill.latency_ms[-1][j]
        assert 0.5 <= r < 0.56, n  # the LM head and attention stay at the bf16 rate
        assert same_rate.prefill.latency_ms[-1][j] == pytest.approx(bf16.prefill.latency_ms[-1][j], rel=1e-9)
    # decode (memory): batch 1 on the whole device, about the weight bytes ratio faster
    r = fp8.decode.alone_ms[-1][0][0] / bf16.decode.alone_ms[-1][0][0]
    assert 0.5 < r < 0.7
    assert "FP8 GEMMs at x2 the measured bf16" in fp8.metadata.notes and "x1 the measured" in same_rate.metadata.notes
    assert "FP8" not in bf16.metadata.notes
    with pytest.raises(ValueError, match="--fp8-flops-scale"):
        preset_target("preset:llama-3.1-70b", quantization="fp8", fp8_flops_scale=0)
    with pytest.raises(ValueError, match="--kv-cache-dtype"):
        preset_target("preset:llama-3.1-70b", kv_cache_dtype="int8")


def test_a_moe_preset_is_derived_with_its_experts(measured, tmp_path):
    d = derive_profile(measured, preset_target("preset:mixtral-8x7b"))
    shape = d.model_shape
    assert (shape.num_experts, shape.experts_per_token, shape.moe_layers) == (8, 2, 32)
    assert "routed uniformly" in d.metadata.notes
    # decode on the whole device: batch 1 reads ~2 of 8 experts per layer, batch 64 all of them
    full = d.decode.alone_ms[-1][0]
    b = dict(zip(d.decode.batch_sizes, full))
    assert b[64] - b[1] > 0.8 * (shape.weight_bytes_read(64) - shape.weight_bytes_read(1)) / 3.19e12 * 1e3
    # the saved profile records the expert fields and loads with them
    d.save(tmp_path / "m.json")
    again = load_profile(tmp_path / "m.json")
    assert again.model_shape == shape
    assert json.loads((tmp_path / "m.json").read_text())["model_shape"]["num_experts"] == 8


def test_the_model_shape_schema_old_and_bad(measured, tmp_path):
    """A version 3 profile without the MoE / FP8 fields loads as dense; inconsistent ones are named."""
    d = derive_profile(measured, preset_target("preset:qwen2.5-32b"))
    data = d.to_json()
    for k in ("expert_bytes", "moe_layers", "num_experts", "experts_per_token", "fp8_flops_per_token"):
        del data["model_shape"][k]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_profile(tmp_path / "old.json").model_shape == d.model_shape
    moe = derive_profile(measured, preset_target("preset:mixtral-8x7b")).to_json()
    for change, match in (({"experts_per_token": 0}, "all 0 .dense."), ({"experts_per_token": 9}, "at most num_experts"),
                          ({"fp8_flops_per_token": 10 ** 15}, "fp8_flops_per_token"),
                          ({"num_experts": -1}, r"model_shape.num_experts: must be at least 0")):
        bad = json.loads(json.dumps(moe))
        bad["model_shape"].update(change)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_profile(tmp_path / "bad.json")


def test_cli_derives_an_fp8_profile(tmp_path):
    from rapidserve.entrypoints.cli import main

    out = tmp_path / "70b.json"
    assert main(["profile", "--derive-from", H100, "--model", "preset:llama-3.1-70b", "--quantization", "fp8",
                 "--kv-cache-dtype", "fp8", "--fp8-flops-scale", "1.8", "--bandwidth-scale", "1.433",
                 "--gpu-name", "NVIDIA H200 141GB HBM3e", "--output", str(out)]) == 0
    p = load_profile(out)
    assert p.metadata.dtype == "bfloat16+fp8-weights+fp8-kv" and "x1.8 the measured bf16" in p.metadata.notes
