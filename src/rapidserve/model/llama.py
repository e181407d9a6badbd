"""The decoder of the Llama family (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3), one class.

Mixtral and Qwen2/3-MoE are the same decoder with a sparse MoE block (rapidserve.model.moe)
in place of the MLP of their sparse layers.

Runs on a flattened batch: `forward(input_ids [T], positions [T]) -> hidden [T, hidden]`;
attention reads the batch layout from the forward context (rapidserve.attention.metadata).
q/k/v and gate/up projections are fused into one matmul each; the loader splits HF weights in.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rapidserve import ops
from rapidserve.attention.layer import PagedAttention
from rapidserve.model import moe
from rapidserve.model.config import ModelConfig
from rapidserve.model.quant import Fp8Linear
from rapidserve.model.rope import RotaryEmbedding
from rapidserve.ops.linear import linear


class Linear(nn.Module):
    """nn.Linear without initialization: weights always come from a loader or dummy init."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def projection(cfg: ModelConfig, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """A decoder layer's projection in the model's weight format (the LM head is never quantized)."""
    if cfg.quantization == "fp8":
        return Fp8Linear(in_features, out_features, bias)
    return Linear(in_features, out_features, bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, dim] or [T, heads, dim] (Qwen3's per-head q/k norm) -> same shape
        if ops.fused_enabled(x) and x.dim() in (2, 3):
            from rapidserve.ops.triton_fused import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # Normalize in float32 and scale in the input dtype, as transformers does.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = projection(cfg, cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = projection(cfg, self.q_size, cfg.hidden_size, cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # NOTE: one module shared by every layer (its cos/sin tables are [max_positions, head_dim]:
        # gigabytes over all layers of a 128K-context model if each had its own).
        self.rotary = rotary
        self.attn = PagedAttention(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, scale=1.0 / math.sqrt(cfg.head_dim)
        )

    def project(
        self, positions: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x [T, hidden] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], rotary applied
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return q, k, v

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        o = self.attn(*self.project(positions, x))  # [T, Hq, D]
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = self.intermediate_size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = projection(cfg, cfg.hidden_size, 2 * inter, cfg.mlp_bias)
        self.down_proj = projection(cfg, inter, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        if ops.fused_enabled(gate_up):
            from rapidserve.ops.triton_fused import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s feed-forward block: the sparse MoE block or a dense MLP."""
    if not cfg.is_moe_layer(layer):
        return MLP(cfg)
    shared = cfg.shared_expert_intermediate_size
    return moe.SparseMoeBlock(cfg, MLP(cfg, shared) if shared else None)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = make_mlp(cfg, layer)

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self._add_attention(self.self_attn(positions, self.input_layernorm(h)), h)

    # The layer in two halves around attention, for piecewise CUDA graphs (runner/graphs.py).
    def before_attention(
        self, positions: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.project(positions, self.input_layernorm(h))

    def after_attention(self, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # o [T, Hq, D] (attention output), h [T, hidden] (the layer's input) -> layer output
        return self._add_attention(self.self_attn.o_proj(o.reshape(h.shape[0], -1)), h)

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))

    def _add_attention(self, attn_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # attn_out [T, hidden] (o_proj's output), h [T, hidden] (the layer's input, left
        # unchanged: callers may still read it) -> layer output
        if ops.fused_enabled(attn_out):
            from rapidserve.ops.triton_fused import add_rms_norm

            norm = self.post_attention_layernorm
            # The residual sum h + attn_out goes into attn_out, a temporary only this layer
            # holds, so no buffer is allocated for it and h is not written.
            normed, h = add_rms_norm(attn_out, h, norm.weight, norm.eps, residual_out=attn_out)
            return h + self.mlp(normed)
        return self.finish(h + attn_out)


# HF checkpoint name suffix -> (our fused parameter suffix, shard index).
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.shared_expert.gate_proj": ("mlp.shared_expert.gate_up_proj", 0),
    "mlp.shared_expert.up_proj": ("mlp.shared_expert.gate_up_proj", 1),
}


