"""`rapidserve simulate`: `bench sweep` on a virtual clock. The same workload, configuration, rate
and SLO flags; the same sweep.json, sweep.csv, per-request records and plots (so `bench rescore`
and the plots work on them); no GPU: every step is priced by the step-cost model of `--profile`.

Each configuration is turned into the engine config its server would get (`bench sweep`'s own
server command, parsed by the engine's own flags), and run through rapidserve.sim.topology.
`--replay SWEEP_DIR` simulates an archived sweep (its workload, seeds, rates and each
configuration's recorded server command) and puts simulated beside measured (fidelity.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rapidserve.bench.gpu_monitor import NO_GPU
from rapidserve.bench.metrics import RequestRecord, summarize
from rapidserve.bench.serve import add_workload_args, build_requests
from rapidserve.bench.sweep import (
    _FORWARDED,
    ATTAINMENT_TARGET,
    DEFAULT_CONFIGS,
    PartitionTimes,
    SweepConfig,
    _json_safe,
    _report,
    auto_rates,
    drain_pct,
    failed_row,
    make_row,
    parse_configs,
    parse_rates,
    partition_shares,
    records_path,
    server_command,
    summarize_configs,
)
from rapidserve.bench.workloads import SampleRequest, arrival_times
from rapidserve.config import EngineConfig
from rapidserve.entrypoints.args import add_engine_args, engine_config_from_args
from rapidserve.model.presets import list_presets
from rapidserve.resources.profile import DtypeLabel, Profile, load_profile
from rapidserve.sim import costs
from rapidserve.sim.topology import (
    ModelShape,
    RunResult,
    gpu_memory_from_name,
    kv_blocks,
    run_disagg,
    run_hybrid,
    run_rapid,
)


def engine_config(argv: Sequence[str]) -> EngineConfig:
    """The EngineConfig a `rapidserve serve` command line gives (its engine flags only)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(parser)
    args, _ = parser.parse_known_args(list(argv))
    return engine_config_from_args(args)


def _serve_args(cmd: Sequence[str]) -> list[str]:
    """The flags after `serve` in a server command."""
    cmd = list(cmd)
    return cmd[cmd.index("serve") + 1:] if "serve" in cmd else cmd


class Simulator:
    """One GPU (from a profile) and one model: simulated runs of engine configurations."""

    def __init__(self, profile: Profile, cost: Any, gpu_memory_bytes: int) -> None:
        self.profile, self.cost, self.gpu_memory_bytes = profile, cost, gpu_memory_bytes

    def run(self, config: EngineConfig, requests: Sequence[SampleRequest], arrivals: Sequence[float]) -> RunResult:
        if config.disagg_devices is not None:
            raise ValueError("simulate models one GPU: --disagg-devices is not simulated")
        shape = ModelShape.of(config)
        if config.mode == "disagg":
            return run_disagg(config, shape, self.gpu_memory_bytes, self.cost, self.profile, requests, arrivals)
        blocks = kv_blocks(config, shape, self.gpu_memory_bytes)
        if config.mode == "rapid":
            return run_rapid(config, shape, blocks, self.cost, self.profile, requests, arrivals)
        return run_hybrid(config, shape, blocks, self.cost, requests, arrivals)


def _sm_partitions(result: RunResult) -> str | None:
    p = result.partition
    if p is None:
        return None
    return partition_shares(None, PartitionTimes(p.seconds, float(p.switches))) or None


def simulate_run(sim: Simulator, name: str, config: EngineConfig, requests: Sequence[SampleRequest], rate: float,
                 args: argparse.Namespace, out_dir: Path | None) -> tuple[dict[str, Any], RunResult]:
    """One configuration at one rate: (the sweep's row, the run)."""
    arrivals = arrival_times(len(requests), rate, args.burstiness, args.seed)
    run = sim.run(config, requests, arrivals)
    summary = summarize(run.records, run.duration, args.slo_itl_ms, args.slo_ttft_ms_per_1k)
    summary["drain_pct"] = drain_pct(run.duration, arrivals)
    row = make_row(name, rate, summary, NO_GPU)
    row["error"] = next((r.error for r in run.records if not r.success), None)
    row["sm_partitions"] = _sm_partitions(run)
    if out_dir is not None and math.isfinite(rate):
        path = records_path(out_dir, name, rate)
        path.parent.mkdir(parents=True, exist_ok=True)
        # json.dumps, not dump: the C encoder (a 1000-request run has ~200K gaps)
        path.write_text(json.dumps({"request_rate": _json_safe(rate), "duration": run.duration, "simulated": True,
                                    "requests": [_record_dict(r) for r in run.records]}), encoding="utf-8")
    return row, run


