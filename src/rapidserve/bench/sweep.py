"""`rapidserve bench sweep`: the paper's evaluation (section 5) as one command.

For each configuration (a serving mode and its flags) it starts `rapidserve serve` as a
subprocess on a free port, runs the `bench serve` load generator at each offered rate, samples GPU
utilization meanwhile (`gpu_monitor`), and stops the server with SIGTERM. A configuration whose
server does not start (or dies) is recorded as failed, with the tail of its log, and the sweep
goes on. Results: one row per (configuration, rate) in CSV and JSON, a comparison table, the
highest rate with >= 90 % SLO attainment per configuration (interpolated between measured
rates), and plots in the style of the paper's Figures 8-12 (`plots`).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np

from rapidserve.bench.gpu_monitor import GpuMonitor, GpuUtil
from rapidserve.bench.metrics import RequestRecord, summarize
from rapidserve.bench.serve import (
    ServeTarget,
    add_workload_args,
    build_requests,
    fetch_model,
    run_benchmark,
    server_tokenizer,
)
from rapidserve.bench.workloads import SampleRequest, arrival_times

DEFAULT_CONFIGS = "hybrid-512,hybrid-1024,hybrid-2048,disagg,rapid"
SERVE_LINE = re.compile(r"rapidserve: serving (?P<name>.+) at (?P<url>http://\S+?)/v1\s*$")
ATTAINMENT_TARGET = 0.9

# The row of one (configuration, rate), in CSV column order.
ROW_KEYS = (
    "config", "request_rate", "status", "completed", "failed", "duration",
    "request_throughput", "output_throughput", "total_token_throughput",
    "goodput_p95_itl", "goodput_max_itl", "goodput_itl_only",
    "attainment_p95_itl", "attainment_max_itl", "attainment_itl_only", "attainment_ttft_only",
    "mean_ttft_ms", "p95_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p95_itl_ms", "p99_itl_ms",
    "mean_tpot_ms", "drain_pct", "gpu_util_pct", "gpu_util_source", "gpu_sm_occupancy_pct", "sm_partitions",
    "sm_feedback", "error",
)
# A run whose last requests' decode takes more than this share of its duration (after the last
# arrival) measures how long its longest outputs take, not the configuration's capacity.
DRAIN_WARN_PCT = 50.0


@dataclass(frozen=True)
class SweepConfig:
    name: str
    server_flags: tuple[str, ...]


def parse_config(name: str) -> SweepConfig:
    """hybrid-N (chunk N), rapid, rapid-POLICY (an SM partition policy), disagg."""
    if name.startswith("hybrid-"):
        chunk = name.removeprefix("hybrid-")
        if not chunk.isdigit() or int(chunk) < 1:
            raise ValueError(f"--configs: {name!r}: hybrid-N needs a chunk size N >= 1")
        return SweepConfig(name, ("--mode", "hybrid", "--max-num-batched-tokens", chunk))
    if name == "rapid":
        return SweepConfig(name, ("--mode", "rapid"))
    if name.startswith("rapid-") and len(name) > len("rapid-"):
        return SweepConfig(name, ("--mode", "rapid", "--partition-policy", name.removeprefix("rapid-")))
    if name == "disagg":
        return SweepConfig(name, ("--mode", "disagg"))
    raise ValueError(f"--configs: unknown configuration {name!r} (hybrid-N, rapid, rapid-POLICY, disagg)")


def parse_configs(text: str) -> list[SweepConfig]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--configs is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"--configs names a configuration twice: {text}")
    return [parse_config(n) for n in names]


def parse_rates(text: str) -> list[float] | None:
    """Ascending finite rates, or None for `auto`."""
    if text.strip().lower() == "auto":
        return None
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError as e:
        raise ValueError(f"--request-rates: expected numbers separated by commas, or auto: {text!r}") from e
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ValueError(f"--request-rates: rates must be finite and > 0: {text!r}")
    return rates


def _round_sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def auto_rates(max_request_throughput: float, n: int) -> list[float]:
    """`n` rates from a quarter of the probed maximum to 1.5 x it: light load to saturation."""
    if not max_request_throughput > 0:
        raise ValueError("the max-throughput probe completed no request: give --request-rates")
    fractions = np.linspace(0.25, 1.5, n) if n > 1 else np.array([1.0])
    return sorted({_round_sig(max_request_throughput * f) for f in fractions.tolist()})


class AttainmentRate(NamedTuple):
    rate: float | None
    # "interpolated" between two measured rates; "lower bound": met at every measured rate (the
    # highest is given); "never reached": below target at the lowest rate; "no data".
    note: str


def max_rate_at_attainment(rates: Sequence[float], attainments: Sequence[float | None],
                           target: float = ATTAINMENT_TARGET) -> AttainmentRate:
    """The highest offered rate up to which SLO attainment stays >= `target`: linear between the
    last measured rate that meets it and the first that does not."""
    pts = sorted((r, a) for r, a in zip(rates, attainments)
                 if a is not None and math.isfinite(r) and not math.isnan(a))
    if not pts:
        return AttainmentRate(None, "no data")
    if pts[0][1] < target:
        return AttainmentRate(None, "never reached")
    for (r0, a0), (r1, a1) in itertools.pairwise(pts):
        if a1 < target:
            return AttainmentRate(r0 + (a0 - target) / (a0 - a1) * (r1 - r0), "interpolated")
    return AttainmentRate(pts[-1][0], "lower bound")


# ---- the server subprocess ---------------------------------------------------------------------


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """`rapidserve serve` (or any command printing SERVE_LINE) as a subprocess in its own session;
    stdout and stderr go to `log_path`."""

    def __init__(self, cmd: Sequence[str], log_path: Path) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path
        self._proc: subprocess.Popen[str] | None = None
        self._url: str | None = None
        self._found = threading.Event()
        self._log: Any = None
        self._reader: threading.Thread | None = None

    def start(self, timeout_s: float) -> str:
        """The server's base URL (without /v1) once it listens; ServerStartError if it exits or
        is not listening within `timeout_s`."""
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        self._log.write(f"$ {shlex.join(self.cmd)}\n")
        self._log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # NOTE: a session of its own: Ctrl-C on the sweep reaches only the sweep, which then stops
        # the server (and, as a last resort, its whole process group) itself.
        self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                      env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read_stdout, name="server-stdout", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        # The reader sets _found on the line, or at the end of stdout (the server exited).
        while not self._found.wait(0.1) and self._proc.poll() is None:
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"the server was not listening after {timeout_s:.0f} s:\n{self.log_tail()}")
        self._found.wait(2.0)  # an exited server's last lines may still be in the reader's hands
        if self._url is None:
            code = self.stop()
            raise ServerStartError(f"the server exited with code {code} before listening:\n{self.log_tail()}")
        return self._url

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._url is None and (m := SERVE_LINE.search(line)):
                self._url = m.group("url")
                self._found.set()
            try:
                self._log.write(line)
                self._log.flush()
            except ValueError:  # stop() closed it
                pass
        self._found.set()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the server shuts down gracefully), SIGKILL to it after `timeout_s`; then
        SIGKILL to whatever is left in its process group (a worker it did not stop must not hold
        the GPU the next configuration needs). The server's exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        # NOTE: stdout is not closed here: the reader thread may be blocked reading it, and a
        # close would wait for it. It ends at EOF, once every holder of the pipe is gone.
        if self._reader is not None:
            self._reader.join(5.0)
        if self._log is not None:
            self._log.close()
        return proc.returncode


# ---- the sweep ---------------------------------------------------------------------------------

# Engine and server flags forwarded to every configuration's server when given.
_FORWARDED = (
    ("--model", "the model (default: the embedded SmolLM2)"),
    ("--tokenizer", "the tokenizer (default: the model's)"), ("--load-format", "auto, dummy, gguf, safetensors"),
    ("--dtype", "the servers' dtype (default: auto)"), ("--device", "auto, cpu or cuda[:N] (default: auto)"),
    ("--max-model-len", "longest context in tokens (default: the model's)"),
    ("--placement", "rapid and disagg: workers as process or thread (default: process)"),
    ("--max-num-seqs", "most requests running in one step (default: 256)"),
    ("--num-kv-blocks", "fix the KV cache size in blocks (default: sized from memory)"),
    ("--kv-cache-memory-bytes", "KV cache memory, e.g. 2GiB (default on CPU: 1GiB)"),
    ("--gpu-memory-utilization", "share of the GPU's memory each server may hold (default: 0.9)"),
)


def server_command(config: SweepConfig, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "rapidserve.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    for flag, _ in _FORWARDED:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            cmd += [flag, str(value)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    flags = config.server_flags
    if "--partition-policy" in flags and flags[flags.index("--partition-policy") + 1] in ("rapid", "nexus"):
        # These policies keep an ITL SLO from a profile: the SLO the sweep's goodput judges by.
        if not getattr(args, "profile", None):
            raise ValueError(f"--configs {config.name}: the policy needs --profile PATH (from `rapidserve profile`)")
        cmd += ["--profile", args.profile]
        if args.slo_itl_ms is not None:
            cmd += ["--slo-itl-ms", str(args.slo_itl_ms)]
    cmd += shlex.split(args.server_args or "")
    # The configuration's own flags last: they win over --server-args.
    return cmd + list(config.server_flags)


def _nvml_index(device: str | None) -> int:
    if device and device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return 0


def make_row(config: str, rate: float, summary: dict[str, Any], gpu: GpuUtil) -> dict[str, Any]:
    row: dict[str, Any] = {k: summary.get(k) for k in ROW_KEYS}
    row.update(config=config, request_rate=rate, status="ok", gpu_util_pct=gpu.util_pct,
               gpu_util_source=gpu.source, gpu_sm_occupancy_pct=gpu.sm_occupancy_pct, error=None)
    return row


def failed_row(config: str, rate: float | None, error: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(config=config, request_rate=rate, status="failed", error=error)
    return row


class _Progress:
    """tqdm bars on stderr: one over every run of the sweep, one over the requests of a run."""

    def __init__(self, total_runs: int) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.runs = tqdm(total=total_runs, desc="sweep", unit="run", file=sys.stderr, position=0)

    def requests(self, desc: str, n: int) -> Any:
        return self._tqdm(total=n, desc=desc, unit="req", file=sys.stderr, leave=False, position=1)

    def write(self, msg: str) -> None:
        self._tqdm.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.runs.close()


def require_healthy(url: str, timeout_s: float = 30.0) -> None:
    """ServerStartError unless the server's /health answers 200: a server whose engine died at
    start-up still listens, and a run against it would wait for answers that never come."""
    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as e:
        raise ServerStartError(f"the server listens at {url} but /health failed: {e}") from e
    if r.status_code != 200:
        raise ServerStartError(f"the server listens at {url} but is unhealthy ({r.status_code}): {r.text[:600]}")


class PartitionTimes(NamedTuple):
    """The rapid mode's SM-partition counters as a server's /metrics reports them."""

    seconds: dict[str, float]  # time the decode worker's steps ran in each partition
    switches: float
    reactions: float = 0.0  # partition switches both workers followed...
    reaction_s: float = 0.0  # ...and their reaction times' sum
    reaction_max_s: float = 0.0
    guard_trips: float | None = None  # the closed loop's (None: open loop, or an older server)
    residuals: dict[str, float] = {}  # "D32/P100@8K beside" -> measured / predicted, now


def parse_partition_times(text: str) -> PartitionTimes | None:
    """The partition counters of a Prometheus exposition (None without them: another mode, or no
    partitioning)."""
    from prometheus_client.parser import text_string_to_metric_families

    seconds: dict[str, float] = {}
    switches = reactions = reaction_s = reaction_max_s = 0.0
    guard_trips: float | None = None
    residuals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "rapidserve:sm_partition_seconds_total":
                seconds[labels["partition"]] = seconds.get(labels["partition"], 0.0) + sample.value
            elif name == "rapidserve:sm_partition_switches_total":
                switches += sample.value
            elif name == "rapidserve:sm_partition_reaction_seconds_count":
                reactions += sample.value
            elif name == "rapidserve:sm_partition_reaction_seconds_sum":
                reaction_s += sample.value
            elif name == "rapidserve:sm_partition_reaction_max_seconds":
                reaction_max_s = max(reaction_max_s, sample.value)
            elif name == "rapidserve:sm_partition_itl_guard_trips_total":
                guard_trips = (guard_trips or 0.0) + sample.value
            elif name == "rapidserve:sm_partition_decode_residual":
                residuals[f"{labels['partition']}@{labels['context']} {labels['phase']}"] = sample.value
    if not seconds:
        return None
    return PartitionTimes(seconds, switches, reactions, reaction_s, reaction_max_s, guard_trips, residuals)


def scrape_partition_times(base_url: str, timeout_s: float = 10.0) -> PartitionTimes | None:
    """The server's partition counters now (None if it has none or /metrics fails: the figure
    is a diagnostic, never a reason to fail a run)."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout_s, trust_env=False)
        r.raise_for_status()
        return parse_partition_times(r.text)
    except (httpx.HTTPError, ValueError):
        return None


