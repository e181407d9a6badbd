"""`rapidserve bench`: floor formulas on a known model, the engine's step stats, and both
commands end to end on a tiny CPU model (the transformers peer included)."""

import json

import pytest
import torch

from rapidserve.bench.floors import (
    DeviceRates,
    decode_step_floor_s,
    measure_device_rates,
    model_cost,
    prefill_flops,
    prefill_floor_s,
)
from rapidserve.bench.throughput import Workload, _serial_floor
from rapidserve.config import EngineConfig
from rapidserve.serving.front import StepStats
from rapidserve.serving.hybrid import LLMEngine
from rapidserve.entrypoints.cli import main
from rapidserve.model.config import ModelConfig
from rapidserve.model.loader import load_model
from rapidserve.model.presets import load_preset
from rapidserve.sampling_params import SamplingParams

H100 = DeviceRates.given(2.99, 797)  # GPU_FACTS.md's measured ceilings
TINY_ENGINE = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory-bytes", "16MiB"]


def _llama_8b_cost():
    return model_cost(ModelConfig.from_hf(load_preset("llama-3.1-8b")), torch.bfloat16)


def test_llama_8b_cost_matches_gpu_facts():
    c = _llama_8b_cost()
    assert c.num_params == 8_030_261_248
    assert c.weight_bytes == 16_060_522_496  # "weights 16.06 GB"
    assert c.kv_bytes_per_token == 131_072  # 32 layers × 2 × 8 heads × 128 × 2 bytes
    embed = 128_256 * 4096
    assert c.step_weight_bytes == c.weight_bytes - 2 * embed  # a step reads only its rows of it
    # The decoder layers' matmuls: 2 × 32 × (qkv + o + gate/up/down) per token ≈ 14 GFLOP.
    assert c.linear_flops_per_token == 2 * 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)
    assert c.attention_flops_per_pair == 4 * 32 * 4096


def test_floor_formulas_on_llama_8b():
    c = _llama_8b_cost()
    # GPU_FACTS.md's 5.4 ms at batch 1 counts the whole 16.06 GB; without the embedding table
    # (1.05 GB, of which a step reads one row per token) the floor is 5.02 ms.
    assert c.weight_bytes / H100.copy_bytes_per_s == pytest.approx(5.37e-3, rel=1e-2)
    assert decode_step_floor_s(c, H100, 0) == pytest.approx(5.02e-3, rel=1e-2)
    kv_256 = 256 * 1024
    assert decode_step_floor_s(c, H100, kv_256) == pytest.approx(
        (c.step_weight_bytes + kv_256 * 131_072) / 2.99e12
    )
    # ~20 µs per prompt token (GPU_FACTS.md: 16 GFLOP counting every parameter; 14 + attention here).
    per_token = prefill_floor_s(c, H100, 2048) / 2048
    assert 17e-6 < per_token < 20e-6
    assert prefill_flops(c, 2048) == (
        c.linear_flops_per_token * 2048 + c.attention_flops_per_pair * 2048 * 2049 // 2
        + c.lm_head_flops_per_token
    )
    # With cached context the chunk attends over it too.
    assert prefill_flops(c, 1, 99) - prefill_flops(c, 1) == c.attention_flops_per_pair * 99


def test_serial_floor_of_the_gpu_facts_workload():
    w = Workload()  # 256 × [512, 1536] + 256
    prompts = w.prompts(128_256)
    floor = _serial_floor([], prompts, w.output_len, _llama_8b_cost(), H100, max_num_seqs=256)
    assert floor is not None
    # GPU_FACTS.md: ≈ 5.3 s of prefill + ≈ 4.7 s of decode at batch 256 ≈ 10 s (its prefill
    # counts 16 GFLOP per token, ours the ~14.5 the layers and attention really need).
    assert floor.full_batch == 256
    assert 4.4 < floor.prefill_s < 5.3
    assert 8.8 < floor.full_batch_total_s < 9.4
    assert floor.decode_batch == 1.0  # no steps given: the decodes one at a time
    assert floor.total_s > floor.full_batch_total_s


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "qwen3"])
def test_param_count_matches_the_model(tiny_model_dir, kind):
    d = tiny_model_dir(kind)[0]
    loaded = load_model(d, "dummy", "float32", torch.device("cpu"))
    assert model_cost(loaded.config, torch.float32).num_params == sum(
        p.numel() for p in loaded.model.parameters()
    )


