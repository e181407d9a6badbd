"""The decoder hyperparameters the engine needs, read from an HF `config.json` dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Architecture name in config.json -> (q/k/v always biased, q/k norm).
# NOTE: Mistral and the Llama family differ only in hyperparameters here; Qwen2 always has a
# q/k/v bias (and none on o_proj), Qwen3 an RMSNorm over each head of q and k before the
# rotary embedding. Elsewhere `attention_bias` biases all four projections.
_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
    # Sparse mixture-of-experts models (rapidserve.model.moe): the same attention as their
    # dense relatives, an MoE block in place of the MLP.
    "MixtralForCausalLM": (False, False),
    "Qwen2MoeForCausalLM": (True, False),
    "Qwen3MoeForCausalLM": (False, True),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    config_dtype: str
    # ---- mixture of experts (num_experts == 0: a dense model) ----
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # one expert's intermediate size
    # Renormalise the top-k router probabilities to sum to 1 (Mixtral always; Qwen: the
    # config's norm_topk_prob).
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert; 0: none
    # Layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    # (transformers' Qwen rule; Mixtral: every layer). Other layers keep a dense MLP.
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # The projections' weight format: None (the model's dtype) or "fp8" (model/quant.py). Set by
    # the loader from --quantization or the checkpoint's quantization_config.
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_experts:
            if not 0 < self.experts_per_token <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok must be in [1, {self.num_experts}], "
                    f"got {self.experts_per_token}"
                )
            if self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0:
                raise ValueError(
                    "moe_intermediate_size and decoder_sparse_step must be positive, got "
                    f"{self.moe_intermediate_size} and {self.decoder_sparse_step}"
                )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has the sparse MoE block (else a dense MLP)."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def expected_experts_touched(self, num_tokens: int) -> float:
        """Expected distinct experts one MoE layer reads for a batch of `num_tokens` tokens
        (uniform routing, see expected_distinct_experts); 0 for dense models."""
        return expected_distinct_experts(self.num_experts, self.experts_per_token, num_tokens)

    def expert_bytes_read(self, num_tokens: int, itemsize: int) -> float:
        """Expected bytes of routed-expert weights one forward over `num_tokens` tokens reads,
        all MoE layers together (the shared expert and the router are dense weights)."""
        return self.num_moe_layers * self.expected_experts_touched(num_tokens) * self.expert_params * itemsize

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in _ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(supported_architectures())}"
            )
        qkv_always_biased, qk_norm = _ARCHITECTURES[arch]
        attention_bias = bool(cfg.get("attention_bias", False))
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            inter = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise ValueError(f"config.json is missing the field {e.args[0]!r}") from None
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        # transformers 5 moved rope settings into `rope_parameters`; accept both.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or (
            rope_params if rope_params.get("rope_type", "default") != "default" else None
        )
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "llama3", "linear"):
                raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
            if kind == "default":
                scaling = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            window = None
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            **_moe_fields(arch, cfg, inter),
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=qkv_always_biased or attention_bias,
            o_bias=attention_bias and not qkv_always_biased,
            qk_norm=qk_norm,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=cfg.get("bos_token_id"),
            config_dtype=str(dtype).replace("torch.", ""),
        )


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected number of distinct experts `num_tokens` tokens route to, top_k each.

    Assumes uniform, independent routing: each token picks top_k distinct experts, so a given
    expert is missed by one token with probability 1 - k/E and by the whole batch with
    (1 - k/E)^n. Trained routers are skewed, so a real batch tends to touch fewer (it reuses
    the popular experts): this is the upper estimate of the expert bytes a step reads.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_experts <= 0 or num_tokens == 0:
        return 0.0
    miss = 1.0 - top_k / num_experts
    return num_experts * (1.0 - miss**num_tokens)


def _moe_fields(arch: str, cfg: dict[str, Any], intermediate: int) -> dict[str, Any]:
    """The MoE fields of ModelConfig from an HF config (empty for a dense architecture)."""
    # NOTE: transformers aliases num_experts and num_local_experts; its Qwen3-MoE config
    # writes the latter although the published checkpoints say num_experts.
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if arch == "MixtralForCausalLM":
        # Mixtral's experts use intermediate_size; every layer is sparse, top-k renormalised.
        return {
            "num_experts": int(experts if experts is not None else 8),
            "experts_per_token": int(cfg.get("num_experts_per_tok", 2)),
            "moe_intermediate_size": intermediate,
            "norm_topk_prob": True,
        }
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        if "moe_intermediate_size" not in cfg or experts is None:
            missing = "moe_intermediate_size" if experts is not None else "num_experts"
            raise ValueError(f"config.json is missing the field {missing!r}")
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        if arch == "Qwen3MoeForCausalLM" and shared:
            raise ValueError("shared_expert_intermediate_size: Qwen3-MoE has no shared expert")
        return {
            "num_experts": int(experts),
            "experts_per_token": int(cfg.get("num_experts_per_tok", 1)),
            "moe_intermediate_size": int(cfg["moe_intermediate_size"]),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "shared_expert_intermediate_size": shared,
            "decoder_sparse_step": int(cfg.get("decoder_sparse_step", 1)),
            "mlp_only_layers": tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
        }
    return {}