def _record_dict(r: RequestRecord) -> dict[str, Any]:
    """RequestRecord.to_dict rounded as `bench sweep` writes it, without dataclasses.asdict's
    deep copy."""
    return {"prompt_len": r.prompt_len, "output_len": r.output_len, "ttft": round(r.ttft, 6),
            "itls": [round(x, 6) for x in r.itls], "e2el": round(r.e2el, 6), "success": r.success,
            "error": r.error}


def _model_default(args: argparse.Namespace, profile: Profile) -> None:
    """The profile's model when none is given (`preset:NAME` if the presets have it), and its
    weight and KV formats: a profile of FP8 weights / KV (metadata.dtype "...+fp8-weights",
    "...+fp8-kv") adds --quantization fp8 / --kv-cache-dtype fp8 to every server's flags unless
    --server-args names them. NOTE: the simulated KV pool is sized from them (an FP8 70B holds
    70 GB of weights, not 141, and one byte per KV entry)."""
    if args.model is None:
        name = profile.metadata.model
        if name not in list_presets():
            raise ValueError(f"the profile was measured with {name!r}, which is no preset: give --model")
        args.model = f"preset:{name}"
        if args.load_format is None:
            args.load_format = "dummy"
    label = DtypeLabel.parse(profile.metadata.dtype)
    extra = shlex.split(args.server_args or "")
    named = {x.split("=", 1)[0] for x in extra}
    if label.fp8_weights and not named & {"--quantization", "-q"}:
        extra += ["--quantization", "fp8"]
    if label.fp8_kv and "--kv-cache-dtype" not in named:
        extra += ["--kv-cache-dtype", "fp8"]
    args.server_args = shlex.join(extra)


def load_simulator(args: argparse.Namespace) -> tuple[Simulator, Profile]:
    if not args.profile:
        raise ValueError("simulate needs --profile PATH (from `rapidserve profile` on the GPU to simulate)")
    profile = load_profile(args.profile)
    errors = costs.parse_cost_error(args.cost_error) if args.cost_error else ()
    model = costs.cost_model(profile, errors)
    if args.gpu_memory_gb is not None:
        if not args.gpu_memory_gb > 0:
            raise ValueError(f"--gpu-memory-gb must be > 0, got {args.gpu_memory_gb}")
        mem = int(args.gpu_memory_gb * (1 << 30))
    else:
        found = gpu_memory_from_name(profile.metadata.gpu_name)
        if found is None:
            raise ValueError(f"cannot tell the memory of {profile.metadata.gpu_name!r} from its name: give "
                             "--gpu-memory-gb (or --num-kv-blocks)")
        mem = found
    return Simulator(profile, model, mem), profile


