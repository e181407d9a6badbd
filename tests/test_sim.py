"""The simulator (rapidserve.sim): the event loop on hand-computed cases with a hand-written cost
model, determinism, a policy's decision reaching the result, and `simulate` end to end."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from rapidserve.bench.workloads import SampleRequest
from rapidserve.config import EngineConfig
from rapidserve.resources.partition import Partition
from rapidserve.resources.profile import DecodeTable, PrefillTable, Profile, ProfileMetadata
from rapidserve.sim.clock import Clock, Driver, EventLoop, Inbox
from rapidserve.sim.topology import ModelShape, run_disagg, run_hybrid, run_rapid

TOTAL = 100
MODEL = "preset:llama-3.1-8b"


class HandCost:
    """Hand-computable step times (s): a decode step 10 ms on the whole device, scaled by
    100/SMs on a split, doubled beside a prefill; a prefill 1 ms per token on the whole device,
    scaled likewise, x1.5 beside a decode; a hybrid step 10 ms + 1 ms per prefill token; a KV copy
    5 ms."""

    total_sms = TOTAL
    host_overhead_s = 0.0
    fit_errors: dict = {}
    limitations: list = []

    def decode_step_s(self, batch, kv_tokens, sms=None, beside=()):
        s = 0.010 * TOTAL / (sms or TOTAL)
        return 2 * s if beside else s

    def prefill_step_s(self, prompts, sms=None, decode_beside=None):
        s = 0.001 * sum(p.tokens for p in prompts) * TOTAL / (sms or TOTAL)
        return 1.5 * s if decode_beside is not None else s

    def hybrid_step_s(self, prefill, decode_batch, decode_kv_tokens):
        return 0.010 + 0.001 * sum(p.tokens for p in prefill)

    def kv_transfer_s(self, num_bytes):
        return 0.005


def synthetic_profile() -> Profile:
    sms, ctx, batch = (20, 40, TOTAL), (1024,), (1, 64)
    grid = tuple(tuple(tuple(5.0 + 0.1 * b + 100 / s for b in batch) for _ in ctx) for s in sms)
    return Profile(
        ProfileMetadata("Synthetic 80GB", TOTAL, 10, "green-contexts", "llama-3.1-8b", "bfloat16",
                        "2026-01-01T00:00:00+00:00", "0.1.0", 2048),
        DecodeTable(sms, ctx, batch, grid, tuple(tuple(tuple(2 * x for x in r) for r in g) for g in grid)),
        PrefillTable((60, 80, TOTAL), (2048, 8192),
                     tuple((0.03 * 2048 * TOTAL / s, 0.035 * 8192 * TOTAL / s) for s in (60, 80, TOTAL))),
    )


def config(**kw) -> EngineConfig:
    return EngineConfig(model=MODEL, load_format="dummy", num_kv_blocks=kw.pop("num_kv_blocks", 1000), **kw)


def req(prompt: int, output: int) -> SampleRequest:
    return SampleRequest([1] * prompt, prompt, output)


def times(result) -> list[list[float]]:
    """Each request's token times, from its record (arrival + TTFT + ITLs)."""
    return [[r.ttft, *r.itls] for r in result.records]


def close(a, b) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-9) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def shape():
    return ModelShape.of(config())


# ---- the event loop ----------------------------------------------------------------------------


def test_events_run_in_time_then_priority_order():
    loop, seen = EventLoop(), []
    loop.at(2.0, 2, lambda: seen.append("turn@2"))
    loop.at(1.0, 2, lambda: (seen.append("turn@1"), loop.at(2.0, 0, lambda: seen.append("price@2"))))
    loop.run()
    assert seen == ["turn@1", "price@2", "turn@2"]
    with pytest.raises(ValueError, match="in the past"):
        loop.at(1.0, 0, lambda: None)


