"""Does a scale help the FP8 KV cache on the embedded SmolLM2? Prints the K/V magnitudes over
English text, then perplexity and top-1 agreement (against the fp32 model, fp32 KV) for an FP8 KV
cache with scale 1.0 and with per-head scales of amax / C (C = 448, 200, 100, 50; vLLM's
`--calculate-kv-scales` uses 200 for K and 100 for V), calibrated on other text (Python source)
or on the scored text itself, and one scale per layer. docs/quantization.md has the figures.

    python scripts/fp8_kv_scales.py [NUM_TOKENS=4096]     # ~5 min on one CPU thread

The scoring is tests/test_fp8_accuracy.py's (one sequence prefilled in 512-token chunks)."""

from __future__ import annotations

import inspect
import json.decoder
import json.encoder
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_fp8_accuracy as acc

from rapidserve.model.loader import load_model
from rapidserve.ops.fp8 import FP8_DTYPE

Scales = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_scale, v_scale) [kv_heads]


def kv_amax(model, ids: list[int]) -> tuple[Scales, torch.Tensor, torch.Tensor]:
    """Per layer and KV head, the largest |K| and |V| over `ids` (an fp32 pass), and all |K|, |V|."""
    acc._score(model, ids, torch.float32)  # leaves the fp32 cache bound to the layers
    amax, ks, vs = [], [], []
    for attn in model.attention_layers:
        k = attn.k_cache.reshape(-1, *attn.k_cache.shape[-2:])[: len(ids)].abs()
        v = attn.v_cache.reshape(-1, *attn.v_cache.shape[-2:])[: len(ids)].abs()
        amax.append((k.amax(dim=(0, 2)), v.amax(dim=(0, 2))))
        ks.append(k.flatten())
        vs.append(v.flatten())
    return amax, torch.cat(ks), torch.cat(vs)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    torch.set_num_threads(1)
    loaded = load_model(None, "auto", "float32", acc.CPU)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(acc._english_text())["input_ids"][:n]
    ref = acc._score(model, ids, torch.float32)
    print(f"{n} tokens, fp32 reference perplexity {ref.ppl:.3f}")
    same, k_all, v_all = kv_amax(model, ids)
    for name, a in (("K", k_all), ("V", v_all)):
        print(f"|{name}|: max {a.max():.2f}, median {a.median():.3f}, below 2^-6 (E4M3 subnormal) "
              f"{(a < 2 ** -6).float().mean():.2%}")
    print("per-layer max |K|:", " ".join(f"{k.max():.1f}" for k, _ in same))
    print("per-layer max |V|:", " ".join(f"{v.max():.2f}" for _, v in same))
    source = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    other, _, _ = kv_amax(model, tok(source)["input_ids"][:512])

    def run(label: str, scales: Scales | None) -> None:
        for i, attn in enumerate(model.attention_layers):
            attn.k_scale.copy_(scales[i][0] if scales else torch.ones_like(attn.k_scale))
            attn.v_scale.copy_(scales[i][1] if scales else torch.ones_like(attn.v_scale))
        t = time.perf_counter()
        got = acc._score(model, ids, FP8_DTYPE)
        agree = (got.top1[:-1] == ref.top1[:-1]).float().mean().item()
        print(f"{label:34s} perplexity {got.ppl:.3f} ({got.ppl / ref.ppl - 1:+.2%}), top-1 {agree:.2%}"
              f"  [{time.perf_counter() - t:.0f} s]", flush=True)

    run("scale 1.0", None)
    for c in (448, 200, 100, 50):
        run(f"per head, other text, amax/{c}", [(k / c, v / c) for k, v in other])
        run(f"per head, same text, amax/{c}", [(k / c, v / c) for k, v in same])
    run("per layer, same text, amax/200", [(k.max().expand_as(k) / 200, v.max().expand_as(v) / 200) for k, v in same])


if __name__ == "__main__":
    main()