def partition_shares(before: PartitionTimes | None, after: PartitionTimes | None) -> str:
    """Where a run's decode steps ran, from the counters before and after it: "D32/P100 50 %,
    full 43 %, D16/P116 7 %; 120 switches" (largest share first), or "" without counters."""
    if after is None:
        return ""
    prev = before.seconds if before is not None else {}
    spent = {k: v - prev.get(k, 0.0) for k, v in after.seconds.items()}
    spent = {k: v for k, v in spent.items() if v > 0}
    total = sum(spent.values())
    if total <= 0:
        return ""
    parts = ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in sorted(spent.items(), key=lambda kv: -kv[1]))
    switches = after.switches - (before.switches if before is not None else 0.0)
    return f"{parts}; {switches:.0f} switches"


def feedback_summary(before: PartitionTimes | None, after: PartitionTimes | None) -> str:
    """What a run's closed loop did, from the counters before and after it: "reaction 4.2 ms mean
    (12 switches), max 9.8 ms; ITL guard 1 trip; residuals D32/P100@8K beside 1.38, ..." (the
    residuals as they stand at the end, largest first), or "" without counters."""
    if after is None:
        return ""
    parts = []
    n = after.reactions - (before.reactions if before is not None else 0.0)
    if n > 0:
        total = after.reaction_s - (before.reaction_s if before is not None else 0.0)
        parts.append(f"reaction {1e3 * total / n:.1f} ms mean ({n:.0f} switches), max since start "
                     f"{1e3 * after.reaction_max_s:.1f} ms")
    if after.guard_trips is not None:
        trips = after.guard_trips - ((before.guard_trips or 0.0) if before is not None else 0.0)
        parts.append(f"ITL guard {trips:.0f} trip{'' if trips == 1 else 's'}")
    if after.residuals:
        ranked = sorted(after.residuals.items(), key=lambda kv: -kv[1])
        parts.append("residuals " + ", ".join(f"{k} {v:.2f}" for k, v in ranked))
    return "; ".join(parts)


