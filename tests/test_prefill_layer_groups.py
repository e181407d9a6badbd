"""A prefill step in groups of layers (runner/layer_groups.py): the same tokens as the whole
forward, groups sized to --prefill-max-step-ms, and the rapid prefill worker following a
partition switch between two groups (the stand-in 16-SM mechanism of test_rapid_partitioning)."""

import queue
import threading

import pytest
import torch

from conftest import random_prompts
from test_rapid_partitioning import TOTAL, _PrefillAwarePolicy, fake_mechanism  # noqa: F401 (a fixture)

from rapidserve import SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.kv.block_manager import BlockManager
from rapidserve.request import Request
from rapidserve.resources.partition import Partition
from rapidserve.runner.layer_groups import LayerGroups
from rapidserve.runner.model_runner import ModelRunner
from rapidserve.runner.setup import prepare_model
from rapidserve.scheduler.chunked import ScheduledRequest
from rapidserve.serving import messages as m

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


# ---- sizing --------------------------------------------------------------------------------------


def test_group_size_from_estimate_then_measurements():
    assert LayerGroups(0.020, 32).size(8192) == 1  # nothing known: the finest groups
    # the profile's estimate: 296 ms for the whole 32-layer forward (9.25 ms a layer) -> 2 layers
    groups = LayerGroups(0.020, 32, estimate_s=lambda n: 0.296 * n / 8192)
    assert groups.size(8192) == 2 and groups.size(1024) == 17 and groups.size(64) == 32
    groups.measured(8192, 2, 0.010)  # measured: 5 ms a layer at 8K, it overrides the estimate
    assert groups.size(8192) == 4
    assert groups.size(12000) == 2  # same bucket, scaled by the tokens: 7.3 ms a layer
    assert groups.size(1024) == 32  # the nearest measured length, scaled: 0.6 ms a layer
    groups.measured(8192, 4, 0.040)  # an EWMA: halfway to 10 ms a layer
    assert groups.per_layer_s(8192) == pytest.approx(0.0075)
    groups.measured(8192, 0, 1.0)  # nothing ran: ignored
    assert groups.per_layer_s(8192) == pytest.approx(0.0075)


@pytest.mark.parametrize("kw,match", [({"max_step_s": 0.0}, "max_step_s"), ({"num_layers": 0}, "num_layers")])
def test_layer_groups_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LayerGroups(**{"max_step_s": 0.02, "num_layers": 2, **kw})


def test_prefill_max_step_ms_config():
    assert EngineConfig().prefill_max_step_ms == 20.0
    EngineConfig(prefill_max_step_ms=0.0)  # whole steps
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prefill_max_step_ms"):
            EngineConfig(prefill_max_step_ms=bad)


# ---- the runner ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner_parts(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    prepared = prepare_model(EngineConfig(model=path, device="cpu", num_kv_blocks=64))
    return prepared


def _prefill(prepared, prompts, groups: LayerGroups | None, between=None):
    """Logits and tokens of one prefill step of `prompts` (fresh blocks each time)."""
    blocks = BlockManager(prepared.cache.num_blocks, 16)
    runner = ModelRunner(prepared.loaded.model, prepared.cache, blocks, prepared.device,
                         prepared.eos_token_ids, prepared.backend, prepared.loaded.max_model_len)
    runner.layer_groups = groups
    batch = []
    for i, p in enumerate(prompts):
        req = Request(f"r{i}", p, GREEDY, 4)
        assert blocks.allocate(req.request_id, len(p))
        batch.append(ScheduledRequest(req, 0, len(p), True))
    with torch.inference_mode():
        logits = runner._forward_step(batch, None, between)[0]
    return logits, runner.execute(batch, between)


def test_layer_groups_give_identical_logits_and_tokens(runner_parts):
    prompts = random_prompts(3, min_len=5, max_len=90)
    whole_logits, whole = _prefill(runner_parts, prompts, None)
    calls = []
    groups = LayerGroups(1e-9, len(runner_parts.loaded.model.layers))  # one layer a group
    logits, tokens = _prefill(runner_parts, prompts, groups, lambda: calls.append(1))
    assert tokens == whole and torch.equal(logits, whole_logits)  # op for op the same forward
    assert len(calls) == 2 * (len(runner_parts.loaded.model.layers) - 1)  # between groups, twice (two steps)
    assert groups.per_layer_s(sum(map(len, prompts))) is not None  # and the groups were timed


def test_forward_layers_range_is_checked(runner_parts):
    model = runner_parts.loaded.model
    with pytest.raises(ValueError, match="layer range"):
        model.forward_layers(torch.zeros(1, dtype=torch.long), torch.zeros(1, 64), 1, len(model.layers) + 1)


# ---- the rapid prefill worker follows a switch between groups ---------------------------------------