class _Bar:
    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="simulate", unit="run", file=sys.stderr, disable=quiet)

    def step(self, desc: str) -> None:
        self.bar.set_postfix_str(desc)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_simulation(args: argparse.Namespace, configs: Sequence[tuple[SweepConfig, list[str]]] | None = None
                   ) -> dict[str, Any]:
    """The sweep simulated: its result dict (as `bench sweep` makes it). `configs`: (config,
    server command) pairs instead of --configs (the replay passes the archived commands)."""
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    sim, profile = load_simulator(args)
    _model_default(args, profile)
    if configs is None:
        configs = [(c, server_command(c, args)) for c in parse_configs(args.configs)]
    rates = parse_rates(args.request_rates)
    if args.slo_itl_ms is None and args.slo_ttft_ms_per_1k is None:
        raise ValueError("simulate needs an SLO for its goodput: --slo-itl-ms and/or --slo-ttft-ms-per-1k")
    engine_configs = [(c, engine_config(_serve_args(cmd)), cmd) for c, cmd in configs]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_len = ModelShape.of(engine_configs[0][1]).max_model_len
    requests = build_requests(args, _no_tokenizer, max_len)
    result: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "rates": rates, "rates_source": "auto" if rates is None else "given", "probe": None,
        "attainment_target": ATTAINMENT_TARGET, "configs": [], "rows": [],
        "simulated": {"profile": args.profile, "gpu_name": profile.metadata.gpu_name,
                      "gpu_memory_gb": sim.gpu_memory_bytes / 2**30, "cost_error": args.cost_error,
                      "cost_model": type(sim.cost).__module__ + "." + type(sim.cost).__name__,
                      "fit_errors": dict(getattr(sim.cost, "fit_errors", {})),
                      "limitations": costs.limitations(sim.cost), "runs": []},
    }
    if rates is None:
        c, ec, _ = engine_configs[0]
        probe, _ = simulate_run(sim, c.name, ec, requests, math.inf, args, None)
        result["probe"] = {"config": c.name, **probe}
        rates = result["rates"] = auto_rates(probe["request_throughput"], args.num_auto_rates)
    bar = _Bar(len(engine_configs) * len(rates), args.quiet)
    t_all = time.perf_counter()
    tasks = [(c.name, ec, rate) for c, ec, _ in engine_configs for rate in rates]
    try:
        outcomes = _run_tasks(sim, requests, args, out_dir, tasks, bar)
    finally:
        bar.close()
    for c, _, cmd in engine_configs:
        entry: dict[str, Any] = {"name": c.name, "server_flags": list(c.server_flags), "status": "ok",
                                 "error": None, "command": shlex.join(cmd)}
        result["configs"].append(entry)
        for (name, _, rate), outcome in zip(tasks, outcomes):
            if name != c.name:
                continue
            if isinstance(outcome, str):
                entry["status"], entry["error"] = "failed", outcome
                result["rows"].append(failed_row(name, rate, outcome))
                continue
            row, info = outcome
            result["rows"].append(row)
            result["simulated"]["runs"].append(info)
    result["simulated"]["wall_s"] = time.perf_counter() - t_all
    summarize_configs(result)
    return result


def _quiet_after_first(run: Any) -> Any:
    """A frontier runs several simulated sweeps: one progress bar each is enough."""
    def runner(args: argparse.Namespace) -> dict[str, Any]:
        result = run(args)
        print(f"simulated {len(result['rows'])} runs of {args.configs} in {result['simulated']['wall_s']:.1f} s "
              f"(ITL SLO {args.slo_itl_ms:g} ms)", file=sys.stderr)
        return result
    return runner


# One run's outcome: (the sweep's row, what the simulation did), or the error that failed it.
_Outcome = tuple[dict[str, Any], dict[str, Any]] | str

# NOTE: the context of a --jobs pool's worker process (set once by its initializer, read by
# each of its runs): the simulator and the workload, so that they cross to it once, not per run.
_POOL: dict[str, Any] = {}


def _one(sim: Simulator, requests: Sequence[SampleRequest], args: argparse.Namespace, out_dir: Path, name: str,
         config: EngineConfig, rate: float) -> _Outcome:
    t0 = time.perf_counter()
    try:
        row, run = simulate_run(sim, name, config, requests, rate, args, out_dir)
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    return row, {"config": name, "request_rate": rate, "wall_s": time.perf_counter() - t0,
                 "num_steps": run.num_steps, "device_busy_s": run.busy_s,
                 "num_preemptions": run.num_preemptions, "num_kv_blocks": run.num_kv_blocks}


def _pool_init(sim: Simulator, requests: Sequence[SampleRequest], args: argparse.Namespace, out_dir: Path) -> None:
    _POOL.update(sim=sim, requests=requests, args=args, out_dir=out_dir)


def _pool_one(name: str, config: EngineConfig, rate: float) -> _Outcome:
    return _one(_POOL["sim"], _POOL["requests"], _POOL["args"], _POOL["out_dir"], name, config, rate)


