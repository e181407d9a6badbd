"""The `rapidserve` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from rapidserve.entrypoints.args import (
    HelpFormatter, add_engine_args, add_log_level_arg, engine_config_from_args, served_names,
)
from rapidserve.config import parse_bytes
from rapidserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rapidserve.async_engine import AsyncEngine
    from rapidserve.entrypoints.openai.server import ServerConfig


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate per prompt")
    g.add_argument("--min-tokens", type=int, default=0, help="tokens to generate before EOS or a stop may end it")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass (1: all)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this times the likeliest (0: none)")
    g.add_argument("--sampling-seed", type=int, default=None,
                   help="per-request seed (default: the engine's generator)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the EOS token")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token already generated (-2 to 2)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted from a token's logit once per time it was generated (-2 to 2)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides (multiplies, if negative) the logit of tokens in the prompt or output (1: off)")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=args.sampling_seed, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
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
                                 served_model_names=served_names(args),
                                 stats_interval_s=args.stats_interval,
                                 max_request_body_bytes=parse_bytes(args.max_request_body_bytes))
    # SIGTERM while the engine starts (before uvicorn's own handlers): exit through the Python
    # stack, so the rapid/disagg workers already spawned are stopped rather than orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    log = logging.getLogger("rapidserve.server")
    t0 = time.monotonic()
    engine = AsyncEngine(create_engine(engine_config_from_args(args)))
    log.info("engine ready in %.1f s (model %s, %s mode)", time.monotonic() - t0, engine.model_name, engine.mode)
    app = build_app(engine, server_config)
    started = time.monotonic()
    try:
        _run_uvicorn(app, server_config, engine, args.log_level)
    finally:
        engine.shutdown()  # and the rapid mode's workers
        log.info("shut down: %d request(s) answered in %.0f s", app.state.server.stats_logger.num_requests,
                 time.monotonic() - started)
        # The interpreter's last garbage collection over a torch-laden heap takes seconds (seen:
        # 3 s on CPU) and frees nothing the OS would not; a supervisor waits for our exit code.
        gc.freeze()
    if engine.error is not None:
        # A supervisor restarts a server that exits non-zero; one that lingered half-dead would
        # only answer 503.
        print(f"error: {engine.dead_reason}", file=sys.stderr)
        return 1
    return 0


_FLUSH_ERRORS_S = 2.0
# After the engine fails, the server keeps answering (503 on /health, the failed requests' error
# bodies) this long, then shuts down and exits 1.
_EXIT_AFTER_FAILURE_S = 1.0


def _exit_on_sigterm(sig: int, _frame: object) -> None:
    raise SystemExit(128 + sig)


def _run_uvicorn(app: FastAPI, config: ServerConfig, engine: AsyncEngine, log_level: str) -> None:
    import uvicorn

    log = logging.getLogger("rapidserve.server")
    model_name = engine.model_name

    class Server(uvicorn.Server):
        dead_since: float | None = None

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

        async def on_tick(self, counter: int) -> bool:  # every 0.1 s
            if engine is not None and not engine.healthy and not self.should_exit:
                now = time.monotonic()
                if self.dead_since is None:
                    self.dead_since = now
                    log.error("%s; exiting in %.0f s", engine.dead_reason,
                              _EXIT_AFTER_FAILURE_S)
                elif now - self.dead_since >= _EXIT_AFTER_FAILURE_S:
                    self.should_exit = True
            return await super().on_tick(counter)

    server = Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level.lower(),
        access_log=False,  # the request log (server_log.py) has a line per request, with tokens
        # (+ time for the error events of requests still open after the grace period to go out)
        timeout_graceful_shutdown=config.graceful_shutdown_s + _FLUSH_ERRORS_S, lifespan="off",
    ))

    def engine_failed(message: str) -> None:
        # The engine thread has failed every pending request; the server stops serving after
        # _EXIT_AFTER_FAILURE_S (on_tick: /health answers 503 meanwhile), so that the process
        # exits non-zero (cmd_serve) and a supervisor restarts it, rather than lingering.
        if server.dead_since is None:
            server.dead_since = time.monotonic()
            log.error("the engine failed: %s; exiting in %.0f s", message.splitlines()[0], _EXIT_AFTER_FAILURE_S)

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
    serve = _subparser(sub, "serve", "the OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, help="the model (as --model; vLLM's form)")
    g = serve.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one; the start line shows it)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    g.add_argument("--max-queue-len", type=int, default=1024,
                   help="requests admitted and not finished; more are answered 503")
    g.add_argument("--graceful-shutdown-timeout", type=float, default=10.0,
                   help="seconds open requests may still run after SIGTERM (then they end with an error)")
    g.add_argument("--stats-interval", type=float, default=5.0,
                   help="seconds between the engine-stats log lines while requests run (0: none)")
    g.add_argument("--max-request-body-bytes", default=None, metavar="SIZE",
                   help="larger request bodies are answered 413 unread, e.g. 4MiB (default: 1 MiB + 64 "
                        "bytes per token of the model's context)")
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)


def _subparser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that shows its defaults and takes --log-level too."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    add_log_level_arg(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapidserve", formatter_class=HelpFormatter,
        description="LLM serving with prefill and decode running concurrently on one GPU (RAPID-Serve), "
                    "with vLLM's flags and an OpenAI-compatible server.",
        epilog="`rapidserve COMMAND --help` lists a command's flags with their defaults; "
               "docs/configuration.md has them all.")
    add_log_level_arg(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = _subparser(sub, "generate", "generate text for one or more prompts, offline")
    gen.add_argument("--prompt", action="append",
                     help="a prompt (repeatable; default: 'What is the capital of France?')")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    _add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    _add_serve_parser(sub)
    _add_bench_parsers(sub)
    _add_profile_parser(sub)
    _add_simulate_parser(sub)
    from rapidserve.entrypoints import demo

    demo.add_cli_args(_subparser(
        sub, "demo", "the project's point in a minute: every serving mode simulated on the shipped H100 "
                     "profile, then one real request answered by the embedded model in the rapid mode"))
    return parser


def _add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    from rapidserve.sim import simulate

    simulate.add_cli_args(_subparser(
        sub, "simulate", "bench sweep (or, with --itl-slos, bench frontier) on a virtual clock: the engine's "
                         "own schedulers and policies, steps priced from a profile (no GPU)"))


def _add_profile_parser(sub: argparse._SubParsersAction) -> None:
    from rapidserve.resources import profiler

    profiler.add_cli_args(_subparser(
        sub, "profile", "measure the SM-partitioning profile (decode and prefill latency per SM split)"))


def _add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    # Imported here: the bench modules pull in torch, which `generate` loads later anyway.
    from rapidserve.bench import frontier, interference, latency, serve, sweep, throughput

    bench = _subparser(sub, "bench", "benchmarks (offline throughput, step latency, online serving)")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    throughput.add_cli_args(_subparser(
        kinds, "throughput", "an offline workload run to completion; --peer transformers compares"))
    latency.add_cli_args(_subparser(
        kinds, "latency", "decode step time per batch size and context, and one long prefill"))
    serve.add_cli_args(_subparser(
        kinds, "serve", "an async load generator against an OpenAI-compatible server (vLLM's metrics)"))
    interference.add_cli_args(_subparser(
        kinds, "interference", "decode inter-token latency while long prefills stream in (any mode)"))
    sweep.add_cli_args(_subparser(
        kinds, "sweep", "start a server per configuration and compare them across offered rates (CSV, JSON, plots)"))
    frontier.add_cli_args(_subparser(
        kinds, "frontier", "each configuration's highest good rate across ITL SLOs, against the best hybrid "
                           "chunk at each (sweeps, rescored per SLO)"))
    sweep.add_rescore_cli_args(_subparser(
        kinds, "rescore", "score a finished sweep again under other SLOs, from its per-request records"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_level is None:
        # The server's log is its request log and load (as vLLM's); other commands print results.
        args.log_level = "INFO" if args.command == "serve" else "WARNING"
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
