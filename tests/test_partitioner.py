"""SM partitioning mechanisms (resources/partition.py): the Partition value, the CPU path, CU
masks, and (marked gpu, skipped without CUDA) green contexts on an NVIDIA GPU."""

import subprocess
import sys

import pytest
import torch

from rapidserve.resources.partition import (
    CuMaskPartitioner,
    Granted,
    GreenContextPartitioner,
    NoPartitioner,
    Partition,
    PhaseStreams,
    cu_masks,
    default_decode_sm_counts,
    make_partitioner,
    mechanism,
    round_to_granularity,
    use_stream,
)


def test_partition_value():
    p = Partition.split(40, 132)
    assert (p.decode_sms, p.prefill_sms) == (40, 92)
    assert str(p) == "D40/P92" and not p.is_full
    assert str(Partition.FULL) == "full" and Partition.FULL.is_full
    assert Partition.FULL.decode_share(132) == 132 == Partition.FULL.prefill_share(132)
    assert p.decode_share(132) == 40 and p.prefill_share(132) == 92
    assert Partition(40, 92) == p and hash(Partition(40, 92)) == hash(p)  # usable as a key
    with pytest.raises(ValueError, match="both phases or to neither"):
        Partition(40, None)
    with pytest.raises(ValueError, match="at least one SM"):
        Partition(0, 132)
    with pytest.raises(ValueError, match=r"decode SMs must be in \[1, 131\] of 132, got 132"):
        Partition.split(132, 132)


def test_granularity():
    assert round_to_granularity(40, 8, 132) == 40
    assert round_to_granularity(42, 8, 132) == 40
    assert round_to_granularity(45, 8, 132) == 48
    assert round_to_granularity(1, 8, 132) == 8
    assert round_to_granularity(131, 8, 132) == 120  # leaves prefill at least one granule
    with pytest.raises(ValueError, match="cannot be split"):
        round_to_granularity(8, 8, 12)
    assert default_decode_sm_counts(132, 8) == [16, 24, 32, 40, 48, 56, 64]
    assert all(n % 8 == 0 for n in default_decode_sm_counts(78, 8))
    assert default_decode_sm_counts(1, 1) == []


def test_no_partitioner_on_cpu():
    cpu = torch.device("cpu")
    assert mechanism(cpu) == "none"
    part = make_partitioner(cpu)
    assert isinstance(part, NoPartitioner) and part.total_sms == 1 and part.side == "both"
    got = part.prepare([Partition.FULL, Partition.split(1, 2)])
    assert got == [Granted(Partition.split(1, 2), 1, 1), Granted(Partition.FULL, 1, 1)]
    assert part.streams(Partition.FULL) == PhaseStreams(None, None)
    with use_stream(part.streams(Partition.FULL).decode):
        assert (torch.ones(2) * 2).sum().item() == 4.0  # runs on the CPU as ever
    part.close()
    assert part.granted() == []
    with pytest.raises(ValueError, match="unknown side 'both-ish'"):
        NoPartitioner(cpu, "both-ish")  # type: ignore[arg-type]


def test_gpu_mechanisms_refuse_a_cpu_device():
    with pytest.raises(ValueError, match="green contexts need an NVIDIA CUDA device"):
        GreenContextPartitioner(torch.device("cpu"))
    with pytest.raises(ValueError, match="CU masking needs a ROCm build"):
        CuMaskPartitioner(torch.device("cpu"))


def _ones(words: list[int]) -> int:
    return sum(w.bit_count() for w in words)


