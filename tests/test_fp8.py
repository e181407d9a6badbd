"""FP8 weights (model/quant.py): the linear layer's two paths, quantization at load, FP8
checkpoints (per tensor, per channel via compressed-tensors, 128x128-style blocks) and their
errors, dummy FP8 weights; the engine with FP8 weights and KV in every mode.

The accuracy of FP8 on a real model (SmolLM2) is in test_fp8_accuracy.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_prompts

from rapidserve import LLM, SamplingParams
from rapidserve.bench.floors import model_cost
from rapidserve.kv.cache import KVCacheSpec
from rapidserve.model.config import ModelConfig
from rapidserve.model.loader import load_model
from rapidserve.model.presets import load_preset
from rapidserve.model.quant import Fp8Linear, checkpoint_quantization
from rapidserve.ops.fp8 import FP8_DTYPE, FP8_MAX, quantize_rows, to_fp8

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_proj(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in _PROJ)


# ---------------------------------------------------------------------------------- the layer


def test_quantize_rows_roundtrip_and_saturation():
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 7)[:, None]
    x[0, 0] = 1e-5 * x[0].abs().max()  # below E4M3's smallest normal once scaled: a subnormal
    q, s = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and s.shape == (7, 1)
    assert torch.equal(q.float().abs().amax(1), torch.full((7,), FP8_MAX))  # each row uses the range
    # Half a step of E4M3: 2^-4 relative for normals, 2^-10 x the scale for subnormals (their
    # step is 2^-9). NOTE: a relative bound alone failed ~11 % of unseeded draws (a |x| under
    # ~3.5e-5 of its row's largest lands subnormal).
    err = (q.float() * s - x).abs()
    assert (err <= torch.maximum(2**-4 * x.abs(), 2**-10 * s)).all()
    zeros, zs = quantize_rows(torch.zeros(2, 8))
    assert (zeros.float() == 0).all() and (zs > 0).all()
    assert to_fp8(torch.tensor([1e6, -1e6]), 1.0).float().tolist() == [448.0, -448.0]  # no NaN


def _fp8_linear(n_in: int, n_out: int, bias: bool, seed: int = 0) -> tuple[Fp8Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lin = Fp8Linear(n_in, n_out, bias)
    lin.init_dummy(gen, std=0.1)
    if bias:
        lin.bias.data.normal_(generator=gen)
    return lin, torch.randn(5, 3, n_in, generator=gen)


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_dequantized_path_matches_its_math(bias):
    """CPU path: per-token activation quantization times the per-channel weights."""
    lin, x = _fp8_linear(96, 48, bias)
    xq, xs = quantize_rows(x)
    ref = (xq.float() * xs) @ lin.dequantized().T + (lin.bias if bias else 0)
    got = lin(x)
    assert got.shape == (5, 3, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and close to the unquantized activations (the per-token rounding is small)
    exact = x @ lin.dequantized().T + (lin.bias if bias else 0)
    assert (got - exact).norm() / exact.norm() < 0.05


def test_fp8_linear_init_dummy_chunks_rows():
    lin = Fp8Linear(256, 100, bias=False)
    lin.init_dummy(torch.Generator().manual_seed(0), chunk_elements=256 * 30)  # 4 chunks, 1 partial
    assert lin.weight.dtype == FP8_DTYPE and (lin.weight_scale > 0).all()
    assert torch.equal(lin.weight.float().abs().amax(1), torch.full((100,), FP8_MAX))
    std = lin.dequantized().std().item()
    assert 0.018 < std < 0.022


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_linear_scaled_mm_matches_dequantized_path(dtype):
    from rapidserve.ops.fp8 import fp8_matmul_supported

    if not fp8_matmul_supported(torch.device("cuda")):
        pytest.skip("needs a GPU with FP8 (compute capability >= 8.9)")
    lin, x = _fp8_linear(4096, 1024, bias=True)
    lin = lin.cuda()
    lin.bias.data = lin.bias.data.to(dtype)
    x = x.reshape(-1, 4096).cuda().to(dtype)
    got = lin(x)
    assert lin._scaled_mm is True and got.dtype == dtype
    lin._scaled_mm = False
    ref = lin(x)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for m in (1, 3, 17, 257):  # batch sizes of decode graphs and odd prefill chunks
        lin._scaled_mm = True
        a = lin(x[:m])
        lin._scaled_mm = False
        torch.testing.assert_close(a.float(), lin(x[:m]).float(), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------- loading and checkpoints


def test_quantized_at_load_per_channel(tiny_model_dir):
    d, hf = tiny_model_dir("llama")
    loaded = load_model(d, "auto", "float32", CPU, quantization="fp8")
    m = loaded.model
    assert loaded.config.quantization == "fp8"
    layer = m.layers[1]
    qkv = layer.self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == FP8_DTYPE
    assert isinstance(layer.mlp.down_proj, Fp8Linear)
    assert m.lm_head.weight.dtype == torch.float32 and m.embed_tokens.weight.dtype == torch.float32
    hl = hf.model.layers[1]
    want = torch.cat([hl.self_attn.q_proj.weight, hl.self_attn.k_proj.weight, hl.self_attn.v_proj.weight])
    # per output channel: each row's error is within half an E4M3 step of its own max
    torch.testing.assert_close(qkv.dequantized(), want.detach(), rtol=2**-4,
                               atol=want.abs().amax().item() * 2**-10)
    ids = torch.tensor(random_prompts(1, seed=5, min_len=40, max_len=41)[0])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    got = _forward_logits(m, ids)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (got - ref).norm() / ref.norm() < 0.25  # W8A8 of a random model with std-0.2 weights


def _forward_logits(model, ids: torch.Tensor, kv_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One prefill of ids [T] over a fresh paged cache (torch backend) -> logits [T, vocab]."""
    from rapidserve.attention.backend import TorchAttention
    from rapidserve.attention.metadata import AttentionMetadata, forward_context
    from rapidserve.kv.cache import KVCache

    n, bs = len(ids), 16
    cache = KVCache(KVCacheSpec.for_model(model.config, bs, kv_dtype), math.ceil(n / bs), CPU)
    for i, attn in enumerate(model.attention_layers):
        attn.bind(*cache.layer(i), TorchAttention())
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(cache.num_blocks, dtype=torch.int32)[None],
        query_start_loc_host=[0, n], seq_lens_host=[n], max_query_len=n, max_seq_len=n)
    with torch.inference_mode(), forward_context(meta):
        return model.compute_logits(model(ids, torch.arange(n)))