def _run_once(target: ServeTarget, requests: Sequence[SampleRequest], rate: float, args: argparse.Namespace,
              monitor: GpuMonitor, progress: _Progress, desc: str,
              records_path: Path | None = None) -> tuple[dict[str, Any], GpuUtil, str | None]:
    """One load-generator run at `rate`: (summary, GPU utilization, first error or None). Every
    request's record goes to `records_path` (JSON) when given, so the run can be scored again
    under other SLOs."""
    arrivals = arrival_times(len(requests), rate, args.burstiness, args.seed)
    bar = progress.requests(desc, len(requests))
    monitor.start()
    try:
        records, duration = asyncio.run(run_benchmark(target, requests, arrivals, args.max_concurrency,
                                                      args.timeout, on_done=lambda _r: bar.update(1)))
    finally:
        gpu = monitor.stop()
        bar.close()
    summary = summarize(records, duration, args.slo_itl_ms, args.slo_ttft_ms_per_1k)
    summary["drain_pct"] = drain_pct(duration, arrivals)
    first_error = next((r.error for r in records if not r.success), None)
    if records_path is not None:
        records_path.parent.mkdir(parents=True, exist_ok=True)
        with open(records_path, "w", encoding="utf-8") as f:
            json.dump({"request_rate": _json_safe(rate), "duration": duration,
                       "requests": [_rounded(r.to_dict()) for r in records]}, f)
    return summary, gpu, first_error


