"""The OpenAI API's request and response bodies (with vLLM's extensions), as pydantic models.

Requests validate strictly (a string is not a number, 1.0 is not an integer) and ignore
unknown fields, as vLLM does, so that clients sending newer OpenAI fields still work.
Parameters the engine cannot honour (best_of > 1, suffix, chat's echo, ...) are refused
with a 400 rather than ignored: a client must not believe it got what it asked for.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator,
)

from rapidserve.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, SamplingParams

_REQUEST = ConfigDict(strict=True, extra="ignore")
TokenId = Annotated[int, Field(ge=0)]  # its upper bound is the model's vocabulary: checked at admission
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]  # alternatives per token (OpenAI: 0..20)
Penalty = Annotated[float, Field(ge=-2, le=2)]  # presence and frequency (OpenAI's range)


def _lone_surrogate(value: Any, where: str) -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate ("\\ud800" is valid JSON but
    not Unicode text: tokenizers and UTF-8 encoders reject it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, where) or _lone_surrogate(v, f"{where}.{k}" if where else str(k))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _lone_surrogate(v, f"{where}[{i}]")) is not None:
                return found
    return None


def _only(*values: Any) -> Any:
    """The field's schema: only these values are accepted (`_check_supported` answers others
    with a 400 naming the field; validation itself is unchanged)."""

    def only(schema: dict[str, Any]) -> None:
        schema.clear()
        schema["enum"] = list(values)

    return Field(json_schema_extra=only)


def _non_empty(schema: dict[str, Any]) -> None:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string":
            option["minLength"] = 1
        elif option.get("type") == "array":
            option["minItems"] = 1
            if isinstance(option.get("items"), dict) and option["items"].get("type") in ("string", "array"):
                _non_empty(option["items"])  # each prompt of a batch too


# The field's schema: its strings and lists must not be empty (the server answers 400).
_NON_EMPTY = Field(json_schema_extra=_non_empty)


class _Request(BaseModel):
    """A request body: strict types, unknown fields ignored, text that is valid Unicode."""

    model_config = _REQUEST

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data, "")
        if where is not None:
            # Escaped: the message must itself be valid UTF-8.
            where = where.encode("utf-8", "backslashreplace").decode("utf-8")
            raise ValueError(f"{where or 'the body'} is not valid Unicode text (it holds a lone surrogate)")
        return data


class RequestError(ValueError):
    """A request field with a value this server refuses (out of range, or not supported)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = _REQUEST
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields completions and chat share. Ranges are declared (so the OpenAPI schema says what
    is accepted); what SamplingParams refuses beyond them is a 400 too."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1  # choices per prompt (parallel sampling)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Token id (as a JSON object's key: a string) -> bias; ids above the vocabulary are refused
    # at admission.
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None

    def _max_tokens(self) -> int | None:
        raise NotImplementedError

    def _logprobs(self) -> int | None:
        """SamplingParams.logprobs: the alternatives per token, None for no logprobs."""
        raise NotImplementedError

    def _prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs (completions' echo with logprobs)."""
        return None

    def _check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options", "stream_options is only allowed with stream=true")

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters; ValueError (naming the field) if a value is out of range."""
        self._check_supported()
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            max_tokens=self._max_tokens(),
            min_tokens=self.min_tokens,
            stop=self.stop or (),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=self._logprobs(),
            prompt_logprobs=self._prompt_logprobs(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._logit_bias(),
        )

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's logit_bias, keyed by token id strings, as SamplingParams' {int: float}."""
        if not self.logit_bias:
            return None
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            # Plain decimal digits only: int() would also take " 7", "+7" and "1_0".
            if not key.isascii() or not key.isdigit():
                raise RequestError("logit_bias", f"logit_bias keys must be token ids (decimal integers >= 0), "
                                                 f"got {key!r}")
            bias[int(key)] = value
        return bias

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[str | list[str] | list[TokenId] | list[list[TokenId]], _NON_EMPTY]
    # OpenAI's default for completions; 0 only with echo (the prompt scored, nothing generated)
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    # The prompt before the generated text (and, with logprobs, its tokens' logprobs first).
    echo: bool = False
    logprobs: NumLogprobs | None = None
    # vLLM's extension: each choice's `prompt_logprobs` (SamplingParams.prompt_logprobs), not streamed
    prompt_logprobs: NumLogprobs | None = None
    best_of: Annotated[int | None, _only(1, None)] = None
    suffix: Annotated[str | None, _only("", None)] = None

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0 (OpenAI's way to score a prompt): the answer holds the prompt
        alone. NOTE: the engine always generates a token; this one is dropped (as vLLM does)."""
        return self.echo and self.max_tokens == 0

    def _max_tokens(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens

    def _logprobs(self) -> int | None:
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        # NOTE: one k for both uses: the larger (the echo's logprobs object keeps its own k).
        ks = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(ks) if ks else None

    def _check_supported(self) -> None:
        super()._check_supported()
        if self.prompt_logprobs is not None and self.stream:
            raise RequestError("prompt_logprobs", "prompt_logprobs is not available with stream=true (as vLLM)")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens", "max_tokens must be at least 1 (0 only with echo: the prompt "
                                             "alone, scored with logprobs)")
        if self.best_of not in (None, 1):
            raise RequestError("best_of", f"best_of must be 1, got {self.best_of}")
        if self.suffix:
            raise RequestError("suffix", "suffix is not supported")

    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt per choice."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt", "the prompt is empty")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content only."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise RequestError(
                        "messages", f"only text content parts are supported, got {part.type!r}"
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], _NON_EMPTY]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: NumLogprobs | None = None
    tools: Annotated[list[dict[str, Any]] | None, _only([], None)] = None
    # vLLM's chat echo repeats the last message: not served (completions' echo is).
    echo: Annotated[bool, _only(False)] = False
    # vLLM's extension, served on completions only: refused here rather than ignored.
    prompt_logprobs: Annotated[int | None, _only(None)] = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM's extension

    def _max_tokens(self) -> int | None:
        # None: as many as the context leaves room for.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _check_supported(self) -> None:
        super()._check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.tools:
            raise RequestError("tools", "tools are not supported")
        if self.echo:
            raise RequestError("echo", "echo is not supported in chat (completions' echo is)")
        if self.prompt_logprobs is not None:
            raise RequestError("prompt_logprobs", "prompt_logprobs is served on /v1/completions only")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise RequestError("response_format", "only response_format {\"type\": \"text\"} is supported")

    def template_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise RequestError("messages", "messages must not be empty")
        return [m.template_message() for m in self.messages]


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses -------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


FinishReason = Literal["stop", "length"] | None


class CompletionLogprobs(BaseModel):
    """OpenAI's completions logprobs: one item per generated token in each list. top_logprobs
    maps token text to logprob for the sampled token and the `logprobs` most likely; text_offset
    is where each token's text starts in the choice's text."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's text as UTF-8


class ChatLogprobsContent(ChatTokenLogprob):
    """A generated token and the `top_logprobs` most likely tokens of its step, best first."""

    top_logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobsContent] | None = None


class PromptLogprob(BaseModel):
    """vLLM's `Logprob` as its server writes a prompt token's (the `prompt_logprobs` extension)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None  # vLLM: the stop token id or string that ended it
    # vLLM's extension (asked with "prompt_logprobs"): per prompt token, null for the first, then
    # token id (a string) -> its Logprob; left out of the answer when not asked.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None

    @model_serializer(mode="wrap")
    def _prompt_logprobs_if_asked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("prompt_logprobs") is None:
            data.pop("prompt_logprobs", None)
        return data


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    """A streamed completion chunk: the same shape, one token's text per choice."""


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """Only the first chunk names the role: absent fields are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nones(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "rapidserve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok", "unhealthy"]
    error: str | None = None  # why not, when unhealthy


class VersionResponse(BaseModel):
    version: str
