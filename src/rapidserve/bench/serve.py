"""`rapidserve bench serve`: an async load generator against any OpenAI-compatible server.

Requests go out on a gamma/Poisson schedule (or all at once), optionally capped by a concurrency
limit, as streaming POSTs to /v1/completions with the prompt as token ids (as text for the
datasets read from files). Each SSE chunk that
carries a choice is timestamped (its text empty or not, as vLLM counts them); the timings become the metrics of
`rapidserve.bench.metrics` (vLLM's definitions, plus the paper's goodput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from rapidserve.bench.metrics import RequestRecord, summarize
from rapidserve.bench.workloads import (
    SYNTHETIC_WORKLOADS,
    SampleRequest,
    Tokenize,
    arrival_times,
    jsonl_requests,
    local_tokenizer,
    random_requests,
    sharegpt_requests,
    synthetic_requests,
)

DATASETS = ("random", *SYNTHETIC_WORKLOADS, "sharegpt", "jsonl")


@dataclass(frozen=True)
class ServeTarget:
    base_url: str
    endpoint: str
    model: str
    ignore_eos: bool


def fetch_model(base_url: str, model: str | None = None, timeout_s: float = 30.0) -> tuple[str, int | None]:
    """(the model's name: `model` or else the first listed, its max_model_len if the server says)."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=timeout_s, trust_env=False)
        r.raise_for_status()
        data = r.json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        if model is not None:  # a server without /v1/models is fine when the name is given
            return model, None
        raise ValueError(f"cannot list models at {base_url}/v1/models: {e}") from e
    if not data and model is None:
        raise ValueError(f"{base_url}/v1/models lists no model: pass --model")
    entry = next((d for d in data if d.get("id") == model), None) if model is not None else data[0]
    max_len = entry.get("max_model_len") if entry else None
    return (model or str(data[0]["id"])), (int(max_len) if max_len else None)


def server_tokenizer(base_url: str, model: str, timeout_s: float = 60.0) -> Tokenize:
    """A Tokenize through the server's POST /tokenize (vLLM's and this server's route)."""
    client = httpx.Client(timeout=timeout_s, trust_env=False)
    url = base_url.rstrip("/") + "/tokenize"

    def tokenize(text: str, special: bool) -> list[int]:
        try:
            r = client.post(url, json={"model": model, "prompt": text, "add_special_tokens": special})
            r.raise_for_status()
            return list(r.json()["tokens"])
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise ValueError(f"cannot tokenize through {url} ({e}): pass --tokenizer") from e

    return tokenize


def build_requests(args: argparse.Namespace, tokenizer: Callable[[], Tokenize],
                   max_model_len: int | None) -> list[SampleRequest]:
    """The workload `args` describe (see add_workload_args); `tokenizer` is called only for the
    datasets read from files."""
    name = args.dataset_name
    if name == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.random_vocab_size, args.seed)
    if name in SYNTHETIC_WORKLOADS:
        return synthetic_requests(SYNTHETIC_WORKLOADS[name], args.num_prompts, args.random_vocab_size,
                                  args.seed, max_model_len)
    if not args.dataset_path:
        raise ValueError(f"--dataset-name {name} needs --dataset-path")
    if name == "sharegpt":
        return sharegpt_requests(args.dataset_path, args.num_prompts, tokenizer(), args.seed,
                                 args.sharegpt_output_len, max_model_len)
    if name == "jsonl":
        return jsonl_requests(args.dataset_path, args.num_prompts, tokenizer(), args.seed,
                              args.custom_output_len, max_model_len)
    raise ValueError(f"unknown --dataset-name {name!r}; available: {', '.join(DATASETS)}")


