"""The sparse mixture-of-experts block (Mixtral, Qwen2-MoE, Qwen3-MoE), in place of the MLP.

  router    logits = x @ gate.T                      x [T, hidden] -> [T, experts]
  routing   softmax in fp32, top-k; Mixtral renormalises the k probabilities to sum to 1,
            Qwen only with `norm_topk_prob`
  experts   out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j]
  shared    Qwen2-MoE adds sigmoid(x @ shared_expert_gate.T) * shared_expert(x), a dense MLP

The experts are stored stacked whatever the checkpoint's layout (one tensor per expert in the
original checkpoints, or already fused as newer transformers versions write them):
  experts.gate_up_proj [experts, 2 * intermediate, hidden]  (gate rows, then up rows)
  experts.down_proj    [experts, hidden, intermediate]
which are transformers' own names, so a fused checkpoint loads without renaming.

On CUDA the experts run in the fused Triton kernel (rapidserve.ops.fused_moe); on CPU in the
torch loop below, the oracle that kernel is tested against (itself checked against HF).
"""

from __future__ import annotations

import re
from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from rapidserve import ops
from rapidserve.model.config import ModelConfig

# A per-expert checkpoint tensor: layers.L.mlp.experts.E.<proj>.weight (Mixtral's w1/w3/w2
# are gate/up/down). `block_sparse_moe.` is renamed to `mlp.` before this is matched.
_PER_EXPERT_RE = re.compile(
    r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"
)
# NOTE: transformers' Qwen MoE routers round the top-k weights to the activation dtype before
# scaling the experts' outputs; Mixtral's keep them in fp32 (the product is rounded after).
# Both are reproduced so that bf16 outputs match HF's, not only fp32 ones.
_WEIGHTS_IN_ACTIVATION_DTYPE = frozenset({"Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"})
# proj -> (stacked parameter, row shard within the expert: 0 gate, 1 up, -1 the whole)
_PER_EXPERT_TARGET = {
    "w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1), "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", -1), "down_proj": ("down_proj", -1),
}


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64), as transformers.

    NOTE: no host sync (softmax, topk, division only): this runs inside CUDA graph capture.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The routed experts in plain torch (the CPU path and the kernels' oracle).

    x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights/ids [T, k] -> [T, H] in x's dtype.
    As transformers' default ("grouped_mm") experts: each (token, slot) pair's expert output
    is scaled by its weight in the promoted dtype of the two (fp32 for Mixtral's fp32 weights,
    the activation dtype for Qwen's rounded ones), then the k slots are summed in fp32 and
    rounded once, so bf16 results equal HF's bit for bit. Reads expert ids on the host: CPU only.
    """
    num_tokens, top_k = topk_ids.shape
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1, 1)
    pair_dtype = torch.promote_types(x.dtype, topk_weights.dtype)
    per_pair = torch.empty(flat_ids.numel(), x.shape[1], dtype=pair_dtype, device=x.device)  # [T*k, H]
    for e in torch.unique(flat_ids).tolist():
        pairs = torch.nonzero(flat_ids == e).squeeze(1)
        gate, up = F.linear(x[pairs // top_k], w13[e]).split(inter, dim=-1)
        per_pair[pairs] = F.linear(F.silu(gate) * up, w2[e]) * flat_weights[pairs]
    return per_pair.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)


class _Projection(nn.Module):
    """A bias-free weight [out, in] read with F.linear (the router and the shared-expert gate)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)


class Experts(nn.Module):
    """The routed experts' weights, stacked (see the module docstring for the layout)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate
        # [E, 2I, H] and [E, H, I]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if ops.fused_enabled(x):
            from rapidserve.ops.fused_moe import fused_experts

            return fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        return experts_reference(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ the gated shared expert of Qwen2-MoE), x [T, H] -> [T, H]."""

    def __init__(self, cfg: ModelConfig, shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.top_k, self.renormalize = cfg.experts_per_token, cfg.norm_topk_prob
        self.round_weights = cfg.architecture in _WEIGHTS_IN_ACTIVATION_DTYPE
        # The router: transformers names it `mlp.gate.weight` [E, H].
        self.gate = _Projection(cfg.num_experts, cfg.hidden_size)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = None
        if shared_expert is not None:
            self.shared_expert_gate = _Projection(1, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(F.linear(x, self.gate.weight), self.top_k, self.renormalize)
        if self.round_weights:
            weights = weights.to(x.dtype)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            gate = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight))  # [T, 1]
            out = out + gate * self.shared_expert(x)
        return out


# ---- checkpoint names -> the stacked parameters -----------------------------------------------


def normalize_name(name: str) -> str:
    """Mixtral's original checkpoints call the MoE block `block_sparse_moe`; we call it `mlp`."""
    return name.replace(".block_sparse_moe.", ".mlp.")


def expert_target(name: str, num_experts: int) -> tuple[str, Hashable] | None:
    """(our stacked parameter, shard) of a per-expert checkpoint tensor, None for other names.

    The shard is (expert, row half) for gate/up (0 gate, 1 up) and (expert, -1) for down. A
    fused checkpoint's `experts.gate_up_proj` already has our name and loads whole.
    """
    match = _PER_EXPERT_RE.fullmatch(name)
    if match is None:
        return None
    layer, expert, proj = match.groups()
    if int(expert) >= num_experts:
        return None  # the caller reports it as an unexpected weight
    param, half = _PER_EXPERT_TARGET[proj]
    return f"layers.{layer}.mlp.experts.{param}", (int(expert), half)


def is_expert_param(param_name: str) -> bool:
    return param_name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


def expert_shard_view(param: torch.Tensor, shard: Hashable) -> torch.Tensor:
    """The slice of a stacked expert parameter that one per-expert tensor fills."""
    expert, half = shard  # type: ignore[misc]
    view = param[expert]
    if half < 0:
        return view
    rows = view.shape[0] // 2
    return view.narrow(0, half * rows, rows)


def expert_shards(param_name: str, num_experts: int) -> set[Hashable]:
    halves = (0, 1) if param_name.endswith("gate_up_proj") else (-1,)
    return {(e, h) for e in range(num_experts) for h in halves}


def per_expert_name(param_name: str, shard: Hashable, architecture: str) -> str:
    """The checkpoint name of one missing per-expert tensor, in the architecture's convention."""
    expert, half = shard  # type: ignore[misc]
    layer = param_name.split(".")[1]
    if architecture == "MixtralForCausalLM":
        proj = {0: "w1", 1: "w3", -1: "w2"}[half]
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"
    proj = {0: "gate_proj", 1: "up_proj", -1: "down_proj"}[half]
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
