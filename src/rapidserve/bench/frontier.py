"""`rapidserve bench frontier`: each configuration's highest good rate across ITL SLOs.

The evaluation the project exists for: for a list of ITL SLOs, each configuration's highest
offered rate at >= 90 % SLO attainment (TTFT within 1 s per started 1K prompt tokens, as the
paper), set against the best hybrid chunk *at that SLO* (a chunk that holds a loose SLO may break
a tight one, and the tightest chunk wastes capacity at a loose one).

Two kinds of configuration:
- SLO-independent ones (hybrid-N, disagg, rapid, rapid-static:N, rapid-full, rapid-off) run once
  (one sweep over the rates into `shared/`); each SLO rescores their per-request records;
- SLO-dependent ones (rapid-rapid, rapid-nexus: their servers aim at the SLO they are given)
  run once per SLO (`slo-ITL/`), each judged at its own SLO.

The sweeps are `bench sweep` runs (a server per configuration), or simulated ones when a
simulator runner is given (same result format). The arithmetic (`build_frontier`) works on the
sweeps' results alone, so it is tested on hand-built records.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rapidserve.bench.sweep import (
    ATTAINMENT_TARGET,
    _json_safe,
    parse_configs,
    rescore,
    summarize_configs,
    write_results,
)

# The partition policies that aim at the ITL SLO they are given (their servers get --slo-itl-ms).
_SLO_AIMING_POLICIES = ("rapid", "nexus")
# The goodput variant the frontier is judged by: each request's p95 ITL within the SLO (and its
# TTFT within its ceiling), as the sweeps' headline goodput.
VARIANT = "p95_itl"
# The decode batch whose step time the SLO multiples (`2x`) refer to.
REFERENCE_BATCH = 32

SweepRunner = Callable[[argparse.Namespace], dict[str, Any]]


def slo_dependent(config: str) -> bool:
    """Whether a configuration's server is given the ITL SLO (so it must run once per SLO)."""
    return config.startswith("rapid-") and config.removeprefix("rapid-") in _SLO_AIMING_POLICIES


def is_static(config: str) -> bool:
    """A rapid configuration with a fixed SM split (`rapid-static:N`: N decode SMs)."""
    return config.startswith("rapid-static:")


def reference_step_ms(profile_path: str, batch: int = REFERENCE_BATCH) -> float:
    """The model's decode step at `batch` on the whole device, alone, at the profile's shortest
    measured context (interpolated over batch): what `--itl-slos 2x` multiplies."""
    from rapidserve.resources.profile import load_profile

    profile = load_profile(profile_path)
    return profile.decode_ms(profile.total_sms, float(batch), float(profile.decode.context_lens[0]), False)


def parse_slos(text: str, profile_path: str | None) -> list[float]:
    """ITL SLOs in ms, ascending: numbers (ms) or multiples `Nx` of the model's batch-32 decode
    step (from --profile), comma-separated."""
    slos: set[float] = set()
    step_ms: float | None = None
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if part.lower().endswith("x"):
                if profile_path is None:
                    raise ValueError(f"--itl-slos: {part!r} is a multiple of the batch-{REFERENCE_BATCH} decode "
                                     "step, which needs --profile")
                if step_ms is None:
                    step_ms = reference_step_ms(profile_path)
                value = float(part[:-1]) * step_ms
            else:
                value = float(part)
        except ValueError as e:
            if "needs --profile" in str(e):
                raise
            raise ValueError(f"--itl-slos: expected ms or multiples like 2x, got {part!r}") from e
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--itl-slos: SLOs must be finite and > 0, got {part!r}")
        slos.add(round(value, 3))
    if not slos:
        raise ValueError("--itl-slos is empty")
    return sorted(slos)


class FrontierPoint(NamedTuple):
    slo_itl_ms: float
    config: str
    rate: float | None  # highest offered rate at >= the attainment target; None: never reached
    note: str  # "interpolated", "lower bound" (met at every rate run), "never reached", "no data"


