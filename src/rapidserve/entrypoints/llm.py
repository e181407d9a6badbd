"""The offline API: `LLM(model=...).generate(prompts, SamplingParams)` and `LLM.chat(messages)`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.serving.front import EngineFront
from rapidserve.entrypoints.args import NOT_BUILT, check_not_built
from rapidserve.outputs import RequestOutput
from rapidserve.sampling_params import SamplingParams

# vLLM's prompt forms: a string, token ids, a TextPrompt {"prompt": str} or a TokensPrompt
# {"prompt_token_ids": [int, ...]}.
Prompt = str | list[int] | Mapping[str, Any]


def _engine_prompt(prompt: Any, index: int) -> str | list[int]:
    """The string or token ids the engine takes, from one of vLLM's prompt forms."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        keys = set(prompt)
        if keys == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
        if keys == {"prompt_token_ids"} and isinstance(prompt["prompt_token_ids"], (list, tuple)):
            return list(prompt["prompt_token_ids"])
        raise ValueError(
            f"prompts[{index}]: a dict prompt must be {{'prompt': str}} or {{'prompt_token_ids': "
            f"[int, ...]}}, got keys {sorted(keys)} (multi-modal data and other keys are not supported)")
    if isinstance(prompt, (list, tuple)):
        return list(prompt)
    raise ValueError(f"prompts[{index}]: expected a string, a list of token ids or a dict, "
                     f"got {type(prompt).__name__}")


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        # vLLM's keyword arguments that change nothing here, and those not built yet (refused).
        kwargs.pop("trust_remote_code", None)  # no model code is ever run: nothing to trust
        check_not_built(kwargs)
        for name in NOT_BUILT:
            kwargs.pop(name, None)
        served = kwargs.get("served_model_name")
        if isinstance(served, (list, tuple)):
            kwargs["served_model_name"] = served[0] if served else None  # offline, only the first names
        self.engine: EngineFront = create_engine(EngineConfig(model=model, **kwargs))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion in one continuous batch; outputs in prompt order, one
        per prompt (with `n` > 1, its `outputs` holds the n completions).

        A prompt takes vLLM's forms: a string, a list of token ids, {"prompt": str} or
        {"prompt_token_ids": [...]}; a single prompt may be passed bare.
        """
        if isinstance(prompts, (str, Mapping)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = [_engine_prompt(p, i) for i, p in enumerate(prompts)]  # type: ignore[union-attr]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} sampling params for {len(prompts)} prompts"
                )
        return self._run(prompts, params)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or several."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.chat_prompt(c, add_generation_prompt) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]
