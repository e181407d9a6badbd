"""`rapidserve demo`: the project's point in about a minute on any machine.

1. The serving modes compared on a GPU without a GPU: `rapidserve simulate` of chunked prefill
   (hybrid-512, hybrid-2048), disaggregated serving and rapid on the shipped H100 profile of
   Llama-3.1-8B, arxiv-like prompts (~8K tokens) at 1-4 req/s, judged by the paper's SLOs.
2. One real request answered by the embedded model (SmolLM2-135M-Instruct) in the rapid mode:
   a prefill worker and a decode worker sharing one model and one KV cache (threads here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROFILE = Path("docs/results/2026-11-23-h100/profile.json")
CONFIGS = "hybrid-512,hybrid-2048,disagg,rapid-rapid"


def default_profile() -> Path | None:
    """The shipped H100 profile: in the working directory (a clone) or beside the sources (an
    editable install)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (base / PROFILE).is_file():
            return base / PROFILE
    return None


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None,
                        help=f"the GPU profile to simulate (default: {PROFILE}, the H100 one in a clone)")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests per simulated run")
    parser.add_argument("--output-dir", default="demo-results",
                        help="where the simulated sweep's CSV, JSON and plots go")
    parser.add_argument("--prompt", default="What is the capital of France?",
                        help="the question the embedded model answers")
    parser.add_argument("--no-request", action="store_true", help="simulate only, answer nothing")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rapidserve.sim import simulate

    profile = Path(args.profile) if args.profile else default_profile()
    if profile is None or not profile.is_file():
        raise ValueError(f"no profile at {args.profile or PROFILE}: run from a clone of the repository, or "
                         "give --profile PATH (from `rapidserve profile` on a GPU)")
    print(f"== 1. Every serving mode on an H100 with Llama-3.1-8B, simulated on this machine ({profile}):\n"
          "   arxiv-like prompts (~8K tokens), 1-4 req/s; a request is good when its p95 time between tokens\n"
          "   is <= 50 ms and its first token comes within 1 s per 1K prompt tokens.\n", flush=True)
    t0 = time.perf_counter()
    parser = argparse.ArgumentParser(prog="rapidserve simulate")
    simulate.add_cli_args(parser)
    sim = parser.parse_args([
        "--profile", str(profile), "--configs", CONFIGS, "--dataset-name", "arxiv-like",
        "--num-prompts", str(args.num_prompts), "--request-rates", "1,2,3,4", "--slo-itl-ms", "50",
        "--output-dir", args.output_dir, "--quiet",
    ])
    rc = sim.func(sim)
    print(f"\n   ({time.perf_counter() - t0:.0f} s; measured on the GPU: docs/benchmarks.md; how close the "
          "simulator comes: docs/simulation.md)\n", flush=True)
    if rc != 0 or args.no_request:
        return rc
    print("== 2. One real request, the embedded model (SmolLM2-135M-Instruct) in the rapid mode: a prefill\n"
          "   worker and a decode worker sharing one model and one KV cache.\n", flush=True)
    from rapidserve.config import EngineConfig
    from rapidserve.engine import create_engine
    from rapidserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    engine = create_engine(EngineConfig(mode="rapid", placement="thread"))
    try:
        started = time.perf_counter() - t0
        print(f"   Q: {args.prompt}\n   A: ", end="", flush=True)
        engine.add_request(engine.chat_prompt([{"role": "user", "content": args.prompt}]),
                           SamplingParams(temperature=0.0, max_tokens=48))
        t1 = time.perf_counter()
        n = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                print(out.delta_text, end="", flush=True)
                n += len(out.delta_token_ids)
        print(f"\n\n   (engine up in {started:.1f} s; {n} tokens in {time.perf_counter() - t1:.2f} s)",
              file=sys.stderr)
    finally:
        engine.shutdown()
    return 0
