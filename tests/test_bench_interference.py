"""`bench interference` and the step timeline: interval arithmetic on hand-built spans, ITL gaps,
and an end-to-end run of each mode on CPU with the timeline files the workers write."""

import dataclasses
import json
import math

import pytest

from rapidserve.bench.interference import LatencyStats, format_result, gaps_within, measure, percentile
from rapidserve.config import EngineConfig
from rapidserve.entrypoints.cli import main
from rapidserve.runner.timeline import StepSpan, load_spans, overlap


def _span(role, a, b):
    return StepSpan(role, 1, 1, a, b)


def test_overlap_of_hand_built_spans():
    spans = [_span("decode", 0, 1), _span("decode", 1, 2), _span("decode", 3, 4),  # busy [0,2] + [3,4]
             _span("prefill", 1.5, 3.5), _span("prefill", 1.6, 1.7)]  # busy [1.5,3.5]
    o = overlap(spans, "decode", "prefill")
    assert (o.a_busy_s, o.b_busy_s) == (3.0, 2.0)
    assert o.both_s == pytest.approx(1.0) and o.fraction_of_b == pytest.approx(0.5)
    clipped = overlap(spans, "decode", "prefill", since_s=1.8, until_s=3.2)
    assert (clipped.a_busy_s, clipped.b_busy_s) == pytest.approx((0.4, 1.4))
    assert clipped.both_s == pytest.approx(0.4)
    assert overlap(spans, "decode", "nobody").fraction_of_b == 0.0


def test_gaps_and_percentiles():
    times = {"a": [0.0, 1.0, 3.0, 6.0], "b": [2.0, 2.5]}
    assert sorted(gaps_within(times, 2.0, 5.0)) == [0.5, 2.0]
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 95) == 5
    s = LatencyStats.of([0.001, 0.003])
    assert (s.count, s.mean_ms, s.max_ms) == (2, 2.0, 3.0)
    assert math.isnan(LatencyStats.of([]).p95_ms)


@pytest.mark.parametrize("mode,placement", [("hybrid", "process"), ("rapid", "thread")])
def test_interference_end_to_end(tiny_model_dir, tmp_path, mode, placement):
    path, _ = tiny_model_dir("llama")
    config = EngineConfig(model=path, device="cpu", mode=mode, placement=placement, max_num_batched_tokens=64,
                          step_timeline=str(tmp_path / "tl"))
    r = measure(config, num_decodes=3, decode_prompt_len=12, prefill_len=150, num_prefills=3,
                prefill_concurrency=1, alone_steps=4, timeline_plot=str(tmp_path / "tl.png"))
    assert (tmp_path / "tl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.decode_alone.count >= 4 * 3 - 3 and r.decode_under_prefill.count > 0
    assert r.prefill_ttft.count == 3 and r.prefill_tokens_per_s > 0 and r.window_s > 0
    spans = load_spans(str(tmp_path / "tl"))
    roles = {s.role for s in spans}
    if mode == "hybrid":
        assert roles == {"hybrid"} and r.overlap is None
        # 150-token prompts in a 64-token budget: chunks of 64 ride along with the decodes
        assert max(s.num_tokens for s in spans) == 64
    else:
        assert roles == {"decode", "prefill"} and r.overlap is not None
        assert max(s.num_tokens for s in spans if s.role == "prefill") == 150  # whole prompts
        assert all(s.num_tokens == s.num_seqs for s in spans if s.role == "decode")
        assert 0 < r.overlap["prefill_busy_s"] and 0 <= r.overlap["prefill_time_with_decode_running"] <= 1
    assert all(s.end_s >= s.start_s for s in spans)


def test_interference_cli_writes_json(tiny_model_dir, tmp_path, capsys):
    path, _ = tiny_model_dir("llama")
    out = tmp_path / "r.json"
    assert main(["bench", "interference", "--model", path, "--load-format", "auto", "--dtype", "float32",
                 "--device", "cpu", "--num-decodes", "2", "--decode-prompt-len", "8", "--prefill-len", "40",
                 "--num-prefills", "2", "--alone-steps", "3", "--output-json", str(out)]) == 0
    assert "decode ITL, under prefill" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["result"]["prefill_ttft"]["count"] == 2 and doc["load"]["prefill_len"] == 40
    with pytest.raises(ValueError, match=">= 1"):
        measure(dataclasses.replace(EngineConfig(model=path, device="cpu")), 0, 8, 40, 1, 1, 1)


def test_interference_reports_kv_transfers_in_disagg_mode(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    config = EngineConfig(model=path, device="cpu", mode="disagg", placement="thread")
    r = measure(config, num_decodes=2, decode_prompt_len=8, prefill_len=40, num_prefills=2,
                prefill_concurrency=1, alone_steps=3)
    assert r.kv_transfer is not None and r.kv_transfer["transfers"] == 4  # 2 decodes + 2 prefills
    assert r.kv_transfer["mean_mb"] > 0 and "KV transfers: 4" in format_result(r)
    # the long prompts' own: 2 transfers of 40 tokens' KV
    k = r.kv_transfer
    assert k["prefill_transfers"] == 2 and k["prefill_mean_ms"] > 0
    decode_mb = (4 * k["mean_mb"] - 2 * k["prefill_mean_mb"]) / 2
    assert k["prefill_mean_mb"] == pytest.approx(3 * decode_mb)  # blocks of 16: 3 for 40 tokens, 1 for 8
    assert "KV transfer of each long prompt" in format_result(r)
