"""`rapidserve bench serve`: metrics on hand-built traces (exact numbers), the workload and
arrival process, and one run end to end against a live loopback server on a tiny random model."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from rapidserve.bench.metrics import RequestRecord, summarize, ttft_slo_ms
from rapidserve.bench.workloads import arrival_times, length_range, random_requests
from conftest import LiveServer

from rapidserve.entrypoints.cli import main

# Two successful requests and one failure, timings in seconds.
R1 = RequestRecord(prompt_len=1500, output_len=4, ttft=0.1, itls=(0.02, 0.03, 0.05), e2el=0.2, success=True)
R2 = RequestRecord(prompt_len=500, output_len=3, ttft=0.5, itls=(0.01, 0.01), e2el=0.52, success=True)
R3 = RequestRecord(prompt_len=700, error="HTTP 500")
TRACE = [R1, R2, R3]


def test_summary_vllm_definitions():
    s = summarize(TRACE, duration_s=2.0)
    assert (s["completed"], s["failed"], s["num_prompts"]) == (2, 1, 3)
    # Failed requests count in neither tokens nor throughput.
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (2000, 7)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx(1003.5)
    assert s["mean_ttft_ms"] == pytest.approx(300.0)
    assert s["median_ttft_ms"] == pytest.approx(300.0)
    assert s["p99_ttft_ms"] == pytest.approx(496.0)  # linear interpolation, as numpy / vLLM
    # TPOT: (e2el - ttft) / (output_len - 1): 100/3 ms and 20/2 ms.
    assert R1.tpot == pytest.approx(0.1 / 3) and R2.tpot == pytest.approx(0.01)
    assert s["mean_tpot_ms"] == pytest.approx((100 / 3 + 10) / 2)
    # ITL pools every gap: [20, 30, 50, 10, 10] ms.
    assert s["mean_itl_ms"] == pytest.approx(24.0)
    assert s["median_itl_ms"] == pytest.approx(20.0)
    assert s["p90_itl_ms"] == pytest.approx(42.0)
    assert s["mean_e2el_ms"] == pytest.approx(360.0)
    assert s["p95_e2el_ms"] == pytest.approx(200 + 0.95 * 320)
    assert "goodput_p95_itl" not in s


def test_single_token_outputs_have_no_tpot():
    r = RequestRecord(prompt_len=10, output_len=1, ttft=0.05, e2el=0.05, success=True)
    assert r.tpot is None
    s = summarize([r], 1.0)
    assert s["mean_tpot_ms"] == 0.0 and s["mean_itl_ms"] == 0.0 and s["mean_ttft_ms"] == pytest.approx(50.0)


def test_goodput():
    assert ttft_slo_ms(1500, 600) == 1200 and ttft_slo_ms(500, 600) == 600 and ttft_slo_ms(1000, 600) == 600
    # R1: p95 gap 48 ms (30 + 0.9 x 20), max 50 ms, TTFT 100 <= 1200. R2: gaps 10, TTFT 500 <= 600.
    s = summarize(TRACE, 2.0, slo_itl_ms=49, slo_ttft_ms_per_1k=600)
    assert (s["good_requests_p95_itl"], s["good_requests_max_itl"]) == (2, 1)
    assert s["goodput_p95_itl"] == pytest.approx(1.0)
    assert s["goodput_max_itl"] == pytest.approx(0.5)
    assert s["goodput_itl_only"] == pytest.approx(1.0)
    assert s["attainment_p95_itl"] == pytest.approx(2 / 3)
    assert s["attainment_max_itl"] == pytest.approx(1 / 3)
    # A tighter TTFT budget fails R2 (500 > 300) but not the ITL-only goodput.
    s = summarize(TRACE, 2.0, slo_itl_ms=49, slo_ttft_ms_per_1k=300)
    assert (s["good_requests_p95_itl"], s["good_requests_max_itl"]) == (1, 0)
    assert s["goodput_itl_only"] == pytest.approx(1.0)
    assert s["attainment_ttft_only"] == pytest.approx(1 / 3)
    # ITL alone: 40 ms fails R1 on both variants.
    s = summarize(TRACE, 2.0, slo_itl_ms=40)
    assert (s["good_requests_p95_itl"], s["good_requests_max_itl"]) == (1, 1)


def test_arrivals_rate_and_seed():
    assert arrival_times(5, math.inf) == [0.0] * 5
    for burstiness in (1.0, 0.5, 4.0):
        t = arrival_times(20000, 10.0, burstiness, seed=1)
        assert t[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(t))
        rate = (len(t) - 1) / t[-1]
        assert rate == pytest.approx(10.0, rel=0.05), (burstiness, rate)
        assert arrival_times(20000, 10.0, burstiness, seed=1) == t
    assert arrival_times(100, 10.0, seed=1) != arrival_times(100, 10.0, seed=2)
    with pytest.raises(ValueError):
        arrival_times(3, 1.0, burstiness=0)


def test_random_workload_lengths():
    assert length_range(100, 0.25) == (75, 125) and length_range(100, 0.0) == (100, 100)
    reqs = random_requests(500, 100, 40, 0.25, vocab_size=256, seed=3)
    assert all(75 <= r.prompt_len <= 125 and len(r.prompt) == r.prompt_len for r in reqs)
    assert all(30 <= r.output_len <= 50 for r in reqs)
    assert all(0 <= t < 256 for r in reqs for t in r.prompt)
    # Both ends of the range are reachable.
    assert {min(r.prompt_len for r in reqs), max(r.prompt_len for r in reqs)} == {75, 125}
    assert random_requests(500, 100, 40, 0.25, 256, seed=3) == reqs
    with pytest.raises(ValueError):
        length_range(10, 1.0)


def test_bench_serve_end_to_end(tiny_model_dir, tmp_path, capsys):
    from rapidserve.async_engine import AsyncEngine
    from rapidserve.config import EngineConfig
    from rapidserve.engine import create_engine
    from rapidserve.entrypoints.openai.server import build_app

    engine = AsyncEngine(create_engine(EngineConfig(model=tiny_model_dir("llama")[0], device="cpu",
                                                    num_kv_blocks=64)))
    live = LiveServer(build_app(engine))
    try:
        url = live.start()
        out = tmp_path / "result.json"
        rc = main(["bench", "serve", "--base-url", url, "--num-prompts", "8",
                   "--random-input-len", "16", "--random-output-len", "6", "--random-range-ratio", "0",
                   "--random-vocab-size", "256", "--request-rate", "50", "--max-concurrency", "4",
                   "--seed", "0", "--slo-itl-ms", "10000", "--slo-ttft-ms-per-1k", "10000",
                   "--timeout", "60", "--save-result", "--result-filename", str(out)])
    finally:
        live.stop()
        engine.shutdown()
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "Serving Benchmark Result" in printed and "Mean TTFT (ms):" in printed
    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["failed"] == 0, result["requests"][0]
    assert result["total_output_tokens"] == 8 * 6
    assert result["total_input_tokens"] == 8 * 16
    assert result["mean_ttft_ms"] > 0 and result["mean_e2el_ms"] >= result["mean_ttft_ms"]
    assert result["good_requests_p95_itl"] == 8
    assert len(result["requests"]) == 8
    for r in result["requests"]:
        assert r["success"] and r["output_len"] == 6 and r["ttft"] > 0 and len(r["itls"]) >= 1
    assert result["config"]["model"]  # the default model came from /v1/models
