"""Per-request timings of a serving benchmark and their summary, defined as `vllm bench serve`
defines them, plus the paper's goodput.

Definitions (every time in seconds in a record, in milliseconds in the summary):
- TTFT: request sent -> first streamed chunk carrying a choice (a token's chunk).
- ITL: the gaps between successive such chunks of one request; percentiles pool every gap of
  every successful request (vLLM does the same, so long outputs weigh more).
- TPOT: per request, (E2EL - TTFT) / (output_len - 1), only for output_len > 1.
- E2EL: request sent -> the last chunk carrying a choice.
- throughputs: completed requests, output tokens, prompt + output tokens, each over the run's
  duration (first request sent -> last one done).
- goodput: a request is good if its ITL is within `slo_itl_ms` (judged by its p95 gap, or by its
  largest gap: two variants) and its TTFT within `slo_ttft_ms_per_1k` x ceil(prompt_len / 1000).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class RequestRecord:
    """One request's outcome. `itls` are the gaps (s) between successive token chunks."""

    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    itls: tuple[float, ...] = field(default_factory=tuple)
    e2el: float = 0.0
    success: bool = False
    error: str = ""

    @property
    def tpot(self) -> float | None:
        # The first token's time is TTFT: TPOT averages only the tokens after it.
        if self.output_len > 1:
            return (self.e2el - self.ttft) / (self.output_len - 1)
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["itls"] = list(self.itls)
        return d


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float]:
    """mean / median / std / p90 / p95 / p99 of `values_s` in ms, keyed as vLLM's result JSON."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        # vLLM reports 0 for an empty series rather than failing (e.g. every output 1 token).
        arr = np.zeros(1)
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def ttft_slo_ms(prompt_len: int, slo_ttft_ms_per_1k: float) -> float:
    """The paper's TTFT ceiling: it grows by one step per started 1000 prompt tokens."""
    return slo_ttft_ms_per_1k * max(1, math.ceil(prompt_len / 1000))


def _itl_p95_ms(r: RequestRecord) -> float:
    return float(np.percentile(np.asarray(r.itls) * 1000.0, 95)) if r.itls else 0.0


def _itl_max_ms(r: RequestRecord) -> float:
    return max(r.itls) * 1000.0 if r.itls else 0.0


def summarize(records: Sequence[RequestRecord], duration_s: float,
              slo_itl_ms: float | None = None, slo_ttft_ms_per_1k: float | None = None) -> dict[str, Any]:
    """The run's summary (vLLM's keys where vLLM has one), goodput keys when an SLO is given."""
    ok = [r for r in records if r.success]
    completed = len(ok)
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    out: dict[str, Any] = {
        "duration": duration_s,
        "num_prompts": len(records),
        "completed": completed,
        "failed": len(records) - completed,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": completed / dur,
        "output_throughput": total_output / dur,
        "total_token_throughput": (total_input + total_output) / dur,
    }
    out.update(_stats("ttft", [r.ttft for r in ok]))
    out.update(_stats("tpot", [t for r in ok if (t := r.tpot) is not None]))
    out.update(_stats("itl", [g for r in ok for g in r.itls]))
    out.update(_stats("e2el", [r.e2el for r in ok]))

    if slo_itl_ms is not None or slo_ttft_ms_per_1k is not None:
        def ttft_ok(r: RequestRecord) -> bool:
            return slo_ttft_ms_per_1k is None or r.ttft * 1000.0 <= ttft_slo_ms(r.prompt_len, slo_ttft_ms_per_1k)

        def itl_ok(value_ms: float) -> bool:
            return slo_itl_ms is None or value_ms <= slo_itl_ms

        # Attainment is over every request sent: a failed request never meets an SLO.
        n = max(len(records), 1)
        good_p95 = sum(1 for r in ok if ttft_ok(r) and itl_ok(_itl_p95_ms(r)))
        good_max = sum(1 for r in ok if ttft_ok(r) and itl_ok(_itl_max_ms(r)))
        good_itl = sum(1 for r in ok if itl_ok(_itl_p95_ms(r)))
        good_ttft = sum(1 for r in ok if ttft_ok(r))
        out.update({
            "slo_itl_ms": slo_itl_ms,
            "slo_ttft_ms_per_1k": slo_ttft_ms_per_1k,
            "good_requests_p95_itl": good_p95,
            "good_requests_max_itl": good_max,
            "goodput_p95_itl": good_p95 / dur,
            "goodput_max_itl": good_max / dur,
            "goodput_itl_only": good_itl / dur,
            "attainment_p95_itl": good_p95 / n,
            "attainment_max_itl": good_max / n,
            "attainment_itl_only": good_itl / n,
            "attainment_ttft_only": good_ttft / n,
        })
    return out