def drain_pct(duration_s: float, arrivals: Sequence[float]) -> float | None:
    """The share (%) of a run's duration after its last request was sent."""
    if duration_s <= 0 or not arrivals:
        return None
    return 100.0 * max(0.0, duration_s - max(arrivals)) / duration_s


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    """A request's record with its times to the microsecond (a third of the file's size)."""
    out = dict(record)
    for k in ("ttft", "e2el"):
        out[k] = round(out[k], 6)
    out["itls"] = [round(x, 6) for x in out["itls"]]
    return out


def records_path(out_dir: Path, config: str, rate: float) -> Path:
    """Where a run's per-request records go: requests/CONFIG@RATE.json in the sweep's directory."""
    return out_dir / "requests" / f"{config}@{rate:g}.json"


def _sweep_config(config: SweepConfig, args: argparse.Namespace, rates: list[float] | None, out_dir: Path,
                  monitor: GpuMonitor, progress: _Progress, result: dict[str, Any]) -> list[float] | None:
    """Run one configuration into `result`; the rates (probed here when `rates` is None and the
    server started)."""
    entry: dict[str, Any] = {"name": config.name, "server_flags": list(config.server_flags),
                             "status": "failed", "error": None}
    result["configs"].append(entry)
    server = ServerProcess(server_command(config, args), out_dir / f"server-{config.name}.log")
    entry["command"] = shlex.join(server.cmd)
    # NOTE: starting a server (loading the model, capturing graphs) can take most of a short
    # sweep: say so before the wait, and how long it took after.
    progress.write(f"[{config.name}] starting its server (log: {server.log_path}) ...")
    t0 = time.perf_counter()
    try:
        url = server.start(args.server_start_timeout)
        require_healthy(url)
    except ServerStartError as e:
        server.stop()
        entry["error"] = str(e)
        result["rows"].append(failed_row(config.name, None, str(e)))
        progress.write(f"[{config.name}] failed to start; see {server.log_path}\n{server.log_tail(600)}")
        return rates
    except BaseException:  # interrupted while it starts: no server outlives the sweep
        server.stop()
        raise
    progress.write(f"[{config.name}] serving at {url} (started in {time.perf_counter() - t0:.1f} s)")
    try:
        model, max_model_len = fetch_model(url)
        requests = build_requests(args, lambda: server_tokenizer(url, model), max_model_len)
        target = ServeTarget(url, "/v1/completions", model, args.ignore_eos)
        if args.warmup_requests > 0:
            warm = [r._replace(output_len=min(r.output_len, 4)) for r in requests[:args.warmup_requests]]
            records, _ = asyncio.run(run_benchmark(target, warm, [0.0] * len(warm), None, args.timeout))
            if errors := [r.error for r in records if not r.success]:
                raise ServerStartError(f"warm-up request failed: {errors[0]}")
        if rates is None:
            summary, _, err = _run_once(target, requests, math.inf, args, monitor, progress,
                                        f"{config.name} probe (all at once)")
            result["probe"] = {"config": config.name, **summary}
            rates = auto_rates(summary["request_throughput"], args.num_auto_rates)
            result["rates"] = rates
            progress.write(f"[{config.name}] max-throughput probe: {summary['request_throughput']:.3g} req/s "
                           f"-> rates {rates}" + (f" (first error: {err})" if err else ""))
        for rate in rates:
            if not server.alive():
                msg = f"the server died:\n{server.log_tail()}"
                result["rows"].append(failed_row(config.name, rate, msg))
                entry["error"] = msg
                progress.runs.update(1)
                continue
            before = scrape_partition_times(url)
            summary, gpu, err = _run_once(target, requests, rate, args, monitor, progress,
                                          f"{config.name} @ {rate:g} req/s", records_path(out_dir, config.name, rate))
            row = make_row(config.name, rate, summary, gpu)
            row["error"] = err
            after = scrape_partition_times(url)
            row["sm_partitions"] = partition_shares(before, after) or None
            row["sm_feedback"] = feedback_summary(before, after) or None
            if row["sm_partitions"]:
                progress.write(f"[{config.name} @ {rate:g} req/s] SM partitions: {row['sm_partitions']}")
            if row["sm_feedback"]:
                progress.write(f"[{config.name} @ {rate:g} req/s] closed loop: {row['sm_feedback']}")
            result["rows"].append(row)
            progress.runs.update(1)
        entry["status"] = "ok" if server.alive() else "failed"
    except (ValueError, ServerStartError, httpx.HTTPError) as e:
        entry["error"] = f"{type(e).__name__}: {e}"
        result["rows"].append(failed_row(config.name, None, entry["error"]))
        progress.write(f"[{config.name}] failed: {entry['error']}")
    finally:
        code = server.stop(args.server_stop_timeout)
        entry["server_exit_code"] = code
    return rates


