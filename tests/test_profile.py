"""The offline profile: JSON round trip, clear errors for malformed files, interpolation, and
`rapidserve profile` end to end on a tiny CPU model (resources/profile.py, profiler.py)."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
from test_partition_policy import (
    TOTAL,
    decode_alone,
    decode_beside,
    prefill_beside_2x,
    prefill_ms,
    synthetic_profile,
)

from rapidserve.entrypoints.cli import main
from rapidserve.resources.partition import Partition
from rapidserve.resources.policy import make_policy
from rapidserve.resources.profile import SCHEMA_VERSION, Profile, load_profile


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


@pytest.fixture(scope="module")
def measured():
    """With prefill beside a decode (schema version 2's optional grid)."""
    return synthetic_profile(prefill_beside_2x)


def test_round_trip(profile, tmp_path):
    path = tmp_path / "p.json"
    profile.save(path)
    again = load_profile(path)
    assert again == profile
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["metadata"]["gpu_name"] == "Synthetic H100"
    assert Profile.from_json(data) == profile
    assert data["prefill"]["beside_decode_ms"] is None and profile.prefill.beside_decode_ms is None
    assert not profile.has_prefill_beside_decode


def test_round_trip_with_prefill_beside_decode(measured, tmp_path):
    path = tmp_path / "p.json"
    measured.save(path)
    again = load_profile(path)
    assert again == measured and again.has_prefill_beside_decode
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 3
    assert data["metadata"]["decode_batch_beside"] == 64 and data["metadata"]["decode_context_beside"] == 1024
    assert data["prefill"]["beside_decode_ms"][0][0] == prefill_beside_2x(measured.prefill.sm_counts[0], 512)
    assert again.prefill_ms(92, 2048, beside_decode=True) == prefill_beside_2x(92, 2048)
    assert again.prefill_ms(92, 2048) == prefill_ms(92, 2048)


def test_a_version_1_file_still_loads(profile, tmp_path):
    # As version 1 wrote it: no prefill beside decode, no decode batch in the metadata.
    data = copy.deepcopy(profile.to_json())
    data["schema_version"] = 1
    del data["prefill"]["beside_decode_ms"], data["metadata"]["decode_batch_beside"]
    del data["metadata"]["decode_context_beside"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    old = load_profile(path)
    assert old == profile
    assert old.prefill.beside_decode_ms is None and old.metadata.decode_batch_beside == 0
    with pytest.raises(ValueError, match="no prefill latency beside a decode"):
        old.prefill_ms(92, 2048, beside_decode=True)
    old.save(path)  # written again: the current version
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_lookups_at_and_between_measured_points(profile):
    assert profile.decode_ms(40, 64, 4096, True) == decode_beside(40, 64, 4096)  # exact at a point
    assert profile.decode_ms(TOTAL, 8, 1024, False) == decode_alone(TOTAL, 8, 1024)
    mid = profile.decode_ms(40, 48, 1024, False)  # between batch 32 and 64: linear
    assert mid == pytest.approx((decode_alone(40, 32, 1024) + decode_alone(40, 64, 1024)) / 2)
    ctx = profile.decode_ms(40, 64, 2560, False)  # between the two contexts
    assert ctx == pytest.approx((decode_alone(40, 64, 1024) + decode_alone(40, 64, 4096)) / 2)
    # past the largest batch: the last segment extended, not clamped
    assert profile.decode_ms(40, 256, 1024, False) > profile.decode_ms(40, 128, 1024, False)
    # between measured SM counts: between the neighbours
    lo, hi = profile.decode_ms(40, 64, 1024, False), profile.decode_ms(48, 64, 1024, False)
    assert hi < profile.decode_ms(44, 64, 1024, False) < lo
    assert profile.prefill_ms(92, 2048) == prefill_ms(92, 2048)
    assert profile.split_sm_counts == (16, 24, 32, 40, 48, 56, 64)


def _broken(profile, edit):
    data = copy.deepcopy(profile.to_json())
    edit(data)
    return data


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("decode"), r"bad\.json: decode: missing"),
    (lambda d: d["metadata"].pop("total_sms"), r": metadata\.total_sms: missing"),
    (lambda d: d["metadata"].update(total_sms="132"), r": metadata\.total_sms: expected an integer"),
    (lambda d: d["metadata"].update(model=7), r": metadata\.model: expected a string"),
    (lambda d: d["metadata"].update(partitioning="mig"), r"metadata\.partitioning: expected one of"),
    (lambda d: d.update(schema_version=99),
     r"schema_version: this rapidserve reads versions 1, 2 and 3, the file has 99"),
    (lambda d: d.update(schema_version=True), r"schema_version: .* the file has True"),
    (lambda d: d.pop("schema_version"), r": schema_version: missing"),
    (lambda d: d["decode"].update(batch_sizes=[1, 32, 8, 64, 128]),
     r"decode\.batch_sizes: must be strictly increasing, but \[2\] = 8 follows 32"),
    (lambda d: d["decode"].update(context_lens=[1024, -4096]), r"decode\.context_lens\[1\]: must be at least 1"),
    (lambda d: d["decode"]["alone_ms"][2][1].__setitem__(3, -0.5),
     r"decode\.alone_ms\[2\]\[1\]\[3\]: latency must be a positive number of ms, got -0\.5"),
    (lambda d: d["decode"]["beside_prefill_ms"][0][0].__setitem__(0, "fast"),
     r"decode\.beside_prefill_ms\[0\]\[0\]\[0\]: expected a number"),
    (lambda d: d["decode"]["alone_ms"].pop(), r"decode\.alone_ms: expected a list of 8 entries, got 7"),
    (lambda d: d["decode"].update(sm_counts=[16, 24, 32, 40, 48, 56, 64, 128]),
     r"decode\.sm_counts: the last must be the whole device \(132 SMs"),
    (lambda d: d["prefill"].update(sm_counts=[68, 76, 84, 92, 100, 108, 116, 140]),
     r"prefill\.sm_counts: 140 exceeds the device's 132 SMs"),
    (lambda d: d["prefill"]["latency_ms"][0].__setitem__(0, float("nan")), r"prefill\.latency_ms\[0\]\[0\]"),
    (lambda d: d.update(prefill=[]), r": prefill: expected an object, got list"),
])
def test_malformed_profiles_name_the_bad_field(profile, tmp_path, edit, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(profile, edit)))
    with pytest.raises(ValueError, match=match):
        load_profile(path)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["prefill"]["beside_decode_ms"].pop(),
     r"prefill\.beside_decode_ms: expected a list of 8 entries, got 7"),
    (lambda d: d["prefill"]["beside_decode_ms"][1].pop(),
     r"prefill\.beside_decode_ms\[1\]: expected a list of 3 entries, got 2"),
    (lambda d: d["prefill"]["beside_decode_ms"][3].__setitem__(2, 0),
     r"prefill\.beside_decode_ms\[3\]\[2\]: latency must be a positive number of ms, got 0"),
    (lambda d: d["prefill"]["beside_decode_ms"][0].__setitem__(1, "slow"),
     r"prefill\.beside_decode_ms\[0\]\[1\]: expected a number"),
    (lambda d: d["prefill"].update(beside_decode_ms={}),
     r"prefill\.beside_decode_ms: expected a list of 8 entries, got dict"),
    (lambda d: d["metadata"].update(decode_batch_beside=0),
     r"metadata\.decode_batch_beside: must be at least 1 where prefill\.beside_decode_ms is measured, got 0"),
    (lambda d: d["metadata"].pop("decode_context_beside"),
     r"metadata\.decode_context_beside: must be at least 1 where prefill\.beside_decode_ms is measured"),
    (lambda d: d["metadata"].update(decode_batch_beside=-1), r"metadata\.decode_batch_beside: must be at least 0"),
    (lambda d: d["metadata"].update(decode_batch_beside="64"), r"metadata\.decode_batch_beside: expected an integer"),
])
def test_malformed_prefill_beside_decode(measured, tmp_path, edit, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(measured, edit)))
    with pytest.raises(ValueError, match=r"bad\.json: " + match):
        load_profile(path)