async def send_request(client: httpx.AsyncClient, target: ServeTarget, req: SampleRequest) -> RequestRecord:
    """One streaming completion, timed chunk by chunk; failures become unsuccessful records."""
    payload = {
        "model": target.model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": target.ignore_eos,
    }
    url = target.base_url.rstrip("/") + target.endpoint
    ttft = 0.0
    itls: list[float] = []
    chunks = 0
    usage_tokens: int | None = None
    prompt_len = req.prompt_len
    st = time.perf_counter()
    last = st  # the last chunk that carried a choice: E2EL ends there, as vLLM's latency does
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                return RequestRecord(prompt_len=prompt_len, error=f"HTTP {resp.status_code}: {body[:500]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    return RequestRecord(prompt_len=prompt_len, error=str(obj["error"])[:500])
                # Every chunk that carries a choice is a token's chunk, its text empty or not, as
                # `vllm bench serve` counts them: text can be empty for a special token, or while
                # the detokenizer holds back an incomplete character, and the token still came.
                if obj.get("choices"):
                    if chunks == 0:
                        ttft = now - st
                    else:
                        itls.append(now - last)
                    last = now
                    chunks += 1
                usage = obj.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    prompt_len = int(usage.get("prompt_tokens") or prompt_len)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestRecord(prompt_len=prompt_len, error=f"{type(e).__name__}: {e}")
    if chunks == 0:
        return RequestRecord(prompt_len=prompt_len, error="no chunk with a choice received")
    # usage counts tokens exactly; a chunk may hold several tokens (or none while text is held
    # back), so counting chunks is only the fallback for servers that do not report usage.
    output_len = int(usage_tokens) if usage_tokens is not None else chunks
    return RequestRecord(prompt_len=prompt_len, output_len=output_len, ttft=ttft, itls=tuple(itls),
                         e2el=last - st, success=True)


async def run_benchmark(target: ServeTarget, requests: Sequence[SampleRequest], arrivals: Sequence[float],
                        max_concurrency: int | None, timeout_s: float,
                        on_done: Callable[[RequestRecord], None] | None = None,
                        ) -> tuple[list[RequestRecord], float]:
    """Send every request on its schedule; (records in request order, duration in s). `on_done`
    sees each record as its request ends (a progress bar)."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # httpx's default pool (100 connections) would silently cap concurrency: lift it.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    timeout = httpx.Timeout(timeout_s)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        start = time.perf_counter()

        async def one(req: SampleRequest, at: float) -> RequestRecord:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                rec = await send_request(client, target, req)
            else:
                async with sem:
                    rec = await send_request(client, target, req)
            if on_done is not None:
                on_done(rec)
            return rec

        tasks = [asyncio.create_task(one(r, a)) for r, a in zip(requests, arrivals)]
        # A bound on the whole run: what has not finished by then counts as failed.
        done, pending = await asyncio.wait(tasks, timeout=timeout_s + (arrivals[-1] if arrivals else 0.0))
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    records = []
    for req, t in zip(requests, tasks):
        if t in done and t.exception() is None:
            records.append(t.result())
        else:
            why = "timed out" if t not in done else f"{type(t.exception()).__name__}: {t.exception()}"
            records.append(RequestRecord(prompt_len=req.prompt_len, error=why))
    return records, duration


def format_summary(s: dict[str, Any]) -> str:
    """vLLM's result table."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total Token throughput (tok/s):", s["total_token_throughput"])
    if "goodput_p95_itl" in s:
        row("Goodput, p95 ITL (req/s):", s["goodput_p95_itl"])
        row("Goodput, max ITL (req/s):", s["goodput_max_itl"])
        row("Goodput, ITL only (req/s):", s["goodput_itl_only"])
        row("SLO attainment, p95 ITL (%):", 100.0 * s["attainment_p95_itl"])
        row("SLO attainment, max ITL (%):", 100.0 * s["attainment_max_itl"])
    for key, name, header in (("ttft", "TTFT", "Time to First Token"),
                              ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                              ("itl", "ITL", "Inter-token Latency"),
                              ("e2el", "E2EL", "End-to-end Latency")):
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {name} (ms):", s[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", s[f"median_{key}_ms"])
        for p in (90, 95, 99):
            row(f"P{p} {name} (ms):", s[f"p{p}_{key}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def _rate(text: str) -> float:
    return float("inf") if text.lower() in ("inf", "infinity") else float(text)


def add_workload_args(parser: argparse._ActionsContainer, slo_itl_ms: float | None = None,
                      slo_ttft_ms_per_1k: float | None = None, timeout_s: float = 3600.0) -> None:
    """The workload and measurement flags `bench serve` and `bench sweep` share."""
    parser.add_argument("--dataset-name", choices=DATASETS, default="random",
                        help="random: uniform lengths; lmsys-like / arxiv-like / loogle-like: the "
                             "paper's datasets' length distributions; sharegpt, jsonl: from --dataset-path")
    parser.add_argument("--dataset-path", default=None, help="the sharegpt JSON or jsonl file")
    parser.add_argument("--num-prompts", type=int, default=1000, help="requests to send")
    parser.add_argument("--random-input-len", type=int, default=1024,
                        help="random dataset: prompt tokens per request")
    parser.add_argument("--random-output-len", type=int, default=128,
                        help="random dataset: output tokens per request")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--random-vocab-size", type=int, default=32000,
                        help="prompt token ids (random and the synthetic datasets) are drawn "
                             "uniformly from [0, this)")
    parser.add_argument("--sharegpt-output-len", type=int, default=None,
                        help="sharegpt: this output length for every request instead of the answer's")
    parser.add_argument("--custom-output-len", type=int, default=256,
                        help="jsonl: the output length of lines without output_len / max_tokens")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps; 1 = Poisson")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload (prompts, lengths, arrivals)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="every request generates its full output length")
    parser.add_argument("--slo-itl-ms", type=float, default=slo_itl_ms, help="goodput: ITL ceiling (ms)")
    parser.add_argument("--slo-ttft-ms-per-1k", type=float, default=slo_ttft_ms_per_1k,
                        help="goodput: TTFT ceiling (ms) per started 1000 prompt tokens")
    parser.add_argument("--timeout", type=float, default=timeout_s,
                        help="seconds one request, and the run past its last arrival, may take")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    parser.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    parser.add_argument("--endpoint", default="/v1/completions", help="the route the requests go to")
    add_workload_args(parser)
    parser.add_argument("--tokenizer", default=None,
                        help="sharegpt / jsonl: a tokenizer.json (or a directory with one) to count "
                             "tokens with (default: the server's /tokenize)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="cap on prompt + output: synthetic lengths are clipped to it, longer "
                             "sharegpt / jsonl requests skipped (default: the server's max_model_len)")
    parser.add_argument("--request-rate", type=_rate, default=float("inf"),
                        help="requests/s (inf: all at once)")
    parser.add_argument("--save-result", action="store_true", help="write the summary and every request as JSON")
    parser.add_argument("--result-filename", default=None,
                        help="the file --save-result writes (default: rapidserve-serve-RATEqps-MODEL-TIME.json)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    model, server_max_len = fetch_model(args.base_url, args.model)
    max_model_len = args.max_model_len if args.max_model_len is not None else server_max_len

    def tokenizer() -> Tokenize:
        return local_tokenizer(args.tokenizer) if args.tokenizer else server_tokenizer(args.base_url, model)

    requests = build_requests(args, tokenizer, max_model_len)
    arrivals = arrival_times(len(requests), args.request_rate, args.burstiness, args.seed)
    target = ServeTarget(args.base_url, args.endpoint, model, args.ignore_eos)
    print(f"model {model}, {len(requests)} {args.dataset_name} requests, rate {args.request_rate}, burstiness "
          f"{args.burstiness}, max concurrency {args.max_concurrency}")
    records, duration = asyncio.run(run_benchmark(target, requests, arrivals, args.max_concurrency, args.timeout))
    summary = summarize(records, duration, args.slo_itl_ms, args.slo_ttft_ms_per_1k)
    print(format_summary(summary))
    errors = [r.error for r in records if not r.success]
    if errors:
        print(f"first error: {errors[0]}")
    if args.save_result:
        name = args.result_filename or "rapidserve-serve-{}qps-{}-{}.json".format(
            args.request_rate, model.rstrip("/").split("/")[-1], time.strftime("%Y%m%d-%H%M%S"))
        config = {k: v for k, v in vars(args).items() if k != "func"}
        config.update(model=model, request_rate=str(args.request_rate))
        result = {"config": config, **summary, "requests": [r.to_dict() for r in records]}
        with open(name, "w") as f:
            json.dump(result, f, indent=2)
        print(f"result written to {name}")
    return 0 if summary["completed"] > 0 else 1
