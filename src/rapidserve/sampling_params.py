"""Per-request sampling and stopping parameters (the vLLM `SamplingParams` surface)."""

from __future__ import annotations

import math
from dataclasses import dataclass

_GREEDY_EPS = 1e-5
# The most samples one request may ask for (SamplingParams.n; the server's `n` too).
MAX_N = 128
# The most alternatives a request may ask for per token (OpenAI's top_logprobs cap, vLLM's
# default max_logprobs).
MAX_LOGPROBS = 20
# The largest |logit_bias| (OpenAI's range; vLLM clamps to it).
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k 0 or -1 disables top-k; top_p 1 and min_p 0 disable
    their filters. `seed` gives the request its own random stream, so its samples do not
    depend on what else is in the batch. `logprobs` k (0..MAX_LOGPROBS; None: off) reports
    each generated token's log-probability, its rank and the k most likely tokens of its step,
    all from the model's raw logits (before temperature, filters and min_tokens' bans), as
    vLLM does. `prompt_logprobs` k (same range) reports each prompt token's log-probability
    given the tokens before it, its rank and the k most likely tokens at its position
    (`RequestOutput.prompt_logprobs`; the first prompt token has none).

    Penalties, as vLLM's (and applied in its order, before temperature and the filters, greedy
    included, after min_tokens' bans): `logit_bias` {token id: bias in [-100, 100]} is added to
    those tokens' logits; `repetition_penalty` r > 0 (1: off) divides the logit of every token
    seen in the prompt or the output by r when it is positive and multiplies it by r otherwise
    (HF's RepetitionPenaltyLogitsProcessor); then `frequency_penalty` f and `presence_penalty`
    p, in [-2, 2], subtract f * count + p * (count > 0), count being how often the token
    occurs in the output so far (OpenAI's definition: the prompt does not count).
    """

    # Parallel sampling: n completions of the prompt, each its own sequence (the front fans the
    # request out into n children, serving/parallel.py); vLLM's `n`.
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(
            self, "stop_token_ids", tuple(self.stop_token_ids or ())
        )
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.logit_bias is not None:
            # A copy: the caller's dict may change after the request is admitted. An empty
            # one is no bias at all.
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id to bias, got {self.logit_bias!r}")
            object.__setattr__(self, "logit_bias", dict(self.logit_bias) or None)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        # NaN passes a plain `< 0` test and inf makes every logit 0 (or NaN), so both are
        # rejected explicitly; bool is an int subclass but never a meant temperature.
        if (
            not isinstance(self.temperature, (int, float))
            or isinstance(self.temperature, bool)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS
            ):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1: off), got {r!r}")
        for t, bias in (self.logit_bias or {}).items():
            # The upper bound of the ids is the model's vocabulary: the engine checks it at admission.
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {bias!r} for token {t}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def penalized(self) -> bool:
        """Some penalty looks at the tokens seen so far (the sampler needs the request's history)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _is_number(value: object) -> bool:
    """A real int or float (bool is an int subclass but never a meant number); NaN fails every
    range test it is put to, so it needs no case of its own."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
