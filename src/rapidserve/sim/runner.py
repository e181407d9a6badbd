"""Stand-in model runners: the calls the engine and the workers make on a ModelRunner, answered
by pricing each step with the step-cost model on the virtual clock instead of running it.

Tokens: every sampled token is `SIM_TOKEN`, never an end-of-sequence id, so a request stops only
by its max_tokens (the workload's output length), as the benchmark's requests do with
ignore_eos.

A step's device time is fixed when it starts on the device (the runner's stream is free and the
loop reached its start): from its own load, its partition, and what the other worker runs at
that instant (the loop prices steps before any turn at the same instant, rapidserve.sim.clock).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rapidserve.scheduler.chunked import ScheduledRequest
from rapidserve.sim.clock import PRICE, Clock, EventLoop
from rapidserve.sim.costs import PrefillLoad

SIM_TOKEN = 13  # an ordinary token id (not an EOS of the presets)
_CPU = torch.device("cpu")


class SimStep:
    """A launched step (the StepResult of a stand-in runner): `tokens()` moves its worker's
    clock to the step's end."""

    __slots__ = ("scheduled", "num_tokens", "clock", "start", "end", "device", "batch", "kv_tokens", "loads")

    def __init__(self, scheduled: list[ScheduledRequest], num_tokens: int, clock: Clock) -> None:
        self.scheduled = scheduled
        self.num_tokens = num_tokens
        self.clock = clock
        self.start = 0.0
        self.end: float | None = None  # known once the step started on the device (priced)
        self.device: float | None = None  # its device time (end - start without the host's)
        self.batch = 0
        self.kv_tokens = 0
        self.loads: list[PrefillLoad] = []

    def tokens(self) -> list[int]:
        # NOTE: the step has started by the time anyone waits for it (its worker's turn comes
        # after its start, and steps are priced before turns): its end is known.
        assert self.end is not None, "waited for a step that has not started on the device"
        if self.clock.now < self.end:
            self.clock.now = self.end
        return [SIM_TOKEN] * self.num_tokens

    def logprobs(self) -> list[None]:
        """No logprobs in a simulation (its tokens are fixed, not sampled)."""
        return [None] * self.num_tokens

    def prompt_logprobs(self) -> dict[str, Any]:
        """None either (a simulated step computes no logits)."""
        return {}

    def device_s(self) -> float | None:
        """The step's device time, as the closed loop reads a real step's (after tokens())."""
        return self.device


class _Runner:
    """What every stand-in runner has of a ModelRunner's surface."""

    def __init__(self, loop: EventLoop, clock: Clock, cost: Any) -> None:
        self.loop, self.clock, self.cost = loop, clock, cost
        self.generators: dict[str, Any] = {}  # no seeded sampling here: tokens are fixed
        self.device = _CPU
        self.partition_graph_keys: tuple[Any, ...] = ()
        self.num_steps = 0
        self.busy_s = 0.0  # device time of its steps
        self.last: SimStep | None = None  # the latest step priced
        self.timeline = None  # no step timeline in a simulation

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def use_partition(self, key: Any, sms: int) -> None:
        """The partition's graphs: nothing to switch here (the runner reads the partition in
        force when it prices a step)."""

    def drop_graphs(self) -> None:
        pass

    def running_at(self, t: float) -> SimStep | None:
        """The step this runner has on the device at time t, if any."""
        s = self.last
        if s is not None and s.end is not None and s.start <= t < s.end:
            return s
        return None

    def submit_isolated(self, scheduled: list[ScheduledRequest], prev: Any = None,
                        between_groups: Any = None) -> tuple[SimStep, list[Any]]:
        """As ModelRunner's: a simulated step never fails a request."""
        return self.submit(scheduled, prev), []

    def submit(self, scheduled: list[ScheduledRequest], prev: Any = None) -> SimStep:
        raise NotImplementedError

    def _price(self, step: SimStep, seconds: float) -> None:
        step.device = seconds
        step.end = step.start + seconds + self.cost.host_overhead_s
        self.busy_s += step.end - step.start
        self.last = step


