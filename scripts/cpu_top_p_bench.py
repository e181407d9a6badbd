"""Top-p sampling on CPU, end to end: 32 prompts (128 tokens of English each) x 64 output tokens
at temperature 1 and top-p 0.95 on the embedded SmolLM2, with the CPU path's candidate filter
(`sampling/sampler.py`, CPU_CANDIDATES) against the full sort, in interleaved rounds. Prints
output tok/s per round (docs/benchmarks.md, "The CPU path").

    python scripts/cpu_top_p_bench.py [ROUNDS=3]
"""

from __future__ import annotations

import pydoc_data.topics
import sys
import time

import rapidserve.sampling.sampler as sampler
from rapidserve import LLM, SamplingParams


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    llm = LLM()
    texts = [v for _, v in sorted(pydoc_data.topics.topics.items())][:32]
    prompts = [{"prompt_token_ids": llm.tokenizer(t)["input_ids"][:128]} for t in texts]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=64, ignore_eos=True, seed=0)
    variants = {"candidates": sampler._apply_top_k_top_p, "sort": sampler._top_k_top_p_sorted}
    llm.generate(prompts[:2], params)  # warm-up
    for _ in range(rounds):
        for name, filter_fn in variants.items():
            sampler._apply_top_k_top_p = filter_fn
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            print(f"{name:10s} {tokens / (time.perf_counter() - start):6.1f} output tok/s", flush=True)


if __name__ == "__main__":
    main()
