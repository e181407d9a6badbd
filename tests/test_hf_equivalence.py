"""Greedy tokens equal HF transformers' on the same weights (the correctness oracle)."""

import random

import pytest

from rapidserve import LLM, SamplingParams
from conftest import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "mixtral", "qwen2-moe", "qwen3-moe"])
def test_tiny_random_models_match_hf(kind, tiny_model_dir):
    path, hf = tiny_model_dir(kind)
    rng = random.Random(1)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 5, 17, 40, 70)]
    llm = LLM(model=path, device="cpu", dtype="float32", max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12), f"prompt of {len(prompt)} tokens"


def test_smollm2_gguf_matches_hf(smollm2_hf, smollm2_llm):
    llm = smollm2_llm  # the embedded default model, fp32 (tests/conftest.py)
    tok = llm.tokenizer
    texts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why each one is prime, in one sentence each. "
        "Then say which of them is the largest and why prime numbers matter in cryptography.",
    ]
    chats = [llm.engine.chat_prompt([{"role": "user", "content": t}]) for t in texts]
    prompts = chats + [tok.encode("The quick brown fox")]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(smollm2_hf, prompt, 24)
    assert "Paris" in outs[0].outputs[0].text
