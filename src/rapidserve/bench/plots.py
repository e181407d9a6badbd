"""Plots of a `bench sweep`, in the style of the paper's Figures 8-12: one line per configuration,
offered load (QPS) on x. Each metric is drawn in its own units (tokens/s, req/s, ms) on the top
row and, below it, normalized to the baseline configuration (chunked prefill, 512 tokens) at its
lowest QPS, as the paper normalizes (no second row when the baseline is not in the sweep or its
value there is 0). One legend per figure, outside the axes; hollow markers of decreasing sizes
keep series that coincide (e.g. several at 0 goodput) visible.

matplotlib's object API with the Agg canvas: no display, no pyplot global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple


class Panel(NamedTuple):
    key: str       # the row's metric
    label: str     # its name
    unit: str      # shown when not normalized
    normalize: bool


# file name, figure title, panels
FIGURES: tuple[tuple[str, str, tuple[Panel, ...]], ...] = (
    ("throughput.png", "Throughput vs offered load (Fig. 8)",
     (Panel("output_throughput", "output token throughput", "tokens/s", True),)),
    ("goodput.png", "Goodput vs offered load (Fig. 9)",
     (Panel("goodput_p95_itl", "goodput, p95 ITL", "req/s", True),
      Panel("goodput_max_itl", "goodput, max ITL", "req/s", True))),
    ("goodput_itl_only.png", "ITL-only goodput vs offered load (Fig. 10)",
     (Panel("goodput_itl_only", "ITL-only goodput", "req/s", True),)),
    ("latency_p95.png", "Tail latencies vs offered load (Fig. 11)",
     (Panel("p95_ttft_ms", "p95 TTFT", "ms", True), Panel("p95_itl_ms", "p95 ITL", "ms", True))),
    ("gpu_util.png", "GPU utilization vs offered load (Fig. 12)",
     (Panel("gpu_util_pct", "GPU utilization", "%", False),)),
)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def baseline_value(rows: Sequence[dict[str, Any]], key: str, baseline: str) -> tuple[float, float] | None:
    """(the baseline's `key` at its lowest measured rate, that rate), or None when there is no
    usable (finite, non-zero) value to divide by."""
    base = [r for r in rows if r["config"] == baseline and r["status"] == "ok" and _finite(r["request_rate"])]
    if not base:
        return None
    first = min(base, key=lambda r: r["request_rate"])
    v = first.get(key)
    return (float(v), float(first["request_rate"])) if _finite(v) and v != 0 else None


_MARKERS = "osD^vP*X"


def sweep_figure(rows: Sequence[dict[str, Any]], title: str, panels: Sequence[Panel],
                 baseline: str = "hybrid-512") -> Any:
    """One figure: a column per panel; the absolute values on top, the normalized ones below
    (when the baseline gives something to divide by)."""
    from matplotlib.figure import Figure  # Agg canvas for savefig: no display needed

    ok = [r for r in rows if r["status"] == "ok" and _finite(r["request_rate"])]
    configs = list(dict.fromkeys(r["config"] for r in ok))
    norms = [baseline_value(ok, p.key, baseline) if p.normalize else None for p in panels]
    nrows = 2 if any(norms) else 1
    fig = Figure(figsize=(5.2 * len(panels) + 1.8, 3.4 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, len(panels), squeeze=False)
    handles: dict[str, Any] = {}
    for col, (panel, norm) in enumerate(zip(panels, norms)):
        for row in range(nrows):
            ax = axes[row][col]
            if row == 1 and norm is None:
                ax.set_visible(False)
                continue
            scale = norm[0] if row == 1 and norm else 1.0
            for i, name in enumerate(configs):
                pts = sorted((r["request_rate"], r[panel.key]) for r in ok
                             if r["config"] == name and _finite(r.get(panel.key)))
                if not pts:
                    continue
                # NOTE: hollow markers, each series smaller than the one before and drawn above
                # it: series with equal values (all zero, say) stay visible as nested rings.
                (line,) = ax.plot([x for x, _ in pts], [y / scale for _, y in pts],
                                  marker=_MARKERS[i % len(_MARKERS)], markersize=max(11 - 1.5 * i, 3.5),
                                  markerfacecolor="none", markeredgewidth=1.4, linewidth=1.2,
                                  linestyle="--" if name == baseline else "-", zorder=2 + i)
                handles.setdefault(name, line)
            if row == 1 and norm:
                ax.set_ylabel(f"{panel.label}\n(x {baseline} at {norm[1]:g} QPS)")
                ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
            else:
                ax.set_ylabel(f"{panel.label} ({panel.unit})")
            if row == nrows - 1 or (row == 0 and norm is None):
                ax.set_xlabel("offered load (req/s)")
            ax.grid(True, alpha=0.3)
            ax.margins(x=0.06, y=0.1)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize="small",
                   title="configuration")
    fig.suptitle(title)
    return fig


def plot_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path, baseline: str = "hybrid-512") -> list[Path]:
    """Write the figures that have data; their paths."""
    out = Path(out_dir)
    ok = [r for r in rows if r["status"] == "ok" and _finite(r["request_rate"])]
    paths: list[Path] = []
    for filename, title, panels in FIGURES:
        if not any(_finite(r.get(p.key)) for r in ok for p in panels):
            continue  # e.g. no GPU utilization on a CPU machine
        fig = sweep_figure(rows, title, panels, baseline)
        path = out / filename
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def plot_timeline(spans: Sequence[Any], path: str | Path, since_s: float, until_s: float,
                  title: str = "Steps on the device") -> Path:
    """A Gantt chart of step spans (`runner.timeline.StepSpan`: role, tokens, start, end), one
    row per role, within [since, until] (seconds on the x axis from `since`): where decode and
    prefill bars overlap, both phases ran at once."""
    from matplotlib.figure import Figure

    roles = sorted({s.role for s in spans}, key=lambda r: {"decode": 0, "prefill": 1}.get(r, 2))
    fig = Figure(figsize=(10, 1.2 + 0.8 * len(roles)))
    ax = fig.add_subplot()
    colors = {"decode": "tab:blue", "prefill": "tab:orange", "hybrid": "tab:green"}
    for row, role in enumerate(roles):
        bars = [(s.start_s - since_s, s.end_s - s.start_s) for s in spans
                if s.role == role and s.end_s > since_s and s.start_s < until_s]
        ax.broken_barh(bars, (row - 0.35, 0.7), facecolors=colors.get(role, "tab:gray"))
    ax.set_yticks(range(len(roles)), roles)
    ax.set_xlim(0, until_s - since_s)
    ax.set_xlabel("seconds")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
