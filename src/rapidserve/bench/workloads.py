"""Workloads for `bench serve`: the `random` dataset and the arrival process.

`random` follows vLLM's RandomDataset: lengths uniform in [len x (1 - r), len x (1 + r)] (both
ends included), prompts of random token ids. Arrivals are a gamma renewal process: shape =
burstiness, scale = 1 / (rate x burstiness), so the mean gap is 1 / rate whatever the burstiness,
and burstiness 1 is Poisson (exponential gaps); < 1 is burstier, > 1 more even.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class SampleRequest(NamedTuple):
    prompt: list[int]
    prompt_len: int
    output_len: int


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of a length drawn as vLLM's --random-range-ratio does (low >= 1)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    return max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int) -> list[SampleRequest]:
    """`num_prompts` requests of random token ids in [0, vocab_size), seeded."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if vocab_size < 1:
        raise ValueError(f"--random-vocab-size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lo, in_hi = length_range(input_len, range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio)
    in_lens = rng.integers(in_lo, in_hi + 1, size=num_prompts)
    out_lens = rng.integers(out_lo, out_hi + 1, size=num_prompts)
    reqs = []
    for n_in, n_out in zip(in_lens.tolist(), out_lens.tolist()):
        prompt = rng.integers(0, vocab_size, size=n_in).tolist()
        reqs.append(SampleRequest(prompt=prompt, prompt_len=n_in, output_len=n_out))
    return reqs


def arrival_times(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from the start) of `n` requests; rate inf sends them all at 0."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    # The first request goes at once: the run's clock starts with it, not one gap later.
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()