def test_unreadable_profiles(tmp_path):
    with pytest.raises(ValueError, match="cannot read the profile"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        load_profile(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="expected an object, got list"):
        load_profile(bad)


def test_the_constructor_validates_too(profile):
    with pytest.raises(ValueError, match=r"profile: decode\.alone_ms: expected a list of 8 entries, got 0"):
        dataclasses.replace(profile, decode=dataclasses.replace(profile.decode, alone_ms=()))
    with pytest.raises(ValueError, match=r"metadata\.decode_batch_beside: must be at least 1"):
        dataclasses.replace(profile, prefill=dataclasses.replace(
            profile.prefill, beside_decode_ms=profile.prefill.latency_ms))


NO_V3_TABLES = ("--beside-prompt-tokens", "none", "--hybrid-chunks", "none", "--kv-transfer-blocks", "none")


@pytest.mark.slow
def test_profile_command_on_cpu(tiny_model_dir, tmp_path, capsys):
    path, _ = tiny_model_dir("llama")
    out = tmp_path / "profile.json"
    rc = main(["profile", "--model", path, "--dtype", "float32", "--device", "cpu",
               "--kv-cache-memory-bytes", "16MiB", "--batch-sizes", "2,1", "--context-lens", "8,16",
               "--prompt-tokens", "8,24", "--beside-prefill-tokens", "16", "--beside-decode-batch", "3",
               "--beside-prompt-tokens", "24,32", "--beside-prompt-context-lens", "16",
               "--beside-prompt-batches", "1,2",
               "--hybrid-chunks", "4,8", "--hybrid-batches", "0,2", "--hybrid-context-lens", "0,16",
               "--kv-transfer-blocks", "1,2", "--num-steps", "2",
               "--warmup-steps", "1", "--prefill-repeats", "1", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SM partitioning unavailable on cpu: one partition, the whole device" in text
    profile = load_profile(out)
    meta = profile.metadata
    assert (meta.gpu_name, meta.total_sms, meta.partitioning, meta.dtype) == ("cpu", 1, "none", "float32")
    assert "unavailable" in meta.notes and meta.prefill_tokens_beside == 16
    assert profile.decode.sm_counts == (1,) and profile.decode.batch_sizes == (1, 2)
    assert profile.decode.context_lens == (8, 16) and profile.prefill.prompt_tokens == (8, 24)
    assert all(ms > 0 for ctx in profile.decode.beside_prefill_ms[0] for ms in ctx)
    # prefill beside a decode of 3 sequences at the shortest context
    assert (meta.decode_batch_beside, meta.decode_context_beside) == (3, 8)
    assert profile.prefill.sm_counts == (1,) and profile.has_prefill_beside_decode
    assert len(profile.prefill.beside_decode_ms[0]) == 2 and all(ms > 0 for ms in profile.prefill.beside_decode_ms[0])
    assert "ms beside a decode" in text
    # the policies run on it: one partition, the whole device
    policy = make_policy("rapid", 1, 1, profile, slo_itl_ms=1.0)
    assert policy.partitions() == (Partition.FULL,)
    # schema version 3: what the step-cost model needs
    assert profile.model_shape.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x K,V x kv heads x head dim x fp32
    t = profile.decode_beside_prompts
    assert (t.prompt_tokens, t.sm_counts, t.context_lens, t.batch_sizes) == ((24, 32), (1,), (16,), (1, 2))
    assert all(ms > 0 for p in t.latency_ms for s in p for c in s for ms in c)
    h = profile.hybrid
    assert (h.chunk_tokens, h.decode_batches, h.context_lens) == ((4, 8), (0, 2), (0, 16))
    assert all(ms > 0 for c in h.latency_ms for b in c for ms in b)
    assert "hybrid: chunk     8 at     16 +    2 decodes" in text
    kv = profile.kv_transfer
    assert kv.num_bytes == (2 * 2 * 16 * 2 * 16 * 4, 2 * 2 * 2 * 16 * 2 * 16 * 4)  # blocks of 16 tokens
    assert profile.host_overhead_ms is not None and profile.host_overhead_ms >= 0 and "host overhead per step" in text
    # the model's fit errors, printed and stored
    assert set(profile.fit_errors) >= {"decode_alone", "prefill_alone", "hybrid", "kv_transfer"}
    assert "step-cost model: tiny-llama0 float32 on cpu" in text and "max relative error" in text


def test_profile_command_errors(tiny_model_dir, tmp_path, capsys):
    path, _ = tiny_model_dir("llama")
    common = ["profile", "--model", path, "--dtype", "float32", "--device", "cpu",
              "--kv-cache-memory-bytes", "16MiB", "--output", str(tmp_path / "p.json")]
    assert main([*common, "--num-steps", "0"]) == 2
    assert "--num-steps >= 1" in capsys.readouterr().err
    assert main([*common, "--beside-decode-batch", "0"]) == 2
    assert "--beside-decode-batch >= 1" in capsys.readouterr().err
    assert main([*common, "--beside-decode-batch", "9", "--max-num-seqs", "8"]) == 2
    assert "--beside-decode-batch 9 > --max-num-seqs 8" in capsys.readouterr().err
    assert main([*common, "--batch-sizes", "1,300"]) == 2
    assert "a decode batch of 300 > --max-num-seqs 128" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the usage and the error
        main([*common, "--hybrid-batches", "0,-4"])
    assert "argument --hybrid-batches: expected whole numbers >= 0" in capsys.readouterr().err
    assert main([*common, "--sm-counts", "8"]) == 2
    assert "decode SM counts must be multiples of 1 below 1" in capsys.readouterr().err


def test_a_profile_of_one_context_length_says_it_cannot_tell_contexts_apart(profile):
    assert profile.limitations() == []
    d = profile.decode
    one = dataclasses.replace(profile, decode=dataclasses.replace(
        d, context_lens=d.context_lens[:1], alone_ms=tuple(row[:1] for row in d.alone_ms),
        beside_prefill_ms=tuple(row[:1] for row in d.beside_prefill_ms)))
    assert one.decode_ms(d.sm_counts[0], 64, 8 * d.context_lens[0], False) == one.decode_ms(
        d.sm_counts[0], 64, d.context_lens[0], False)  # what the note warns of
    (note,) = one.limitations()
    assert f"one context length ({d.context_lens[0]})" in note and "--context-lens" in note
    # And the H100 profile the benchmarks shipped with is such a profile.
    results = Path(__file__).parents[1] / "docs/results"
    assert len(load_profile(results / "2026-11-22-h100/profile.json").limitations()) == 1
    assert load_profile(results / "2026-11-23-h100/profile.json").limitations() == []  # 1024 and 2560


@pytest.mark.slow
def test_profile_reaches_batches_past_the_kv_cache_on_shared_blocks(tiny_model_dir, tmp_path, capsys):
    """A decode step's cost does not depend on the KV's values: a batch that needs more blocks
    than are free runs on every free block, its sequences' tables cycling through them."""
    path, _ = tiny_model_dir("llama")
    out = tmp_path / "profile.json"
    # 12 blocks of 16 tokens; the prefill runner holds 2 (24 tokens), 10 are left: a batch of 4
    # at context 64 needs 4 x 5 = 20.
    rc = main(["profile", "--model", path, "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "12",
               "--max-model-len", "128", "--batch-sizes", "1,4", "--context-lens", "8,64",
               "--prompt-tokens", "8,24", "--beside-prefill-tokens", "16", "--beside-decode-batch", "2",
               *NO_V3_TABLES,
               "--num-steps", "2", "--warmup-steps", "1", "--prefill-repeats", "1", "--output", str(out)])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("full: decode batch")]
    shared = [ln for ln in lines if "KV blocks shared" in ln]
    assert len(lines) == 4 and len(shared) == 1 and "batch    4 context     64" in shared[0]
    profile = load_profile(out)
    assert all(ms > 0 for ctx in profile.decode.alone_ms[0] for ms in ctx)
    # one sequence longer than the whole cache cannot be profiled: said, not hung
    assert main(["profile", "--model", path, "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "12",
                 "--max-model-len", "256", "--batch-sizes", "1", "--context-lens", "200",
                 "--prompt-tokens", "8", "--beside-prefill-tokens", "8", "--beside-decode-batch", "1",
                 *NO_V3_TABLES, "--output", str(out)]) == 2
    assert "no room for one sequence at context 200 (13 blocks, 11 free)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def version3():
    from test_cost_model import v3_profile

    return v3_profile("own-model")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["model_shape"].pop("kv_bytes_per_token"), r"model_shape\.kv_bytes_per_token: missing"),
    (lambda d: d["model_shape"].update(weight_bytes=-1), r"model_shape\.weight_bytes: must be at least 0"),
    (lambda d: d["model_shape"].update(experts=8), r"model_shape: unknown field 'experts'"),
    (lambda d: d.update(model_shape=[1, 2]), r"model_shape: expected an object, got list"),
    (lambda d: d["hybrid"].update(decode_batches=[0, 16, 16]),
     r"hybrid\.decode_batches: must be strictly increasing, but \[2\] = 16 follows 16"),
    (lambda d: d["hybrid"].update(chunk_tokens=[0, 1024, 2048]), r"hybrid\.chunk_tokens\[0\]: must be at least 1"),
    (lambda d: d["hybrid"]["latency_ms"][1][2].pop(), r"hybrid\.latency_ms\[1\]\[2\]: expected a list of 3 entries"),
    (lambda d: d["decode_beside_prompts"].update(sm_counts=[16, 32, 200]),
     r"decode_beside_prompts\.sm_counts: 200 exceeds the device's 132 SMs"),
    (lambda d: d["decode_beside_prompts"]["latency_ms"][1][0][1].__setitem__(0, -2),
     r"decode_beside_prompts\.latency_ms\[1\]\[0\]\[1\]\[0\]: latency must be a positive number of ms"),
    (lambda d: d["decode_beside_prompts"].pop("batch_sizes"), r"decode_beside_prompts\.batch_sizes: missing"),
    (lambda d: d["kv_transfer"].update(latency_ms=[1.0]), r"kv_transfer\.latency_ms: expected a list of 3 entries"),
    (lambda d: d.update(host_overhead_ms=-0.1), r"host_overhead_ms: expected a number of ms >= 0, got -0\.1"),
    (lambda d: d.update(host_overhead_ms="1"), r"host_overhead_ms: expected a number of ms >= 0"),
    (lambda d: d.update(fit_errors={"decode_alone": "low"}), r"fit_errors\.decode_alone: expected a relative error"),
])
def test_malformed_version_3_tables_name_the_bad_field(version3, tmp_path, edit, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(version3, edit)))
    with pytest.raises(ValueError, match=r"bad\.json: " + match):
        load_profile(path)


