"""Host values onto the sampling device without a stream sync (the sampler's, the penalties' and
the logprobs' per-step parameters)."""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list or array -> a new device tensor without making the host wait for queued GPU work.

    A plain `.to(cuda)` from pageable memory synchronizes the stream; staging through pinned
    memory lets the copy be queued behind the forward pass instead.
    """
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
