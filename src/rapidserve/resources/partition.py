"""SM partitioning mechanisms: give each phase a stream limited to a set of SMs (or the whole device).

A `Partition` names a split: decode gets a group of n SMs, prefill the remainder; or
`Partition.FULL`, where both phases may use every SM (the paper's over-allocation, P100-D100).
A `Partitioner` turns partitions into streams:

- `GreenContextPartitioner` (NVIDIA): green contexts through the CUDA driver API (cuda-bindings).
  For each partition the SMs are split *once* (`cuDevSmResourceSplitByCount`: a group of n SMs
  and the remainder), so the two sides are disjoint (torch's `GreenContext.create(n)` takes the
  first n SMs each time, so two of them overlap: GPU_FACTS.md, "SM partitioning").
- `CuMaskPartitioner` (ROCm builds of torch): CU-masked streams (`hipExtStreamCreateWithCUMask`).
- `NoPartitioner` (CPU, or partitioning off): every phase on a plain stream of the whole device.

Placement. In one process (thread placement) a partitioner is made for `side="both"` and hands
out both streams. Under MPS (process placement) each worker process makes its own partitioner
for its side only (`side="decode"` or `side="prefill"`): the split is deterministic, so both
processes get the same group and remainder, and each creates only the green contexts it uses.

NOTE: partitions are created once, at start-up, for every partition a policy may pick
(`prepare`); `streams()` is then a dictionary lookup, cheap enough to call every step. A CUDA
graph keeps the partition of the stream it was captured on, so graphs are captured per partition
on the streams handed out here; those streams live until the process exits (`_KEPT`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import torch

log = logging.getLogger("rapidserve.engine")

Side = Literal["decode", "prefill", "both"]
SIDES: tuple[Side, ...] = ("decode", "prefill", "both")

# Hopper splits SMs in groups of 8 (GPU_FACTS.md); used where the driver does not say.
HOPPER_SM_GRANULARITY = 8


@dataclass(frozen=True)
class Partition:
    """Decode gets `decode_sms` SMs and prefill `prefill_sms` (disjoint), or, when both are None,
    each phase may use every SM (over-allocation: `Partition.FULL`)."""

    decode_sms: int | None = None
    prefill_sms: int | None = None

    FULL: ClassVar[Partition]

    def __post_init__(self) -> None:
        if (self.decode_sms is None) != (self.prefill_sms is None):
            raise ValueError(f"a partition gives SMs to both phases or to neither, got {self!r}")
        if self.decode_sms is not None and self.prefill_sms is not None and min(self.decode_sms, self.prefill_sms) < 1:
            raise ValueError(f"each side of a split needs at least one SM, got {self!r}")

    @classmethod
    def split(cls, decode_sms: int, total_sms: int) -> Partition:
        """Decode takes `decode_sms` of `total_sms`; prefill the remainder."""
        if not 0 < decode_sms < total_sms:
            raise ValueError(f"decode SMs must be in [1, {total_sms - 1}] of {total_sms}, got {decode_sms}")
        return cls(decode_sms, total_sms - decode_sms)

    @property
    def is_full(self) -> bool:
        return self.decode_sms is None

    def decode_share(self, total_sms: int) -> int:
        """SMs decode may use (all of them when over-allocated)."""
        return total_sms if self.decode_sms is None else self.decode_sms

    def prefill_share(self, total_sms: int) -> int:
        return total_sms if self.prefill_sms is None else self.prefill_sms

    def __str__(self) -> str:
        return "full" if self.is_full else f"D{self.decode_sms}/P{self.prefill_sms}"


Partition.FULL = Partition()


class PhaseStreams(NamedTuple):
    """The streams a partition gives each phase. None: this partitioner was made for the other
    side only (one process per phase), or the device has no streams (CPU)."""

    decode: torch.cuda.Stream | None
    prefill: torch.cuda.Stream | None


class Granted(NamedTuple):
    """What a partition really got from the hardware (logged and reported)."""

    partition: Partition
    decode_sms: int  # SMs of the decode group (all of the device's when over-allocated)
    prefill_sms: int  # SMs of the remainder


class Partitioner(Protocol):
    """Gives each phase a stream limited to a set of SMs (or the whole device)."""

    total_sms: int  # SMs (CUs) of the device; 1 on CPU
    granularity: int  # decode SM counts are multiples of this
    side: Side

    def prepare(self, partitions: Iterable[Partition]) -> list[Granted]:
        """Create the streams of every partition a policy may pick (once, at start-up)."""
        ...

    def streams(self, partition: Partition) -> PhaseStreams:
        """The prepared streams of a partition (a lookup)."""
        ...

    def granted(self) -> list[Granted]:
        """Every prepared partition and the SMs each side really got."""
        ...

    def close(self) -> None:
        """Destroy what `prepare` made (after every graph captured on those streams is gone)."""
        ...


def use_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[Any]:
    """`with use_stream(s):` runs on s; on CPU (None) it does nothing."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def round_to_granularity(sms: int, granularity: int, total_sms: int) -> int:
    """The nearest count the hardware can give a decode group: a multiple of the granularity,
    at least one granule, leaving at least one granule to prefill."""
    if total_sms < 2 * granularity:
        raise ValueError(f"{total_sms} SMs cannot be split in groups of {granularity}")
    n = max(granularity, round(sms / granularity) * granularity)
    return min(n, (total_sms - granularity) // granularity * granularity)


def _check_side(side: str) -> Side:
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; available: {', '.join(SIDES)}")
    return side  # type: ignore[return-value]


class _StreamTable:
    """The prepared partitions of a partitioner: partition -> (streams, what they got)."""

    def __init__(self, total_sms: int) -> None:
        self.total_sms = total_sms
        self.by_partition: dict[Partition, tuple[PhaseStreams, Granted]] = {}

    def get(self, partition: Partition) -> PhaseStreams:
        entry = self.by_partition.get(partition)
        if entry is None:
            have = ", ".join(str(p) for p in sorted(self.by_partition, key=_order)) or "none"
            raise KeyError(f"partition {partition} was not prepared (prepared: {have})")
        return entry[0]

    def granted(self) -> list[Granted]:
        return [g for _, g in sorted(self.by_partition.values(), key=lambda e: _order(e[1].partition))]


def _order(p: Partition) -> tuple[int, int]:
    return (1, 0) if p.decode_sms is None else (0, p.decode_sms)


# ---- no partitioning -----------------------------------------------------------------------------


class NoPartitioner:
    """CPU, or partitioning off: each phase gets a plain stream on the whole device (on CUDA one
    per side, so the two workers' kernels can overlap), or None on CPU. Every partition maps to
    the same streams."""

    granularity = 1

    def __init__(self, device: torch.device, side: Side = "both") -> None:
        self.device = device
        self.side = _check_side(side)
        cuda = device.type == "cuda"
        self.total_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
        self._streams = PhaseStreams(
            torch.cuda.Stream(device) if cuda and side != "prefill" else None,
            torch.cuda.Stream(device) if cuda and side != "decode" else None,
        )
        self._granted: dict[Partition, Granted] = {}

    def prepare(self, partitions: Iterable[Partition]) -> list[Granted]:
        for p in partitions:
            self._granted[p] = Granted(p, self.total_sms, self.total_sms)
        return self.granted()

    def streams(self, partition: Partition) -> PhaseStreams:
        return self._streams

    def granted(self) -> list[Granted]:
        return [self._granted[p] for p in sorted(self._granted, key=_order)]

    def close(self) -> None:
        self._granted.clear()


class _SplittingPartitioner:
    """What the hardware mechanisms share: a table of prepared partitions, plain full-device
    streams for over-allocation, and `prepare` calling the mechanism's `_split_streams` once
    for every split."""

    device: torch.device
    side: Side
    total_sms: int
    granularity: int
    _table: _StreamTable  # made by the subclass's __init__
    _full_streams: PhaseStreams | None

    def _split_streams(self, partition: Partition) -> tuple[PhaseStreams, Granted]:
        raise NotImplementedError

    def prepare(self, partitions: Iterable[Partition]) -> list[Granted]:
        for p in partitions:
            if p in self._table.by_partition:
                continue
            if p.is_full:
                if self._full_streams is None:
                    self._full_streams = PhaseStreams(
                        torch.cuda.Stream(self.device) if self.side != "prefill" else None,
                        torch.cuda.Stream(self.device) if self.side != "decode" else None,
                    )
                self._table.by_partition[p] = (self._full_streams, Granted(p, self.total_sms, self.total_sms))
                continue
            self._table.by_partition[p] = self._split_streams(p)
        return self.granted()

    def streams(self, partition: Partition) -> PhaseStreams:
        return self._table.get(partition)

    def granted(self) -> list[Granted]:
        return self._table.granted()

    def close(self) -> None:
        """Forget the partitions; their streams (and green contexts) stay in `_KEPT`."""
        self._table.by_partition.clear()
        self._full_streams = None
        torch.cuda.synchronize(self.device)


# NOTE: the mechanisms' streams (and green contexts) are never destroyed, only kept here until the
# process exits: torch's pinned-memory allocator records an event on every stream a pinned buffer
# was used on when the buffer is freed, which may come after a worker closed its partitions (its
# last step results), and an event on a destroyed stream aborts the process ("context is
# destroyed", seen on the H100). A few handles per engine; the driver releases them at exit.
_KEPT: list[Any] = []


# ---- NVIDIA: green contexts ------------------------------------------------------------------------


def _driver() -> Any:
    """cuda-bindings' driver module, imported only when a green context is made."""
    try:
        import cuda.bindings.driver as drv
    except ImportError as e:
        raise RuntimeError(
            "SM partitioning on NVIDIA needs cuda-bindings (pip install cuda-bindings matching the "
            "CUDA version of torch), or --partition-policy off"
        ) from e
    return drv


def _ok(drv: Any, result: tuple[Any, ...], what: str) -> Any:
    """Unwrap a cuda-bindings call: (CUresult, value...) -> value(s); raise on an error."""
    err = result[0]
    if err != drv.CUresult.CUDA_SUCCESS:
        name = drv.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name[1] if name[0] == drv.CUresult.CUDA_SUCCESS else err}")
    rest = result[1:]
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