def _run_tasks(sim: Simulator, requests: Sequence[SampleRequest], args: argparse.Namespace, out_dir: Path,
               tasks: Sequence[tuple[str, EngineConfig, float]], bar: _Bar) -> list[_Outcome]:
    """Every (configuration, config, rate) run, in order; over --jobs processes when > 1 (each
    run is independent and deterministic, so the results do not depend on it)."""
    jobs = max(1, min(args.jobs, len(tasks)))
    if jobs == 1:
        out = []
        for name, config, rate in tasks:
            out.append(_one(sim, requests, args, out_dir, name, config, rate))
            bar.step(f"{name} @ {rate:g}")
        return out
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # fork: the workers start with rapidserve imported (spawn would import torch again in each)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pool_init,
                             initargs=(sim, requests, argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                                            if k != "func"}), out_dir)) as pool:
        futures = {pool.submit(_pool_one, *t): i for i, t in enumerate(tasks)}
        out: list[_Outcome | None] = [None] * len(tasks)
        for f in as_completed(futures):
            i = futures[f]
            out[i] = f.result()
            bar.step(f"{tasks[i][0]} @ {tasks[i][2]:g}")
    return [o for o in out if o is not None]


def _no_tokenizer() -> Any:
    raise ValueError("simulate generates token ids (random, lmsys-like, arxiv-like, loogle-like); the "
                     "sharegpt and jsonl datasets need a tokenizer: give --tokenizer")


# ---- replaying an archived sweep ------------------------------------------------------------------

FIDELITY_METRICS = (("median_ttft_ms", "p50 TTFT ms"), ("p95_ttft_ms", "p95 TTFT ms"),
                    ("median_itl_ms", "p50 ITL ms"), ("p95_itl_ms", "p95 ITL ms"),
                    ("request_throughput", "req/s"), ("goodput_p95_itl", "good/s"))


def _load_records(path: Path) -> tuple[list[RequestRecord], float] | None:
    if not path.exists() and path.with_suffix(".json.gz").exists():
        path = path.with_suffix(".json.gz")
    if not path.exists():
        return None
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        saved = json.load(f)
    return [RequestRecord(**{**q, "itls": tuple(q["itls"])}) for q in saved["requests"]], float(saved["duration"])


CLOSED_LOOP_FLAGS = ("--closed-loop", "--no-closed-loop")


def predates_closed_loop(archived: dict[str, Any]) -> bool:
    """Whether an archived sweep ran before the closed loop existed (2026-11-30), when rapid's
    partitioning was open loop: none of its server commands names a closed-loop flag and none of
    its measured rows has the `sm_feedback` column `bench sweep` writes since then.
    NOTE: today's default is --closed-loop, so replaying such a sweep as recorded would simulate
    a policy that did not run."""
    named = any(f in shlex.split(c.get("command") or "") for c in archived.get("configs", ())
                for f in CLOSED_LOOP_FLAGS)
    fed_back = any("sm_feedback" in r for r in archived.get("rows", ()) if r.get("status") == "ok")
    return not named and not fed_back


def _flag_value(cmd: Sequence[str], flag: str) -> str | None:
    """The value of the last `flag V` or `flag=V` in a command line."""
    value = None
    for i, x in enumerate(cmd):
        if x == flag and i + 1 < len(cmd):
            value = cmd[i + 1]
        elif x.startswith(flag + "="):
            value = x[len(flag) + 1:]
    return value


