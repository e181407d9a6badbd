"""SM partitioning inside the rapid topology's workers (the mechanisms and policies live in
rapidserve.resources).

Each worker makes a partitioner for its own side (decode: the SM group; prefill: the remainder),
for every partition the policy may pick. The split is deterministic, so the two sides of one
partition are disjoint whether the workers are threads of one process or two processes under
MPS. The decode worker decides the partition of each step (`DecodePartitioning.before_step`),
moves to that partition's stream at the step boundary, and tells the prefill worker, which
moves at its next step (`PrefillPartitioning.follow`).

NOTE: a worker's steps run on the stream of the partition in force; on a switch the new stream
first waits for the old one, so a step never overtakes the one before it (the next decode step
reads the tokens and KV the previous one wrote).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rapidserve.resources.feedback import FeedbackConfig
from rapidserve.resources.partition import Granted, Partition, Partitioner, make_partitioner
from rapidserve.resources.policy import (
    OffPolicy,
    PartitionMetrics,
    PartitionPolicy,
    PartitionStats,
    StepState,
    make_policy,
    parse_policy,
)
from rapidserve.resources.profile import load_profile

if TYPE_CHECKING:
    from rapidserve.config import EngineConfig
    from rapidserve.runner.model_runner import ModelRunner, StepResult

log = logging.getLogger("rapidserve.engine")


def _make_partitioner(device: torch.device, partitioned: bool, side: str) -> Partitioner:
    # Looked up at call time, so that tests can stand a fake mechanism in for the hardware's.
    return make_partitioner(device, partitioned, side)  # type: ignore[arg-type]


def build_policy(config: EngineConfig, partitioner: Partitioner) -> PartitionPolicy:
    """The configured policy for this device; `off` where the device cannot be partitioned."""
    spec = parse_policy(config.partition_policy)
    if spec.kind != "off" and partitioner.total_sms < 2 * partitioner.granularity:
        log.warning("partition policy %s: this device has no SM partitioning; running without", spec)
        return OffPolicy()
    profile = load_profile(config.profile) if config.profile else None
    for note in profile.limitations() if profile is not None else ():
        log.warning("%s: %s", config.profile, note)
    return make_policy(spec, partitioner.total_sms, partitioner.granularity, profile, config.slo_itl_ms,
                       config.slo_ttft_ms, itl_headroom=config.slo_itl_headroom,
                       feedback=FeedbackConfig() if config.closed_loop else None)


class _Side:
    """One worker's partitioner and the partition its steps run in now."""

    def __init__(self, partitioner: Partitioner, side: str, partitions: tuple[Partition, ...]) -> None:
        self.partitioner = partitioner
        self.side = side
        self.granted: list[Granted] = partitioner.prepare(partitions)
        self.current: Partition | None = None
        # The worker's own stream, restored on close: a thread left on a partition's stream would
        # use it after the partitioner let it go (freeing a pinned buffer queries the current stream).
        self.home = torch.cuda.current_stream() if self.stream(partitions[0]) is not None else None

    def stream(self, partition: Partition) -> torch.cuda.Stream | None:
        streams = self.partitioner.streams(partition)
        return streams.decode if self.side == "decode" else streams.prefill

    def move_to(self, partition: Partition) -> bool:
        """Run this thread's next work on the partition's stream; False if already there."""
        if partition == self.current:
            return False
        new = self.stream(partition)
        if new is not None:
            old = torch.cuda.current_stream()
            if new != old:
                new.wait_stream(old)
            torch.cuda.set_stream(new)
        self.current = partition
        return True

    def sms(self, partition: Partition) -> int:
        total = self.partitioner.total_sms
        return partition.decode_share(total) if self.side == "decode" else partition.prefill_share(total)

    def close(self) -> None:
        if self.home is not None:
            torch.cuda.current_stream().synchronize()
            torch.cuda.set_stream(self.home)
        self.current = None
        self.partitioner.close()


def _open_side(config: EngineConfig, device: torch.device, side: str,
               partitioner: Partitioner | None = None) -> tuple[PartitionPolicy, _Side]:
    """The configured policy and this worker's side of every partition it may pick, with the
    worker moved onto the first one's stream. `partitioner`: the mechanism to use instead of the
    device's (the simulator's, which has no streams)."""
    spec = parse_policy(config.partition_policy)
    if partitioner is None:
        partitioner = _make_partitioner(device, spec.kind != "off", side)
    policy = build_policy(config, partitioner)
    partitions = policy.partitions()
    opened = _Side(partitioner, side, partitions)
    opened.move_to(partitions[0])
    return policy, opened