def _points(result: dict[str, Any], slo: float) -> list[FrontierPoint]:
    summarize_configs(result, result.get("attainment_target", ATTAINMENT_TARGET))
    out = []
    for entry in result["configs"]:
        ar = entry["max_rate_at_attainment"][VARIANT]
        out.append(FrontierPoint(slo, entry["name"], ar["rate"], ar["note"]))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b where never reaching the target counts as 0 (None only when both are 0)."""
    a0, b0 = a or 0.0, b or 0.0
    if b0 > 0:
        return a0 / b0
    return None if a0 == 0 else math.inf


def build_frontier(slos: Sequence[float], shared: dict[float, dict[str, Any]] | None,
                   per_slo: dict[float, dict[str, Any]]) -> dict[str, Any]:
    """The frontier from sweep results: `shared[slo]` is the SLO-independent configurations'
    sweep scored at `slo` (see `rescore`), `per_slo[slo]` the SLO-dependent ones' sweep run at it.
    Per SLO: every configuration's highest good rate, the best hybrid chunk, and each
    non-hybrid configuration's ratio to that best chunk and to disagg."""
    points: list[FrontierPoint] = []
    per: list[dict[str, Any]] = []
    for slo in slos:
        pts = []
        if shared is not None and slo in shared:
            pts += _points(shared[slo], slo)
        if slo in per_slo:
            pts += _points(per_slo[slo], slo)
        points += pts
        rates = {p.config: p.rate for p in pts}
        hybrids = [p for p in pts if p.config.startswith("hybrid-") and p.rate is not None]
        # The best chunk: the highest good rate; on a tie the smaller chunk (its ITL is lower).
        best = max(hybrids, key=lambda p: (p.rate, -int(p.config.removeprefix("hybrid-"))), default=None)
        any_hybrid = any(p.config.startswith("hybrid-") for p in pts)
        # The best static split: the reference an adaptive policy must beat at this SLO. On a tie
        # the one listed first.
        statics = [p for p in pts if is_static(p.config) and p.rate is not None]
        best_static = max(statics, key=lambda p: p.rate, default=None)
        ratios: dict[str, dict[str, float | None]] = {}
        # NOTE: a configuration that could not run ("no data": e.g. disagg's two copies of a large
        # model do not fit) has no ratio, neither as numerator nor as the disagg denominator.
        ran = {p.config for p in pts if p.note != "no data"}
        for p in pts:
            if p.config.startswith("hybrid-"):
                continue
            ratios[p.config] = {
                # No chunk reaching the target counts as 0: a configuration that does is inf x.
                "vs_best_hybrid": _ratio(p.rate, best.rate if best else None) if any_hybrid and p.config in ran else None,
                "vs_disagg": _ratio(p.rate, rates["disagg"]) if "disagg" in ran and p.config != "disagg"
                and p.config in ran else None,
            }
        per.append({"slo_itl_ms": slo, "rates": rates,
                    "best_hybrid": None if best is None else {"config": best.config, "rate": best.rate},
                    "best_static": None if best_static is None else {
                        "config": best_static.config, "rate": best_static.rate,
                        "vs_best_hybrid": _ratio(best_static.rate, best.rate if best else None) if any_hybrid else None},
                    "ratios": ratios})
    return {"variant": VARIANT, "attainment_target": ATTAINMENT_TARGET, "slos": list(slos),
            "points": [p._asdict() for p in points], "per_slo": per}


# ---- running -----------------------------------------------------------------------------------


def _sweep_args(args: argparse.Namespace, configs: Sequence[str], out_dir: Path, slo: float) -> argparse.Namespace:
    sub = copy.copy(args)
    sub.configs = ",".join(configs)
    sub.output_dir = str(out_dir)
    sub.slo_itl_ms = slo
    return sub


