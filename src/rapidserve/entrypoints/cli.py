"""The `rapidserve` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from rapidserve.config import parse_bytes
from rapidserve.entrypoints.args import add_engine_args, engine_config_from_args
from rapidserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rapidserve.async_engine import AsyncEngine
    from rapidserve.entrypoints.openai.server import ServerConfig


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=args.sampling_seed, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from rapidserve.engine import create_engine

    params = _sampling_params(args)
    engine = create_engine(engine_config_from_args(args))
    try:
        _generate(engine, args, params)
    finally:
        engine.shutdown()  # the rapid and disagg modes' workers, on errors too
    return 0


def _generate(engine: Any, args: argparse.Namespace, params: SamplingParams) -> None:
    from rapidserve.runner.setup import resolve_device

    prompts = args.prompt or ["What is the capital of France?"]
    t0 = time.perf_counter()
    ids = []
    for text in prompts:
        prompt = engine.chat_prompt([{"role": "user", "content": text}]) if args.chat else text
        ids.append(engine.add_request(prompt, params))
    done = {}
    stream = len(prompts) == 1 and not args.json
    while engine.has_unfinished_requests():
        for out in engine.step():
            if stream:
                print(out.delta_text, end="", flush=True)
            if out.finished:
                done[out.request_id] = out
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in done.values())
    if stream:
        print()
    for text, rid in zip(prompts, ids):
        o = done[rid].outputs[0]
        if args.json:
            print(json.dumps({"prompt": text, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}))
        elif not stream:
            print(f"--- {text!r}\n{o.text}\n[{o.finish_reason}]")
    print(f"[{len(prompts)} request(s), {n_out} tokens in {elapsed:.2f} s, "
          f"{n_out / elapsed:.1f} tok/s on {resolve_device(args.device)}, {engine.config.mode} mode]", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from rapidserve.async_engine import AsyncEngine
    from rapidserve.engine import create_engine
    from rapidserve.entrypoints.openai.server import ServerConfig, build_app

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    server_config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                                 max_queue_len=args.max_queue_len,
                                 graceful_shutdown_s=args.graceful_shutdown_timeout,
                                 max_request_body_bytes=parse_bytes(args.max_request_body_bytes))
    # SIGTERM while the engine starts (before uvicorn's own handlers): exit through the Python
    # stack, so the rapid/disagg workers already spawned are stopped rather than orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    engine = AsyncEngine(create_engine(engine_config_from_args(args)))
    try:
        _run_uvicorn(build_app(engine, server_config), server_config, engine, args.log_level)
    finally:
        engine.shutdown()  # and the rapid mode's workers
    if engine.error is not None:
        print(f"error: the engine failed: {engine.error!r}", file=sys.stderr)
        return 1
    return 0


_FLUSH_ERRORS_S = 2.0


def _exit_on_sigterm(sig: int, _frame: object) -> None:
    raise SystemExit(128 + sig)


def _run_uvicorn(app: FastAPI, config: ServerConfig, engine: AsyncEngine, log_level: str) -> None:
    import uvicorn

    log = logging.getLogger("rapidserve.server")
    model_name = engine.model_name

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list | None = None) -> None:
            # Open requests may run for the grace period; those still open then end with an
            # error event (and their engine requests are aborted), not a cut connection.
            cut = asyncio.get_running_loop().call_later(
                config.graceful_shutdown_s, app.state.server.end_streams, "the server is shutting down")
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()

        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1]  # the real one, for --port 0
                print(f"rapidserve: serving {model_name} at http://{config.host}:{port}/v1", flush=True)

    server = Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level.lower(),
        access_log=logging.getLogger().isEnabledFor(logging.INFO),
        # (+ time for the error events of requests still open after the grace period to go out)
        timeout_graceful_shutdown=config.graceful_shutdown_s + _FLUSH_ERRORS_S, lifespan="off",
    ))

    def engine_failed(message: str) -> None:
        # The engine thread has failed every pending request; stop serving so that the
        # process exits non-zero (cmd_serve) and a supervisor restarts it, rather than
        # lingering with /health at 503. (uvicorn reads the flag from its own loop.)
        log.error("the engine failed, exiting: %s", message.splitlines()[0])
        server.should_exit = True

    engine.on_fatal(engine_failed)

    def stopped(sig: int, _frame: object) -> None:
        log.info("stopped by %s", signal.Signals(sig).name)

    # NOTE: uvicorn catches SIGINT/SIGTERM, shuts down gracefully (open requests get
    # --graceful-shutdown-timeout seconds), then raises the signal again against the handlers it
    # found. These make that a clean return, so the engine thread is stopped and we exit 0.
    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    server.run()


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, help="the model (as --model; vLLM's form)")
    g = serve.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    g.add_argument("--max-queue-len", type=int, default=1024,
                   help="requests admitted and not finished; more are answered 503")
    g.add_argument("--graceful-shutdown-timeout", type=float, default=10.0,
                   help="seconds open requests may still run after SIGTERM (then they end with an error)")
    g.add_argument("--max-request-body-bytes", default=None, metavar="SIZE",
                   help="larger request bodies are answered 413 unread, e.g. 4MiB (default: 1 MiB + 64 "
                        "bytes per token of the model's context)")
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapidserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts, offline")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    _add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    _add_serve_parser(sub)
    _add_bench_parsers(sub)
    _add_profile_parser(sub)
    return parser


def _add_profile_parser(sub: argparse._SubParsersAction) -> None:
    from rapidserve.resources import profiler

    profiler.add_cli_args(sub.add_parser(
        "profile", help="measure the SM-partitioning profile (decode and prefill latency per SM split)"))


def _add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    # Imported here: the bench modules pull in torch, which `generate` loads later anyway.
    from rapidserve.bench import interference, latency, serve, sweep, throughput

    bench = sub.add_parser("bench", help="benchmarks (offline throughput, step latency, online serving)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    throughput.add_cli_args(kinds.add_parser(
        "throughput", help="an offline workload run to completion; --peer transformers compares"))
    latency.add_cli_args(kinds.add_parser(
        "latency", help="decode step time per batch size and context, and one long prefill"))
    serve.add_cli_args(kinds.add_parser(
        "serve", help="an async load generator against an OpenAI-compatible server (vLLM's metrics)"))
    interference.add_cli_args(kinds.add_parser(
        "interference", help="decode inter-token latency while long prefills stream in (any mode)"))
    sweep.add_cli_args(kinds.add_parser(
        "sweep", help="start a server per configuration and compare them across offered rates (CSV, JSON, plots)"))
    sweep.add_rescore_cli_args(kinds.add_parser(
        "rescore", help="score a finished sweep again under other SLOs, from its per-request records"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