def test_a_message_is_seen_at_its_senders_time_and_wakes_a_sleeping_worker():
    loop, sender = EventLoop(), Clock()
    inbox = Inbox(sender)

    class Logic:
        idle = True
        log: list = []

        def turn(self, msgs):
            self.log.append((loop.now, msgs))
            return True

    clock = Clock()
    logic = Logic()
    Driver(loop, clock, logic, inbox, lambda: 0)
    sender.now = 0.5
    inbox.put("a")
    loop.run()
    # as the device worker: idle, it blocks on its inbox for up to _IDLE_WAIT_S (0.5 s), then
    # turns once more; a turn that changed nothing is not repeated until a message comes
    assert logic.log == [(0.5, ["a"]), (1.0, [])]
    assert inbox.take(10.0) == []
    loop.at(1.2, 1, lambda: inbox.put_at(1.2, "b"))  # a message during an idle wait wakes it at once
    loop.run()
    assert logic.log[2:] == [(1.2, ["b"]), (1.7, [])]


def test_rapid_two_overlapping_workers(shape):
    """Hand-computed: r0 (100-token prompt, 5 tokens) at 0; r1 (50 tokens, 2 tokens) at 0.105.
    r0 prefills alone in 0.100 s; its decode steps take 0.010 alone; r1's prefill starts at 0.11
    beside r0's step [0.11, 0.12) (0.050 x 1.5 = 0.075, to 0.185); r0's steps starting at 0.12
    and 0.14 run beside it (0.020 each)."""
    r = run_rapid(config(mode="rapid"), shape, 1000, HandCost(), synthetic_profile(), [req(100, 5), req(50, 2)],
                  [0.0, 0.105])
    r0, r1 = r.records
    assert close([r0.ttft, *r0.itls], [0.100, 0.010, 0.010, 0.020, 0.020])
    assert close([r1.ttft + 0.105, *r1.itls], [0.185, 0.010])
    assert r.num_steps == {"decode": 5, "prefill": 2}
    assert r.duration == pytest.approx(0.195)


class _SwitchPolicy:
    """Decode on 40 SMs while a prompt waits or prefills; the whole device otherwise."""

    name = "switch"
    partitioned = True

    def partitions(self):
        return (Partition.FULL, Partition.split(40, TOTAL))

    def decide(self, state):
        return Partition.split(40, TOTAL) if state.prefill_active else Partition.FULL


def test_rapid_partition_switch_prefill_follows_at_its_next_step(shape, monkeypatch):
    """Hand-computed with a policy that splits D40/P60 while a prompt is in prefill: r0's prompt
    (100) runs on 60 SMs (0.1667 s); its decode steps on the whole device (0.010) until r1
    arrives (0.17): the step decided at 0.17667 runs on 40 SMs beside r1's prefill (0.025 x 2),
    and r1's prefill, which followed to P60, beside r0's step [0.17667, 0.18667) (0.06 x 100/60 x
    1.5 = 0.15)."""
    import rapidserve.serving.partitioning as part

    monkeypatch.setattr(part, "build_policy", lambda cfg, partitioner: _SwitchPolicy())
    r = run_rapid(config(mode="rapid", partition_policy="full"), shape, 1000, HandCost(), synthetic_profile(),
                  [req(100, 4), req(60, 2)], [0.0, 0.17])
    r0, r1 = r.records
    t0 = 0.1 / 0.6
    assert close([r0.ttft, *r0.itls], [t0, 0.010, 0.010, 0.050])
    assert close([r1.ttft + 0.17, *r1.itls], [t0 + 0.010 + 0.15, 0.010])
    assert r.partition is not None and r.partition.switches == 3  # split, full, split, full