def test_cu_masks():
    d, p = cu_masks(76, 304)  # MI300X: 304 CUs in 8 XCDs of 38
    assert len(d) == len(p) == 10  # 32-bit words
    assert _ones(d) == 76 and _ones(p) == 228
    assert all((a & b) == 0 for a, b in zip(d, p))  # disjoint
    assert _ones([a | b for a, b in zip(d, p)]) == 304  # together: every CU
    # spread: every block of 38 CU ids holds its share of the decode CUs
    bits = [(d[i // 32] >> (i % 32)) & 1 for i in range(304)]
    assert all(9 <= sum(bits[x * 38:(x + 1) * 38]) <= 10 for x in range(8))
    with pytest.raises(ValueError, match=r"decode CUs must be in \[1, 303\]"):
        cu_masks(304, 304)


# ---- on an NVIDIA GPU --------------------------------------------------------------------------


@pytest.mark.gpu
def test_green_context_splits_report_real_sm_counts():
    dev = torch.device("cuda")
    part = make_partitioner(dev)
    assert isinstance(part, GreenContextPartitioner)
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    assert part.total_sms == total
    if torch.cuda.get_device_capability(dev)[0] == 9:
        assert part.granularity == 8  # Hopper
    counts = default_decode_sm_counts(total, part.granularity)
    try:
        got = part.prepare([Partition.split(n, total) for n in counts] + [Partition.FULL])
        assert [g.partition for g in got][-1] == Partition.FULL
        for g in got[:-1]:
            assert g.decode_sms % 8 == 0 and g.decode_sms == g.partition.decode_sms
            assert g.prefill_sms >= 1 and g.decode_sms + g.prefill_sms <= total
        for n in counts:
            s = part.streams(Partition.split(n, total))
            assert s.decode is not None and s.prefill is not None and s.decode != s.prefill
        with pytest.raises(KeyError, match="was not prepared"):
            part.streams(Partition.split(counts[0] + 1, total))
        with pytest.raises(ValueError, match="multiple of"):
            part.prepare([Partition.split(counts[0] + 1, total)])
    finally:
        part.close()


@pytest.mark.gpu
def test_a_kernel_runs_on_each_side_of_a_split():
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    p = Partition.split(40 if total >= 80 else 8, total)
    part = make_partitioner(dev)
    try:
        part.prepare([p, Partition.FULL])
        x = torch.randn(256, 256, device=dev)
        torch.cuda.synchronize()
        for stream in (*part.streams(p), *part.streams(Partition.FULL)):
            assert stream is not None
            with use_stream(stream):
                y = x @ x
            stream.synchronize()
            torch.testing.assert_close(y, x @ x)
        # graphs captured on a decode stream replay there
        g = torch.cuda.CUDAGraph()
        s = part.streams(p).decode
        out = torch.empty_like(x)
        with use_stream(s):
            torch.mm(x, x, out=out)
            s.synchronize()
            with torch.cuda.graph(g, stream=s):
                torch.mm(x, x, out=out)
            out.zero_()
            g.replay()
        s.synchronize()
        torch.testing.assert_close(out, x @ x)
        del g
    finally:
        torch.cuda.synchronize()
        part.close()


@pytest.mark.gpu
def test_one_side_per_process():
    """Under MPS each worker process makes the same split for its own side only."""
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    p = Partition.split(40 if total >= 80 else 8, total)
    decode, prefill = make_partitioner(dev, side="decode"), make_partitioner(dev, side="prefill")
    try:
        gd, gp = decode.prepare([p])[0], prefill.prepare([p])[0]
        assert (gd.decode_sms, gd.prefill_sms) == (gp.decode_sms, gp.prefill_sms)
        assert decode.streams(p).prefill is None and decode.streams(p).decode is not None
        assert prefill.streams(p).decode is None and prefill.streams(p).prefill is not None
    finally:
        decode.close()
        prefill.close()


@pytest.mark.gpu
def test_pinned_buffer_outlives_a_closed_partition():
    """A pinned buffer used on a partition's stream may be freed after the worker closed its
    partitions (its last step results): the worker is back on its own stream and nothing aborts
    (torch records an event on the buffer's streams at the free: on the H100 this aborted the
    process with "context is destroyed" when the green contexts were destroyed at close)."""
    code = """
import torch
from rapidserve.resources.partition import Partition, make_partitioner
from rapidserve.serving.partitioning import _Side
dev = torch.device("cuda")
total = torch.cuda.get_device_properties(dev).multi_processor_count
home = torch.cuda.Stream()
torch.cuda.set_stream(home)
p = Partition.split(40 if total >= 80 else 8, total)
side = _Side(make_partitioner(dev, side="decode"), "decode", (p,))
side.move_to(p)
assert torch.cuda.current_stream() != home
buf = torch.empty(4096, pin_memory=True)
buf.copy_(torch.randn(4096, device=dev), non_blocking=True)
side.close()
assert torch.cuda.current_stream() == home
del buf
torch.cuda.synchronize()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
