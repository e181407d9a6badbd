"""The fused MoE Triton kernels (rapidserve.ops.fused_moe) against the torch reference
(rapidserve.model.moe.experts_reference, itself checked against transformers).

Without CUDA the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1),
on small shapes and small tiles so that the row, column and reduction loops all take several
tiles. The `gpu` tests run the real kernels (bf16, Mixtral-like widths) and inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from rapidserve import ops
from rapidserve.model.config import ModelConfig
from rapidserve.model.moe import SparseMoeBlock, experts_reference, route
from rapidserve.ops.fused_moe import TileConfig, align_by_expert, fused_experts, tile_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILES = TileConfig(16, 16, 16, 1, 1)
# fp32: products accumulate in another order; 16-bit: the k slots are summed once in fp32
# where torch's index_add rounds after each expert (and an fp32-ulp change of a matmul can
# move a rounded intermediate by one ulp).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _case(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
          seed: int = 0, ids: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    weights, topk_ids = route(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    if ids is not None:
        topk_ids = ids
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return to(x), to(w13), to(w2), weights.to(DEVICE), topk_ids.to(DEVICE)


def _check(args, dtype: torch.dtype, config: TileConfig | None = SMALL_TILES) -> None:
    x, w13, w2, weights, ids = args
    got = fused_experts(x, w13, w2, weights, ids, config)
    want = experts_reference(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    assert got.dtype == x.dtype and got.shape == x.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol * float(want.abs().max().clamp(min=1)))


@pytest.mark.parametrize(
    "tokens, experts, top_k, hidden, inter, dtype",
    [
        (1, 4, 2, 40, 24, torch.float32),    # a decode of one token: two experts, two empty
        (1, 4, 2, 40, 24, torch.bfloat16),
        (5, 8, 2, 48, 40, torch.float32),    # uneven widths (masked column and reduction tiles)
        (5, 8, 2, 48, 40, torch.float16),
        (37, 4, 2, 32, 48, torch.float32),   # several row tiles per expert
        (37, 4, 2, 32, 48, torch.bfloat16),
        (3, 16, 4, 32, 16, torch.float32),   # most experts get no token
        (3, 16, 4, 32, 16, torch.float16),
    ],
)
def test_fused_experts_match_reference(tokens, experts, top_k, hidden, inter, dtype):
    _check(_case(tokens, experts, top_k, hidden, inter, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routing_weights_in_the_activation_dtype(dtype):
    # Qwen's routers round the weights to the activation dtype: the scaled pairs are rounded
    # too (Mixtral's fp32 weights keep them fp32 until the slot sum).
    x, w13, w2, weights, ids = _case(9, 4, 2, 32, 48, dtype, seed=4)
    _check((x, w13, w2, weights.to(dtype), ids), dtype)


def test_one_token_per_expert_and_no_tokens():
    # Every expert exactly one pair: each row tile holds one valid row and 15 padding rows.
    ids = torch.arange(6).view(6, 1)
    _check(_case(6, 6, 1, 32, 32, torch.float32, ids=ids), torch.float32)
    # All tokens on one expert, the others idle.
    ids = torch.zeros(20, 1, dtype=torch.int64)
    _check(_case(20, 4, 1, 32, 32, torch.float32, ids=ids), torch.float32)
    x, w13, w2, weights, ids = _case(0, 4, 2, 32, 16, torch.float32)
    assert fused_experts(x, w13, w2, weights, ids).shape == (0, 32)


def test_default_tiles_match_reference():
    _check(_case(9, 4, 2, 64, 96, torch.float32, seed=2), torch.float32, config=None)


def test_bad_expert_shapes_are_refused():
    x, w13, w2, weights, ids = _case(2, 4, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="expert weights"):
        fused_experts(x, w13, w2[:, :, :8], weights, ids)


@pytest.mark.parametrize("tokens, experts, top_k, block_m", [(1, 4, 2, 16), (50, 8, 2, 16), (7, 3, 3, 4), (0, 4, 2, 16), (600, 8, 2, 64)])
def test_align_by_expert(tokens, experts, top_k, block_m):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]) if tokens else (
        torch.empty(0, top_k, dtype=torch.int64))
    align = align_by_expert(ids, experts, block_m)
    n = tokens * top_k
    pairs, blocks = align.sorted_pairs, align.block_expert
    # static size: the bound on the padded pair count, whatever the routing
    assert pairs.numel() == -(-(n + experts * (block_m - 1)) // block_m) * block_m
    assert blocks.numel() == pairs.numel() // block_m
    real = pairs[pairs < n]
    assert sorted(real.tolist()) == list(range(n))  # each pair exactly once
    flat = ids.reshape(-1)
    for b, expert in enumerate(blocks.tolist()):
        tile = pairs[b * block_m:(b + 1) * block_m]
        tile = tile[tile < n]
        if expert == experts:
            assert tile.numel() == 0  # past the last expert's group: no work
        else:
            assert (flat[tile.long()] == expert).all()
            assert tile.tolist() == sorted(tile.tolist())  # stable: pair order kept


def test_tile_config_grows_with_rows_per_expert_and_fits_hopper():
    small, large = tile_config(2, 8), tile_config(8 * 4096, 8)
    assert small.block_m == 16 and large.block_m > small.block_m
    for pairs in (1, 64, 256, 4096, 8 * 4096):
        for itemsize in (2, 4):
            c = tile_config(pairs, 8, itemsize)
            assert min(c.block_m, c.block_n, c.block_k) >= 16  # tl.dot's minimum
            # per pipeline stage: an A tile and the gate and up weight tiles
            smem = c.num_stages * (c.block_m * c.block_k + 2 * c.block_k * c.block_n) * itemsize
            assert smem <= 160 * 1024, (pairs, itemsize, c)  # Hopper: 227 KB per block
            assert 2 * c.block_m * c.block_n // (32 * c.num_warps) <= 64  # accumulator registers


def _tiny_moe_config(shared: int = 0) -> ModelConfig:
    return ModelConfig.from_hf({
        "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": shared, "norm_topk_prob": True,
    })


def test_moe_block_fused_path_matches_cpu_path(monkeypatch):
    from rapidserve.model.llama import make_mlp

    torch.manual_seed(0)
    block = make_mlp(_tiny_moe_config(shared=40), 0).to(DEVICE)
    assert isinstance(block, SparseMoeBlock) and block.shared_expert is not None
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(11, 32, device=DEVICE)
    monkeypatch.setattr(ops, "fused_enabled", lambda t: False)
    want = block(x.cpu() if DEVICE == "cpu" else x)
    monkeypatch.setattr(ops, "fused_enabled", lambda t: True)
    got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 128, 2048])
def test_gpu_bf16_mixtral_widths(tokens):
    # Mixtral's hidden with a narrower expert (the kernels' tiling, not its size, is tested).
    _check(_case(tokens, 8, 2, 4096, 1792, torch.bfloat16), torch.bfloat16, config=None)


@pytest.mark.gpu
def test_gpu_fused_experts_replay_in_a_cuda_graph():
    x, w13, w2, weights, ids = _case(32, 8, 2, 256, 128, torch.bfloat16)
    out = fused_experts(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    for seed in (1, 2, 3):  # new routing and inputs, same buffers
        nx, _, _, nweights, nids = _case(32, 8, 2, 256, 128, torch.bfloat16, seed=seed)
        x.copy_(nx), weights.copy_(nweights), ids.copy_(nids)
        graph.replay()
        want = experts_reference(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
        rtol, atol = TOL[torch.bfloat16]
        torch.testing.assert_close(out.cpu(), want, rtol=rtol, atol=atol * float(want.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_gpu_tiny_moe_models_with_graphs_match_hf(kind, tiny_model_dir):
    """The fused kernel inside the decode and piecewise CUDA graphs: fp32 greedy tokens equal
    HF's (the fp32 kernels do ieee fp32 products)."""
    from conftest import hf_greedy, random_prompts

    from rapidserve import LLM, SamplingParams

    path, hf = tiny_model_dir(kind)
    prompts = random_prompts(6, seed=5, max_len=90)
    llm = LLM(model=path, device="cuda", dtype="float32", max_num_batched_tokens=64, kv_cache_memory_bytes="64MiB")
    assert llm.engine.runner.decode_graphs is not None and llm.engine.runner.piecewise is not None
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


@pytest.mark.gpu
@pytest.mark.parametrize("placement", ["thread", "process"])
def test_gpu_rapid_mode_runs_moe(placement, tiny_model_dir):
    from conftest import random_prompts

    from rapidserve import LLM, SamplingParams

    path, _ = tiny_model_dir("qwen2-moe")
    prompts = random_prompts(8, seed=3, max_len=90)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(model=path, device="cuda", dtype="float32", kv_cache_memory_bytes="128MiB")
    ref = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, params)]
    llm = LLM(mode="rapid", placement=placement, **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref
    finally:
        llm.engine.shutdown()


def test_kernel_bench_script_runs(tmp_path, monkeypatch, capsys):
    """scripts/moe_kernel_bench.py (run by gpu_evidence.sh's moe stage), tiny on CPU."""
    import json
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path / "k.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "moe_kernel_bench.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--dtype", "float32", "--hidden", "32",
                                      "--inter", "16", "--tokens", "3", "--repeats", "1", "--output-json", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    (point,) = json.loads(out.read_text())["points"]
    assert point["tokens"] == 3 and 2 <= point["experts_touched"] <= 6 and point["fused_ms"] > 0
    assert "T     3:" in capsys.readouterr().out