def test_hybrid_preemption(shape):
    """A pool of 4 blocks of 16 tokens and two requests of 16 + 40 tokens: the second is
    preempted when both outgrow 2 blocks and recomputed once the first is done. The first's
    steps are 10 ms each after the 42 ms step that prefilled both prompts (10 + 32 tokens)."""
    r = run_hybrid(config(num_kv_blocks=4), shape, 4, HandCost(), [req(16, 40), req(16, 40)], [0.0, 0.0])
    r0, r1 = r.records
    assert r.num_preemptions >= 1
    assert r0.output_len == r1.output_len == 40
    assert close([r0.ttft, *r0.itls], [0.042] + [0.010] * 39)
    assert max(r1.itls) > 0.1  # it waited for the first to finish
    assert r1.e2el > r0.e2el


def test_rapid_preemption_goes_back_through_the_prefill_worker(shape):
    """Hand-computed, as the decode worker behaves today: two requests of 16 + 40 tokens in a
    4-block pool, prefilled together (32 ms), decode alone (10 ms a step). When they need a third
    block each (33 tokens, at 0.192 s) the later one is preempted; its blocks are held until the
    step in flight retires, so the earlier one is preempted too. Idle, the worker blocks on its
    inbox for 0.5 s before handing them back: the first is prefilled again (33 tokens: 33 ms),
    decodes to the end at 0.945 s, and after another 0.5 s wait the second follows."""
    r = run_rapid(config(mode="rapid", num_kv_blocks=4), shape, 4, HandCost(), synthetic_profile(),
                  [req(16, 40), req(16, 40)], [0.0, 0.0])
    first = [0.032 + 0.010 * k for k in range(17)]
    t0 = [*first, *(0.192 + 0.5 + 0.033 + 0.010 * k for k in range(23))]
    t1 = [*first, *(0.945 + 0.5 + 0.033 + 0.010 * k for k in range(23))]
    for rec, expect in zip(r.records, (t0, t1)):
        assert close([rec.ttft, *rec.itls], [expect[0], *(b - a for a, b in zip(expect, expect[1:]))])
    assert r.num_preemptions == 2
    assert r.num_steps["prefill"] == 3  # both prompts at once, then each recompute


def test_disagg_prices_the_kv_copy(shape):
    """One request: prefill on the prefill instance's 50 SMs (0.1 x 2 = 0.2 s) plus its KV copy
    (5 ms), then decode steps on the decode instance's 50 SMs (0.020 each)."""
    r = run_disagg(config(mode="disagg"), shape, 80 << 30, HandCost(), synthetic_profile(), [req(100, 3)], [0.0])
    (r0,) = r.records
    assert close([r0.ttft, *r0.itls], [0.205, 0.020, 0.020])
    assert r.busy_s["kv_transfer"] == pytest.approx(0.005)


def test_a_policys_decision_changes_the_result(shape):
    reqs = [req(200, 20) for _ in range(6)]
    arrivals = [0.0, 0.01, 0.02, 0.05, 0.1, 0.12]
    itl = {}
    for policy in ("full", "static:20"):
        r = run_rapid(config(mode="rapid", partition_policy=policy), shape, 1000, HandCost(), synthetic_profile(),
                      reqs, arrivals)
        itl[policy] = max(i for rec in r.records for i in rec.itls)
    assert itl["static:20"] > itl["full"]


# ---- determinism and the command ---------------------------------------------------------------


def _simulate(tmp_path: Path, name: str, *extra: str) -> dict:
    from rapidserve.entrypoints.cli import main

    profile = tmp_path / "profile.json"
    if not profile.exists():
        synthetic_profile().save(profile)
    out = tmp_path / name
    rc = main(["simulate", "--profile", str(profile), "--configs", "hybrid-512,rapid-static:20,disagg",
               "--request-rates", "2,8", "--dataset-name", "lmsys-like", "--num-prompts", "30",
               "--slo-itl-ms", "60", "--output-dir", str(out), "--no-plots", "--quiet", *extra])
    assert rc == 0
    return json.loads((out / "sweep.json").read_text())