class DecodePartitioning:
    """The decode worker's: the policy, its side's streams and graphs per partition, metrics.
    Made before the model, so that everything the worker runs is on its partition's stream."""

    def __init__(self, config: EngineConfig, device: torch.device, partitioner: Partitioner | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """partitioner, clock: the simulator's (no streams; virtual time) instead of the device's."""
        self.policy, self._side = _open_side(config, device, "decode", partitioner)
        self.clock = clock
        self.partitions = self.policy.partitions()
        self.metrics = PartitionMetrics(clock)
        # The closed loop's input: each launched step's partition and state, until its measured
        # time comes back with its tokens (in launch order).
        self._observe = getattr(self.policy, "observe", None)
        self._feedback_stats = getattr(self.policy, "feedback_stats", lambda: None)
        self.closed_loop = self._observe is not None and self._feedback_stats() is not None
        self._launched: deque[tuple[Partition, StepState]] = deque()
        for g in self._side.granted:
            log.info("decode: partition %s gives decode %d SMs, prefill %d", g.partition, g.decode_sms, g.prefill_sms)

    @property
    def partitioned(self) -> bool:
        return self.policy.partitioned

    @property
    def current(self) -> Partition:
        assert self._side.current is not None
        return self._side.current

    def capture_graphs(self, runner: ModelRunner) -> None:
        """Decode graphs for every other partition, each captured on its decode stream (the
        runner's first set was captured on the first partition's, where the worker starts)."""
        for p in self.partitions[1:]:
            stream = self._side.stream(p)
            if stream is None:
                continue
            self._side.move_to(p)
            runner.capture_partition_graphs(p, stream, self._side.sms(p))
        self._side.move_to(self.partitions[0])
        self.use(runner, self.partitions[0])

    def use(self, runner: ModelRunner, partition: Partition) -> None:
        key = partition if partition in runner.partition_graph_keys else None
        runner.use_partition(key, self._side.sms(partition))

    def before_step(self, state: StepState, runner: ModelRunner) -> Partition | None:
        """Decide the coming step's partition and move to it. Returns the partition if it
        changed (the prefill worker is to follow), else None."""
        p = self.policy.decide(state)
        self.metrics.record(p)
        if self.closed_loop and state.decode_batch > 0:  # a step is launched: its time will come back
            self._launched.append((p, state))
        if not self._side.move_to(p):
            return None
        self.use(runner, p)
        if runner.timeline is not None:
            runner.timeline.mark("decide", str(p))
        return p

    def observe(self, result: StepResult) -> None:
        """A launched step's tokens were taken: hand its measured time to the policy (once per
        step, in launch order; after result.tokens())."""
        if not self._launched:
            return
        p, state = self._launched.popleft()
        # NOTE: the step of this decision, unless launches and takes fell out of step
        assert state.decode_batch == len(result.scheduled), "decode steps observed out of launch order"
        measured = result.device_s()
        if measured is not None and self._observe is not None:
            self._observe(p, state, measured)

    def followed(self, decided_s: float, moved_s: float) -> None:
        """The prefill worker moved to a partition decided at decided_s (both monotonic)."""
        self.metrics.react(moved_s - decided_s)

    def stats(self) -> PartitionStats:
        return self.metrics.snapshot()._replace(feedback=self._feedback_stats())

    def decode_sms(self) -> int:
        """SMs decode runs on now (0: no partitioning)."""
        return self._side.sms(self.current) if self.partitioned else 0

    def close(self) -> None:
        self._side.close()


class PrefillPartitioning:
    """The prefill worker's: its side of the same partitions (the policy is built from the same
    config, so it names the same ones); it follows the decode worker at its next step."""

    def __init__(self, config: EngineConfig, device: torch.device, partitioner: Partitioner | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self._side = _open_side(config, device, "prefill", partitioner)
        self.clock = clock
        self.partitioned = self.policy.partitioned
        # Whether a prefill step may have to move mid-way (the policy can pick more than one).
        self.switching = self.partitioned and len(self.policy.partitions()) > 1

    def follow(self, partition: Partition) -> bool:
        """The decode worker moved: move too, now (between steps, or between a step's layer
        groups): the next prefill kernels run on the new partition. False if already there."""
        return self._side.move_to(partition)

    @property
    def current(self) -> Partition:
        """The partition this worker's steps run in now."""
        assert self._side.current is not None
        return self._side.current

    def prefill_sms(self) -> int:
        assert self._side.current is not None
        return self._side.sms(self._side.current)

    def close(self) -> None:
        self._side.close()
