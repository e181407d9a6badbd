"""Kernel-time breakdown of decode and prefill steps on the GPU (torch.profiler).

PYTHONPATH=src python3 scripts/gpu_profile.py [--model preset:llama-3.1-8b] > profile.txt
"""
import argparse
import random

import torch
from torch.profiler import ProfilerActivity, profile

from rapidserve import LLM, SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="preset:llama-3.1-8b")
ap.add_argument("--batches", default="1,256")
ap.add_argument("--context", type=int, default=1024)
args = ap.parse_args()
llm = LLM(model=args.model, load_format="dummy", max_model_len=4096)
eng = llm.engine
rng = random.Random(0)


def table(prof, title):
    print(f"\n===== {title}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


for b in [int(x) for x in args.batches.split(",")]:
    # Long outputs, so that no request ends before the whole batch decodes together.
    p = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    ids = [eng.add_request([rng.randrange(1000) for _ in range(args.context)], p) for _ in range(b)]
    while eng.scheduler.waiting or not all(r.is_decoding for r in eng.scheduler.running):
        eng.step()
    assert len(eng.scheduler.running) == b
    eng.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
    table(prof, f"5 decode steps at batch {b}, context ~{args.context}")
    for rid in ids:
        eng.abort_request(rid)

eng.add_request([rng.randrange(1000) for _ in range(2048)], SamplingParams(temperature=0.0, max_tokens=1))
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    eng.step()
    torch.cuda.synchronize()
table(prof, "prefill step of 2048 tokens")