def test_simulate_end_to_end_is_deterministic_and_rescorable(tmp_path, capsys):
    a = _simulate(tmp_path, "a")
    b = _simulate(tmp_path, "b", "--jobs", "2")  # in two processes: the same runs
    assert [r["config"] for r in a["rows"]] == ["hybrid-512"] * 2 + ["rapid-static:20"] * 2 + ["disagg"] * 2
    assert all(r["status"] == "ok" and r["completed"] == 30 for r in a["rows"])
    for row in a["rows"]:
        rec = f"requests/{row['config']}@{row['request_rate']:g}.json"
        assert (tmp_path / "a" / rec).read_text() == (tmp_path / "b" / rec).read_text()
    assert [r["p95_itl_ms"] for r in a["rows"]] == [r["p95_itl_ms"] for r in b["rows"]]
    assert (tmp_path / "a" / "sweep.csv").exists()
    from rapidserve.bench.metrics import RequestRecord

    saved = json.loads((tmp_path / "a" / "requests" / "disagg@8.json").read_text())
    assert set(saved["requests"][0]) == set(RequestRecord(1).to_dict())  # bench sweep's format
    assert a["simulated"]["limitations"]
    static = [r for r in a["rows"] if r["config"] == "rapid-static:20"]
    assert all(r["sm_partitions"].startswith("D20/P80 100 %") for r in static)
    from rapidserve.entrypoints.cli import main

    assert main(["bench", "rescore", str(tmp_path / "a"), "--slo-itl-ms", "20", "--no-plots",
                 "--output-dir", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "sweep.json").read_text())
    assert [r["goodput_p95_itl"] for r in rescored["rows"]] != [r["goodput_p95_itl"] for r in a["rows"]]


def test_simulate_cost_error_slows_steps(tmp_path):
    base = _simulate(tmp_path, "base")
    slow = _simulate(tmp_path, "slow", "--cost-error", "decode:+50%,hybrid:+50%")
    for r0, r1 in zip(base["rows"], slow["rows"]):
        assert r1["mean_itl_ms"] > r0["mean_itl_ms"]


