"""The virtual clock: a discrete-event loop, each worker's own time, and in-memory inboxes whose
messages arrive at the time their sender put them.

A worker's turn runs at one instant of the loop; within it the worker's own clock moves on only
when it waits for a step's tokens (the runner's `tokens()`), and whatever it puts afterwards is
stamped with that later time. A message is visible to its receiver once the receiver's clock has
reached its stamp; a receiver that sleeps on an empty inbox is woken at the stamp.

NOTE: events at one instant run in priority order: a step that starts on the device is priced
(`PRICE`) before any worker's turn (`TURN`) at that instant reads its result or prices a step of
its own beside it; ties keep the order they were scheduled in.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any, Protocol

from rapidserve.serving.workers import _IDLE_WAIT_S

# As the device workers wait on an empty inbox (rapidserve.serving.workers._IDLE_WAIT_S).
IDLE_WAIT_S = _IDLE_WAIT_S

PRICE = 0  # a step starts on the device: its duration is fixed from what runs beside it now
ARRIVAL = 1  # a request reaches the engine
TURN = 2  # a worker's turn


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, t: float, priority: int, fn: Callable[[], None]) -> None:
        if t < self.now:
            raise ValueError(f"an event at {t} s is in the past (now {self.now} s)")
        heapq.heappush(self._heap, (t, priority, next(self._seq), fn))

    def run(self) -> None:
        """Run every event in time order until none is left."""
        heap = self._heap
        while heap:
            t, _, _, fn = heapq.heappop(heap)
            self.now = t
            fn()


class Clock:
    """A worker's own time: the loop's time when its turn began, later once it waited for a step."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class Turns(Protocol):
    """A worker's logic (rapidserve.serving.workers.DecodeTurns, PrefillTurns, ...)."""

    @property
    def idle(self) -> bool: ...

    def turn(self, msgs: list[Any]) -> bool: ...


class Inbox:
    """A worker's queue on the virtual clock: `put` by the sender (stamped with the sender's
    clock), read by the receiver's driver (`take`)."""

    def __init__(self, sender: Clock) -> None:
        self.sender = sender
        self._items: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self.receiver: Driver | None = None

    def put(self, msg: Any) -> None:
        t = self.sender.now
        heapq.heappush(self._items, (t, next(self._seq), msg))
        if self.receiver is not None:
            self.receiver.notify(t)

    def put_at(self, t: float, msg: Any) -> None:
        """A message from outside the workers (the front: a new request) at time t."""
        heapq.heappush(self._items, (t, next(self._seq), msg))
        if self.receiver is not None:
            self.receiver.notify(t)

    def take(self, now: float) -> list[Any]:
        """Every message stamped up to `now`, in stamp order (one sender's in its order)."""
        out = []
        items = self._items
        while items and items[0][0] <= now:
            out.append(heapq.heappop(items)[2])
        return out

    def next_time(self) -> float | None:
        return self._items[0][0] if self._items else None


class Driver:
    """Runs a worker's turns on the loop: again at once while it has work (its clock moved on by
    the step it waited for), else when its next message arrives, as the real worker blocks on
    its inbox when idle."""

    def __init__(self, loop: EventLoop, clock: Clock, logic: Turns, inbox: Inbox,
                 progress: Callable[[], int], idle_wait_s: float = IDLE_WAIT_S) -> None:
        """progress: a counter that moves when the worker launches a step (its runner's);
        idle_wait_s: how long the worker blocks on an empty inbox before it turns anyway."""
        self.loop, self.clock, self.logic, self.inbox = loop, clock, logic, inbox
        self.idle_wait_s = idle_wait_s
        self.progress = progress
        inbox.receiver = self
        self._next: float | None = None  # the time of its scheduled turn, None while it sleeps
        self._in_turn = False
        self._on_inbox = True  # blocked on the inbox (asleep, or in an idle wait)
        self.stopped = False

    def notify(self, t: float) -> None:
        """A message stamped t is in the inbox: wake at t if blocked on the inbox (a worker
        waiting for a step's tokens reads it at its next turn)."""
        if self._on_inbox and not self._in_turn and not self.stopped:
            self.wake_at(max(t, self.clock.now))

    def wake_at(self, t: float, on_inbox: bool = False) -> None:
        if self._next is not None and self._next <= t:
            return
        self._next = t
        self._on_inbox = on_inbox
        self.loop.at(t, TURN, lambda: self._turn(t))

    def _turn(self, t: float) -> None:
        if self._next != t or self.stopped:
            return  # superseded by an earlier wake-up
        self._next = None
        self._on_inbox = False
        clock = self.clock
        clock.now = max(clock.now, t)
        before_time, before_steps = clock.now, self.progress()
        msgs = self.inbox.take(clock.now)
        self._in_turn = True
        try:
            if not self.logic.turn(msgs):
                self.stopped = True
                return
        finally:
            self._in_turn = False
        moved = bool(msgs) or clock.now != before_time or self.progress() != before_steps
        if moved and not self.logic.idle:
            self.wake_at(clock.now)
            return
        nxt = self.inbox.next_time()
        self._on_inbox = True
        if moved:
            # An idle worker blocks on its inbox for at most idle_wait_s, then turns anyway (its
            # last turn may have freed what a next one uses: blocks retired after a preemption).
            self.wake_at(clock.now + self.idle_wait_s, on_inbox=True)
        # NOTE: a turn without news, a step or a wait would repeat itself exactly: the worker's
        # state changes only by a message now, so it sleeps until the next one.
        if nxt is not None:
            self.wake_at(max(nxt, clock.now), on_inbox=True)
