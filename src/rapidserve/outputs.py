"""What the engine hands back for a request (the vLLM `RequestOutput` shape)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's log-probability at one step (vLLM's `Logprob`)."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token of its step
    decoded_token: str | None = None  # the token alone as text (None without a tokenizer)


# Per generated token: token id -> Logprob, the sampled token first, then the step's k most likely
# (k = SamplingParams.logprobs; k or k + 1 entries, as vLLM's SampleLogprobs).
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt token: None for the first (nothing predicts it), then token id -> Logprob, the prompt
# token first (its logprob given the tokens before it, its rank), then its position's k most likely
# (k = SamplingParams.prompt_logprobs; vLLM's PromptLogprobs).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # With SamplingParams.logprobs set (else None): one entry per token of token_ids, and the
    # sum of the sampled tokens' logprobs.
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """One request's output. With SamplingParams.n > 1 (parallel sampling) each output while it
    runs carries one completion (its `index`; the deltas are that completion's; its
    finish_reason once it ends) with `finished` False, and the last one, `finished` True, all n
    completions in index order and no delta (serving/parallel.py)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Text and tokens added since the previous output of this request (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    # With SamplingParams.prompt_logprobs set (else None): one entry per prompt token, on every
    # output from the first token on (as vLLM's cumulative outputs). NOTE: the same list on
    # each output of a request: complete once its first token is out, never changed after.
    prompt_logprobs: PromptLogprobs | None = None
