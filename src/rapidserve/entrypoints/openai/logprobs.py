"""The OpenAI API's logprobs objects (completions' and chat's) from the engine's per-token
`Logprob` dicts (`CompletionOutput.logprobs`), whole or one streamed chunk at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rapidserve.entrypoints.openai.protocol import (
    ChatLogprobs, ChatLogprobsContent, ChatTokenLogprob, CompletionLogprobs, PromptLogprob,
)
from rapidserve.outputs import Logprob, PromptLogprobs, RequestOutput

# JSON has no -inf (a token the model gives probability 0): the floor vLLM's server reports.
_FLOOR = -9999.0


def _text(token_id: int, lp: Logprob) -> str:
    """A token's text; without a tokenizer, vLLM's "token_id:N"."""
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def _value(lp: Logprob) -> float:
    return max(lp.logprob, _FLOOR)


def new_logprobs(output: RequestOutput) -> tuple[list[int], list[dict[int, Logprob]]]:
    """The tokens this output added (a streamed chunk's) and their logprob dicts."""
    c = output.outputs[0]
    n = len(output.delta_token_ids)
    if c.logprobs is None or n == 0:
        return [], []
    return list(output.delta_token_ids), c.logprobs[len(c.logprobs) - n:]


class CompletionLogprobsBuilder:
    """A choice's completions logprobs, chunk by chunk (text offsets continue across chunks)."""

    def __init__(self) -> None:
        self._offset = 0  # characters of the tokens' text so far

    def build(self, token_ids: Sequence[int], entries: Sequence[dict[int, Logprob] | None],
              texts: Mapping[int, str] | None = None, out: CompletionLogprobs | None = None,
              top: int | None = None) -> CompletionLogprobs:
        """The items of these tokens (appended to `out` if given). An entry None (the prompt's
        first token under echo: nothing predicts it) has a null logprob and top_logprobs, its
        text from `texts`. `top`: keep the token and the `top` most likely of each entry (the
        prompt's entries may hold more: vLLM's prompt_logprobs asked with a larger k)."""
        out = CompletionLogprobs() if out is None else out
        for token_id, entry in zip(token_ids, entries):
            if entry is None:
                text = (texts or {}).get(token_id, f"token_id:{token_id}")
                out.tokens.append(text)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                out.text_offset.append(self._offset)
                self._offset += len(text)
                continue
            lp = entry[token_id]
            text = _text(token_id, lp)
            out.tokens.append(text)
            out.token_logprobs.append(_value(lp))
            # The sampled token and the k most likely (a text shared by two ids: one key).
            out.top_logprobs.append({_text(t, e): _value(e) for t, e in entry.items()
                                     if top is None or t == token_id or (e.rank or 0) <= top})
            out.text_offset.append(self._offset)
            self._offset += len(text)
        return out


def prompt_logprobs_json(entries: PromptLogprobs | None) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs` of a completions choice (token ids as JSON keys)."""
    if entries is None:
        return None
    return [None if e is None else
            {str(t): PromptLogprob(logprob=_value(lp), rank=lp.rank, decoded_token=lp.decoded_token)
             for t, lp in e.items()} for e in entries]


def _chat_token(token_id: int, lp: Logprob) -> ChatTokenLogprob:
    text = _text(token_id, lp)
    return ChatTokenLogprob(token=text, logprob=_value(lp),
                            bytes=None if lp.decoded_token is None else list(text.encode("utf-8")))


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]], top: int) -> ChatLogprobs:
    """Chat's logprobs.content: each token with the `top` most likely tokens of its step."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = _chat_token(token_id, entry[token_id])
        # NOTE: the entry holds the sampled token (any rank) and the step's top k by rank.
        best = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top]
        content.append(ChatLogprobsContent(**sampled.model_dump(),
                                           top_logprobs=[_chat_token(t, e) for t, e in best]))
    return ChatLogprobs(content=content)