def test_device_rates_are_none_on_cpu():
    assert measure_device_rates("cpu") is None
    with pytest.raises(ValueError):
        DeviceRates.given(0, 797)


def test_workload_prompts_are_seeded_and_in_range():
    w = Workload(num_prompts=20, input_len_min=8, input_len_max=24, output_len=4, seed=3)
    a, b = w.prompts(256), w.prompts(256)
    assert a == b and len(a) == 20
    assert all(8 <= len(p) <= 24 and all(0 <= t < 256 for t in p) for p in a)
    assert Workload(num_prompts=20, input_len_min=8, input_len_max=24, seed=4).prompts(256) != a
    with pytest.raises(ValueError):
        Workload(input_len_min=30, input_len_max=20)


def test_last_step_stats(tiny):
    engine = LLMEngine(EngineConfig(model=tiny, device="cpu", kv_cache_memory_bytes="16MiB",
                                    max_num_batched_tokens=24))
    assert engine.last_step_stats == StepStats(0, 0, 0)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.add_request(list(range(1, 11)), params)  # 10 tokens
    engine.add_request(list(range(1, 21)), params)  # 20 tokens
    engine.step()
    assert engine.last_step_stats == StepStats(24, 0, 0)  # all of one prompt, a chunk of the other
    engine.step()
    # The first request decodes over its 10 prompt tokens + 1; the rest of the second prefills.
    assert engine.last_step_stats == StepStats(6, 1, 11)
    engine.step()
    assert engine.last_step_stats == StepStats(0, 2, 12 + 21)