def test_version_3_tables_are_optional(version3, tmp_path):
    data = copy.deepcopy(version3.to_json())
    for key in ("model_shape", "hybrid", "decode_beside_prompts", "kv_transfer", "host_overhead_ms"):
        data[key] = None
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    p = load_profile(path)
    assert p.hybrid is None and p.model_shape is None and p.host_overhead_ms is None
    assert p.decode == version3.decode


def test_profile_estimates_how_long_a_grid_takes(capsys, tmp_path):
    """`--estimate-from`: a grid's time priced by the step-cost model of an earlier profile,
    with the per-partition overhead calibrated on the 2026-11-23 H100 run (66 s)."""
    h100 = str(Path(__file__).parents[1] / "docs/results/2026-11-23-h100/profile.json")
    archived = ["--batch-sizes", "1,16,64,128", "--context-lens", "1024,2560", "--prompt-tokens", "2048,8192",
                "--num-steps", "8", "--sm-counts", "16,32,48,64", *NO_V3_TABLES]
    assert main(["profile", "--output", str(tmp_path / "p.json"), "--estimate-from", h100, *archived]) == 0
    out = capsys.readouterr().out
    total = float(out.split("total")[1].split()[0])
    assert 60 < total < 72 and "decode SMs 16,32,48,64 and the whole device" in out
    # the default grid: about 3 minutes on the H100
    assert main(["profile", "--output", str(tmp_path / "p.json"), "--estimate-from", h100]) == 0
    out = capsys.readouterr().out
    assert 120 < float(out.split("total")[1].split()[0]) < 200
    assert "hybrid" in out and "decode beside prompts" in out
    assert not (tmp_path / "p.json").exists()  # nothing measured