class GreenContextPartitioner(_SplittingPartitioner):
    """Green contexts through the driver API. Per prepared split: the device's SM resource is
    split once into a group of n SMs (decode) and the remainder (prefill); each side gets a green
    context and one non-blocking stream in it, wrapped as a `torch.cuda.ExternalStream`.
    Over-allocation (`Partition.FULL`) uses plain full-device streams."""

    def __init__(self, device: torch.device, side: Side = "both") -> None:
        if device.type != "cuda" or torch.version.hip is not None:
            raise ValueError(f"green contexts need an NVIDIA CUDA device, got {device}")
        self.device = device
        self.side = _check_side(side)
        self._drv = drv = _driver()
        index = device.index if device.index is not None else torch.cuda.current_device()
        # NOTE: torch's primary context first: the green contexts' streams run torch kernels and
        # use torch's allocations, which live in the primary context.
        torch.cuda.init()
        torch.zeros(1, device=device)
        _ok(drv, drv.cuInit(0), "cuInit")
        self._dev = _ok(drv, drv.cuDeviceGet(index), "cuDeviceGet")
        self._full = _ok(drv, drv.cuDeviceGetDevResource(
            self._dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
        sm = self._full.sm
        self.total_sms = int(sm.smCount)
        # Groups come in multiples of 8 SMs from compute capability 9 (Hopper) on, of 2 before;
        # newer drivers also say so (CUDA 13: minSmPartitionSize, smCoscheduledAlignment), and
        # where they ask for more, that wins.
        major = torch.cuda.get_device_properties(device).major
        queried = [int(getattr(sm, f, 0) or 0) for f in ("minSmPartitionSize", "smCoscheduledAlignment")]
        self.granularity = max(HOPPER_SM_GRANULARITY if major >= 9 else 2, *queried)
        self._table = _StreamTable(self.total_sms)
        self._full_streams: PhaseStreams | None = None
        log.info("green contexts on %s: %d SMs, granularity %d", torch.cuda.get_device_name(device),
                 self.total_sms, self.granularity)

    def _green_stream(self, resource: Any) -> torch.cuda.Stream:
        drv = self._drv
        desc = _ok(drv, drv.cuDevResourceGenerateDesc([resource], 1), "cuDevResourceGenerateDesc")
        ctx = _ok(drv, drv.cuGreenCtxCreate(
            desc, self._dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")
        raw = _ok(drv, drv.cuGreenCtxStreamCreate(
            ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0), "cuGreenCtxStreamCreate")
        _KEPT.extend((ctx, raw))
        return torch.cuda.ExternalStream(int(raw), device=self.device)

    def _split(self, decode_sms: int) -> tuple[Any, Any]:
        drv = self._drv
        groups, n, remainder = _ok(drv, drv.cuDevSmResourceSplitByCount(1, self._full, 0, decode_sms),
                                   f"cuDevSmResourceSplitByCount(minCount={decode_sms})")
        if int(n) != 1:
            raise RuntimeError(f"could not split a group of {decode_sms} SMs from {self.total_sms}")
        return groups[0], remainder

    def _split_streams(self, p: Partition) -> tuple[PhaseStreams, Granted]:
        assert p.decode_sms is not None
        want = round_to_granularity(p.decode_sms, self.granularity, self.total_sms)
        if want != p.decode_sms:
            raise ValueError(f"partition {p}: decode SMs must be a multiple of {self.granularity} "
                             f"below {self.total_sms} (nearest: {want})")
        group, remainder = self._split(want)
        got = Granted(p, int(group.sm.smCount), int(remainder.sm.smCount))
        streams = PhaseStreams(
            self._green_stream(group) if self.side != "prefill" else None,
            self._green_stream(remainder) if self.side != "decode" else None,
        )
        level = logging.WARNING if (got.decode_sms, got.prefill_sms) != (p.decode_sms, p.prefill_sms) else logging.INFO
        log.log(level, "partition %s (%s side): decode group %d SMs, prefill remainder %d SMs",
                p, self.side, got.decode_sms, got.prefill_sms)
        return streams, got


# ---- AMD: CU masks -------------------------------------------------------------------------------


def cu_masks(decode_cus: int, total_cus: int) -> tuple[list[int], list[int]]:
    """Bit masks (32-bit words, CU i = bit i % 32 of word i // 32) of a decode group and of the
    remainder. The decode CUs are spread evenly over the device's CU ids, so that on chips whose
    dispatcher deals workgroups round-robin over dies (MI300X: 8 XCDs) each die keeps its share."""
    if not 0 < decode_cus < total_cus:
        raise ValueError(f"decode CUs must be in [1, {total_cus - 1}], got {decode_cus}")
    decode = {int(i * total_cus / decode_cus) for i in range(decode_cus)}
    words = (total_cus + 31) // 32
    d, p = [0] * words, [0] * words
    for cu in range(total_cus):
        target = d if cu in decode else p
        target[cu // 32] |= 1 << (cu % 32)
    return d, p


class CuMaskPartitioner(_SplittingPartitioner):
    """ROCm builds of torch: one CU-masked stream per side and partition
    (`hipExtStreamCreateWithCUMask` from libamdhip64, loaded only here)."""

    def __init__(self, device: torch.device, side: Side = "both") -> None:
        if device.type != "cuda" or torch.version.hip is None:
            raise ValueError(f"CU masking needs a ROCm build of torch and a GPU, got {device} "
                             f"(hip {torch.version.hip})")
        self.device = device
        self.side = _check_side(side)
        self.total_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.granularity = 1
        self._hip = self._load()
        self._table = _StreamTable(self.total_sms)
        self._full_streams: PhaseStreams | None = None

    @staticmethod
    def _load() -> ctypes.CDLL:
        try:
            hip = ctypes.CDLL("libamdhip64.so")
        except OSError as e:
            raise RuntimeError("CU masking needs libamdhip64.so on the library path") from e
        hip.hipExtStreamCreateWithCUMask.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
        hip.hipExtStreamCreateWithCUMask.restype = ctypes.c_int
        return hip

    def _masked_stream(self, mask: list[int]) -> torch.cuda.Stream:
        with torch.cuda.device(self.device):
            handle = ctypes.c_void_p()
            words = (ctypes.c_uint32 * len(mask))(*mask)
            err = self._hip.hipExtStreamCreateWithCUMask(ctypes.byref(handle), len(mask), words)
        if err != 0:
            raise RuntimeError(f"hipExtStreamCreateWithCUMask failed with error {err}")
        _KEPT.append(handle)
        return torch.cuda.ExternalStream(int(handle.value or 0), device=self.device)

    def prepare(self, partitions: Iterable[Partition]) -> list[Granted]:
        torch.zeros(1, device=self.device)  # torch's context first
        return super().prepare(partitions)

    def _split_streams(self, p: Partition) -> tuple[PhaseStreams, Granted]:
        assert p.decode_sms is not None
        dmask, pmask = cu_masks(p.decode_sms, self.total_sms)
        streams = PhaseStreams(
            self._masked_stream(dmask) if self.side != "prefill" else None,
            self._masked_stream(pmask) if self.side != "decode" else None,
        )
        got = Granted(p, p.decode_sms, self.total_sms - p.decode_sms)
        log.info("partition %s (%s side): CU masks of %d and %d CUs", p, self.side, got.decode_sms, got.prefill_sms)
        return streams, got


# ---- choosing one ------------------------------------------------------------------------------


def mechanism(device: torch.device) -> str:
    """The partitioning mechanism a device has: green-contexts, cu-mask or none."""
    if device.type != "cuda":
        return "none"
    return "cu-mask" if torch.version.hip is not None else "green-contexts"


def make_partitioner(device: torch.device, partitioned: bool = True, side: Side = "both") -> Partitioner:
    """The partitioner for a device. `partitioned=False` (policy `off`) or a CPU device gives
    `NoPartitioner`; otherwise green contexts on NVIDIA, CU masks on ROCm."""
    kind = mechanism(device) if partitioned else "none"
    if kind == "green-contexts":
        return GreenContextPartitioner(device, side)
    if kind == "cu-mask":
        return CuMaskPartitioner(device, side)
    return NoPartitioner(device, side)


def default_decode_sm_counts(total_sms: int, granularity: int) -> list[int]:
    """Decode group sizes worth profiling: every multiple of the granularity from two granules
    up to half the device (decode rarely needs more: GPU_FACTS.md keeps ~75 % of decode's speed
    on 30 % of the SMs); fewer on small devices."""
    if total_sms < 2 * granularity:
        return []
    lo = 2 * granularity if total_sms >= 4 * granularity else granularity
    hi = max(lo, total_sms // 2 // granularity * granularity)
    return list(range(lo, hi + 1, granularity))