def replay_args(sweep_dir: Path, args: argparse.Namespace) -> tuple[argparse.Namespace, list[tuple[SweepConfig, list[str]]]]:
    """The archived sweep's workload, seeds, rates and SLOs in `args` (what the command line
    gave explicitly for --profile, --cost-error, --output-dir and memory stays), and each
    configuration with its recorded server command, plus --no-closed-loop on a rapid command of
    a sweep that predates the closed loop (`predates_closed_loop`) and then --server-args.
    `args.replay_notes` says what was added."""
    archived = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
    a = archived["args"]
    for key in ("dataset_name", "dataset_path", "num_prompts", "random_input_len", "random_output_len",
                "random_range_ratio", "random_vocab_size", "sharegpt_output_len", "custom_output_len", "burstiness",
                "max_concurrency", "seed", "ignore_eos", "slo_itl_ms", "slo_ttft_ms_per_1k"):
        if key in a:
            setattr(args, key, a[key])
    args.request_rates = ",".join(format(r, "g") for r in archived["rates"])
    if args.profile is None:
        args.profile = a.get("profile")
    configs = []
    open_loop = predates_closed_loop(archived)
    args.replay_notes = []
    for entry in archived["configs"]:
        if not entry.get("command"):
            continue
        cmd = shlex.split(entry["command"])
        extra = shlex.split(args.server_args or "")
        if open_loop and _flag_value(cmd, "--mode") == "rapid":
            cmd.append("--no-closed-loop")
            overridden = any(f in extra for f in CLOSED_LOOP_FLAGS)
            args.replay_notes.append(
                f"{entry['name']}: --no-closed-loop added (the sweep ran before the closed loop existed: open loop)"
                + (f", then --server-args {args.server_args!r}" if overridden else ""))
        # NOTE: after the archived flags, so that they override them (the engine's parser: last wins)
        cmd += extra
        # NOTE: the policy decides from the profile its server had (a path in this checkout, as
        # the archives record it); --profile only prices the steps. Where the server's profile is
        # not here, --profile stands in for it too.
        cmd = [args.profile if i > 0 and cmd[i - 1] == "--profile" and not Path(x).exists() else x
               for i, x in enumerate(cmd)]
        configs.append((SweepConfig(entry["name"], tuple(entry.get("server_flags", ()))), cmd))
    return args, configs


