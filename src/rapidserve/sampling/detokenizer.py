"""Incremental detokenization: turn each step's new token ids into the newly readable text.

Decoding a lone token is wrong in two ways: byte-level BPE tokens can carry part of a
multi-byte UTF-8 character (decoding to U+FFFD until the rest arrives), and some
tokenizers (SentencePiece) render a token's leading space differently at the start of a
string. So each step decodes a short window of recent tokens twice:

    ids:  ... | prefix_offset ........ read_offset ........ end |
                \\__ already emitted __/ \\__ not yet emitted __/

    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])

and emits new_text[len(prefix_text):] unless new_text ends in U+FFFD (an incomplete
character: wait for the next token). After emitting, the window slides forward
(prefix_offset <- read_offset, read_offset <- end), so the cost per token is constant.

Because the window only ever starts where earlier text ended on a complete character,
decode(ids[prefix_offset:]) always begins with prefix_text, and the concatenation of all
deltas (plus `flush()`) equals tokenizer.decode(output_ids).
"""

from __future__ import annotations

from typing import Any

# How many prompt tokens seed the window, so the first output token is decoded in context.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams one request's output text, token by token.

    tokenizer: a transformers tokenizer (fast or slow); only `decode` is used.
    prompt_token_ids: the prompt; only its last few tokens are kept, as decoding context.
    skip_special_tokens: drop special tokens (EOS, chat markers) from the text.

    `text` is the concatenation of every delta returned so far. A trailing incomplete
    character is held back until a later token completes it; `flush()` releases it (as
    U+FFFD) when the request finishes.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends inside a multi-byte character would make the first output
        # bytes merge with it; that character belongs to neither side, so decode the output
        # without context instead (its leading bytes then read as U+FFFD, exactly as
        # tokenizer.decode(output_ids) shows them).
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        # Sliding window of token ids; offsets index into it (see module docstring).
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._chunks: list[str] = []
        self._text_cache: str | None = ""

    @property
    def text(self) -> str:
        """All output text emitted so far (the concatenation of the returned deltas)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    def add(self, token_ids: list[int]) -> str:
        """Append newly generated tokens; return the text they made readable (may be "")."""
        # One token at a time: a batch ending in an incomplete character must still release
        # the complete characters before it.
        delta = "".join([self._add_one(t) for t in token_ids])
        if delta:
            self._chunks.append(delta)
            self._text_cache = None
        return delta

    def flush(self) -> str:
        """Release text held back for an incomplete trailing character; call at finish."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(prefix_text) :]
        self._advance()
        if delta:
            self._chunks.append(delta)
            self._text_cache = None
        return delta

    def _add_one(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Shorter-or-equal happens while special tokens are skipped or bytes are pending.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._advance()
        return new_text[len(prefix_text) :]

    def _advance(self) -> None:
        """Slide the window: what was unread is now the context for the next token."""
        # Drop ids before the new prefix so memory stays bounded by the window.
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        # Space clean-up (" ." -> ".") is not prefix-stable, so it is never applied here.
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )
