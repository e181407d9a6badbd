"""Typed messages between the engine front and the rapid topology's workers.

Small records only: token ids, block ids, a sampled token (with its logprobs, and its prompt's
logprobs with the first token, when its request asked). The KV cache and the weights never
travel (both workers hold the same tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rapidserve.sampling.logprobs import TokenLogprobs
from rapidserve.sampling.prompt_logprobs import PromptLogprobsChunk
from rapidserve.sampling_params import SamplingParams


# ---- front -> decode worker ----------------------------------------------------------------

@dataclass(frozen=True)
class Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- decode worker -> prefill worker -------------------------------------------------------

@dataclass(frozen=True)
class PrefillWork:
    """Prefill every token the request has (its prompt, plus its outputs after a preemption)
    into the given blocks and sample the next token."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int
    block_ids: list[int]
    generator_state: Any = None  # a seeded request's random stream (a CPU ByteTensor)


@dataclass(frozen=True)
class CancelPrefill:
    request_id: str


@dataclass(frozen=True)
class SetPartition:
    """The decode worker moved to another SM partition: the prefill worker follows at its next
    step (onto the remainder of the same split)."""

    partition: Any  # resources.partition.Partition
    decided_s: float = 0.0  # time.monotonic() when the decode worker decided it (reaction time)


@dataclass(frozen=True)
class SharedTensors:
    """The decode worker's model and KV cache, handed to the prefill worker once (CUDA IPC
    or shared memory under process placement; plain references under thread placement)."""

    model: Any
    kv_cache: Any
    max_model_len: int
    eos_token_ids: tuple[int, ...]  # banned while a request is below its min_tokens


# ---- prefill worker -> decode worker -------------------------------------------------------

@dataclass(frozen=True)
class PrefillDone:
    request_id: str
    token: int
    generator_state: Any = None
    logprobs: TokenLogprobs | None = None  # the first token's, if the request asked
    # The prompt's (SamplingParams.prompt_logprobs), all of them: the prefill side runs a prompt
    # whole. None after a preemption (they went with the first token).
    prompt_logprobs: PromptLogprobsChunk | None = None


@dataclass(frozen=True)
class PartitionFollowed:
    """The prefill worker runs on a SetPartition's partition now (its next kernels go there)."""

    partition: Any  # resources.partition.Partition
    decided_s: float  # the SetPartition's decided_s
    moved_s: float  # time.monotonic() when the prefill worker moved


@dataclass(frozen=True)
class PrefillDropped:
    request_id: str


@dataclass(frozen=True)
class PrefillFailed:
    """The request's KV could not be delivered (the disagg topology: its transfer failed); the
    prefill side holds nothing of it any more."""

    request_id: str
    message: str


# ---- decode worker -> front ------------------------------------------------------------------

@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int
    status: str | None  # a RequestStatus value when the token ends the request
    stop_reason: int | None = None
    logprobs: TokenLogprobs | None = None  # if the request asked (SamplingParams.logprobs)
    prompt_logprobs: PromptLogprobsChunk | None = None  # with the first token (PrefillDone's)


@dataclass(frozen=True)
class RequestFailed:
    """The request ended with an error (its blocks are freed); the other requests go on."""

    request_id: str
    message: str


@dataclass(frozen=True)
class WorkerStats:
    """The decode worker's state after a loop turn (for metrics and tests)."""

    num_free_blocks: int
    num_blocks: int
    num_running: int
    num_waiting: int
    num_prefilling: int
    num_preemptions: int
    decode_sms: int = 0  # SMs of the decode partition in force (0: no partitioning)
    partition: Any = None  # resources.policy.PartitionStats (rapid mode with a policy)
    memory_bytes: int = 0  # GPU memory the worker's process holds (torch's pools; 0 on CPU)


@dataclass(frozen=True)
class StepEvents:
    events: list[TokenEvent]
    stats: WorkerStats


@dataclass(frozen=True)
class Ready:
    """Sent by the decode worker once the model and the cache exist."""

    num_kv_blocks: int
    block_size: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class WorkerFailed:
    role: str  # "prefill" or "decode"
    message: str
