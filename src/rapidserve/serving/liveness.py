"""Liveness of the worker processes (rapid and disagg topologies, process placement).

Two guarantees, one per direction:

- **A worker never outlives the front.** Whatever ends the front's process (SIGKILL included),
  each worker exits: on Linux the kernel kills it (`PR_SET_PDEATHSIG`, set as the worker
  starts); everywhere, a watchdog thread in the worker waits on the pipe to the parent that
  multiprocessing keeps open (`multiprocessing.parent_process().sentinel`, readable once the
  parent is gone) and ends the process. Once no worker holds them, multiprocessing's resource
  tracker unlinks the queues' named semaphores (`/dev/shm/sem.mp-*`); the weights and KV cache
  on CPU are shared through unlinked segments and vanish with their last holder.
- **The front notices a worker that died or went silent within a bound, even while idle.** Each
  worker's watchdog thread also beats: it stores `time.monotonic()` (one system-wide clock on
  Linux and macOS) in a shared double every `interval` seconds; the front reads those doubles
  (`Heartbeats.silent`) whenever it polls its workers, so a beat costs no message, no queue, no
  lock, and the front does not have to drain anything to check.

NOTE: the beat comes from a thread of its own, not from the worker's loop. A worker inside a
long step (a CPU prefill of a big prompt, a first Triton compile on the GPU) is busy, not hung,
and keeps beating; a worker that is stopped (SIGSTOP), dead, or frozen as a whole process goes
silent. What a beating thread cannot show is a worker whose main thread is wedged while its
process runs (a GPU kernel that never ends, a deadlock inside a step): the step watch does.
- **The front notices a step that never ends.** Each worker's main thread stores when its current
  step started (`StepClock`, a second shared double beside the beat; 0 between steps); the front
  (`StepWatch.hung`) fails the engine when one step has run longer than `--step-timeout-s`. A
  step is one turn of the worker's loop: from taking its inbox's messages to waiting on it
  again (scheduling, launching the forward, reading its tokens back, replying); a prefill step
  run in layer groups restarts the clock at each group (between two groups it is back in its
  loop's hands). Start-up (loading, CUDA graph capture) is not a step: it has its own bound.
  It works the same under thread placement (the slots are then plain doubles of one process).
  The hybrid mode has no workers: its steps run on the server's engine thread (`AsyncEngine`),
  which cannot watch itself, so a `StepWatcher` thread judges that thread's clock instead.
NOTE: PR_SET_PDEATHSIG fires when the *thread* that spawned the worker ends, not the process,
so the front asks for it only when it spawns from the main thread; from another thread the
pipe watchdog alone does the job (it also covers platforms without prctl).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rapidserve.engine")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
BEAT_INTERVAL_S = 0.5  # the most often a worker beats (the front's bound is several of these)
PARENT_GONE_EXIT_CODE = 70  # what a worker exits with when its front has died (EX_SOFTWARE)
# A worker that has returned exits once its queues' feeder threads have flushed; one writing to
# a peer that is stopped or dead never would (its pipe is full), so it is cut short after this.
EXIT_FLUSH_S = 2.0


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) ends. Linux only;
    returns whether it is set."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def beat_interval(timeout_s: float) -> float:
    """How often a worker beats for a front that waits `timeout_s` (several beats per bound, so
    that one late wake-up of a loaded machine does not trip it)."""
    return min(BEAT_INTERVAL_S, timeout_s / 4)


class Pulse:
    """The watchdog thread of a worker process: beats into `slot` every `interval` seconds and
    ends the process as soon as the parent's pipe says the parent is gone."""

    def __init__(self, role: str, slot: Any, interval: float) -> None:
        self.role, self.slot, self.interval = role, slot, interval
        parent = multiprocessing.parent_process()
        self._parent_sentinel = parent.sentinel if parent is not None else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rapidserve-{role}-pulse", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """No more beats (not joined: a daemon thread ends with the process, and waiting out its
        current interval would only delay the worker's exit)."""
        self._stop.set()

    def beat(self) -> None:
        if self.slot is not None:
            self.slot.value = time.monotonic()

    def _run(self) -> None:
        sentinels = [self._parent_sentinel] if self._parent_sentinel is not None else []
        while not self._stop.is_set():
            if sentinels and multiprocessing.connection.wait(sentinels, timeout=self.interval):
                # The parent is gone: nobody will read our output or stop us. End at once, without
                # Python's exit handlers: they could block on queues whose reader is dead.
                try:  # (stderr may have been a pipe to the dead parent)
                    print(f"rapidserve {self.role} worker: the engine process is gone; exiting",
                          file=sys.stderr, flush=True)
                finally:
                    os._exit(PARENT_GONE_EXIT_CODE)
            if not sentinels:
                self._stop.wait(self.interval)
            self.beat()


def worker_entry(
    role: str, slot: Any, interval: float, pdeathsig: bool, target: Callable[..., None], args: tuple[Any, ...],
    tmpdir: str | None = None,
) -> None:
    """A worker process's entry point: its liveness first (parent-death signal, watchdog,
    heartbeat), then `target(*args)`. Under thread placement the front calls `target` directly.

    `tmpdir`: a directory the front owns and removes after the workers are gone; the worker's
    temporary files go there (multiprocessing's `pymp-*` socket directory, which passing a
    tensor's file descriptor creates), so a worker that is killed leaves none behind."""
    parent = multiprocessing.parent_process()
    if parent is not None and pdeathsig and set_parent_death_signal() and os.getppid() != parent.pid:
        os._exit(PARENT_GONE_EXIT_CODE)  # the parent died before the signal was armed
    if tmpdir is not None:
        tempfile.tempdir = tmpdir
    pulse = Pulse(role, slot, interval)
    pulse.start()
    try:
        target(*args)
    finally:
        pulse.stop()
        threading.Thread(target=_exit_after, args=(EXIT_FLUSH_S,), name=f"rapidserve-{role}-exit",
                         daemon=True).start()


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    os._exit(0)  # still here: a feeder thread is stuck on a full pipe to a peer that reads no more


MIN_TIMEOUT_S = 0.5  # below this the front's own polls (every 50 ms while busy) are too coarse


def check_heartbeat_timeout(timeout_s: float) -> None:
    if not (timeout_s == 0 or timeout_s >= MIN_TIMEOUT_S):
        raise ValueError(f"worker_heartbeat_timeout_s must be 0 (off) or at least {MIN_TIMEOUT_S} s, got {timeout_s}")


class _Bound:
    """A bound on how long a worker may stay in some state, judged by the front each time it
    looks (`_looking()`), enforced only once `arm()` is called (the workers are up)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        # How often the front must look for the bound to be judged fairly (see _looking()).
        self.poll_s = min(BEAT_INTERVAL_S, timeout_s / 4) if timeout_s > 0 else BEAT_INTERVAL_S
        self._armed_at: float | None = None
        self._checked_at: float | None = None

    def arm(self) -> None:
        if self.timeout_s > 0:
            self._armed_at = self._checked_at = time.monotonic()

    def _looking(self) -> float | None:
        """Now, if the bound is to be judged now; None if it is not armed, or if the front itself
        was not looking for a while."""
        if self._armed_at is None:
            return None
        now = time.monotonic()
        last_check, self._checked_at = self._checked_at, now
        if last_check is not None and now - last_check > self.timeout_s / 2:
            # NOTE: the front itself was not looking for a while: stopped with its workers (a
            # terminal's Ctrl-Z stops the whole process group; then `fg`), starved, or an offline
            # caller between two generate() calls. The workers' silence (or a step's age) may be
            # ours: they get a fresh bound rather than the blame (a truly stopped or wedged one is
            # caught one bound later).
            self._armed_at = now
            return None
        return now


class Heartbeats(_Bound):
    """The front's view of its workers' beats: one shared double per worker, written by the
    worker's `Pulse`, read here. Enforced only once `arm()` is called (the workers are up:
    loading a model can hold a process's GIL for long stretches, and start-up has its own
    bound)."""

    def __init__(self, ctx: Any, roles: list[str], timeout_s: float) -> None:
        check_heartbeat_timeout(timeout_s)
        super().__init__(timeout_s)
        self.interval = beat_interval(timeout_s) if timeout_s > 0 else BEAT_INTERVAL_S
        # NOTE: RawValue: no lock (one writer, an aligned 8-byte store), and its memory is an
        # unlinked temporary file, so nothing is left in /dev/shm whatever happens.
        self.slots = {role: ctx.RawValue("d", 0.0) for role in roles}

    def age(self, role: str) -> float:
        """Seconds since the worker's last beat (counted from arm() if it is later)."""
        last = max(self.slots[role].value, self._armed_at or 0.0)
        return time.monotonic() - last

    def silent(self) -> tuple[str, float] | None:
        """The first worker whose last beat is older than the bound, with its age; None if all
        beat (or the check is not armed)."""
        if self._looking() is None:
            return None
        for role in self.slots:
            age = self.age(role)
            if age > self.timeout_s:
                return role, age
        return None