def run_frontier(args: argparse.Namespace, runner: SweepRunner) -> dict[str, Any]:
    """Run the sweeps the frontier needs with `runner` (a `bench sweep` or a simulated one) into
    args.output_dir, and build the frontier from them."""
    names = [c.name for c in parse_configs(args.configs)]
    slos = parse_slos(args.itl_slos, getattr(args, "profile", None))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    independent = [n for n in names if not slo_dependent(n)]
    dependent = [n for n in names if slo_dependent(n)]
    shared: dict[float, dict[str, Any]] | None = None
    if independent:
        shared_dir = out / "shared"
        # Run once, at the loosest SLO (any would do: the runs do not depend on it); rescored below.
        write_results(runner(_sweep_args(args, independent, shared_dir, slos[-1])), shared_dir)
        shared = {}
        for slo in slos:
            scored = rescore(shared_dir, slo, args.slo_ttft_ms_per_1k)
            slo_dir = shared_dir / f"slo-itl-{slo:g}"
            slo_dir.mkdir(parents=True, exist_ok=True)
            write_results(scored, slo_dir)
            shared[slo] = scored
    per_slo: dict[float, dict[str, Any]] = {}
    for slo in slos if dependent else ():
        per_slo[slo] = runner(_sweep_args(args, dependent, out / f"slo-itl-{slo:g}", slo))
        write_results(per_slo[slo], out / f"slo-itl-{slo:g}")
    frontier = build_frontier(slos, shared, per_slo)
    frontier["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    return frontier


# ---- output ------------------------------------------------------------------------------------


def _fmt_rate(rate: float | None, note: str) -> str:
    if rate is None:
        return "never" if note == "never reached" else "-"
    return f"{rate:.2f}" + ("+" if note == "lower bound" else "")


def _fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return "inf" if math.isinf(r) else f"{r:.2f}x"


def format_frontier(frontier: dict[str, Any]) -> str:
    """One row per SLO: each configuration's highest good rate (req/s; `+`: met at the highest rate
    run, a lower bound), the best hybrid chunk, and the others' ratios to it."""
    notes = {(p["slo_itl_ms"], p["config"]): p["note"] for p in frontier["points"]}
    configs = list(dict.fromkeys(p["config"] for p in frontier["points"]))
    others = [c for c in configs if not c.startswith("hybrid-")]
    any_static = any(is_static(c) for c in configs)
    header = ["ITL SLO ms", *configs, "best hybrid", *(["best static", "static/best"] if any_static else []),
              *(f"{c}/best" for c in others)]
    lines = []
    for entry in frontier["per_slo"]:
        slo = entry["slo_itl_ms"]
        best = entry["best_hybrid"]
        row = [f"{slo:g}"]
        row += [_fmt_rate(entry["rates"].get(c), notes.get((slo, c), "no data")) for c in configs]
        row.append("-" if best is None else best["config"])
        if any_static:
            bs = entry.get("best_static")
            row += ["-" if bs is None else bs["config"].removeprefix("rapid-"),
                    "-" if bs is None else _fmt_ratio(bs["vs_best_hybrid"])]
        row += [_fmt_ratio(entry["ratios"].get(c, {}).get("vs_best_hybrid")) for c in others]
        lines.append(row)
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    text = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    text += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines]
    text.append(f"highest offered rate (req/s) at >= {100 * frontier['attainment_target']:.0f} % of requests "
                "within the SLOs (p95 ITL <= the SLO, TTFT <= its ceiling); + = met at the highest rate run")
    return "\n".join(text)


def write_frontier(frontier: dict[str, Any], out_dir: Path) -> list[Path]:
    """frontier.json (everything) and frontier.csv (one row per SLO and configuration)."""
    json_path, csv_path = out_dir / "frontier.json", out_dir / "frontier.csv"
    json_path.write_text(json.dumps(_json_safe(frontier), indent=2), encoding="utf-8")
    best = {e["slo_itl_ms"]: e["best_hybrid"] for e in frontier["per_slo"]}
    best_static = {e["slo_itl_ms"]: e.get("best_static") for e in frontier["per_slo"]}
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["slo_itl_ms", "config", "max_good_rate", "note", "best_hybrid", "vs_best_hybrid", "best_static"])
        ratios = {e["slo_itl_ms"]: e["ratios"] for e in frontier["per_slo"]}
        for p in frontier["points"]:
            b, bs = best[p["slo_itl_ms"]], best_static[p["slo_itl_ms"]]
            r = ratios[p["slo_itl_ms"]].get(p["config"], {}).get("vs_best_hybrid")
            w.writerow([p["slo_itl_ms"], p["config"], "" if p["rate"] is None else p["rate"], p["note"],
                        "" if b is None else b["config"], "" if r is None else r, "" if bs is None else bs["config"]])
    return [json_path, csv_path]