def summarize_configs(result: dict[str, Any], target: float = ATTAINMENT_TARGET) -> None:
    """Each configuration's highest rate at >= `target` attainment, for each goodput variant."""
    for entry in result["configs"]:
        rows = [r for r in result["rows"] if r["config"] == entry["name"] and r["status"] == "ok"]
        entry["max_rate_at_attainment"] = {}
        for variant in ("p95_itl", "max_itl", "itl_only"):
            ar = max_rate_at_attainment([r["request_rate"] for r in rows],
                                        [r[f"attainment_{variant}"] for r in rows], target)
            entry["max_rate_at_attainment"][variant] = {"rate": ar.rate, "note": ar.note}


# What makes two sweeps' runs comparable: the workload, the SLOs and every server's common flags.
_SAME_WORKLOAD = (
    "dataset_name", "dataset_path", "num_prompts", "random_input_len", "random_output_len", "random_range_ratio",
    "random_vocab_size", "sharegpt_output_len", "custom_output_len", "burstiness", "max_concurrency", "seed",
    "ignore_eos", "slo_itl_ms", "slo_ttft_ms_per_1k", "server_args", "enforce_eager",
    *(flag[2:].replace("-", "_") for flag, _ in _FORWARDED),
)


def load_previous(args: argparse.Namespace, out_dir: Path) -> dict[str, Any] | None:
    """`--resume`: the sweep already in `out_dir` (None if there is none), with only its
    configurations that ran (a failed one runs again). ValueError if its workload, SLOs or common
    server flags differ from this one's: their figures could not share a table."""
    path = out_dir / "sweep.json"
    if not path.exists():
        return None
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
        prev_args, configs, rows = prev["args"], prev["configs"], prev["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: cannot read the sweep in {path}: {e}") from e
    differ = [k for k in _SAME_WORKLOAD if prev_args.get(k) != getattr(args, k, None)]
    if differ:
        details = ", ".join(f"{k}: {prev_args.get(k)!r} there, {getattr(args, k, None)!r} here" for k in differ)
        raise ValueError(f"--resume: the sweep in {out_dir} ran another workload or SLO ({details}); "
                         "use another --output-dir")
    done = {c["name"] for c in configs if c.get("status") == "ok"}
    prev["configs"] = [c for c in configs if c["name"] in done]
    prev["rows"] = [r for r in rows if r["config"] in done]
    return prev


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    configs = parse_configs(args.configs)
    rates = parse_rates(args.request_rates)
    if args.num_auto_rates < 1:
        raise ValueError(f"--num-auto-rates must be >= 1, got {args.num_auto_rates}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.slo_itl_ms is None and args.slo_ttft_ms_per_1k is None:
        raise ValueError("bench sweep needs an SLO for its goodput: --slo-itl-ms and/or --slo-ttft-ms-per-1k")
    for config in configs:
        server_command(config, args)  # a configuration missing what it needs fails before any run
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "rates": rates, "rates_source": "auto" if rates is None else "given", "probe": None,
        "attainment_target": ATTAINMENT_TARGET, "configs": [], "rows": [],
    }
    prev = load_previous(args, out_dir) if args.resume else None
    if prev is not None:
        done = {c["name"] for c in prev["configs"]}
        if done:
            print(f"resuming the sweep in {out_dir}: {', '.join(sorted(done))} already ran", file=sys.stderr)
        result["configs"], result["rows"], result["probe"] = prev["configs"], prev["rows"], prev.get("probe")
        if rates is None and prev.get("rates"):
            rates = result["rates"] = prev["rates"]  # the same offered rates for every configuration
            result["rates_source"] = prev.get("rates_source", "auto")
        configs = [c for c in configs if c.name not in done]
    monitor = GpuMonitor(_nvml_index(args.device))
    has_gpu = monitor.open()
    result["gpu_monitor"] = "nvml" if has_gpu else None
    progress = _Progress(len(configs) * (len(rates) if rates is not None else args.num_auto_rates))
    try:
        for config in configs:
            before = len(result["rows"])
            rates = _sweep_config(config, args, rates, out_dir, monitor, progress, result)
            runs_done = sum(1 for r in result["rows"][before:] if r["request_rate"] is not None)
            # A configuration that ran fewer rates (failed) still advances the sweep's bar fully.
            planned = len(rates) if rates is not None else args.num_auto_rates
            progress.runs.update(max(0, planned - runs_done))
            summarize_configs(result)
            write_results(result, out_dir)  # what ran so far survives a sweep cut short
    except KeyboardInterrupt:
        # Interrupted (Ctrl-C, `timeout -s INT`): the configuration cut short keeps its runs but
        # counts as failed, so --resume runs it again.
        summarize_configs(result)
        write_results(result, out_dir)
        raise
    finally:
        progress.close()
        monitor.close()
    summarize_configs(result)
    return result


