"""A request's state as the scheduler and the engine see it. No torch here."""

from __future__ import annotations

import enum
import time

from rapidserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    """One sequence. `num_computed_tokens` of its tokens have their KV in the cache; a step
    brings it closer to `num_tokens` (prefill, a prefill chunk or a decode alike)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # params.max_tokens, capped by the model's length
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # NOTE: tokens sampled on the device by a step still in flight (0 or 1): with
        # one-step-ahead scheduling the next step is planned before this one's token is read
        # back; the runner feeds it to that step from device memory.
        self.num_pending = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # NOTE: prompt positions [0, n) have had their prompt logprobs computed by a launched step
        # (SamplingParams.prompt_logprobs): a recompute after a preemption does not score them again.
        self.num_prompt_logprobs = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens (known or pending) whose KV is not in the cache yet."""
        return self.num_tokens + self.num_pending - self.num_computed_tokens

    @property
    def at_max_tokens(self) -> bool:
        """Its pending token will be its last: nothing more to schedule."""
        return self.num_output_tokens + self.num_pending >= self.max_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token lacks KV: the next step is a one-token decode."""
        return self.num_output_tokens + self.num_pending > 0 and self.num_uncomputed_tokens == 1

    def reset_for_recompute(self) -> None:
        """Preempted: its KV is dropped, and its prompt and outputs will be computed again."""
        # NOTE: a token in flight (num_pending) still lands and is kept: it was sampled from
        # the full context before the KV was dropped.
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions += 1

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def token_stop(
        self, token_id: int, eos_token_ids: tuple[int, ...]
    ) -> tuple[RequestStatus | None, int | None]:
        """Whether the token just appended ends the request, by token-level rules only (EOS,
        stop token ids, length): (status, stop reason), or (None, None). Stop strings are
        text-level and checked by the engine front."""
        p = self.params
        if self.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token_id in eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token_id in p.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token_id
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
