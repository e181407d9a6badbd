"""Mixture-of-experts models (rapidserve.model.moe) on CPU: HF-equal greedy tokens in every
mode and checkpoint layout, chunking and preemption, loading errors, the config's MoE fields.

The HF-oracle test over the three tiny MoE architectures in hybrid mode lives with the dense
ones in test_hf_equivalence.py; here the other modes and layouts run on tiny Mixtral.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import hf_greedy, run_engine

from rapidserve import LLM, SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.model.config import ModelConfig
from rapidserve.model.loader import load_model
from rapidserve.model.moe import experts_reference, route

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _prompts(n: int = 4, seed: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(length)] for length in (1, 9, 33, 70)[:n]]


@pytest.fixture(scope="module")
def mixtral(tiny_model_dir):
    """(checkpoint dir, HF model, prompts, HF's greedy tokens for them)."""
    path, hf = tiny_model_dir("mixtral")
    prompts = _prompts()
    return path, hf, prompts, [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


# ---------------------------------------------------------------------------- every mode


def test_chunked_prefill_and_preemption_match_hf(mixtral):
    path, _, prompts, ref = mixtral
    assert _tokens(LLM(model=path, device="cpu", max_num_batched_tokens=16), prompts) == ref
    small = LLM(model=path, device="cpu", num_kv_blocks=7, block_size=16, max_num_batched_tokens=32)
    assert _tokens(small, prompts) == ref
    assert small.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize(
    "mode, placement", [("rapid", "thread"), ("rapid", "process"), ("disagg", "thread"), ("disagg", "process")]
)
def test_every_mode_matches_hf(mixtral, mode, placement):
    path, _, prompts, ref = mixtral
    engine = create_engine(EngineConfig(model=path, device="cpu", mode=mode, placement=placement))
    try:
        assert [o.outputs[0].token_ids for o in run_engine(engine, prompts, GREEDY)] == ref
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------ checkpoint layouts


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_fused_expert_layout_matches_hf(kind, tiny_model_dir, tmp_path):
    # Newer transformers keep (and may write) experts stacked: experts.gate_up_proj
    # [E, 2I, H] and experts.down_proj [E, H, I]: the in-memory state dict is that layout.
    src, hf = tiny_model_dir(kind)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(Path(src, "config.json").read_text())
    prompts = _prompts(3)
    got = _tokens(LLM(model=str(tmp_path), device="cpu"), prompts)
    assert got == [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


def _per_expert_copy(src: str, dst: Path, edit) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(Path(src, "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" in state  # the original layout
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(Path(src, "config.json").read_text())
    return dst


def _load(path: Path) -> None:
    load_model(str(path), "auto", "float32", torch.device("cpu"))


def test_missing_expert_names_the_tensor(mixtral, tmp_path):
    path = _per_expert_copy(mixtral[0], tmp_path, lambda s: s.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 weights: model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight"):
        _load(path)


def test_wrong_expert_shape_names_the_tensor(mixtral, tmp_path):
    def edit(state):
        name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
        state[name] = state[name][:, :-1].contiguous()

    path = _per_expert_copy(mixtral[0], tmp_path, edit)
    with pytest.raises(ValueError, match=r"block_sparse_moe\.experts\.3\.w2\.weight' has shape \(64, 127\)"):
        _load(path)


def test_extra_expert_is_unexpected(mixtral, tmp_path):
    def edit(state):
        state["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(128, 64)

    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.0\.block_sparse_moe\.experts\.4\.w1"):
        _load(_per_expert_copy(mixtral[0], tmp_path, edit))


def test_wrong_fused_expert_shape_names_the_tensor(tiny_model_dir, tmp_path):
    src, hf = tiny_model_dir("qwen3-moe")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["model.layers.0.mlp.experts.down_proj"] = state["model.layers.0.mlp.experts.down_proj"][:3].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(Path(src, "config.json").read_text())
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj' has shape \(3, 64, 48\)"):
        _load(tmp_path)


# ------------------------------------------------------------------------------ the config


def _qwen2_moe_config(**kw) -> ModelConfig:
    cfg = {
        "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 96, **kw,
    }
    return ModelConfig.from_hf(cfg)


def test_config_moe_fields_and_sparse_layers():
    cfg = _qwen2_moe_config(decoder_sparse_step=2, mlp_only_layers=[3])
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (60, 4, 32)
    assert cfg.shared_expert_intermediate_size == 96 and cfg.norm_topk_prob is False
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert cfg.num_moe_layers == 2 and cfg.expert_params == 3 * 64 * 32
    dense = ModelConfig.from_hf({**json.loads(json.dumps(_LLAMA)), "architectures": ["LlamaForCausalLM"]})
    assert not dense.is_moe and dense.expected_experts_touched(100) == 0.0
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        _qwen2_moe_config(num_experts_per_tok=61)
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        ModelConfig.from_hf({**_LLAMA, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8})


_LLAMA = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4}


def test_expected_experts_touched():
    cfg = _qwen2_moe_config()  # 60 experts, top-4
    assert cfg.expected_experts_touched(0) == 0.0
    assert cfg.expected_experts_touched(1) == pytest.approx(4.0)
    # two tokens: 4 + 4 * (56 / 60) expected distinct
    assert cfg.expected_experts_touched(2) == pytest.approx(4 + 4 * 56 / 60)
    assert cfg.expected_experts_touched(10_000) == pytest.approx(60.0)
    # against a simulation of uniform routing
    gen = torch.Generator().manual_seed(0)
    sims = [len(torch.rand(32, 60, generator=gen).topk(4).indices.unique()) for _ in range(400)]
    assert sum(sims) / len(sims) == pytest.approx(cfg.expected_experts_touched(32), rel=0.02)
    assert cfg.expert_bytes_read(1, 2) == pytest.approx(6 * 4 * 3 * 64 * 32 * 2)
    with pytest.raises(ValueError, match="num_tokens"):
        cfg.expected_experts_touched(-1)


def test_routing_normalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[0, 1]] and torch.allclose(w[0], probs[:2])
    w, _ = route(logits, 2, renormalize=True)
    assert torch.allclose(w[0], probs[:2] / probs[:2].sum())


def test_experts_reference_against_a_dense_loop():
    gen = torch.Generator().manual_seed(1)
    t, h, i, e, k = 7, 16, 24, 5, 2
    x = torch.randn(t, h, generator=gen)
    w13, w2 = torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen)
    weights, ids = route(torch.randn(t, e, generator=gen), k, True)
    want = torch.zeros(t, h)
    for tok in range(t):
        for j in range(k):
            ex = int(ids[tok, j])
            g, u = (w13[ex] @ x[tok]).split(i)
            want[tok] += weights[tok, j] * (w2[ex] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(experts_reference(x, w13, w2, weights, ids), want, rtol=1e-5, atol=1e-5)


def test_decode_floor_reads_only_the_touched_experts():
    from rapidserve.bench.floors import DeviceRates, decode_step_floor_s, model_cost, step_weight_bytes_read
    from rapidserve.model.presets import load_preset

    cfg = ModelConfig.from_hf(load_preset("mixtral-8x7b"))
    cost = model_cost(cfg, torch.bfloat16)
    assert cost.routed_expert_bytes == 32 * 8 * 3 * 4096 * 14336 * 2
    dense_part = cost.step_weight_bytes - cost.routed_expert_bytes
    # batch 1 reads 2 of 8 experts per layer; a large batch reads (nearly) all of them
    assert step_weight_bytes_read(cost, 1) == pytest.approx(dense_part + cost.routed_expert_bytes / 4)
    assert step_weight_bytes_read(cost, 128) == pytest.approx(cost.step_weight_bytes, rel=1e-9)
    assert step_weight_bytes_read(cost) == cost.step_weight_bytes
    rates = DeviceRates.given(4.0, 700.0)
    assert decode_step_floor_s(cost, rates, 0, 1) < decode_step_floor_s(cost, rates, 0, 32)
    # the prefill's matmul FLOPs count the active experts only (2 of 8)
    assert cost.linear_flops_per_token < 2 * cost.active_params_per_token < 2 * cost.num_params / 3


# ------------------------------------------------------------------------------------- GGUF

_GGUF_ARCH = {"mixtral": "llama", "qwen2-moe": "qwen2moe", "qwen3-moe": "qwen3moe"}


def _write_moe_gguf(hf, kind: str, path: Path) -> None:
    """What llama.cpp's converter writes for a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint:
    stacked *_exps expert tensors, llama's q/k rows permuted, F32."""
    import gguf
    import numpy as np

    cfg, arch = hf.config, _GGUF_ARCH[kind]
    state = {k.removeprefix("model."): v.float().numpy() for k, v in hf.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    def permute(w: np.ndarray, n: int) -> np.ndarray:  # HF rotate-half -> llama.cpp interleaved
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    if arch != "llama":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if kind == "qwen2-moe":
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    tensors = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"],
               "output.weight": state["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        attn = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                "attn_k_norm": "self_attn.k_norm", "ffn_gate_inp": "mlp.gate",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                "ffn_down_shexp": "mlp.shared_expert.down_proj"}
        for g, h in attn.items():
            for suffix in ("weight", "bias"):
                if p + h + "." + suffix in state:
                    w = state[p + h + "." + suffix]
                    if arch == "llama" and g in ("attn_q", "attn_k"):
                        w = permute(w, heads if g == "attn_q" else kv_heads)
                    tensors[f"{b}{g}.{suffix}"] = w
        if p + "mlp.shared_expert_gate.weight" in state:
            tensors[b + "ffn_gate_inp_shexp.weight"] = state[p + "mlp.shared_expert_gate.weight"].reshape(-1)
        if p + "mlp.experts.gate_up_proj" in state:
            gate_up = state[p + "mlp.experts.gate_up_proj"]
            half = gate_up.shape[1] // 2
            tensors[b + "ffn_gate_exps.weight"] = gate_up[:, :half]
            tensors[b + "ffn_up_exps.weight"] = gate_up[:, half:]
            tensors[b + "ffn_down_exps.weight"] = state[p + "mlp.experts.down_proj"]
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_gguf_experts_load_as_the_hf_checkpoint(kind, tiny_model_dir, tmp_path):
    from rapidserve.model.gguf_file import read_gguf
    from rapidserve.model.llama import CausalLM

    src, hf = tiny_model_dir(kind)
    path = tmp_path / f"tiny-{kind}.gguf"
    _write_moe_gguf(hf, kind, path)
    config, weights = read_gguf(path)
    cfg = ModelConfig.from_hf(config)
    want = load_model(src, "auto", "float32", torch.device("cpu"))
    for field in ("architecture", "num_experts", "experts_per_token", "moe_intermediate_size",
                  "norm_topk_prob", "shared_expert_intermediate_size", "mlp_only_layers", "qkv_bias", "qk_norm"):
        assert getattr(cfg, field) == getattr(want.config, field), field
    model = CausalLM(cfg, max_positions=64)
    model.load_weights(weights)
    got = dict(model.named_parameters())
    for name, param in want.model.named_parameters():
        assert torch.equal(got[name], param), name


def test_gguf_old_per_expert_mixtral_is_refused(tiny_model_dir, tmp_path):
    import gguf
    import numpy as np

    from rapidserve.model.gguf_file import read_gguf_config

    path = tmp_path / "old.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 16), (writer.add_head_count, 2), (writer.add_expert_count, 2),
                       (writer.add_expert_used_count, 1)):
        add(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 8), np.float32))
    writer.add_tensor("blk.0.ffn_gate.0.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="per-expert ffn_"):
        read_gguf_config(path)


# --------------------------------------------------------------------------------- profiler


@pytest.mark.slow
def test_profile_command_runs_an_moe_model(tiny_model_dir, tmp_path, capsys):
    from rapidserve.entrypoints.cli import main
    from rapidserve.resources.profile import load_profile

    path, _ = tiny_model_dir("qwen2-moe")
    out = tmp_path / "profile.json"
    rc = main(["profile", "--model", path, "--dtype", "float32", "--device", "cpu",
               "--kv-cache-memory-bytes", "16MiB", "--batch-sizes", "3", "--context-lens", "8",
               "--prompt-tokens", "8", "--beside-prefill-tokens", "8", "--beside-decode-batch", "2",
               "--num-steps", "1", "--warmup-steps", "1", "--prefill-repeats", "1",
               "--beside-prompt-tokens", "none", "--hybrid-chunks", "none", "--kv-transfer-blocks", "none",
               "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    profile = load_profile(out)
    assert profile.decode.batch_sizes == (3,) and profile.prefill.prompt_tokens == (8,)
    assert all(ms > 0 for ctx in profile.decode.alone_ms[0] for ms in ctx)
    assert all(ms > 0 for ms in profile.prefill.latency_ms[0])
    # the profile records the experts: 2 layers, layer 0 dense; an expert's gate/up/down, 64 x 48 in fp32
    shape = profile.model_shape
    assert (shape.num_experts, shape.experts_per_token, shape.moe_layers) == (4, 2, 1)
    assert shape.expert_bytes == 3 * 64 * 48 * 4
    assert shape.weight_bytes_read(1) == shape.weight_bytes + 2 * shape.expert_bytes  # 2 of 4 experts, then all
    assert shape.weight_bytes_read(64) == pytest.approx(shape.weight_bytes + 4 * shape.expert_bytes)


# -------------------------------------------------------------------------------- benchmarks


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The `paged|` prefix:FutureWarning")
def test_bench_commands_run_an_moe_model(mixtral, tmp_path):
    """bench latency reports decode floors over the experts a batch touches; bench throughput
    runs the transformers peer on the MoE config (both with given device rates on CPU)."""
    from rapidserve.bench.floors import DeviceRates, decode_step_floor_s, model_cost
    from rapidserve.entrypoints.cli import main

    path = mixtral[0]
    engine = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory-bytes", "16MiB"]
    rates = ["--bandwidth-tbps", "2.0", "--matmul-tflops", "500"]
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model", path, *engine, "--batch-sizes", "1,8", "--context-lens", "16",
                 "--num-steps", "2", "--warmup-steps", "1", "--prefill-len", "32", "--prefill-repeats", "1",
                 *rates, "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())
    cost = model_cost(ModelConfig.from_hf(json.loads(Path(path, "config.json").read_text())), torch.float32)
    given = DeviceRates.given(2.0, 500.0)
    for point in res["decode"]:
        kv = round(point["mean_context"] * point["batch_size"])
        assert point["floor_s"] == pytest.approx(decode_step_floor_s(cost, given, kv, point["batch_size"]), rel=1e-3)
    one, eight = res["decode"]
    assert one["floor_s"] < eight["floor_s"]  # 2 of 4 experts per layer against (nearly) all 4
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--model", path, *engine, "--num-prompts", "3", "--input-len-min", "8",
                 "--input-len-max", "16", "--output-len", "3", *rates, "--output-json", str(out),
                 "--peer", "transformers", "--peer-num-blocks", "16", "--peer-max-batch-tokens", "64"]) == 0
    res = json.loads(out.read_text())
    assert res["peer"]["output_tokens"] == res["rapidserve"]["output_tokens"] == 9


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_bf16_routing_and_experts_equal_transformers(kind, tiny_model_dir):
    """In bf16 too, the router's weights (fp32 for Mixtral, rounded to bf16 for Qwen) and the
    CPU experts loop give HF's bits exactly (same per-expert matmuls, same adding order)."""
    import copy

    src, hf = tiny_model_dir(kind)
    hf_block = copy.deepcopy(hf.model.layers[1].mlp).to(torch.bfloat16)  # the session's model stays fp32
    ours = load_model(src, "auto", "bfloat16", torch.device("cpu")).model.layers[1].mlp
    x = torch.randn(13, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    _, hf_weights, hf_ids = hf_block.gate(x)
    weights, ids = route(torch.nn.functional.linear(x, ours.gate.weight), ours.top_k, ours.renormalize)
    if ours.round_weights:
        weights = weights.to(x.dtype)
    assert weights.dtype == hf_weights.dtype == (torch.float32 if kind == "mixtral" else torch.bfloat16)
    assert torch.equal(ids, hf_ids) and torch.equal(weights, hf_weights)
    assert torch.equal(ours(x), hf_block(x[None])[0])


def test_a_layer_without_experts_names_both_layouts(mixtral, tmp_path):
    def edit(state):
        for name in [n for n in state if n.startswith("model.layers.1.block_sparse_moe.experts.")]:
            del state[name]

    # the fused layout's name, then the per-expert tensors (either layout would do)
    with pytest.raises(ValueError, match=r"lacks 14 weights: model\.layers\.1\.mlp\.experts\.gate_up_proj, "
                                         r"model\.layers\.1\.block_sparse_moe\.experts\.0\.w1\.weight"):
        _load(_per_expert_copy(mixtral[0], tmp_path, edit))
