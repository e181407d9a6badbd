"""Read a llama.cpp GGUF file as an HF-style config dict, HF-named weights and a tokenizer.

The model layer only speaks HF (config.json keys, transformers parameter names,
rotate-half rope layout), so everything GGUF-specific is translated here.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from rapidserve.model import gguf_cache

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor
    from transformers import PreTrainedTokenizerBase

# GGUF `general.architecture` -> HF `architectures[0]`. llama.cpp files Mixtral under
# "llama" (with `llama.expert_count`): see _MOE_ARCHITECTURES.
SUPPORTED_ARCHITECTURES: Mapping[str, str] = MappingProxyType(
    {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "qwen2moe": "Qwen2MoeForCausalLM",
        "qwen3moe": "Qwen3MoeForCausalLM",
    }
)
# GGUF architecture of an MoE file -> (HF architecture, top-k renormalised by default).
# NOTE: llama.cpp renormalises Mixtral's and Qwen3-MoE's top-k weights, not Qwen2-MoE's;
# `{arch}.expert_weights_norm`, when a file has it, overrides.
_MOE_ARCHITECTURES: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {
        "llama": ("MixtralForCausalLM", True),
        "qwen2moe": ("Qwen2MoeForCausalLM", False),
        "qwen3moe": ("Qwen3MoeForCausalLM", True),
    }
)

# llama.cpp's converter permutes the q/k rows of these architectures only (its llama
# graph uses interleaved "normal" rope; qwen2/qwen3 use NEOX rope = HF's rotate-half).
_QK_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_GLOBAL_TENSORS: Mapping[str, str] = MappingProxyType(
    {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    }
)

_LAYER_TENSORS: Mapping[str, str] = MappingProxyType(
    {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        # MoE: the router, and Qwen2-MoE's shared expert with its gate.
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
        "ffn_up_shexp": "mlp.shared_expert.up_proj",
        "ffn_down_shexp": "mlp.shared_expert.down_proj",
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    }
)
# Stacked expert tensors [experts, rows, cols] -> the per-expert HF projection. Each is
# yielded as one HF tensor per expert (model.layers.L.mlp.experts.E.<proj>.weight).
_EXPERT_TENSORS: Mapping[str, str] = MappingProxyType(
    {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
)
_PER_EXPERT = "*"  # the expert-index placeholder in hf_tensor_name's answer

_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR_RE = re.compile(r"(\w+)\.(weight|bias)")


class GGUFContents(NamedTuple):
    config: dict[str, Any]
    weights: Iterator[tuple[str, torch.Tensor]]


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """HF-style config dict (the keys of a config.json) from a GGUF file's metadata."""
    return _parsed(os.fspath(path))[0]


