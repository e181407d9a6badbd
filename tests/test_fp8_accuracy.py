"""FP8 on a real model: the embedded SmolLM2-135M-Instruct (fp32 on CPU is the reference) over
English text that ships with Python itself (the pydoc topics: the language reference's prose).

One prefill per 512-token chunk of a single sequence, so every chunk after the first reads the
earlier ones' K/V back from the (FP8) paged cache; each position's next-token distribution is
scored: perplexity of the text and top-1 agreement with the fp32 model.

Measured (docs/quantization.md). 1024 tokens: fp8 KV ppl +0.75-0.82 %, top-1 95.1-95.6 %; fp8
weights (W8A8) +2.8-3.2 %, 90.1-91.6 %; both +1.6-4.0 %, 90.2-91.8 %. 4096 tokens: fp8 KV
+1.9-2.1 %, 93.4-93.7 %; fp8 weights +3.2-3.5 %, 90.6-90.7 %; both +5.2-5.8 %, 88.6-89.0 %. The
ranges are two runs whose attention differs only in summation order (the reference loop and the
CPU fast path): the FP8 model's per-token activation rounding turns such 1e-7 differences into
different E4M3 roundings downstream, so over 1024 tokens its perplexity moves by up to 2.4 points
on rounding alone. The bounds below leave that margin: a real regression (a wrong scale, a
mixed-up head, a stale cache) moves the figures by far more. The issue asks >= 95 % and <= 2 %:
FP8 KV meets it at 1K tokens of context and not at 4K; FP8 weights on this 135M model do not.
"""

from __future__ import annotations

import math

import pytest
import torch

from rapidserve.attention.backend import TorchAttention
from rapidserve.attention.metadata import AttentionMetadata, forward_context
from rapidserve.kv.cache import KVCache, KVCacheSpec
from rapidserve.model.loader import load_model
from rapidserve.ops.fp8 import FP8_DTYPE
from conftest import hf_greedy

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
NUM_TOKENS = 1024
CHUNK = 512
README_CHAT = [{"role": "user", "content": "Name three rivers."}]
CHAT_TOKENS = 16  # SamplingParams' default max_tokens


def _english_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


class Scored:
    def __init__(self, nll: torch.Tensor, top1: torch.Tensor, top_logp: torch.Tensor) -> None:
        self.nll, self.top1 = nll, top1  # [N - 1] and [N]: the argmax after every position
        self.top_logp = top_logp  # [N]: the argmax's log-probability

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.mean().item())


def _score(model, ids: list[int], kv_dtype: torch.dtype, chunk: int = CHUNK) -> Scored:
    """Next-token NLL and argmax at every position of one sequence, prefilled chunk by chunk."""
    n, bs = len(ids), 16
    cache = KVCache(KVCacheSpec.for_model(model.config, bs, kv_dtype), math.ceil(n / bs), CPU)
    for i, attn in enumerate(model.attention_layers):
        attn.bind(*cache.layer(i), TorchAttention())
    table = torch.arange(cache.num_blocks, dtype=torch.int32)[None]
    tokens = torch.tensor(ids)
    nll, top1, top_logp = [], [], []
    with torch.inference_mode():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            meta = AttentionMetadata(
                slot_mapping=torch.arange(s, e), query_start_loc=torch.tensor([0, e - s], dtype=torch.int32),
                seq_lens=torch.tensor([e], dtype=torch.int32), block_tables=table,
                query_start_loc_host=[0, e - s], seq_lens_host=[e], max_query_len=e - s, max_seq_len=e)
            with forward_context(meta):
                logp = model.compute_logits(model(tokens[s:e], torch.arange(s, e))).log_softmax(-1)
            target = tokens[s + 1:e + 1]
            nll.append(-logp[: len(target)].gather(1, target[:, None]).squeeze(1))
            best = logp.max(-1)
            top1.append(best.indices)
            top_logp.append(best.values)
    return Scored(torch.cat(nll), torch.cat(top1), torch.cat(top_logp))