def test_simulate_rejects_bad_input(tmp_path, capsys):
    from rapidserve.entrypoints.cli import main

    synthetic_profile().save(tmp_path / "p.json")
    assert main(["simulate", "--configs", "hybrid-512", "--request-rates", "1", "--num-prompts", "2",
                 "--output-dir", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--profile" in capsys.readouterr().err
    assert main(["simulate", "--profile", str(tmp_path / "p.json"), "--cost-error", "decode:+x%", "--configs",
                 "hybrid-512", "--request-rates", "1", "--num-prompts", "2", "--output-dir", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "decode:+x%" in capsys.readouterr().err


def test_replay_of_a_simulated_sweep_reproduces_it(tmp_path):
    """--replay takes an archived sweep's workload, rates and server commands: replaying a
    simulated sweep must give back its every figure (the simulation is deterministic)."""
    from rapidserve.entrypoints.cli import main
    from rapidserve.sim.simulate import FIDELITY_METRICS

    _simulate(tmp_path, "archive")
    assert main(["simulate", "--replay", str(tmp_path / "archive"), "--output-dir", str(tmp_path / "replay"),
                 "--no-plots", "--quiet"]) == 0
    f = json.loads((tmp_path / "replay" / "fidelity.json").read_text())
    assert [(r["config"], r["request_rate"]) for r in f["rows"]] == [
        (c, rate) for c in ("hybrid-512", "rapid-static:20", "disagg") for rate in (2.0, 8.0)]
    for row in f["rows"]:
        for key, _ in FIDELITY_METRICS:
            assert row[f"simulated_{key}"] == row[f"measured_{key}"], (row["config"], key)
    assert set(f["max_rate_at_attainment_p95_itl"]) == {"hybrid-512", "rapid-static:20", "disagg"}
    assert "(+0%)" in (tmp_path / "replay" / "fidelity.md").read_text()


@pytest.mark.parametrize("mode", ["hybrid", "rapid", "disagg"])
def test_a_request_the_server_would_refuse_fails_alone(shape, mode):
    """Admission as the engine front does it: a request needing more KV than the pool holds is
    answered 400 (a failed record); the others run."""
    cfg = config(mode=mode, num_kv_blocks=8)  # 128 tokens
    reqs, arrivals = [req(200, 4), req(50, 3)], [0.0, 0.0]
    if mode == "hybrid":
        r = run_hybrid(cfg, shape, 8, HandCost(), reqs, arrivals)
    elif mode == "rapid":
        r = run_rapid(cfg, shape, 8, HandCost(), synthetic_profile(), reqs, arrivals)
    else:
        r = run_disagg(cfg, shape, 80 << 30, HandCost(), synthetic_profile(), reqs, arrivals)
    bad, good = r.records
    assert not bad.success and "HTTP 400" in bad.error and "KV cache" in bad.error
    assert good.success and good.output_len == 3


def test_simulate_auto_rates_probe_first(tmp_path):
    from rapidserve.entrypoints.cli import main

    synthetic_profile().save(tmp_path / "p.json")
    assert main(["simulate", "--profile", str(tmp_path / "p.json"), "--configs", "hybrid-512", "--request-rates",
                 "auto", "--num-auto-rates", "2", "--num-prompts", "10", "--dataset-name", "lmsys-like",
                 "--output-dir", str(tmp_path / "auto"), "--no-plots", "--quiet"]) == 0
    result = json.loads((tmp_path / "auto" / "sweep.json").read_text())
    probe = result["probe"]["request_throughput"]
    assert result["rates_source"] == "auto" and len(result["rates"]) == 2
    assert result["rates"][0] == pytest.approx(0.25 * probe, rel=0.01)
    assert result["rates"][1] == pytest.approx(1.5 * probe, rel=0.01)


def test_replay_runs_a_sweep_from_before_the_closed_loop_open_loop(tmp_path):
    """An archived sweep whose commands name no closed-loop flag and whose rows have no
    `sm_feedback` (bench sweep writes it since the closed loop) ran open loop: its rapid
    commands are replayed with --no-closed-loop, said in fidelity.md; --server-args come after
    and win. A sweep with the column (or a flag) is replayed as recorded."""
    from rapidserve.entrypoints.cli import main
    from rapidserve.sim.simulate import predates_closed_loop

    _simulate(tmp_path, "archive")
    path = tmp_path / "archive" / "sweep.json"
    archived = json.loads(path.read_text())
    for row in archived["rows"]:
        row.pop("sm_feedback", None)
    path.write_text(json.dumps(archived))
    assert predates_closed_loop(archived)
    assert not predates_closed_loop({**archived, "rows": [{**r, "sm_feedback": None} for r in archived["rows"]]})
    flagged = [{**c, "command": c["command"] + " --closed-loop"} for c in archived["configs"]]
    assert not predates_closed_loop({**archived, "configs": flagged})

    def replay(name: str, *extra: str) -> dict[str, str]:
        assert main(["simulate", "--replay", str(tmp_path / "archive"), "--output-dir", str(tmp_path / name),
                     "--no-plots", "--quiet", *extra]) == 0
        return {c["name"]: c["command"] for c in json.loads((tmp_path / name / "sweep.json").read_text())["configs"]}

    cmds = replay("open")
    assert cmds["rapid-static:20"].endswith("--no-closed-loop")
    assert "closed-loop" not in cmds["hybrid-512"] + cmds["disagg"]  # only rapid has a partitioning loop
    text = (tmp_path / "open" / "fidelity.md").read_text()
    assert "rapid-static:20: --no-closed-loop added" in text and "hybrid-512: --no" not in text
    cmds = replay("closed", "--server-args=--closed-loop")
    assert cmds["rapid-static:20"].endswith("--no-closed-loop --closed-loop")
    assert "then --server-args '--closed-loop'" in (tmp_path / "closed" / "fidelity.md").read_text()


# ---- MoE and FP8 models: their weights and KV size the pools -----------------------------------


def test_moe_and_fp8_models_size_the_kv_pool_from_their_weights():
    import torch

    from rapidserve.bench.floors import model_cost
    from rapidserve.sim.topology import kv_blocks

    h200 = 141 << 30
    for model, kw in (("preset:mixtral-8x7b", {}), ("preset:llama-3.1-70b", {"quantization": "fp8"})):
        c = EngineConfig(model=f"{model}", load_format="dummy", **kw)
        s = ModelShape.of(c)
        # every expert of every layer (Mixtral: 46.7B parameters), FP8 projections one byte each
        assert s.weight_bytes == pytest.approx(model_cost(s.config, torch.bfloat16).weight_bytes, rel=2e-3)
    mixtral = ModelShape.of(EngineConfig(model="preset:mixtral-8x7b", load_format="dummy"))
    assert 93e9 < mixtral.weight_bytes < 94e9
    bf16 = ModelShape.of(EngineConfig(model="preset:llama-3.1-70b", load_format="dummy"))
    fp8 = ModelShape.of(EngineConfig(model="preset:llama-3.1-70b", load_format="dummy", quantization="fp8"))
    fp8kv = ModelShape.of(EngineConfig(model="preset:llama-3.1-70b", load_format="dummy", quantization="fp8",
                                       kv_cache_dtype="fp8"))
    assert 72e9 < fp8.weight_bytes < 73e9 and bf16.weight_bytes > 141e9
    assert fp8kv.block_bytes(16) * 2 == fp8.block_bytes(16) == bf16.block_bytes(16)
    with pytest.raises(ValueError, match="no memory left"):  # 141 GB of bf16 weights on a 141 GiB GPU at 0.9
        kv_blocks(EngineConfig(model="preset:llama-3.1-70b", load_format="dummy"), bf16, h200)
    cfg = EngineConfig(model="preset:llama-3.1-70b", load_format="dummy", quantization="fp8", kv_cache_dtype="fp8")
    blocks = kv_blocks(cfg, fp8kv, h200)
    assert blocks * fp8kv.block_bytes(16) > 50e9  # issue 18: >= 50 GB of KV beside an FP8 70B on one H200
    bf16_kv = kv_blocks(dataclasses.replace(cfg, kv_cache_dtype="auto"), fp8, h200)
    assert abs(blocks - 2 * bf16_kv) <= 1  # the same bytes, half a block each


def test_simulate_an_fp8_profile_runs_its_servers_in_fp8(tmp_path):
    """A profile of FP8 weights and KV (metadata.dtype) makes every simulated server FP8: the
    server command carries the flags, and the pools are sized from one byte per weight and entry."""
    from rapidserve.entrypoints.cli import main
    from rapidserve.resources.profile_derive import derive_profile, preset_target

    measured = Profile.from_json(json.loads(Path("docs/results/2026-11-23-h100/profile.json").read_text()))
    p = derive_profile(measured, preset_target("preset:llama-3.1-70b", quantization="fp8", kv_cache_dtype="fp8",
                                               gpu_name="NVIDIA H200 141GB HBM3e", bandwidth_scale=1.433))
    p.save(tmp_path / "70b.json")
    out = tmp_path / "sim"
    assert main(["simulate", "--profile", str(tmp_path / "70b.json"), "--configs", "hybrid-512,rapid-static:64",
                 "--request-rates", "0.5", "--dataset-name", "lmsys-like", "--num-prompts", "6", "--slo-itl-ms", "100",
                 "--output-dir", str(out), "--no-plots", "--quiet"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert all("--quantization fp8" in c["command"] and "--kv-cache-dtype fp8" in c["command"]
               for c in result["configs"])
    assert all(r["status"] == "ok" and r["completed"] == 6 for r in result["rows"])
    blocks = {r["num_kv_blocks"] for r in result["simulated"]["runs"]}
    assert min(blocks) * 16 * p.model_shape.kv_bytes_per_token > 50e9