def rescore(sweep_dir: Path, slo_itl_ms: float | None, slo_ttft_ms_per_1k: float | None) -> dict[str, Any]:
    """The sweep in `sweep_dir` scored again under other SLOs (None: the sweep's own), from the
    per-request records it kept (requests/CONFIG@RATE.json, or .json.gz): goodput, attainment
    and the highest rates at the target change; throughput, latencies and GPU figures are the
    runs' own. ValueError if a run's records are missing (sweeps before records were kept) or
    unreadable."""
    path = sweep_dir / "sweep.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        args, rows = result["args"], result["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the sweep {path}: {e}") from e
    itl = args.get("slo_itl_ms") if slo_itl_ms is None else slo_itl_ms
    ttft = args.get("slo_ttft_ms_per_1k") if slo_ttft_ms_per_1k is None else slo_ttft_ms_per_1k
    for name, v in (("--slo-itl-ms", itl), ("--slo-ttft-ms-per-1k", ttft)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if itl is None and ttft is None:
        raise ValueError("no SLO to score by: give --slo-itl-ms and/or --slo-ttft-ms-per-1k")
    scored = []
    for row in rows:
        if row.get("status") != "ok":
            scored.append(row)
            continue
        rec_path = records_path(sweep_dir, row["config"], float(row["request_rate"]))
        if not rec_path.exists() and rec_path.with_suffix(".json.gz").exists():
            rec_path = rec_path.with_suffix(".json.gz")  # as archived (docs/results)
        try:
            with (gzip.open if rec_path.suffix == ".gz" else open)(rec_path, "rt", encoding="utf-8") as f:
                saved = json.load(f)
            records = [RequestRecord(**{**q, "itls": tuple(q["itls"])}) for q in saved["requests"]]
            duration = float(saved["duration"])
        except FileNotFoundError:
            raise ValueError(f"{rec_path} is missing: this sweep kept no per-request records, so it cannot "
                             "be scored again") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the run's records {rec_path}: {e}") from e
        summary = summarize(records, duration, itl, ttft)
        rate = float(row["request_rate"])
        summary["drain_pct"] = drain_pct(duration, arrival_times(len(records), rate, args.get("burstiness", 1.0),
                                                                 args.get("seed", 0)))
        scored.append({**row, **{k: summary[k] for k in ROW_KEYS if k in summary}})
    result["rows"] = scored
    result["args"] = {**args, "slo_itl_ms": itl, "slo_ttft_ms_per_1k": ttft}
    result["rescored_from"] = str(sweep_dir)
    summarize_configs(result, result.get("attainment_target", ATTAINMENT_TARGET))
    return result


# ---- output ------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


# (row key, column name, format, width): one short name per column, explained by TABLE_LEGEND.
TABLE_COLUMNS = (
    ("config", "config", "s", 14), ("request_rate", "QPS", "g", 6),
    ("request_throughput", "req/s", ".2f", 6), ("output_throughput", "tok/s", ".1f", 8),
    ("goodput_p95_itl", "good", ".2f", 6), ("goodput_max_itl", "goodmax", ".2f", 7),
    ("goodput_itl_only", "gooditl", ".2f", 7), ("attainment_p95_itl", "attain", ".0%", 6),
    ("p95_ttft_ms", "TTFT95", ".1f", 8), ("p95_itl_ms", "ITL95", ".1f", 7),
    ("drain_pct", "drain%", ".0f", 6), ("gpu_util_pct", "GPU%", ".0f", 5),
)
TABLE_LEGEND = (
    "QPS offered; req/s, tok/s achieved; good/goodmax/gooditl: goodput req/s (SLO on p95 ITL, max "
    "ITL, ITL only); attain: in SLO (p95); TTFT95, ITL95: p95 ms; drain%: after last send; GPU%: busy"
)


def _table_header() -> list[str]:
    header = " ".join(f"{title:>{w}}" if i else f"{title:<{w}}"
                      for i, (_, title, _, w) in enumerate(TABLE_COLUMNS))
    return [header, *textwrap.wrap(TABLE_LEGEND, max(len(header), 60)), "-" * len(header)]


def format_table(result: dict[str, Any]) -> str:
    """The comparison table: a line per (configuration, rate), then each configuration's highest
    rate at the attainment target."""
    lines = _table_header()
    for row in result["rows"]:
        if row["status"] != "ok":
            rate = _fmt(row["request_rate"], "g")
            why = [ln.strip() for ln in (row.get("error") or "").splitlines() if ln.strip()]
            # The first line says what happened, the last one (of the server's log) usually why.
            msg = " ... ".join(dict.fromkeys([why[0], why[-1]])) if why else ""
            lines.append(f"{row['config']:<14} {rate:>7} FAILED: {msg[:160]}")
            continue
        cells = []
        for i, (key, _, spec, w) in enumerate(TABLE_COLUMNS):
            v = row.get(key)
            s = _fmt(v, spec) if key != "config" else str(v)
            cells.append(f"{s:<{w}}" if i == 0 else f"{s:>{w}}")
        lines.append(" ".join(cells))
    drained = [r for r in result["rows"] if r["status"] == "ok" and (r.get("drain_pct") or 0) > DRAIN_WARN_PCT]
    if drained:
        lines.append("")
        lines.append(f"note: {len(drained)} run(s) spent over {DRAIN_WARN_PCT:.0f}% of their time after the last "
                     "request was sent (drain%): their throughput is how long the longest outputs take, not "
                     "the configuration's capacity; more --num-prompts measure capacity")
    pct = f"{result['attainment_target']:.0%}"
    lines.append("")
    lines.append(f"highest rate with >= {pct} SLO attainment (req/s; p95-ITL / max-ITL / ITL-only goodput):")
    for entry in result["configs"]:
        if entry["status"] != "ok" and not any(r["config"] == entry["name"] and r["status"] == "ok"
                                               for r in result["rows"]):
            lines.append(f"  {entry['name']:<14} failed")
            continue
        parts = []
        for variant in ("p95_itl", "max_itl", "itl_only"):
            ar = entry["max_rate_at_attainment"][variant]
            if ar["rate"] is None:
                parts.append(ar["note"])
            else:
                parts.append(f"{ar['rate']:.3g}" + (" (or more)" if ar["note"] == "lower bound" else ""))
        lines.append(f"  {entry['name']:<14} " + " / ".join(parts))
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """sweep.csv (the rows), sweep.json (everything); the paths."""
    csv_path, json_path = out_dir / "sweep.csv", out_dir / "sweep.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_KEYS))
        w.writeheader()
        for row in result["rows"]:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in ROW_KEYS})
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(result), f, indent=2)
    return [csv_path, json_path]


