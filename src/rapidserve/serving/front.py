"""The engine front shared by the three topologies (hybrid, rapid, disagg): prompts,
admission checks, detokenization, stop strings, outputs, and the stats every topology reports.
A topology subclasses `EngineFront` and supplies its workers (serving/hybrid.py, rapid.py,
disagg.py); `rapidserve.engine.create_engine` picks one."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from rapidserve.config import EngineConfig
from rapidserve.kv.block_manager import blocks_needed
from rapidserve.model.config import ModelConfig
from rapidserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from rapidserve.request import Request, RequestStatus
from rapidserve.resources.policy import PartitionStats
from rapidserve.sampling import IncrementalDetokenizer, PromptLogprobsChunk, TokenLogprobs, find_stop
from rapidserve.sampling_params import SamplingParams
from rapidserve.scheduler.chunked import ScheduledRequest
from rapidserve.serving.parallel import ParentRequest, child_params

log = logging.getLogger("rapidserve.engine")


class _TextState:
    """Per-request output text: incremental detokenization and stop-string cutting; and the
    output tokens' logprobs when the request asked for them."""

    def __init__(self, detokenizer: IncrementalDetokenizer | None, logprobs: bool = False,
                 prompt_logprobs: bool = False) -> None:
        self.detokenizer = detokenizer
        # One entry per prompt token scored so far (the first has none: None).
        self.prompt_logprobs: PromptLogprobs | None = [None] if prompt_logprobs else None
        self.text = ""
        self.emitted_tokens = 0  # output tokens already reported in a delta
        self.logprobs: SampleLogprobs | None = [] if logprobs else None  # one entry per output token
        self.cumulative_logprob = 0.0


class StepStats(NamedTuple):
    """What the last `step()` ran, for benchmarks and metrics (`LLMEngine.last_step_stats`)."""

    num_prefill_tokens: int  # prompt tokens (or tokens recomputed after a preemption)
    num_decode_tokens: int  # one per request that advanced by one token past its prompt
    num_decode_kv_tokens: int  # KV entries those decodes attend over: the sum of their lengths

    @classmethod
    def of(cls, scheduled: list[ScheduledRequest]) -> StepStats:
        prefill = decode = decode_kv = 0
        for s in scheduled:
            # A one-token step past the prompt costs what a decode costs (the whole context
            # read, one KV entry written), even as the tail of a recompute after a preemption.
            if s.num_new_tokens == 1 and s.start >= s.request.num_prompt_tokens:
                decode += 1
                decode_kv += s.start + 1
            else:
                prefill += s.num_new_tokens
        return cls(prefill, decode, decode_kv)


# Upper bounds (seconds) of the KV transfer time histogram (KVTransferStats.bucket_counts).
KV_TRANSFER_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class KVTransferStats(NamedTuple):
    """The disagg mode's KV copies since start (one per prefill), and its prefill instance's KV
    pool (the decode instance's is EngineStats' blocks)."""

    num_transfers: int
    num_bytes: int
    seconds: float  # all transfers together
    bucket_counts: tuple[int, ...]  # transfers within each KV_TRANSFER_BUCKETS bound (cumulative)
    prefill_free_blocks: int
    prefill_total_blocks: int
    prefill_memory_bytes: int = 0  # GPU memory the prefill instance holds (its weights, pool, activations)


class EngineStats(NamedTuple):
    """The engine's state for metrics: the same fields in every topology."""

    num_running: int
    num_waiting: int  # not yet running (in the rapid mode: including prompts being prefilled)
    num_free_blocks: int  # in the disagg mode: of the decode instance's pool
    num_total_blocks: int
    num_preemptions: int
    kv_transfer: KVTransferStats | None = None  # the disagg mode only
    decode_sms: int = 0  # the rapid mode: SMs of the decode partition in force (0: no partitioning)
    partition: PartitionStats | None = None  # the rapid mode with a partition policy
    memory_bytes: int = 0  # GPU memory the engine (hybrid) or the decode worker's process holds

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


def load_chat_template(value: str | None) -> str | None:
    """The Jinja text of --chat-template: the file it names, else the value itself if it reads as
    a template. Its syntax is checked here, so a bad template fails at start-up, not per request."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template "
                         "(inline text with {{ ... }} or {% ... %})")
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: not a valid Jinja template ({e}, line {e.lineno})") from e
    return text


def check_unicode(text: str, what: str) -> None:
    """ValueError if `text` cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800", which
    JSON allows and tokenizers reject with a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: a lone surrogate at position {e.start}") from None