def split_loads(scheduled: Sequence[ScheduledRequest]) -> tuple[list[PrefillLoad], int, int]:
    """(prefill loads, decode sequences, their KV tokens) of a step, classified as StepStats.of
    does: a one-token step past the prompt is a decode (it reads its whole context)."""
    loads: list[PrefillLoad] = []
    decode = kv = 0
    for s in scheduled:
        if s.num_new_tokens == 1 and s.start >= s.request.num_prompt_tokens:
            decode += 1
            kv += s.start + 1
        else:
            loads.append(PrefillLoad(s.num_new_tokens, s.start))
    return loads, decode, kv


class HybridRunner(_Runner):
    """The hybrid engine's runner: one step at a time on the whole device."""

    def submit(self, scheduled: list[ScheduledRequest], prev: Any = None) -> SimStep:
        step = SimStep(scheduled, sum(1 for s in scheduled if s.samples), self.clock)
        last = self.last
        step.start = max(self.clock.now, last.end if last is not None and last.end is not None else 0.0)
        step.loads, step.batch, step.kv_tokens = split_loads(scheduled)
        self._price(step, self.cost.hybrid_step_s(step.loads, step.batch, step.kv_tokens))
        self.num_steps += 1
        return step

    def execute(self, scheduled: list[ScheduledRequest]) -> list[int]:
        return self.submit(scheduled).tokens()


class DecodeRunner(_Runner):
    """The decode worker's runner (rapid: in the partition its policy decided; disagg: on its
    static split). A step queued behind the one in flight starts when that one ends."""

    def __init__(self, loop: EventLoop, clock: Clock, cost: Any, sms: Callable[[], int | None],
                 beside: Callable[[float], SimStep | None]) -> None:
        """sms: decode SMs now (None: the whole device); beside: the other side's step at a time."""
        super().__init__(loop, clock, cost)
        self.sms = sms
        self.beside = beside
        self._queued: SimStep | None = None

    def submit(self, scheduled: list[ScheduledRequest], prev: Any = None) -> SimStep:
        step = SimStep(scheduled, len(scheduled), self.clock)
        step.batch = len(scheduled)
        step.kv_tokens = sum(s.start + 1 for s in scheduled)
        sms = self.sms()  # the partition decided for this step (before_step ran first)
        last = self.last
        if self._queued is not None:
            raise AssertionError("a decode step was launched with two steps in flight")
        end = 0.0 if last is None else last.end
        assert end is not None
        step.start = max(self.clock.now, end)
        self.num_steps += 1
        if step.start <= self.loop.now:
            self._start(step, sms)
        else:
            self._queued = step
            self.loop.at(step.start, PRICE, lambda: self._start(step, sms))
        return step

    def _start(self, step: SimStep, sms: int | None) -> None:
        self._queued = None
        other = self.beside(step.start)
        loads = other.loads if other is not None else ()
        self._price(step, self.cost.decode_step_s(step.batch, step.kv_tokens, sms, loads))


class PrefillRunner(_Runner):
    """The prefill worker's (or instance's) runner: whole prompts, one batch at a time, waited
    for at once (`execute`)."""

    def __init__(self, loop: EventLoop, clock: Clock, cost: Any, sms: Callable[[], int | None],
                 beside: Callable[[float], SimStep | None]) -> None:
        super().__init__(loop, clock, cost)
        self.sms = sms
        self.beside = beside

    def submit(self, scheduled: list[ScheduledRequest], prev: Any = None) -> SimStep:
        step = SimStep(scheduled, len(scheduled), self.clock)
        step.start = self.clock.now
        step.loads = [PrefillLoad(s.num_new_tokens, s.start) for s in scheduled]
        other = self.beside(step.start)
        decode = (other.batch, other.kv_tokens) if other is not None else None
        self._price(step, self.cost.prefill_step_s(step.loads, self.sms(), decode))
        self.num_steps += 1
        return step

    def execute(self, scheduled: list[ScheduledRequest]) -> list[int]:
        return self.submit(scheduled).tokens()

    def extend(self, seconds: float) -> None:
        """More work on this side's stream after its step (a KV copy), waited for too."""
        step = self.last
        assert step is not None and step.end is not None
        step.end += seconds
        self.busy_s += seconds
        self.clock.now = max(self.clock.now, step.end)
