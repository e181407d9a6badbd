"""Token sampling, incremental detokenization and stop-string handling."""

from rapidserve.sampling.detokenizer import IncrementalDetokenizer
from rapidserve.sampling.logprobs import LogprobsTensors, TokenLogprobs, compute_logprobs
from rapidserve.sampling.prompt_logprobs import PromptLogprobsChunk
from rapidserve.sampling.penalties import PendingTokens, TokenHistory, apply_penalties
from rapidserve.sampling.sampler import Sampler, SamplingBatch, apply_filters, make_generator
from rapidserve.sampling.stop import StopMatch, find_stop, hold_back

__all__ = [
    "IncrementalDetokenizer",
    "LogprobsTensors",
    "PendingTokens",
    "PromptLogprobsChunk",
    "Sampler",
    "SamplingBatch",
    "StopMatch",
    "TokenHistory",
    "TokenLogprobs",
    "apply_filters",
    "apply_penalties",
    "compute_logprobs",
    "find_stop",
    "hold_back",
    "make_generator",
]