# ---- command line ------------------------------------------------------------------------------


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sweep")
    g.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated: hybrid-N (--mode hybrid --max-num-batched-tokens N), rapid, "
                        "rapid-POLICY (--partition-policy POLICY), disagg")
    g.add_argument("--request-rates", default="auto",
                   help="offered rates (req/s), comma-separated, or auto: a max-throughput run "
                        "first, then --num-auto-rates rates from 0.25x to 1.5x its throughput")
    g.add_argument("--num-auto-rates", type=int, default=5, help="--request-rates auto: how many rates")
    g.add_argument("--output-dir", default="sweep-results", help="sweep.csv, sweep.json, *.png, server logs")
    g.add_argument("--baseline", default="hybrid-512",
                   help="plots are normalized to this configuration at the lowest rate (raw without it)")
    g.add_argument("--server-args", default="", help="more flags for every server, as one string")
    g.add_argument("--server-start-timeout", type=float, default=900.0,
                   help="seconds a server may take to listen before its configuration counts as failed")
    g.add_argument("--server-stop-timeout", type=float, default=60.0,
                   help="seconds after SIGTERM before the server's process group is killed")
    g.add_argument("--warmup-requests", type=int, default=1,
                   help="untimed requests (4 output tokens) sent to each server first")
    g.add_argument("--no-plots", action="store_true", help="write no PNG")
    g.add_argument("--resume", action="store_true",
                   help="add to the sweep already in --output-dir: its configurations that ran are kept "
                        "(and skipped here), its rates reused when --request-rates is auto; the "
                        "workload, SLOs and common server flags must be the same")
    s = parser.add_argument_group("server (forwarded to every configuration when given)")
    for flag, help_text in _FORWARDED:
        s.add_argument(flag, default=None, help=help_text)
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    s.add_argument("--profile", default=None,
                   help="the SM-partition profile for rapid-rapid and rapid-nexus (their servers also get "
                        "--slo-itl-ms, the goodput's ITL SLO)")
    w = parser.add_argument_group("workload and SLOs (as bench serve)")
    # The paper's SLOs for Llama-3.1-70B: ITL 100 ms, TTFT 1 s per started 1000 prompt tokens.
    add_workload_args(w, slo_itl_ms=100.0, slo_ttft_ms_per_1k=1000.0, timeout_s=600.0)
    parser.set_defaults(func=main, num_prompts=200)