# ---- the step watch -------------------------------------------------------------------------------

MIN_STEP_TIMEOUT_S = 1.0  # the front looks every 50 ms while serving, every 0.5 s while idle
# Test hook (like disagg's RAPIDSERVE_INJECT_KV_TRANSFER_FAILURE): "ROLE:N" makes the worker of that
# role (decode or prefill; engine: the hybrid engine) block forever in its N-th device step, as a
# kernel that never ends would.
INJECT_STEP_HANG_ENV = "RAPIDSERVE_INJECT_STEP_HANG"


def check_step_timeout(timeout_s: float) -> None:
    if not (timeout_s == 0 or timeout_s >= MIN_STEP_TIMEOUT_S):
        raise ValueError(f"step_timeout_s must be 0 (off) or at least {MIN_STEP_TIMEOUT_S} s, got {timeout_s}")


class StepClock:
    """A worker's side of the step watch: when its current step started, in `slot` (a shared
    double; 0.0 between steps). Written only by the worker's main thread (the hybrid mode: the
    AsyncEngine's engine thread), read by the front (there: its StepWatcher)."""

    def __init__(self, slot: Any | None) -> None:
        self.slot = slot

    def start(self) -> None:
        if self.slot is not None:
            self.slot.value = time.monotonic()

    def stop(self) -> None:
        if self.slot is not None:
            self.slot.value = 0.0