def fidelity(sweep_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Simulated beside measured for every configuration and rate the archive has, from the
    per-request records of both (so medians are there too)."""
    archived = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
    a = archived["args"]
    rows = []
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        name, rate = row["config"], float(row["request_rate"])
        measured = _load_records(records_path(sweep_dir, name, rate))
        simulated = _load_records(records_path(Path(result["args"]["output_dir"]), name, rate))
        if measured is None or simulated is None:
            continue
        m = summarize(*measured, a.get("slo_itl_ms"), a.get("slo_ttft_ms_per_1k"))
        s = summarize(*simulated, a.get("slo_itl_ms"), a.get("slo_ttft_ms_per_1k"))
        rows.append({"config": name, "request_rate": rate,
                     **{f"measured_{k}": m[k] for k, _ in FIDELITY_METRICS},
                     **{f"simulated_{k}": s[k] for k, _ in FIDELITY_METRICS}})
    best = {}
    for entry in archived["configs"]:
        mr = entry.get("max_rate_at_attainment", {}).get("p95_itl", {})
        sr = next((c["max_rate_at_attainment"]["p95_itl"] for c in result["configs"] if c["name"] == entry["name"]),
                  None)
        if sr is not None:
            best[entry["name"]] = {"measured": mr, "simulated": sr}
    return {"sweep": str(sweep_dir), "rows": rows, "max_rate_at_attainment_p95_itl": best,
            "notes": list(result["args"].get("replay_notes") or ())}


def _rel(sim: float | None, meas: float | None) -> str:
    if sim is None or meas is None or not meas:
        return "-"
    return f"{100 * (sim - meas) / meas:+.0f}%"


def format_fidelity(f: dict[str, Any]) -> str:
    """A markdown table: each metric as simulated / measured (error)."""
    head = "| config | rate | " + " | ".join(t for _, t in FIDELITY_METRICS) + " |"
    lines = [f"Simulated / measured (relative error) for {f['sweep']}:", "", head,
             "|" + "---|" * (2 + len(FIDELITY_METRICS))]
    for r in f["rows"]:
        cells = []
        for k, _ in FIDELITY_METRICS:
            s, m = r[f"simulated_{k}"], r[f"measured_{k}"]
            cells.append(f"{s:.3g} / {m:.3g} ({_rel(s, m)})")
        lines.append(f"| {r['config']} | {r['request_rate']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Highest rate with >= 90 % attainment (p95-ITL goodput), simulated / measured:", ""]
    for name, b in f["max_rate_at_attainment_p95_itl"].items():
        def fmt(x: dict[str, Any]) -> str:
            r = x.get("rate")
            return (x.get("note") or "-") if r is None else f"{r:.3g}" + (" (or more)" if x.get("note") == "lower bound" else "")
        lines.append(f"- {name}: {fmt(b['simulated'])} / {fmt(b['measured'])}")
    if f.get("notes"):
        lines += ["", "The server commands as replayed:", ""] + [f"- {n}" for n in f["notes"]]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("simulation")
    g.add_argument("--profile", default=None, help="the profile of the GPU and model to simulate (rapidserve profile)")
    g.add_argument("--cost-error", default=None,
                   help="deliberate mispricing, e.g. 'decode:ctx>4096:+40%%,prefill:+10%%' (how sensitive a "
                        "choice is to the cost model)")
    g.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="the GPU's memory, which sizes the KV pools as the engine would (default: from the "
                        "profile's GPU name, e.g. 80 for 'H100 80GB')")
    g.add_argument("--replay", default=None, metavar="SWEEP_DIR",
                   help="simulate an archived `bench sweep` (its workload, seeds, rates, SLOs and server "
                        "commands) and write fidelity.md / fidelity.json: simulated beside measured")
    g.add_argument("--jobs", type=int, default=1,
                   help="runs simulated at once, in as many processes (each run is independent: the results "
                        "are the same)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--itl-slos", default=None,
                   help="the SLO frontier instead of one sweep (as `bench frontier`): ITL SLOs in ms or "
                        "multiples Nx of the batch-32 decode step, e.g. 1.5x,2x,3x,6x; each configuration's "
                        "highest good rate at each, against the best hybrid chunk there")
    s = parser.add_argument_group("sweep (as bench sweep)")
    s.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated: hybrid-N, rapid, rapid-POLICY, disagg (as bench sweep)")
    s.add_argument("--request-rates", default="auto",
                   help="offered rates (req/s), comma-separated, or auto (a simulated max-throughput run first)")
    s.add_argument("--num-auto-rates", type=int, default=5, help="--request-rates auto: how many rates")
    s.add_argument("--output-dir", default="sim-results", help="sweep.csv, sweep.json, requests/, *.png")
    s.add_argument("--baseline", default="hybrid-512",
                   help="plots are normalized to this configuration at the lowest rate (raw without it)")
    s.add_argument("--server-args", default="", help="more engine flags for every configuration, as one string")
    s.add_argument("--no-plots", action="store_true", help="write no PNG")
    e = parser.add_argument_group("engine (as bench sweep forwards them)")
    for flag, help_text in _FORWARDED:
        e.add_argument(flag, default=None, help=help_text)
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (no effect on the pricing)")
    w = parser.add_argument_group("workload and SLOs (as bench sweep)")
    add_workload_args(w, slo_itl_ms=100.0, slo_ttft_ms_per_1k=1000.0, timeout_s=600.0)
    parser.set_defaults(func=main, num_prompts=200)


def main(args: argparse.Namespace) -> int:
    if args.itl_slos is not None:
        from rapidserve.bench import frontier

        if args.replay:
            raise ValueError("--itl-slos and --replay do not go together")
        return frontier.main(args, runner=_quiet_after_first(run_simulation))
    configs = None
    replay = Path(args.replay) if args.replay else None
    if replay is not None:
        args, configs = replay_args(replay, args)
    result = run_simulation(args, configs)
    out_dir = Path(args.output_dir)
    _report(result, out_dir, args)
    wall = result["simulated"]["wall_s"]
    print(f"simulated {len(result['rows'])} runs in {wall:.1f} s")
    for note in result["simulated"]["limitations"]:
        print(f"note: {note}")
    for note in getattr(args, "replay_notes", ()):
        print(f"replay: {note}")
    if replay is not None:
        f = fidelity(replay, result)
        (out_dir / "fidelity.json").write_text(json.dumps(_json_safe(f), indent=2), encoding="utf-8")
        text = format_fidelity(f)
        (out_dir / "fidelity.md").write_text(text + "\n", encoding="utf-8")
        print(text)
    return 0 if any(r["status"] == "ok" for r in result["rows"]) else 1