class EngineFront:
    """What every topology's engine shares: prompt validation, detokenization, stop strings and
    the outputs handed back. Subclasses run the model (`step`) and own the KV cache."""

    # Set by subclasses before requests arrive.
    model_config: ModelConfig
    tokenizer: Any
    max_model_len: int
    model_name: str
    eos_token_ids: tuple[int, ...]
    num_kv_blocks: int
    block_size: int

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.chat_template = load_chat_template(config.chat_template)  # None: the tokenizer's
        self.last_step_stats = StepStats(0, 0, 0)  # what the last step() ran
        self._requests: dict[str, Request] = {}  # unfinished, by id
        self._text: dict[str, _TextState] = {}
        self._ids = itertools.count()
        self._token_texts: dict[int, str] = {}  # token id -> the token alone as text (logprobs)
        # Parallel sampling (n > 1): unfinished parents by id, and the parent of each child id
        # (children live in _requests like any request; only step() and abort know parents).
        self._parents: dict[str, ParentRequest] = {}
        self._parent_of: dict[str, ParentRequest] = {}

    # ---- to be provided by a topology --------------------------------------------------------

    def _submit(self, req: Request) -> None:
        raise NotImplementedError

    def _release(self, req: Request, decided_by_worker: bool) -> None:
        """Free what a finished or aborted request holds (unless its worker already did)."""
        raise NotImplementedError

    def _step(self) -> list[RequestOutput]:
        """One step of the topology: an output per request (child) that got a token or ended."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop workers, if the topology has any."""

    # How often an idle AsyncEngine calls check_liveness() (None: never; a topology without
    # worker processes has nothing that can die on its own).
    liveness_poll_s: float | None = None
    # The role whose device steps run on the thread that calls step() (the hybrid mode: "engine"):
    # that thread cannot watch itself, so an AsyncEngine watches its steps (the step watch,
    # --step-timeout-s). None: the steps run in workers the topology watches (rapid, disagg).
    caller_step_role: str | None = None

    def check_liveness(self) -> None:
        """Raise if the engine can no longer serve (a worker died or went silent), failing what
        is pending. Called while idle, between steps; step() checks on its own."""

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for each request that got a token (or ended). A
        request with n > 1 gives one output per child event, then its final (ParentRequest)."""
        outputs = self._step()
        if not self._parent_of:
            return outputs
        folded: list[RequestOutput] = []
        ended: list[ParentRequest] = []
        for out in outputs:
            parent = self._parent_of.get(out.request_id)
            if parent is None:
                folded.append(out)
                continue
            # (a finished parent folds nothing more: a sibling's output later in this step)
            folded.extend(parent.fold(out))
            if parent.finished:
                ended.append(parent)
        for parent in ended:
            self._end_parent(parent)
        return folded

    # ---- requests ----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            check_unicode(prompt, "prompt")
            if self.tokenizer is None:
                raise ValueError(
                    "this model has no tokenizer (a preset or a directory without one): pass "
                    "token ids, or give --tokenizer"
                )
            return prompt, self._in_vocabulary(list(self.tokenizer.encode(prompt, add_special_tokens=True)))
        ids = list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is not in the vocabulary [0, {vocab})")
        return None, ids

    def check_params(self, params: SamplingParams) -> None:
        """Refuse parameters that index the vocabulary out of range (ValueError naming the
        field). NOTE: the sampler bans stop ids below min_tokens by indexing the logits; an id
        outside them would fail a step (and, before this check, the whole engine)."""
        vocab = self.model_config.vocab_size
        for t in params.stop_token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"stop_token_ids must be token ids in the vocabulary [0, {vocab}), got {t}")
        # NOTE: the sampler adds the bias by indexing the logits, as it bans stop ids.
        outside = sorted(t for t in (params.logit_bias or {}) if t >= vocab)
        if outside:
            raise ValueError(f"logit_bias must map token ids in the vocabulary [0, {vocab}), got {outside[:5]}")

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        self.check_params(params)
        text, ids = self.encode_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but the maximum context length is "
                f"{self.max_model_len} (prompt plus at least one generated token)"
            )
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        # NOTE: checked once for a parallel request (each child needs what one request needs, and
        # children are scheduled, preempted and freed one by one), so none is half admitted.
        if blocks_needed(len(ids) + max_tokens, self.block_size) > self.num_kv_blocks:
            raise ValueError(
                f"the request needs up to {len(ids) + max_tokens} tokens of KV cache, more than the "
                f"whole cache holds ({self.num_kv_blocks * self.block_size}); lower "
                "max_tokens or give the cache more memory"
            )
        if request_id is None:
            request_id = str(next(self._ids))
        if request_id in self._requests or request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n == 1:
            self._add_sequence(request_id, ids, params, max_tokens, text)
            return request_id
        parent = ParentRequest(request_id, params.n, text, ids)
        for cid in parent.child_ids:
            if cid in self._requests or cid in self._parents:
                raise ValueError(f"request id {request_id!r}: its child id {cid!r} is already in use")
        self._parents[request_id] = parent
        try:
            for i, cid in enumerate(parent.child_ids):
                self._add_sequence(cid, ids, child_params(params, i), max_tokens, text)
                self._parent_of[cid] = parent
        except BaseException:
            self.abort_request(request_id)  # the children submitted so far: all or none
            raise
        return request_id

    def _add_sequence(
        self, request_id: str, ids: list[int], params: SamplingParams, max_tokens: int, text: str | None
    ) -> None:
        """Submit one sequence (a request, or a parent's child) to the topology."""
        req = Request(request_id, ids, params, max_tokens, prompt=text)
        self._submit(req)
        self._requests[request_id] = req
        detok = None
        if params.detokenize and self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        self._text[request_id] = _TextState(detok, logprobs=params.logprobs is not None,
                                            prompt_logprobs=params.prompt_logprobs is not None)

    def _end_parent(self, parent: ParentRequest) -> None:
        """Forget a parent that has given its final output; abort the children still running (a
        sibling failed)."""
        self._parents.pop(parent.request_id, None)
        for cid in parent.child_ids:
            self._parent_of.pop(cid, None)
            self._abort_sequence(cid)

    def abort_request(self, request_id: str) -> bool:
        """Abort a request; a parallel one (by its id, or any child's) with all its children."""
        parent = self._parents.get(request_id) or self._parent_of.get(request_id)
        if parent is not None:
            parent.finished = True
            self._end_parent(parent)
            return True
        return self._abort_sequence(request_id)

    def _abort_sequence(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        req.status = RequestStatus.FINISHED_ABORTED
        self._release(req, decided_by_worker=False)
        self._text.pop(request_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- outputs -----------------------------------------------------------------------------

    def _on_token(
        self,
        req: Request,
        token: int,
        decided: tuple[RequestStatus | None, int | None] | None = None,
    ) -> RequestOutput:
        """Take a request's next token. `decided` is a worker's token-level verdict (EOS, stop
        ids, length; it has then freed the request); None means judge it here."""
        req.append_token(token)
        status, reason = decided if decided is not None else req.token_stop(token, self.eos_token_ids)
        by_worker = decided is not None and status is not None
        state = self._text[req.request_id]
        p = req.params
        prev_len = len(state.text)
        if state.detokenizer is not None:
            state.text += state.detokenizer.add([token])
        cut_by_stop_string = False
        if (
            status is not RequestStatus.FINISHED_STOPPED and p.stop and state.detokenizer is not None
            and req.num_output_tokens >= p.min_tokens
        ):
            hit = find_stop(state.text[:prev_len], state.text[prev_len:], p.stop, p.include_stop_str_in_output)
            if hit is not None:
                state.text = state.text[: hit.cut]
                status, reason, cut_by_stop_string = RequestStatus.FINISHED_STOPPED, hit.stop, True
        if status is not None:
            req.status, req.stop_reason = status, reason
            del self._requests[req.request_id]
            self._release(req, decided_by_worker=by_worker)
            if not cut_by_stop_string and state.detokenizer is not None:
                # Release a character the last token left incomplete (shown as U+FFFD).
                state.text += state.detokenizer.flush()
        return self._output(req, prev_len)

    def _fail_request(self, req: Request, message: str) -> RequestOutput | None:
        """End one request with an error found on this side (a step could not run it, or its
        output could not be made): free what it holds; the other requests go on. None if it
        had already ended."""
        if self._requests.get(req.request_id) is not req or req.request_id not in self._text:
            return None
        log.warning("request %s failed: %s", req.request_id, message)
        req.status = RequestStatus.FINISHED_ERROR
        self._release(req, decided_by_worker=False)
        return self._on_error(req, message)

    def _take_token(
        self,
        req: Request,
        token: int,
        decided: tuple[RequestStatus | None, int | None] | None = None,
        logprobs: TokenLogprobs | None = None,
        prompt_logprobs: PromptLogprobsChunk | None = None,
    ) -> RequestOutput | None:
        """`_on_token` (after recording the token's `logprobs`, which the worker computed if the
        request asked, and the last of its prompt's logprobs), with an exception there
        (detokenizing, stop strings) failing only this request."""
        try:
            if prompt_logprobs is not None:
                self._add_prompt_logprobs(req, prompt_logprobs)
            self._add_logprobs(req, token, logprobs)
            return self._on_token(req, token, decided)
        except Exception as e:  # noqa: BLE001 - one request's output, not the engine
            return self._fail_request(req, f"{type(e).__name__}: {e}")

    def _add_logprobs(self, req: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        """Record the logprobs of a request's next token, if it asked for them: the sampled
        token first, then the step's top k (a token among them once, as vLLM's dict holds it)."""
        state = self._text[req.request_id]
        if state.logprobs is None:
            return
        if logprobs is None:
            raise RuntimeError(f"token {token} came without the logprobs the request asked for")
        state.logprobs.append(self._logprob_entry(req, token, logprobs.logprob, logprobs.rank,
                                                  logprobs.top_ids, logprobs.top_logprobs))
        state.cumulative_logprob += logprobs.logprob

    def _take_prompt_logprobs(self, req: Request, chunk: PromptLogprobsChunk) -> RequestOutput | None:
        """Record a run of a request's prompt logprobs (a prefill chunk's, before its first token);
        an exception fails only this request (its output, else None)."""
        try:
            self._add_prompt_logprobs(req, chunk)
        except Exception as e:  # noqa: BLE001 - one request's output, not the engine
            return self._fail_request(req, f"{type(e).__name__}: {e}")
        return None

    def _add_prompt_logprobs(self, req: Request, chunk: PromptLogprobsChunk) -> None:
        """Append a run of prompt tokens' logprob dicts: the prompt token first, then its
        position's top k (a token among them once). Entries the list already holds are skipped."""
        state = self._text[req.request_id]
        entries = state.prompt_logprobs
        if entries is None:
            raise RuntimeError("prompt logprobs came for a request that did not ask for them")
        skip = len(entries) - chunk.first
        if skip < 0:
            raise RuntimeError(f"prompt logprobs from token {chunk.first} came before those of token {len(entries)}")
        k = chunk.k
        prompt = req.prompt_token_ids
        for i, row in enumerate(chunk.packed.tolist()[skip:], start=chunk.first + skip):
            top_ids = [int(t) for t in row[2:2 + k]]
            entries.append(self._logprob_entry(req, prompt[i], row[0], int(row[1]), top_ids, row[2 + k:2 + 2 * k]))

    def _logprob_entry(self, req: Request, token: int, logprob: float, rank: int, top_ids: Sequence[int],
                       top_logprobs: Sequence[float]) -> dict[int, Logprob]:
        """One position's vLLM-style dict: the token there first, then the position's top k (a
        token among them once)."""
        entry = {token: Logprob(logprob, rank, self._token_text(req, token))}
        for r, (t, lp) in enumerate(zip(top_ids, top_logprobs), start=1):
            if t not in entry:
                entry[t] = Logprob(lp, r, self._token_text(req, t))
        return entry

    def _token_text(self, req: Request, token: int) -> str | None:
        """A token alone as text (special tokens too), as vLLM decodes a Logprob's token."""
        if self.tokenizer is None or not req.params.detokenize:
            return None
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = str(self.tokenizer.decode([token]))
        return text

    def _on_error(self, req: Request, message: str) -> RequestOutput:
        """End a request with an error its worker reported (the worker has freed what it held):
        finish_reason "error", the message in `error`; the other requests go on."""
        req.status = RequestStatus.FINISHED_ERROR
        del self._requests[req.request_id]
        out = self._output(req, len(self._text[req.request_id].text))
        out.error = message
        return out

    def _output(self, req: Request, prev_text_len: int) -> RequestOutput:
        state = self._text[req.request_id]
        finished = req.status.finished
        if finished:
            del self._text[req.request_id]
        out_ids = req.output_token_ids
        new_ids = out_ids[state.emitted_tokens:]
        state.emitted_tokens = len(out_ids)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=state.text,
                    token_ids=out_ids,
                    finish_reason=req.status.value if finished else None,
                    stop_reason=req.stop_reason,
                    logprobs=None if state.logprobs is None else list(state.logprobs),
                    cumulative_logprob=None if state.logprobs is None else state.cumulative_logprob,
                )
            ],
            finished=finished,
            delta_text=state.text[prev_text_len:],
            delta_token_ids=new_ids,
            prompt_logprobs=state.prompt_logprobs,
        )

    # ---- helpers for the front ends ----------------------------------------------------------

    def chat_prompt(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template: give --tokenizer")
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: give one with --chat-template")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"each message needs a string role and a content, got {m!r}")
            for key, value in m.items():
                if isinstance(value, str):
                    check_unicode(value, f"messages: a message's {key}")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            chat_template=self.chat_template,
        )
        # The template already holds any BOS it wants: add no special tokens again.
        return self._in_vocabulary(list(self.tokenizer.encode(text, add_special_tokens=False)))

    def _in_vocabulary(self, ids: list[int]) -> list[int]:
        """The tokenizer's ids, if the model has an embedding for each (a --tokenizer that
        does not match the model would otherwise fail a step)."""
        vocab = self.model_config.vocab_size
        if ids and max(ids) >= vocab:
            raise ValueError(
                f"the tokenizer gave token id {max(ids)}, outside the model's vocabulary [0, {vocab}): "
                "the tokenizer does not match the model"
            )
        return ids