def iter_gguf_weights(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, float32 tensor shaped like HF's) for every tensor in the file.

    The file and its metadata are validated when this is called, not on the first
    next(), so a bad file fails before the caller starts building a model.
    """
    return read_gguf(path).weights


def read_gguf(path: str | os.PathLike[str]) -> GGUFContents:
    """Config and weights from one parse of the file (parsing the metadata takes seconds; its
    result is cached, see gguf_cache)."""
    path_str = os.fspath(path)
    config, tensors = _parsed(path_str)
    names = [(tensor, hf_tensor_name(tensor.name, path_str)) for tensor in tensors]
    return GGUFContents(config, _dequantized(names, config, path_str))


def _parsed(path: str) -> tuple[dict[str, Any], list[Any]]:
    """(config, tensors): from the cache when the file was read before, else parsed (and cached).
    The tensors are gguf ReaderTensors or the cache's IndexedTensors (the same fields)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: GGUF file not found")
    cached = gguf_cache.load_index(path)
    if cached is not None:
        return cached
    reader = _open_reader(path)
    config = _config_from_reader(reader, path)
    gguf_cache.save_index(path, config, [gguf_cache.tensor_entry(t) for t in reader.tensors])
    return config, list(reader.tensors)


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The transformers tokenizer (with chat template) embedded in a GGUF file: converted by
    transformers (which parses the file again) the first time, then from the cache."""
    path_str = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path_str):
        raise ValueError(f"{path_str}: GGUF file not found")
    cached = gguf_cache.load_tokenizer(path_str)
    if cached is not None:
        return cached
    # Imported lazily: transformers takes seconds to import and only this needs it.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            os.path.dirname(path_str),
            gguf_file=os.path.basename(path_str),
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path_str}: cannot build a tokenizer from this GGUF file: {exc}") from exc
    gguf_cache.save_tokenizer(path_str, tokenizer)
    return tokenizer


def hf_tensor_name(gguf_name: str, path: str = "<gguf>") -> str:
    """HF parameter name of a GGUF tensor.

    `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; a stacked expert
    tensor `blk.3.ffn_up_exps.weight` -> `model.layers.3.mlp.experts.*.up_proj.weight`
    (`*`: each expert's slice is yielded under its own index).
    """
    if match := _LAYER_TENSOR_RE.fullmatch(gguf_name):
        layer, kind, suffix = match.groups()
        if kind in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"
        if kind in _EXPERT_TENSORS and suffix == "weight":
            return f"model.layers.{layer}.mlp.experts.{_PER_EXPERT}.{_EXPERT_TENSORS[kind]}.weight"
    elif match := _GLOBAL_TENSOR_RE.fullmatch(gguf_name):
        kind, suffix = match.groups()
        if kind in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[kind]}.{suffix}"
    # Refuse rather than skip: an unknown tensor means a feature the model would lack.
    raise ValueError(f"{path}: unsupported GGUF tensor {gguf_name!r}")


def unpermute_qk_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> HF rotate-half layout).

    llama.cpp stores, per head, rows in the order (r0, r_half, r1, r_half+1, ...): the
    two elements of each rotary pair are adjacent. HF keeps the first halves of all
    pairs, then all second halves. Works for weights [rows, in] and biases [rows].
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    per_head = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def _open_reader(path: str | os.PathLike[str]) -> GGUFReader:
    from gguf import GGUFReader

    path_str = os.fspath(path)
    if not os.path.isfile(path_str):
        raise ValueError(f"{path_str}: GGUF file not found")
    try:
        return GGUFReader(path_str)
    except (OSError, ValueError, IndexError, KeyError) as exc:
        # GGUFReader reports a bad magic as ValueError and a truncated file as
        # whatever numpy raises while slicing past the end.
        raise ValueError(f"{path_str}: not a readable GGUF file: {exc}") from exc


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _require(reader: GGUFReader, key: str, path: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"{path}: GGUF metadata lacks required key {key!r}")
    return value


def _f32(value: float) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.99999974e-06. The shortest decimal that
    # round-trips through float32 recovers the number config.json had.
    return float(str(np.float32(value)))


def _config_from_reader(reader: GGUFReader, path: str) -> dict[str, Any]:
    arch = _require(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {supported})")
    if int(_field(reader, "split.count", 1)) > 1:
        raise ValueError(
            f"{path}: split GGUF files are unsupported; merge them first (llama-gguf-split --merge)"
        )

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "rope_freqs.weight" in tensors:
        # llama3-style rope scaling lives in this tensor, not in metadata; ignoring it
        # would silently give wrong long-context (and subtly wrong short-context) output.
        raise ValueError(
            f"{path}: llama3-style rope scaling (rope_freqs.weight tensor) is unsupported; "
            "use the HF safetensors checkpoint instead"
        )
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")

    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = int(_require(reader, key("embedding_length"), path))
    heads = int(_require(reader, key("attention.head_count"), path))
    kv_heads = int(_field(reader, key("attention.head_count_kv"), heads))
    head_dim = _field(reader, key("attention.key_length"))
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{path}: hidden size {hidden} is not a multiple of {heads} heads")
        head_dim = hidden // heads
    head_dim = int(head_dim)
    value_dim = int(_field(reader, key("attention.value_length"), head_dim))
    rope_dim = int(_field(reader, key("rope.dimension_count"), head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(
            f"{path}: unsupported attention geometry: key dim {head_dim}, value dim {value_dim}, "
            f"rotary dim {rope_dim} (all must be equal)"
        )

    embed_rows = int(tensors["token_embd.weight"].shape[-1])
    vocab_size = _field(reader, key("vocab_size"))
    if vocab_size is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens.data) if tokens is not None else embed_rows
    vocab_size = int(vocab_size)
    if vocab_size != embed_rows:
        raise ValueError(
            f"{path}: vocab size {vocab_size} does not match token_embd.weight's {embed_rows} rows"
        )

    config: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, key("feed_forward_length"), path)),
        "num_hidden_layers": int(_require(reader, key("block_count"), path)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_require(reader, key("attention.layer_norm_rms_epsilon"), path)),
        # 10000 is llama.cpp's default when the key is absent.
        "rope_theta": _f32(_field(reader, key("rope.freq_base"), 10000.0)),
        "max_position_embeddings": int(_require(reader, key("context_length"), path)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "torch_dtype": "float32",
    }
    for token in ("bos", "eos"):
        token_id = _field(reader, f"tokenizer.ggml.{token}_token_id")
        if token_id is not None:
            config[f"{token}_token_id"] = int(token_id)
    rope_scaling = _rope_scaling(reader, arch, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    config.update(_moe_config(reader, arch, tensors, int(config["num_hidden_layers"]), path))
    return config


def _moe_config(
    reader: GGUFReader, arch: str, tensors: Mapping[str, ReaderTensor], layers: int, path: str
) -> dict[str, Any]:
    """The HF config keys of an MoE file (Mixtral under "llama", qwen2moe, qwen3moe); {} if dense."""
    experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    if arch not in _MOE_ARCHITECTURES or (arch == "llama" and experts == 0):
        return {}
    if experts == 0:
        raise ValueError(f"{path}: GGUF metadata lacks required key {arch + '.expert_count'!r}")
    if any(re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight", name) for name in tensors):
        raise ValueError(
            f"{path}: per-expert ffn_*.N tensors (an old Mixtral GGUF) are unsupported; "
            "reconvert with a current llama.cpp (stacked *_exps tensors)"
        )
    hf_arch, renormalise = _MOE_ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "num_experts": experts,
        "num_experts_per_tok": int(_require(reader, f"{arch}.expert_used_count", path)),
        "norm_topk_prob": bool(_field(reader, f"{arch}.expert_weights_norm", renormalise)),
        # Layers without a router keep a dense MLP (Qwen's mlp_only_layers).
        "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors],
    }
    if arch == "llama":
        config["num_local_experts"] = config.pop("num_experts")
        return config
    config["moe_intermediate_size"] = int(_require(reader, f"{arch}.expert_feed_forward_length", path))
    shared = _field(reader, f"{arch}.expert_shared_feed_forward_length")
    if shared is None and "blk.0.ffn_gate_shexp.weight" in tensors:
        shared = int(tensors["blk.0.ffn_gate_shexp.weight"].shape[-1])
    if shared:
        config["shared_expert_intermediate_size"] = int(shared)
    return config


def _rope_scaling(reader: GGUFReader, arch: str, path: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind is None:
        # Older converters wrote only a linear scale factor.
        legacy = _field(reader, f"{arch}.rope.scale_linear")
        if legacy is None or float(legacy) == 1.0:
            return None
        kind, factor = "linear", legacy
    if kind == "none":
        return None
    if factor is None:
        raise ValueError(f"{path}: rope scaling {kind!r} without {arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        original = _require(reader, f"{arch}.rope.scaling.original_context_length", path)
        return {
            "rope_type": "yarn",
            "factor": _f32(factor),
            "original_max_position_embeddings": int(original),
        }
    raise ValueError(f"{path}: unsupported rope scaling type {kind!r} (supported: linear, yarn)")


def _dequantized(
    names: list[tuple[ReaderTensor, str]], config: Mapping[str, Any], path: str
) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType, dequantize

    heads_of: dict[str, int] = {}
    if config["model_type"] in _QK_PERMUTED_ARCHITECTURES:
        heads_of = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor, hf_name in names:
        kind = GGMLQuantizationType(int(tensor.tensor_type)).name
        if kind in _BLOCK_BYTES:
            array = dequantize_blocks(tensor.data, kind)
        else:
            array = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dims innermost first; HF's [out, in] is the reverse.
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if array.size != int(np.prod(shape)):
            raise ValueError(
                f"{path}: tensor {tensor.name} dequantized to {array.size} values, expected {shape}"
            )
        array = array.reshape(shape)
        layer_match = _LAYER_TENSOR_RE.fullmatch(tensor.name)
        if layer_match and layer_match.group(2) in heads_of:
            array = unpermute_qk_rows(array, heads_of[layer_match.group(2)])
        if layer_match and layer_match.group(2) == "ffn_gate_inp_shexp":
            array = array.reshape(1, -1)  # llama.cpp stores the [1, hidden] gate as [hidden]
        if _PER_EXPERT in hf_name:
            if array.ndim != 3:
                raise ValueError(f"{path}: expert tensor {tensor.name} has shape {shape}, expected 3 dims")
            for expert in range(array.shape[0]):
                part = np.require(array[expert], dtype=np.float32, requirements=["C", "W"])
                yield hf_name.replace(_PER_EXPERT, str(expert)), torch.from_numpy(part)
            continue
        # F32 tensors come back as views of the read-only memmap: copy those only.
        array = np.require(array, dtype=np.float32, requirements=["C", "W"])
        yield hf_name, torch.from_numpy(array)


# ggml's simplest block formats, 32 weights per block, each block a float16 scale d first:
# Q4_0 (18 bytes: 16 bytes of 4-bit codes, low nibbles = weights 0-15, high = 16-31; w = d (q - 8)),
# Q4_1 (20 bytes: d, then a float16 minimum m, then the codes as Q4_0's; w = d q + m),
# Q8_0 (34 bytes: 32 int8 codes; w = d q).
_BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def dequantize_blocks(data: np.ndarray, kind: str) -> np.ndarray:
    """A Q4_0/Q4_1/Q8_0 tensor's raw bytes (uint8 [..., blocks x block bytes]) -> float32
    [..., blocks x 32], with the same float32 operations as gguf's numpy reference (so the same
    bits), vectorized in torch: the embedded model's weights are Q4_1 (its embedding Q8_0), and
    gguf's row-group loop took 1.4 of its 2.8 s load on 2 idle cores."""
    nbytes = _BLOCK_BYTES[kind]
    if data.dtype != np.uint8 or data.shape[-1] % nbytes:
        raise ValueError(f"{kind} data must be uint8 rows of {nbytes}-byte blocks, got {data.dtype} {data.shape}")
    with warnings.catch_warnings():  # a read-only memmap of the file: read, never written
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(np.ascontiguousarray(data)).view(-1, nbytes)
    d = raw[:, 0:2].contiguous().view(torch.float16).float()
    if kind == "Q8_0":
        out = d * raw[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = raw[:, 4:] if kind == "Q4_1" else raw[:, 2:]
        codes = torch.cat((qs & 0x0F, qs >> 4), dim=1)  # [blocks, 32]
        if kind == "Q4_1":
            out = d * codes.float() + raw[:, 2:4].contiguous().view(torch.float16).float()
        else:
            out = d * (codes.to(torch.int8) - 8).float()
    return out.numpy().reshape(*data.shape[:-1], data.shape[-1] // nbytes * _BLOCK)