def test_prefill_worker_moves_between_layer_groups(tiny_model_dir, fake_mechanism, monkeypatch):  # noqa: F811
    from rapidserve.serving.workers import PrefillWorker

    monkeypatch.setattr("rapidserve.serving.partitioning.make_policy", lambda *a, **k: _PrefillAwarePolicy())
    path, _ = tiny_model_dir("llama")
    config = EngineConfig(model=path, device="cpu", mode="rapid", placement="thread", partition_policy="static:8",
                          prefill_max_step_ms=1e-6)  # one layer a group
    prepared = prepare_model(EngineConfig(model=path, device="cpu", num_kv_blocks=64))
    shared = m.SharedTensors(prepared.loaded.model, prepared.cache.tensor, prepared.loaded.max_model_len,
                             prepared.eos_token_ids)
    inbox, to_decode = queue.Queue(), queue.Queue()
    import ctypes

    from rapidserve.serving.liveness import StepClock

    clock = StepClock(ctypes.c_double(0.0))  # the step watch's: each group restarts it
    starts: list[tuple[float, float]] = []  # the clock before and after each group's end
    worker = PrefillWorker(config, inbox, to_decode, shared, clock)
    assert worker.runner.layer_groups is not None and worker.partitioning.switching
    split = Partition.split(8, TOTAL)
    prompt_a, prompt_b = random_prompts(2, min_len=20, max_len=40)
    between = worker._between_groups

    def first_group_done():
        # The decode worker switches while the prompt's first group runs; a prompt comes after.
        if not hasattr(first_group_done, "sent"):
            first_group_done.sent = True
            inbox.put(m.SetPartition(split, decided_s=0.0))
            inbox.put(m.PrefillWork("b", prompt_b, len(prompt_b), GREEDY, 4, [2, 3, 4]))
        before = clock.slot.value
        between()
        starts.append((before, clock.slot.value))

    monkeypatch.setattr(worker, "_between_groups", first_group_done)
    inbox.put(m.PrefillWork("a", prompt_a, len(prompt_a), GREEDY, 4, [0, 1]))
    t = threading.Thread(target=worker.run)
    t.start()
    got = [to_decode.get(timeout=60) for _ in range(3)]
    inbox.put(m.Shutdown())
    t.join(timeout=60)
    assert not t.is_alive()
    # in a step at each group's end, and the next group is a step of its own; 0 out of its steps
    assert len(starts) >= 2 and all(0 < before < after for before, after in starts), starts
    assert clock.slot.value == 0.0
    # it moved mid-way through a's step (before a's PrefillDone), and b waited for the step's end
    assert [type(x).__name__ for x in got] == ["PartitionFollowed", "PrefillDone", "PrefillDone"]
    assert got[0].partition == split and got[0].moved_s > 0.0 and [x.request_id for x in got[1:]] == ["a", "b"]
    moves = [p for side, what, p in fake_mechanism if side == "prefill" and what == "streams"]
    assert moves[-1] == split


def test_a_cpu_prefill_worker_runs_long_prompts_in_groups_for_the_step_watch(tiny_model_dir):
    """On CPU a long prompt's prefill runs in groups of about a second (each a step for
    --step-timeout-s), unless the step watch is off."""
    from rapidserve.serving.workers import _CPU_GROUP_S, PrefillWorker

    path, _ = tiny_model_dir("llama")
    prepared = prepare_model(EngineConfig(model=path, device="cpu", num_kv_blocks=64))
    shared = m.SharedTensors(prepared.loaded.model, prepared.cache.tensor, prepared.loaded.max_model_len,
                             prepared.eos_token_ids)
    for timeout, grouped in ((300.0, True), (0.0, False)):
        config = EngineConfig(model=path, device="cpu", mode="rapid", placement="thread", step_timeout_s=timeout)
        worker = PrefillWorker(config, queue.Queue(), queue.Queue(), shared)
        assert (worker.runner.layer_groups is not None) == grouped
        if grouped:
            assert worker.runner.layer_groups.max_step_s == _CPU_GROUP_S


def test_the_step_timeline_keeps_the_switch_marks(tmp_path):
    import time

    from rapidserve.runner.timeline import StepTimeline, load_marks, load_spans

    decode, prefill = StepTimeline("decode", torch.device("cpu")), StepTimeline("prefill", torch.device("cpu"))
    decode.mark("decide", "D8/P8")
    decided = decode.marks[0].at_s
    time.sleep(0.002)
    prefill.mark("follow", "D8/P8", decided)
    decode.dump(str(tmp_path))
    prefill.dump(str(tmp_path))
    marks = load_marks(str(tmp_path))
    assert [(k.role, k.kind, k.partition) for k in marks] == [("decode", "decide", "D8/P8"), ("prefill", "follow", "D8/P8")]
    assert marks[0].reaction_s is None and marks[1].reaction_s >= 0.002
    assert load_spans(str(tmp_path)) == []  # the spans' reader is unchanged
