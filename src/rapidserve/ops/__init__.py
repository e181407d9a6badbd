"""Fused elementwise kernels for the decoder (RMSNorm, residual add + RMSNorm, rotary, SiLU·mul).

The Triton kernels live in `rapidserve.ops.triton_fused`; import that module where it is used
(it imports triton, which CPU-only installs may lack). The model calls them on CUDA tensors
only; on CPU it keeps the torch code, which is the oracle the kernels are tested against.
"""

from __future__ import annotations

import torch


def fused_enabled(x: torch.Tensor) -> bool:
    """Whether the model sends x through the Triton kernels: on CUDA only.

    CPU keeps the torch code (the HF-equivalence oracle). Tests patch this to run the model's
    fused path under the Triton interpreter; benchmarks can patch it to compare the two.
    """
    return x.is_cuda
