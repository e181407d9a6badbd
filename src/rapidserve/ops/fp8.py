"""FP8 (E4M3) number handling shared by the weights (model/quant.py) and the KV cache.

E4M3 (`torch.float8_e4m3fn`): 4 exponent bits, 3 mantissa bits, finite range +-448, no inf.
A value is stored as `round(x / scale)` in E4M3 and read back as `fp8 * scale`; the scale maps
the largest magnitude of its group (a row, a head, a tensor) onto 448 (or is fixed, for the KV).
"""

from __future__ import annotations

import torch

from rapidserve.config import KV_CACHE_DTYPES

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# A group of zeros gets this scale (not 0: dividing by it must stay finite).
_MIN_SCALE = 1.0e-12


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def to_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale rounded to E4M3 (saturating at +-448: a cast alone would give NaN past it)."""
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() == 0:
        x = x.float()  # a float32 scale with dims promotes the division itself: one kernel less
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) dynamic quantization: x [..., K] -> (fp8 [..., K], scale [..., 1] fp32)
    with x ~= fp8 * scale. Rows are a weight's output channels or an activation's tokens.

    NOTE: runs per projection per step on the activations, so it is kept to few kernels (the
    max-norm is one reduction; the division promotes to float32 itself)."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = (amax / FP8_MAX).clamp_(min=_MIN_SCALE)
    return to_fp8(x, scale), scale


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether torch's scaled matmul runs FP8 GEMMs here: CUDA with compute capability >= 8.9
    (Ada, Hopper and newer). Elsewhere FP8 weights are dequantized into the compute dtype."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for `--kv-cache-dtype` (auto: the model's dtype)."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_DTYPE
    raise ValueError(f"unknown kv_cache_dtype {name!r}; available: {', '.join(KV_CACHE_DTYPES)}")