class StepWatch(_Bound):
    """The front's side: one step-start double per worker (`slots`, handed to each worker's
    StepClock). `make_slot()` makes one: a RawValue of the spawn context for worker processes
    (unlinked memory, as the beats'), a ctypes double for worker threads. Enforced once `arm()`
    is called."""

    def __init__(self, roles: list[str], timeout_s: float, make_slot: Callable[[], Any]) -> None:
        check_step_timeout(timeout_s)
        super().__init__(timeout_s)
        self.slots = {role: make_slot() for role in roles}

    def verdict(self, who: str, age: float) -> str:
        """The one-line reason the engine fails with, for `who` (e.g. "the decode worker") whose
        step has run `age` seconds."""
        return (f"{who} has been in one step for {age:.1f} s (wedged: a kernel that never ends or a "
                f"deadlock; --step-timeout-s {self.timeout_s:g})")

    def hung(self) -> tuple[str, float] | None:
        """The first worker whose current step has run longer than the bound, with the step's
        age; None if none has (or the check is not armed)."""
        now = self._looking()
        if now is None or self._armed_at is None:
            return None
        for role, slot in self.slots.items():
            started = slot.value
            if started > 0:
                age = now - max(started, self._armed_at)
                if age > self.timeout_s:
                    return role, now - started
        return None


class StepWatcher:
    """A thread that judges a StepWatch on its own, for stepping threads that no front polls (the
    hybrid mode's engine thread steps itself): every `watch.poll_s` it asks `watch.hung()` (so the
    same rules: armed first, a watcher that was not looking re-arms), and calls `on_hung(role,
    age)` once, for the first step past the bound, then ends.

    NOTE: `on_hung` runs on this thread while the wedged one is still inside its step: it may only
    touch what is safe from any thread (it must not wait for the wedged thread)."""

    def __init__(self, watch: StepWatch, on_hung: Callable[[str, float], None], name: str) -> None:
        self.watch, self.on_hung = watch, on_hung
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more judging (not joined: it ends within one poll; a daemon either way)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.watch.poll_s):
            wedged = self.watch.hung()
            if wedged is not None:
                self.on_hung(*wedged)
                return


def inject_step_hang(role: str, runner: Any) -> None:
    """The test hook: with INJECT_STEP_HANG_ENV = "ROLE:N" naming this worker (or the hybrid
    engine), its N-th call of `runner.submit_isolated` (a device step) blocks forever."""
    spec = os.environ.get(INJECT_STEP_HANG_ENV, "")
    if not spec:
        return
    target, _, n = spec.partition(":")
    if target != role:
        return
    hang_at = int(n or 1)
    real = runner.submit_isolated
    calls = [0]

    def submit_isolated(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == hang_at:
            log.warning("%s worker: step %d never ends (%s)", role, hang_at, INJECT_STEP_HANG_ENV)
            threading.Event().wait()
        return real(*args, **kwargs)

    runner.submit_isolated = submit_isolated