def plot_frontier(frontier: dict[str, Any], out_dir: Path) -> Path:
    """frontier.png: x the ITL SLO (ms), y the highest good rate (req/s); one line per mode, the
    hybrid mode drawn as its best chunk at each SLO (labelled with the chunk)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4.8))
    ax = fig.add_subplot()
    slos = [e["slo_itl_ms"] for e in frontier["per_slo"]]
    markers = iter("sD^v<>px*h")
    best = [e["best_hybrid"] for e in frontier["per_slo"]]
    if any(p["config"].startswith("hybrid-") for p in frontier["points"]):
        # No chunk reaching the target at an SLO: a good rate of 0 there.
        ys = [b["rate"] if b is not None else 0.0 for b in best]
        ax.plot(slos, ys, "o-", color="black", lw=2, label="hybrid (best chunk)")
        for x, y, b in zip(slos, ys, best):
            ax.annotate("none" if b is None else b["config"].removeprefix("hybrid-"), (x, y),
                        textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if any(is_static(p["config"]) for p in frontier["points"]):
        # The static splits drawn as the best one at each SLO (labelled with its decode SMs).
        bs = [e.get("best_static") for e in frontier["per_slo"]]
        ys = [b["rate"] if b is not None else 0.0 for b in bs]
        ax.plot(slos, ys, "s-", color="tab:gray", lw=1.5, label="rapid static (best split)")
        for x, y, b in zip(slos, ys, bs):
            ax.annotate("none" if b is None else "D" + b["config"].removeprefix("rapid-static:"), (x, y),
                        textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7, color="tab:gray")
    configs = list(dict.fromkeys(p["config"] for p in frontier["points"]
                                 if not p["config"].startswith("hybrid-") and not is_static(p["config"])))
    for c in configs:
        ys = [(e["rates"].get(c) or 0.0) if c in e["rates"] else math.nan for e in frontier["per_slo"]]
        ax.plot(slos, ys, marker=next(markers, "o"), ls="--", label=c, alpha=0.85)
    ax.set_xscale("log")
    ax.set_xticks(slos, [f"{s:g}" for s in slos])
    ax.minorticks_off()
    ax.set_xlabel("ITL SLO (ms, each request's p95)")
    ax.set_ylabel("highest good rate (req/s)")
    ax.set_title(f"SLO frontier: highest rate at >= {100 * frontier['attainment_target']:.0f} % attainment")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.subplots_adjust(right=0.74)
    path = out_dir / "frontier.png"
    fig.savefig(path, dpi=120)
    return path


# ---- command line ------------------------------------------------------------------------------

DEFAULT_CONFIGS = "hybrid-128,hybrid-256,hybrid-512,hybrid-1024,hybrid-2048,disagg,rapid-rapid,rapid-nexus"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from rapidserve.bench import sweep

    sweep.add_cli_args(parser)
    parser.set_defaults(configs=DEFAULT_CONFIGS, output_dir="frontier-results", func=main)
    parser.add_argument("--itl-slos", default="1.5x,2x,3x,6x",
                        help="ITL SLOs, comma-separated: ms, or multiples Nx of the model's batch-32 decode "
                             "step on the whole device (from --profile); --slo-itl-ms is ignored")


def main(args: argparse.Namespace, runner: SweepRunner | None = None) -> int:
    from rapidserve.bench.sweep import run_sweep

    frontier = run_frontier(args, runner or run_sweep)
    out = Path(args.output_dir)
    paths = write_frontier(frontier, out)
    if not args.no_plots:
        paths.append(plot_frontier(frontier, out))
    print(format_frontier(frontier))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
