"""Token sampling, incremental detokenization and stop-string handling."""

from rapidserve.sampling.detokenizer import IncrementalDetokenizer
from rapidserve.sampling.logprobs import LogprobsTensors, TokenLogprobs, compute_logprobs
from rapidserve.sampling.sampler import Sampler, SamplingBatch, apply_filters, make_generator
from rapidserve.sampling.stop import StopMatch, find_stop, hold_back

__all__ = [
    "IncrementalDetokenizer",
    "LogprobsTensors",
    "Sampler",
    "SamplingBatch",
    "StopMatch",
    "TokenLogprobs",
    "apply_filters",
    "compute_logprobs",
    "find_stop",
    "hold_back",
    "make_generator",
]
