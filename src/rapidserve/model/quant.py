"""FP8 weights: the linear layer that holds them and the loading that produces them.

`--quantization fp8` (or a checkpoint whose config.json has an FP8 `quantization_config`) makes
every projection of the decoder layers (q/k/v, o, gate/up, down) an `Fp8Linear`: E4M3 weights
with one float32 scale per output channel. The embedding, the norms and the LM head stay in the
model's dtype.

Weights reach the model through `fp8_weights`, a filter on the checkpoint's tensor stream:
- a bf16/fp16/fp32 projection weight is quantized per output channel as it streams by (on the
  device), so a model never sits in memory at full precision;
- an FP8 weight keeps its bytes and its scale becomes one per output channel: a per-tensor
  scale is repeated (exact), a per-channel one is taken as is (exact), 128x128 block scales
  (HF `weight_block_size`) are applied and the weight requantized per channel (a second
  rounding: the GEMM path takes per-channel scales);
- static activation scales (`input_scale`) are dropped: activations are quantized per token at
  run time, which is at least as accurate;
- KV cache scales (`self_attn.k_scale` / `v_scale`, or `k_proj/v_proj.output_scale`) are set
  aside for `apply_kv_scales`.

Per-channel weight scales make the fused q/k/v and gate/up parameters simple: each HF shard
brings the scales of its own rows, so the loader narrows the scale like the weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rapidserve.ops.fp8 import FP8_DTYPE, fp8_matmul_supported, is_fp8, quantize_rows

QUANTIZATIONS = ("fp8",)

# The projections that become Fp8Linear (HF names, before q/k/v and gate/up are fused).
_LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
_KV_SCALE = re.compile(r"(^|\.)layers\.(\d+)\.self_attn\.(?:([kv])_scale|([kv])_proj\.output_scale)$")
_SCALE_LEAVES = ("weight_scale", "weight_scale_inv")


@dataclass(frozen=True)
class CheckpointQuant:
    """How a pre-quantized checkpoint stores its weights (config.json's quantization_config)."""

    method: str  # "fp8" (HF / vLLM FP8) or "compressed-tensors"
    block: tuple[int, int] | None  # weight_block_size of block-scaled fp8 checkpoints


def checkpoint_quantization(hf_config: dict[str, Any]) -> CheckpointQuant | None:
    """The checkpoint's FP8 format, None if it is not quantized; ValueError for other schemes."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config fmt {fmt!r}: only e4m3 FP8 weights are supported")
        block = qc.get("weight_block_size")
        if block is None:
            return CheckpointQuant("fp8", None)
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"quantization_config weight_block_size must be two positive ints, got {block!r}")
        return CheckpointQuant("fp8", (block[0], block[1]))
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        for gname, group in groups.items():
            w = (group or {}).get("weights") or {}
            if w.get("num_bits") != 8 or w.get("type") != "float":
                raise ValueError(
                    f"compressed-tensors group {gname!r}: weights {w.get('num_bits')}-bit "
                    f"{w.get('type')!r}; only 8-bit float (FP8) weights are supported"
                )
            if w.get("strategy", "tensor") not in ("tensor", "channel"):
                raise ValueError(
                    f"compressed-tensors group {gname!r}: weight strategy {w.get('strategy')!r}; "
                    "supported: tensor, channel"
                )
        return CheckpointQuant("compressed-tensors", None)
    raise ValueError(
        f"unsupported quantization_config quant_method {method!r}; supported: fp8, compressed-tensors (FP8)"
    )


def resolve_quantization(requested: str | None, checkpoint: CheckpointQuant | None) -> str | None:
    """The model's weight format: the flag's, or the checkpoint's when it is pre-quantized."""
    if requested is not None and requested not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {requested!r}; available: {', '.join(QUANTIZATIONS)}")
    if checkpoint is not None:
        return "fp8"  # its weights are FP8: they cannot be loaded any other way
    return requested


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in E4M3 and one float32 scale per output channel.

    Activations are quantized per token (dynamic) in both paths, so the CPU path computes what
    the GPU path does: on GPUs with FP8 (compute capability >= 8.9) one torch scaled matmul;
    elsewhere the weight is dequantized into x's dtype for this layer's matmul.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._scaled_mm: bool | None = None  # decided on the first call, on its device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out] in x's dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        xq, xs = quantize_rows(x2)  # [T, in] fp8, [T, 1] fp32
        if self._scaled_mm is None:
            # NOTE: decided on the first call (a warm-up, never inside CUDA graph capture); the
            # FP8 GEMM needs both matrix dimensions to be multiples of 16.
            self._scaled_mm = (fp8_matmul_supported(x.device) and self.in_features % 16 == 0
                               and self.out_features % 16 == 0)
        if self._scaled_mm and x.dtype in (torch.bfloat16, torch.float16):
            # Row-wise scales (per token x per channel) need a bf16 output in torch's kernels.
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.view(1, -1),
                                 out_dtype=torch.bfloat16).to(x.dtype)
        else:
            # Both operands are exact in x's dtype (E4M3 fits in bf16/fp16/fp32); the scales are
            # applied to the product, as the scaled matmul does.
            y = F.linear(xq.to(x.dtype), self.weight.to(x.dtype))
            y = (y.float() * xs * self.weight_scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight as float32 [out, in] (for tests and references)."""
        return self.weight.float() * self.weight_scale[:, None]

    @torch.no_grad()
    def init_dummy(self, generator: torch.Generator, std: float = 0.02, chunk_elements: int = 1 << 26) -> None:
        """Random weights (normal, std) quantized per channel, built in row chunks (default
        256 MiB of float32) on the weight's device: a 70B model never exists at full precision."""
        rows = max(1, chunk_elements // self.in_features)
        for start in range(0, self.out_features, rows):
            n = min(rows, self.out_features - start)
            w = torch.empty(n, self.in_features, device=self.weight.device, dtype=torch.float32)
            w.normal_(0.0, std, generator=generator)
            q, s = quantize_rows(w)
            self.weight.data[start:start + n] = q
            self.weight_scale.data[start:start + n] = s.view(-1)


# ---- loading ---------------------------------------------------------------------------------


def fp8_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    checkpoint: CheckpointQuant | None,
    device: torch.device,
    kv_scales: dict[str, torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with every projection weight as (E4M3 weight, per-channel
    `weight_scale`); see the module docstring. KV cache scales go into `kv_scales` (by HF name).

    NOTE: an FP8 weight and its scale may come in either order (even from different shards):
    the first waits for the second; a weight or scale left without its partner is an error.
    """
    block = checkpoint.block if checkpoint is not None else None
    waiting_w: dict[str, torch.Tensor] = {}
    waiting_s: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in weights:
        if _KV_SCALE.search(name):
            kv_scales[name] = tensor
            continue
        prefix, _, leaf = name.rpartition(".")
        if not _LINEAR.search(prefix):
            yield name, tensor
            continue
        if leaf == "weight":
            if not is_fp8(tensor.dtype):
                q, s = quantize_rows(tensor.to(device))
                yield name, q
                yield f"{prefix}.weight_scale", s.view(-1)
            elif prefix in waiting_s:
                yield from _fp8_pair(prefix, tensor, *waiting_s.pop(prefix), block, device)
            else:
                waiting_w[prefix] = tensor
        elif leaf in _SCALE_LEAVES:
            if prefix in waiting_w:
                yield from _fp8_pair(prefix, waiting_w.pop(prefix), name, tensor, block, device)
            else:
                waiting_s[prefix] = (name, tensor)
        elif leaf == "input_scale":
            continue  # activations are quantized per token at run time
        else:
            yield name, tensor  # biases (and anything the model will reject by name)
    if waiting_w:
        prefix = next(iter(waiting_w))
        raise ValueError(
            f"FP8 weight {prefix}.weight has no scale tensor ({prefix}.weight_scale or "
            f"{prefix}.weight_scale_inv) in the checkpoint"
            + (f" ({len(waiting_w) - 1} more)" if len(waiting_w) > 1 else "")
        )
    if waiting_s:
        name = next(iter(waiting_s.values()))[0]
        raise ValueError(f"scale {name} has no FP8 weight beside it in the checkpoint")


def _fp8_pair(
    prefix: str, weight: torch.Tensor, scale_name: str, scale: torch.Tensor,
    block: tuple[int, int] | None, device: torch.device,
) -> Iterator[tuple[str, torch.Tensor]]:
    """An FP8 weight and its checkpoint scale -> (weight, per-channel weight_scale [out])."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight {prefix}.weight must be 2-D, got shape {tuple(weight.shape)}")
    out, inp = weight.shape
    weight = weight.to(device)
    s = scale.to(device=device, dtype=torch.float32)
    if s.numel() == 1:  # per tensor
        yield f"{prefix}.weight", weight
        yield f"{prefix}.weight_scale", s.reshape(1).expand(out).contiguous()
        return
    if tuple(s.shape) in ((out,), (out, 1)):  # per output channel
        yield f"{prefix}.weight", weight
        yield f"{prefix}.weight_scale", s.reshape(out)
        return
    if block is not None and tuple(s.shape) == (math.ceil(out / block[0]), math.ceil(inp / block[1])):
        full = s.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
        q, rs = quantize_rows(weight.float() * full)
        yield f"{prefix}.weight", q
        yield f"{prefix}.weight_scale", rs.view(-1)
        return
    expected = f"a scalar (per tensor), [{out}] or [{out}, 1] (per channel)"
    if block is not None:
        expected += f", or [{math.ceil(out / block[0])}, {math.ceil(inp / block[1])}] ({block[0]}x{block[1]} blocks)"
    raise ValueError(
        f"scale {scale_name} has shape {tuple(scale.shape)}; the weight {prefix}.weight "
        f"{tuple(weight.shape)} needs {expected}"
    )


def apply_kv_scales(attention_layers: list[Any], kv_scales: dict[str, torch.Tensor]) -> int:
    """Set the KV cache scales a checkpoint carries (per tensor or per KV head) on the attention
    layers; returns how many were set."""
    for name, t in kv_scales.items():
        m = _KV_SCALE.search(name)
        assert m is not None
        layer, kind = int(m.group(2)), m.group(3) or m.group(4)
        if layer >= len(attention_layers):
            raise ValueError(f"KV scale {name} names layer {layer}; the model has {len(attention_layers)}")
        target: torch.Tensor = getattr(attention_layers[layer], f"{kind}_scale")
        if t.numel() not in (1, target.numel()):
            raise ValueError(
                f"KV scale {name} has shape {tuple(t.shape)}; expected a scalar or one per KV head "
                f"({target.numel()})"
            )
        value = t.to(device=target.device, dtype=torch.float32).reshape(-1)
        if not bool(torch.all(value > 0)):
            raise ValueError(f"KV scale {name} must be positive")
        target.copy_(value.expand(target.numel()))
    return len(kv_scales)
