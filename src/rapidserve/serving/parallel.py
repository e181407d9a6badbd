"""Parallel sampling (`SamplingParams.n` > 1): one request fanned out into n child sequences of
the same prompt, and their outputs folded back into the parent's (vLLM v1's `ParentRequest`).

The engine front (serving/front.py) does both ends, so every topology (hybrid, rapid, disagg)
runs the children as ordinary requests and knows nothing of parents. No torch here.
"""

from __future__ import annotations

import dataclasses

from rapidserve.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from rapidserve.sampling_params import SamplingParams


def child_request_id(parent_id: str, index: int) -> str:
    """The engine-internal id of a parent's child `index`."""
    return f"{parent_id}#{index}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Child `index`'s parameters: one sample each; with a seed, seed + index (as vLLM), so each
    child is reproducible and the children differ; without one, each samples independently.

    NOTE: every child scores the prompt (prompt_logprobs), though the scores are the same: so
    each child's first event carries them whichever child gets there first (a streamed echo)."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


class ParentRequest:
    """A request with n children: which are unfinished, and each one's latest completion.

    NOTE: the children's outputs pass through `fold` in the order the engine produced them:
    each becomes one event of the parent (its request id, the child's `index`, the child's delta,
    `finished` False); when the last child ends, one more output follows: the parent's final,
    `finished` True, with all n completions in index order and no delta. A child that fails ends
    the parent at once: its siblings are aborted (by the front, once it sees the parent finished) and
    the final output carries the child's error.
    """

    def __init__(self, request_id: str, n: int, prompt: str | None, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.child_ids = [child_request_id(request_id, i) for i in range(n)]
        self._index = {cid: i for i, cid in enumerate(self.child_ids)}
        self.unfinished = set(self.child_ids)
        self.latest: list[CompletionOutput | None] = [None] * n
        self.finished = False
        self.prompt_logprobs: PromptLogprobs | None = None  # the first child's to report them

    @property
    def n(self) -> int:
        return len(self.child_ids)

    def fold(self, out: RequestOutput) -> list[RequestOutput]:
        """The parent's outputs for one output of a child: its event, then the parent's final if
        that child was the last (or failed). Nothing once the parent has finished."""
        if self.finished:
            return []
        i = self._index[out.request_id]
        completion = out.outputs[0]
        completion.index = i
        if self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        self.latest[i] = completion
        if completion.finish_reason is not None:
            self.unfinished.discard(out.request_id)
        if out.error is not None:
            self.unfinished.discard(out.request_id)
            return [self.final(error=out.error)]
        event = RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=[completion], finished=False, delta_text=out.delta_text,
            delta_token_ids=out.delta_token_ids, prompt_logprobs=out.prompt_logprobs,
        )
        if self.unfinished:
            return [event]
        return [event, self.final()]

    def final(self, error: str | None = None) -> RequestOutput:
        """The parent's last output: every child's completion (a child that never reported, or was
        cut short by a sibling's failure, as "abort")."""
        self.finished = True
        outputs = []
        for i, c in enumerate(self.latest):
            if c is None:
                c = CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort")
            elif c.finish_reason is None:
                c = dataclasses.replace(c, finish_reason="abort")
            outputs.append(c)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=outputs, finished=True, error=error, prompt_logprobs=self.prompt_logprobs,
        )
