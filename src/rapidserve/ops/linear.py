"""The projections' matmul on CPU: oneDNN's fp32 GEMM where torch has it.

torch sends a float32 `F.linear` on CPU to MKL's sgemm; its oneDNN matmul (the op Inductor's
CPU code calls, `mkldnn._linear_pointwise`, which takes the plain weight as it is: no copy, no
repacking) is faster on the decoder's shapes, in IEEE fp32 both. Measured on this workplace's
2-core AMD EPYC, one thread, SmolLM2-135M's shapes: gate/up [32 x 576] x [576 x 3072] 1.53 ->
1.31 ms, the LM head [32 x 576] x [576 x 49152] 32.9 -> 25.0 ms, a 1024-token prefill's gate/up
38.7 -> 34.7 ms. The results differ from sgemm's by summation order only (~5e-6 relative).

Other dtypes and devices keep `F.linear` (bf16 already goes to oneDNN; CUDA to cuBLAS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# None: not tried yet; decided by the first float32 CPU call (an op missing from this build, or
# one that refuses the call, falls back to F.linear for the life of the process).
_ONEDNN: bool | None = None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x [..., in], weight [out, in] -> [..., out]."""
    global _ONEDNN
    if x.dtype != torch.float32 or x.device.type != "cpu" or _ONEDNN is False or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    if _ONEDNN is None:
        _ONEDNN = _onednn_works()
        if not _ONEDNN:
            return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    if x.dim() != 2 or not x.is_contiguous():
        x = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return y.view(*lead, weight.shape[0])


def _onednn_works() -> bool:
    """Whether this torch build runs oneDNN's fp32 linear and it agrees with F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((5, 24), (40, 24), (40,)))
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return y.shape == (5, 40) and torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