def _fused_target(name: str) -> tuple[str, int]:
    """(our parameter, shard index; -1: the whole) of a dense checkpoint tensor."""
    for hf_part, (ours, idx) in _FUSED.items():
        if f".{hf_part}." in f".{name}":
            return name.replace(hf_part, ours), idx
    return name, -1


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size), _freeze=True
        )
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions [T] -> hidden [T, hidden]
        h = self.embed_tokens(input_ids)
        h = self.forward_layers(positions, h, 0, len(self.layers))
        return self.norm(h)

    # The forward in pieces, for running a prompt in groups of layers (runner/layer_groups.py):
    # embed_tokens, forward_layers over consecutive [start, end) ranges, then norm, computes what
    # forward does, op for op.
    def forward_layers(self, positions: torch.Tensor, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        # h [T, hidden] (the input of layer `start`) -> [T, hidden] (the output of layer end - 1)
        if not 0 <= start <= end <= len(self.layers):
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {len(self.layers)} layers")
        for layer in self.layers[start:end]:
            h = layer(positions, h)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [N, hidden] -> logits [N, vocab] in float32
        return self.lm_head(hidden).float()

    # ---- weights ---------------------------------------------------------------------------

    def _shard_sizes(self, param_name: str) -> list[int]:
        """Row sizes of the HF tensors fused into this parameter ([] if it is not fused)."""
        cfg = self.config
        module = param_name.rsplit(".", 1)[0]
        if module.endswith("qkv_proj"):
            return [cfg.q_size, cfg.kv_size, cfg.kv_size]
        if module.endswith("gate_up_proj"):
            # The dense MLP's, or Qwen2-MoE's shared expert's (another intermediate size).
            inter = self.get_parameter(param_name).shape[0] // 2
            return [inter, inter]
        return []

    def _shards(self, param_name: str) -> set:
        """The shard keys that together fill a parameter ({-1}: it loads whole)."""
        if moe.is_expert_param(param_name):
            return moe.expert_shards(param_name, self.config.num_experts)
        return set(range(len(self._shard_sizes(param_name)))) or {-1}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model; every parameter must be covered exactly."""
        params = dict(self.named_parameters(remove_duplicate=False))
        tied = self.config.tie_word_embeddings
        if tied:
            del params["lm_head.weight"]
        filled: dict[str, set] = {}  # parameter -> shard keys written (-1: whole)
        for hf_name, tensor in weights:
            name = moe.normalize_name(hf_name.removeprefix("model."))
            if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                continue
            expert = moe.expert_target(name, self.config.num_experts)
            target, shard = expert if expert is not None else _fused_target(name)
            param = params.get(target)
            if param is None:
                raise ValueError(f"unexpected weight {hf_name!r} in the checkpoint")
            dst = param.data
            if expert is not None:
                dst = moe.expert_shard_view(dst, shard)
            elif shard >= 0:
                sizes = self._shard_sizes(target)
                dst = dst.narrow(0, sum(sizes[:shard]), sizes[shard])
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"the config implies {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            filled.setdefault(target, set()).add(shard)
        missing: list[str] = []
        for name in params:
            got, want = filled.get(name, set()), self._shards(name)
            if got == want or (got == {-1} and moe.is_expert_param(name)):
                continue
            if moe.is_expert_param(name) and -1 not in got:
                # Name the absent checkpoint tensors in the per-expert layout (all of a
                # layer's, when it has none: the fused layout's name comes first then).
                arch = self.config.architecture
                absent = sorted(moe.per_expert_name(name, s, arch) for s in want - got)
                missing += absent if got else [f"model.{name}", *absent]
            else:
                missing.append(name)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"the checkpoint lacks {len(missing)} weights: {shown}")

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights like transformers' init (normal, std 0.02; norms 1; biases 0)."""
        gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith(".weight_scale") or param.element_size() == 1:
                continue  # FP8 projections: init_dummy below
            if name.endswith("norm.weight"):
                param.data.fill_(1.0)
            elif name.endswith(".bias"):
                param.data.zero_()
            else:
                param.data.normal_(0.0, 0.02, generator=gen)
        for module in self.modules():
            if isinstance(module, Fp8Linear):
                module.init_dummy(gen)