def _write_fp8_checkpoint(src: str, dst: Path, scheme: str, drop: str | None = None,
                          bad_shape: str | None = None) -> dict[str, torch.Tensor]:
    """A copy of the tiny HF checkpoint at `src` with FP8 projections; returns the dequantized
    weights it stores (by HF name). scheme: tensor | channel (compressed-tensors) | block."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    out, deq = {}, {}
    for name, w in tensors.items():
        if not _is_proj(name):
            out[name] = w
            continue
        prefix = name[: -len(".weight")]
        if scheme == "tensor":
            s = w.abs().amax() / FP8_MAX
            q = to_fp8(w, s)
            deq[name] = q.float() * s
            out[f"{prefix}.weight_scale"] = s.reshape(())  # HF FP8 writes a scalar
            out[f"{prefix}.input_scale"] = torch.tensor(0.5)  # static: ignored
        elif scheme == "channel":
            q, s = quantize_rows(w)
            deq[name] = q.float() * s
            out[f"{prefix}.weight_scale"] = s  # [out, 1], as compressed-tensors
        else:  # 32 x 32 blocks: the tiny model's 64 x 128 projections have 2 x 4 of them
            b = 32
            blocks = w.reshape(w.shape[0] // b, b, w.shape[1] // b, b)
            s = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [out / b, in / b]
            full = s.repeat_interleave(b, 0).repeat_interleave(b, 1)
            q = to_fp8(w, full)
            deq[name] = q.float() * full
            out[f"{prefix}.weight_scale_inv"] = s
        out[name] = q
    if drop is not None:
        del out[drop]
    if bad_shape is not None:
        out[bad_shape] = torch.ones(3, 5)
    if scheme == "channel":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
            "ignore": ["lm_head"],
        }
    else:
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      **({"weight_block_size": [32, 32]} if scheme == "block" else {})}
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return deq


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_prequantized_checkpoints_load(tiny_model_dir, tmp_path, scheme):
    d, hf = tiny_model_dir("llama")
    deq = _write_fp8_checkpoint(d, tmp_path / scheme, scheme)
    loaded = load_model(str(tmp_path / scheme), "auto", "float32", CPU)  # detected, no flag
    assert loaded.config.quantization == "fp8"
    for i, layer in enumerate(loaded.model.layers):
        pre = f"model.layers.{i}"
        qkv = torch.cat([deq[f"{pre}.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
        got = layer.self_attn.qkv_proj.dequantized()
        down = deq[f"{pre}.mlp.down_proj.weight"]
        if scheme == "block":
            # blocks -> per-channel: the stored values, rounded once more to E4M3 per row
            torch.testing.assert_close(got, qkv, rtol=2**-4, atol=qkv.abs().amax().item() * 2**-10)
        else:
            assert torch.equal(got, qkv)  # the checkpoint's bytes and scales, exactly
            assert torch.equal(layer.mlp.down_proj.dequantized(), down)
    # HF on the dequantized weights is the oracle of what the checkpoint means
    with torch.no_grad():
        ref_model = type(hf)(hf.config).eval()
        ref_model.load_state_dict({**hf.state_dict(), **deq})
        ids = torch.tensor(random_prompts(1, seed=6, min_len=30, max_len=31)[0])
        ref = ref_model(ids[None]).logits[0]
    got = _forward_logits(loaded.model, ids)
    # what remains is the per-token activation rounding, large on this random std-0.2 model
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
    assert (got - ref).norm() / ref.norm() < 0.25


def test_prequantized_checkpoint_errors_name_the_tensor(tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir("llama")
    name = "model.layers.1.mlp.up_proj.weight_scale"
    _write_fp8_checkpoint(d, tmp_path / "missing", "tensor", drop=name)
    with pytest.raises(ValueError, match=r"FP8 weight model\.layers\.1\.mlp\.up_proj\.weight has no scale"):
        load_model(str(tmp_path / "missing"), "auto", "float32", CPU)
    _write_fp8_checkpoint(d, tmp_path / "shape", "channel", bad_shape="model.layers.0.self_attn.k_proj.weight_scale")
    with pytest.raises(ValueError, match=r"scale model\.layers\.0\.self_attn\.k_proj\.weight_scale has shape \(3, 5\)"):
        load_model(str(tmp_path / "shape"), "auto", "float32", CPU)


def test_checkpoint_quantization_configs():
    assert checkpoint_quantization({}) is None
    assert checkpoint_quantization({"quantization_config": {"quant_method": "fp8"}}).block is None
    assert checkpoint_quantization(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}).block == (128, 128)
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        checkpoint_quantization({"quantization_config": {"quant_method": "awq"}})
    with pytest.raises(ValueError, match="weight_block_size"):
        checkpoint_quantization({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}})
    int4 = {"quant_method": "compressed-tensors",
            "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}
    with pytest.raises(ValueError, match="only 8-bit float"):
        checkpoint_quantization({"quantization_config": int4})


def test_kv_scales_from_the_checkpoint(tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir("llama")
    _write_fp8_checkpoint(d, tmp_path / "kv", "channel")
    tensors = load_file(str(tmp_path / "kv" / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.25)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([2.0, 3.0])  # per KV head
    save_file(tensors, str(tmp_path / "kv" / "model.safetensors"), metadata={"format": "pt"})
    m = load_model(str(tmp_path / "kv"), "auto", "float32", CPU).model
    assert m.layers[0].self_attn.attn.k_scale.tolist() == [0.25, 0.25]
    assert m.layers[1].self_attn.attn.v_scale.tolist() == [2.0, 3.0]
    assert m.layers[1].self_attn.attn.k_scale.tolist() == [1.0, 1.0]
    tensors["model.layers.1.self_attn.v_scale"] = torch.ones(3)
    save_file(tensors, str(tmp_path / "kv" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"KV scale model\.layers\.1\.self_attn\.v_scale has shape \(3,\)"):
        load_model(str(tmp_path / "kv"), "auto", "float32", CPU)


def test_model_cost_counts_fp8_weights_and_kv():
    """The benchmarks' floors (bench/floors.py) read FP8 weights and KV at one byte."""
    cfg = ModelConfig.from_hf(load_preset("llama-3.1-8b"))
    bf16 = model_cost(cfg, torch.bfloat16)
    fp8 = model_cost(dataclasses.replace(cfg, quantization="fp8"), torch.bfloat16, FP8_DTYPE)
    assert fp8.num_params == bf16.num_params and fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
    tables = 2 * cfg.vocab_size * cfg.hidden_size * 2  # the bf16 embedding and LM head stay
    halved = (bf16.weight_bytes - tables) / 2
    assert halved < fp8.weight_bytes - tables < halved * 1.001  # + norms and per-channel scales
    assert fp8.step_weight_bytes == fp8.weight_bytes - tables // 2