def add_rescore_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", help="a `bench sweep` --output-dir (its sweep.json and requests/)")
    parser.add_argument("--slo-itl-ms", type=float, default=None,
                        help="goodput: ITL ceiling (ms); default: the sweep's")
    parser.add_argument("--slo-ttft-ms-per-1k", type=float, default=None,
                        help="goodput: TTFT ceiling (ms) per started 1000 prompt tokens; default: the sweep's")
    parser.add_argument("--output-dir", default=None,
                        help="where the rescored sweep.csv, sweep.json and plots go (default: "
                             "SWEEP_DIR/slo-itl-ITL-ttft-TTFT); never SWEEP_DIR itself")
    parser.add_argument("--baseline", default="hybrid-512",
                        help="plots are normalized to this configuration at the lowest rate (raw without it)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG")
    parser.set_defaults(func=rescore_main)


def rescore_main(args: argparse.Namespace) -> int:
    src = Path(args.sweep_dir)
    result = rescore(src, args.slo_itl_ms, args.slo_ttft_ms_per_1k)
    a = result["args"]
    tag = "-".join(f"{k}-{'none' if v is None else format(v, 'g')}"
                   for k, v in (("itl", a["slo_itl_ms"]), ("ttft", a["slo_ttft_ms_per_1k"])))
    out_dir = Path(args.output_dir) if args.output_dir else src / f"slo-{tag}"
    if out_dir.resolve() == src.resolve():
        raise ValueError("--output-dir is the sweep's own directory: its results would be overwritten")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"SLOs: ITL {a['slo_itl_ms']} ms, TTFT {a['slo_ttft_ms_per_1k']} ms per 1K prompt tokens")
    _report(result, out_dir, args)
    return 0


def _report(result: dict[str, Any], out_dir: Path, args: argparse.Namespace) -> None:
    """Write the results (and the plots unless --no-plots) to `out_dir`; print the table."""
    from rapidserve.bench.plots import plot_sweep

    paths = write_results(result, out_dir)
    if not args.no_plots:
        paths += plot_sweep(result["rows"], out_dir, baseline=args.baseline)
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in paths))


def main(args: argparse.Namespace) -> int:
    result = run_sweep(args)
    _report(result, Path(args.output_dir), args)
    return 0 if any(r["status"] == "ok" for r in result["rows"]) else 1