@pytest.mark.filterwarnings("ignore:The `paged|` prefix:FutureWarning")
def test_bench_throughput(tiny, tmp_path, capsys):
    out = tmp_path / "tp.json"
    rc = main(["bench", "throughput", "--model", tiny, *TINY_ENGINE, "--num-prompts", "6",
               "--input-len-min", "8", "--input-len-max", "24", "--output-len", "4",
               "--bandwidth-tbps", "2.99", "--matmul-tflops", "797", "--output-json", str(out),
               "--peer", "transformers", "--peer-num-blocks", "16", "--peer-max-batch-tokens", "64"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "output tok/s" in text and "decode-only step" in text and "rapidserve / peer" in text
    res = json.loads(out.read_text())
    r = res["rapidserve"]
    assert r["num_requests"] == 6 and r["output_tokens"] == 6 * 4
    prompts = Workload(6, 8, 24, 4, seed=0).prompts(256)
    assert r["prompt_tokens"] == sum(len(p) for p in prompts)
    assert r["elapsed_s"] > 0
    assert r["output_tokens_per_s"] == pytest.approx(24 / r["elapsed_s"])
    assert r["total_tokens_per_s"] == pytest.approx((24 + r["prompt_tokens"]) / r["elapsed_s"])
    assert r["num_preemptions"] == 0
    # One prefill step for all six prompts, then three steps decoding all six.
    d = r["decode"]
    assert d["num_steps"] == 3 and d["mean_batch"] == 6
    assert d["floor_s"] > 0 and d["floor_ratio"] > 1
    assert r["prefill"]["num_steps"] == 1 and 0 < r["prefill"]["fraction_of_floor"] < 1
    assert r["serial_floor"]["decode_batch"] == 6 and r["serial_floor_ratio"] > 1
    # Both of the peer's paths ran; the ratio is against the faster.
    peers = res["peers"]
    assert [p["name"].split()[-1] for p in peers] == ["generate_batch", "generate"]
    for p in peers:
        assert p["output_tokens"] == 6 * 4  # EOS never stopped it
        assert p["elapsed_s"] > 0
    peer = res["peer"]
    assert peer["output_tokens_per_s"] == max(p["output_tokens_per_s"] for p in peers)
    assert res["rapidserve_over_peer"] == pytest.approx(r["output_tokens_per_s"] / peer["output_tokens_per_s"])


def test_bench_throughput_without_rates_skips_floors(tiny, tmp_path, capsys):
    out = tmp_path / "tp.json"
    rc = main(["bench", "throughput", "--model", tiny, *TINY_ENGINE, "--num-prompts", "3",
               "--input-len-min", "4", "--input-len-max", "6", "--output-len", "2",
               "--warmup-prompts", "0", "--output-json", str(out)])
    assert rc == 0
    assert "floors skipped" in capsys.readouterr().out
    r = json.loads(out.read_text())["rapidserve"]
    assert r["output_tokens"] == 6 and r["serial_floor"] is None and r["decode"]["floor_s"] is None


def test_bench_latency(tiny, tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--model", tiny, *TINY_ENGINE, "--batch-sizes", "1,2",
               "--context-lens", "16,32", "--num-steps", "4", "--warmup-steps", "1",
               "--prefill-len", "64", "--prefill-repeats", "2",
               "--bandwidth-tbps", "2.99", "--matmul-tflops", "797", "--output-json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    points = res["decode"]
    assert [(p["batch_size"], p["context_len"]) for p in points] == [(1, 16), (2, 16), (1, 32), (2, 32)]
    for p in points:
        assert p["skipped"] is None
        assert 0 < p["median_s"] <= p["p90_s"]
        # Timed after the prefill (+ the first token) and a warm-up step: past the prompt.
        assert p["context_len"] + 2 <= p["mean_context"] <= p["context_len"] + 8
        assert p["floor_s"] > 0 and p["floor_ratio"] == pytest.approx(p["median_s"] / p["floor_s"])
    pre = res["prefill"]
    assert pre["prompt_len"] == 64 and pre["median_s"] > 0
    assert pre["fraction_of_matmul_rate"] == pytest.approx(pre["floor_s"] / pre["median_s"])
    assert "prefill of 64 tokens" in capsys.readouterr().out


def test_bench_latency_says_when_the_cache_is_too_small(tiny, tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--model", tiny, "--dtype", "float32", "--device", "cpu",
               "--num-kv-blocks", "8", "--batch-sizes", "1,4", "--context-lens", "32",
               "--num-steps", "2", "--prefill-len", "0", "--output-json", str(out)])
    assert rc == 0
    first, second = json.loads(out.read_text())["decode"]
    assert first["skipped"] is None and first["floor_s"] is None  # CPU: no rates, no floor
    assert "KV blocks" in second["skipped"] and second["median_s"] is None
    assert "skipped: needs" in capsys.readouterr().out


@pytest.mark.parametrize("ahead", [False, True])
def test_run_workload_attributes_each_step_once(tiny, ahead):
    """With one-step-ahead scheduling a step() call reads back the step before the one it
    launches: the records must still hold every prompt token and decode exactly once."""
    from rapidserve.bench.throughput import run_workload

    engine = LLMEngine(EngineConfig(model=tiny, device="cpu", max_num_batched_tokens=64, async_scheduling=ahead))
    prompts = [[1 + i] * (10 + 7 * i) for i in range(6)]
    run = run_workload(engine, prompts, output_len=5)
    assert run.output_tokens == 6 * 5
    assert sum(s.num_prefill_tokens for s in run.steps) == sum(map(len, prompts))
    assert sum(s.num_decode_tokens for s in run.steps) == 6 * 4  # the first token of each comes with its prefill
    assert all(s.seconds > 0 for s in run.steps)