def test_the_70b_preset_fits_one_h200_in_fp8():
    cfg = dataclasses.replace(ModelConfig.from_hf(load_preset("llama-3.1-70b")), quantization="fp8")
    cost = model_cost(cfg, torch.bfloat16, FP8_DTYPE)
    assert 70e9 < cost.num_params < 71e9  # Llama-3.1-70B: 70.6B parameters
    assert 70e9 < cost.weight_bytes < 73e9  # 141 GB in bf16; an H200 has ~139 GiB (149 GB) usable
    assert cost.kv_bytes_per_token == 80 * 2 * 8 * 128  # 160 KiB per token: 50 GB hold 305K tokens


def test_dummy_fp8_builds_fp8_weights(tiny):
    loaded = load_model(tiny, "dummy", "float32", CPU, quantization="fp8")
    lin = loaded.model.layers[0].mlp.gate_up_proj
    assert isinstance(lin, Fp8Linear) and lin.weight.dtype == FP8_DTYPE
    assert 0.018 < lin.dequantized().std().item() < 0.022
    again = load_model(tiny, "dummy", "float32", CPU, quantization="fp8").model.layers[0].mlp.gate_up_proj
    assert torch.equal(lin.weight.view(torch.uint8), again.weight.view(torch.uint8))  # seeded


