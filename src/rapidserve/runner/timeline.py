"""When each step ran on the device, for showing that two workers' steps overlap in time.

On CUDA a step's start and end are CUDA events recorded around its launch on the worker's
stream, converted to the host's monotonic clock through a reference event taken at a known host
time: `time.monotonic()` is one clock for every process of the machine, so the decode and prefill
workers' timelines can be laid side by side even when they are two processes. On CPU a step runs
synchronously and is timed on the host directly. Off unless `--step-timeline DIR` is given.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch


class StepSpan(NamedTuple):
    role: str
    num_tokens: int
    num_seqs: int
    start_s: float  # time.monotonic() seconds
    end_s: float


class Mark(NamedTuple):
    """A moment of a partition switch on the host's monotonic clock: the decode worker's
    decision ("decide") or the prefill worker's move ("follow", with the decision's time)."""

    role: str
    kind: str  # "decide" or "follow"
    partition: str
    at_s: float  # time.monotonic() seconds
    decided_s: float | None = None  # follow: when the decode worker decided the switch

    @property
    def reaction_s(self) -> float | None:
        """follow: decision to both sides on the new partition (the decode side moves at once)."""
        return None if self.decided_s is None else self.at_s - self.decided_s


class StepTimeline:
    def __init__(self, role: str, device: torch.device) -> None:
        self.role = role
        self.cuda = device.type == "cuda"
        self._open: list[tuple[int, int, Any, Any]] = []  # (tokens, seqs, start, end) not converted yet
        self.spans: list[StepSpan] = []
        self.marks: list[Mark] = []
        if self.cuda:
            torch.cuda.synchronize(device)
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()
            self._ref.synchronize()
            self._ref_host_s = time.monotonic()

    def begin(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.monotonic()

    def end(self, start: Any, num_tokens: int, num_seqs: int) -> None:
        """Close a step opened with begin() (on CUDA: after its work was queued)."""
        self._open.append((num_tokens, num_seqs, start, self.begin()))
        if len(self._open) >= 256:
            self.flush()

    def mark(self, kind: str, partition: str, decided_s: float | None = None) -> None:
        """A partition switch now (host time: the moment the worker's next kernels go to the new
        partition; on CUDA the device follows once the work queued before it is done)."""
        self.marks.append(Mark(self.role, kind, partition, time.monotonic(), decided_s))

    def flush(self) -> None:
        """Convert the finished steps' events to host times (waits for the last one)."""
        for tokens, seqs, start, end in self._open:
            if self.cuda:
                end.synchronize()
                start_s = self._ref_host_s + self._ref.elapsed_time(start) / 1e3
                end_s = self._ref_host_s + self._ref.elapsed_time(end) / 1e3
            else:
                start_s, end_s = start, end
            self.spans.append(StepSpan(self.role, tokens, seqs, start_s, end_s))
        self._open.clear()

    def dump(self, directory: str) -> Path:
        """Write the spans to DIRECTORY/{role}-{pid}.json; returns the path."""
        self.flush()
        path = Path(directory) / f"{self.role}-{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"role": self.role, "spans": [s._asdict() for s in self.spans],
                                    "marks": [k._asdict() for k in self.marks]}))
        return path


def load_spans(directory: str) -> list[StepSpan]:
    """Every span written to a timeline directory, sorted by start."""
    spans = []
    for path in sorted(Path(directory).glob("*.json")):
        data = json.loads(path.read_text())
        spans.extend(StepSpan(**s) for s in data["spans"])
    return sorted(spans, key=lambda s: s.start_s)


def load_marks(directory: str) -> list[Mark]:
    """Every partition-switch mark written to a timeline directory, sorted by time."""
    marks = []
    for path in sorted(Path(directory).glob("*.json")):
        marks.extend(Mark(**k) for k in json.loads(path.read_text()).get("marks", []))
    return sorted(marks, key=lambda k: k.at_s)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two sorted, disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


class Overlap(NamedTuple):
    a_busy_s: float
    b_busy_s: float
    both_s: float  # time when a step of each role was running

    @property
    def fraction_of_b(self) -> float:
        """Of the time role b was busy, the part role a was busy too."""
        return self.both_s / self.b_busy_s if self.b_busy_s else 0.0


def overlap(spans: list[StepSpan], a: str, b: str, since_s: float = float("-inf"),
            until_s: float = float("inf")) -> Overlap:
    """How much the steps of role a and role b ran at the same time, within [since, until]."""
    def busy(role: str) -> list[tuple[float, float]]:
        return _union([(max(s.start_s, since_s), min(s.end_s, until_s)) for s in spans
                       if s.role == role and s.end_s > since_s and s.start_s < until_s])

    xa, xb = busy(a), busy(b)
    return Overlap(_length(xa), _length(xb), _intersection(xa, xb))