@pytest.fixture(scope="module")
def smollm2():
    ref = load_model(None, "auto", "float32", CPU)
    fp8 = load_model(None, "auto", "float32", CPU, quantization="fp8")
    return ref.model, fp8.model, ref.tokenizer


@pytest.fixture(scope="module")
def english(smollm2):
    """The text's first NUM_TOKENS ids and the fp32 model's scores over them."""
    ref_model, _, tok = smollm2
    ids = tok(_english_text())["input_ids"][:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    return ids, _score(ref_model, ids, torch.float32)


@pytest.mark.parametrize("weights,kv,min_top1,max_ppl_ratio", [
    ("fp32", "fp8", 0.94, 1.02),
    ("fp8", "fp32", 0.88, 1.05),
    ("fp8", "fp8", 0.87, 1.06),
])
def test_fp8_perplexity_and_top1_agreement(smollm2, english, weights, kv, min_top1, max_ppl_ratio):
    ref_model, fp8_model, _ = smollm2
    ids, ref = english
    model = fp8_model if weights == "fp8" else ref_model
    got = _score(model, ids, FP8_DTYPE if kv == "fp8" else torch.float32)
    agree = (got.top1[:-1] == ref.top1[:-1]).float().mean().item()
    ratio = got.ppl / ref.ppl
    print(f"weights {weights} kv {kv}: ppl {got.ppl:.3f} vs {ref.ppl:.3f} ({ratio - 1:+.2%}), top-1 {agree:.2%}")
    assert 8 < ref.ppl < 20  # the reference itself reads English
    assert agree >= min_top1 and ratio <= max_ppl_ratio


def test_readme_chat_greedy_text_with_fp8(smollm2, smollm2_hf):
    """Greedy decoding is unchanged iff at every step the FP8 model's argmax over the prompt and
    the reference's continuation so far is the reference's next token: one prefill checks all.
    Where it is not, how far below the FP8 model's argmax the reference's token lies (in nats)
    tells a near-tie, decided by rounding, from a different answer.

    Measured: FP8 KV keeps all 16 tokens with MKL's fp32 GEMM, 12 with oneDNN's (the CPU path's,
    ops/linear.py): its 13th pick is a tie within 0.041 nats. FP8 weights keep 5-10 (gaps up to
    0.29 nats), both 10 (0.51)."""
    ref_model, fp8_model, tok = smollm2
    # as the engine renders a chat (LLMEngine.chat_prompt)
    text = tok.apply_chat_template(README_CHAT, tokenize=False, add_generation_prompt=True)
    chat = list(tok.encode(text, add_special_tokens=False))
    # The reference's greedy continuation: transformers' on the same weights (the oracle, with
    # its own KV cache; the fp32 model here gives the same tokens: tests/test_hf_equivalence.py).
    want = hf_greedy(smollm2_hf, chat, CHAT_TOKENS)
    assert _score(ref_model, chat + want, torch.float32, chunk=1 << 30).top1[len(chat) - 1:-1].tolist() == want
    kept, gap = {}, {}
    for name, model, kv in [("fp8 kv", ref_model, FP8_DTYPE), ("fp8 weights", fp8_model, torch.float32),
                            ("both", fp8_model, FP8_DTYPE)]:
        got = _score(model, chat + want, kv, chunk=1 << 30)
        picks = got.top1[len(chat) - 1:-1].tolist()
        kept[name] = next((i for i, (a, b) in enumerate(zip(picks, want)) if a != b), len(want))
        # log p(argmax) - log p(reference's token), at each of the continuation's positions
        at = slice(len(chat) - 1, len(chat) - 1 + len(want))
        gap[name] = (got.top_logp[at] + got.nll[at]).max().item()
    print(f"greedy tokens of {tok.decode(want)!r} kept: {kept}; largest gap (nats): {gap}")
    assert kept["fp8 kv"] == CHAT_TOKENS or gap["fp8 kv"] < 0.1  # unchanged up to near-ties
    assert kept["fp8 weights"] >= 4 and kept["both"] >= 4
    assert gap["fp8 weights"] < 1.0 and gap["both"] < 1.0  # never far from the reference's answer