# --------------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def fp8_reference(tiny):
    prompts = random_prompts(6, seed=11, max_len=60)
    llm = LLM(model=tiny, device="cpu", quantization="fp8", kv_cache_dtype="fp8")
    return prompts, [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("kw", [
    dict(max_num_batched_tokens=16),  # chunked prefill over the FP8 cache, mixed steps
    dict(mode="rapid", placement="thread"),
    dict(mode="disagg", placement="thread"),
])
def test_fp8_engine_every_mode_gives_the_same_tokens(tiny, fp8_reference, kw):
    prompts, ref = fp8_reference
    llm = LLM(model=tiny, device="cpu", quantization="fp8", kv_cache_dtype="fp8", **kw)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        llm.engine.shutdown()
    assert got == ref


def test_fp8_engine_tokens_match_the_forward(tiny, fp8_reference):
    """The engine's greedy tokens are the model's own argmax over prompt + generated text."""
    prompts, ref = fp8_reference
    model = load_model(tiny, "auto", "float32", CPU, quantization="fp8").model
    for p, toks in zip(prompts[:3], ref[:3]):
        ids = torch.tensor(p + toks)
        logits = _forward_logits(model, ids, FP8_DTYPE)
        assert logits[len(p) - 1:-1].argmax(-1).tolist() == toks


def test_fp8_kv_pool_has_twice_the_blocks(tiny):
    sizes = {}
    for kv in ("auto", "fp8"):
        llm = LLM(model=tiny, device="cpu", dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory_bytes="1MiB")
        sizes[kv] = llm.engine.num_kv_blocks
        assert llm.generate([[1, 2, 3]], GREEDY)[0].outputs[0].finish_reason == "length"
    assert sizes["fp8"] == 2 * sizes["auto"]


def test_disagg_fp8_kv_copy_moves_half_the_bytes(tiny):
    bytes_ = {}
    prompt = list(range(1, 41))  # 3 blocks of 16
    for kv in ("auto", "fp8"):
        llm = LLM(model=tiny, device="cpu", dtype="bfloat16", kv_cache_dtype=kv, mode="disagg", placement="thread")
        try:
            llm.generate([prompt], GREEDY)
            bytes_[kv] = llm.engine.stats().kv_transfer.num_bytes
        finally:
            llm.engine.shutdown()
    # tiny llama: 2 layers x (k, v) x 16 slots x 2 heads x 16 dims, 3 blocks
    assert bytes_["auto"] == 3 * 2 * 2 * 16 * 2 * 16 * 2
    assert bytes_["fp8"] * 2 == bytes_["auto"]


def test_bad_flags_are_value_errors(tiny):
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        LLM(model=tiny, device="cpu", quantization="int4")
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'fp4'"):
        LLM(model=tiny, device="cpu", kv_cache_dtype="fp4")


@pytest.mark.parametrize("command", [["serve"], ["generate"], ["profile", "--output", "p.json"], ["bench", "latency"]])
def test_cli_flags_reach_the_engine_config(command):
    from rapidserve.entrypoints.args import engine_config_from_args
    from rapidserve.entrypoints.cli import build_parser

    args = build_parser().parse_args([*command, "--quantization", "fp8", "--kv-cache-dtype", "fp8"])
    config = engine_config_from_args(args)
    assert (config.quantization, config.kv_cache_dtype) == ("fp8", "fp8")
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--quantization", "awq"])


def _hf_with_our_weights(hf, model):
    """A copy of the HF model whose projections are our FP8 model's, dequantized."""
    cfg = model.config
    ref = type(hf)(hf.config).eval()
    state = dict(hf.state_dict())
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}"
        q, k, v = layer.self_attn.qkv_proj.dequantized().split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        gate, up = layer.mlp.gate_up_proj.dequantized().split(cfg.intermediate_size)
        for name, w in [("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v),
                        ("self_attn.o_proj", layer.self_attn.o_proj.dequantized()), ("mlp.gate_proj", gate),
                        ("mlp.up_proj", up), ("mlp.down_proj", layer.mlp.down_proj.dequantized())]:
            state[f"{pre}.{name}.weight"] = w
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama-tied", "mistral"])
def test_fp8_weights_on_every_family(tiny_model_dir, kind, monkeypatch):
    """Biased q/k/v (Qwen2), per-head q/k norms (Qwen3), a tied LM head: with the activations
    left unrounded, the FP8 model is HF on the dequantized weights (the wiring is exact); with
    them rounded per token, close to HF on the original weights."""
    import rapidserve.model.quant as quant

    d, hf = tiny_model_dir(kind)
    model = load_model(d, "auto", "float32", CPU, quantization="fp8").model
    ids = torch.tensor(random_prompts(1, seed=7, min_len=30, max_len=31)[0])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        ref_deq = _hf_with_our_weights(hf, model)(ids[None]).logits[0]
    got = _forward_logits(model, ids)
    # (a random std-0.2 model's logits are near ties: top-1 says little here; SmolLM2's is tested)
    assert (got - ref).norm() / ref.norm() < 0.25
    monkeypatch.setattr(quant, "quantize_rows", lambda x: (x, torch.ones(*x.shape[:-1], 1)))
    torch.testing.assert_close(_forward_logits(model, ids), ref_deq, rtol=1e-4, atol=1e-4)


def test_fp8_linear_empty_batch():
    lin, _ = _fp8_linear(32, 16, bias=True)
    assert lin(torch.zeros(0, 32)).shape == (0, 16)


@pytest.mark.gpu
def test_fp8_engine_on_gpu_graphs_match_eager(tiny):
    """FP8 weights (scaled matmul on >= 8.9, dequantized below) and an FP8 KV cache (triton,
    >= 8.9) on CUDA: the decode graphs and piecewise graphs give the eager tokens."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 KV with triton needs compute capability >= 8.9")
    prompts = random_prompts(8, seed=2, max_len=200)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        llm = LLM(model=tiny, dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8",
                  enforce_eager=eager, max_num_batched_tokens=64)
        runs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.runner.model.layers[0].mlp.down_proj._scaled_mm is True
    assert runs[True] == runs[False]


def test_profile_records_fp8():
    """A profile measured with FP8 weights / KV says so (its step times are not bf16's)."""
    from types import SimpleNamespace

    from rapidserve.config import EngineConfig
    from rapidserve.resources.profiler import _dtype_label

    def label(**kw):
        return _dtype_label(SimpleNamespace(dtype=torch.bfloat16, config=EngineConfig(**kw)))

    assert label() == "bfloat16"
    assert label(quantization="fp8", kv_cache_dtype="fp8") == "bfloat16+fp8-weights+fp8-kv"
    assert label(kv_cache_dtype="fp8_e4m3") == "bfloat16+fp8-kv"
