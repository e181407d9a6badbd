"""`rapidserve bench frontier`: SLO parsing, and the frontier's arithmetic end to end on hand-built
per-request records (a stand-in runner writes sweeps as `bench sweep` does; the SLO-independent
ones are rescored per SLO from their records, the SLO-aiming ones run per SLO)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from rapidserve.bench import frontier as fr
from rapidserve.bench.metrics import RequestRecord, summarize
from rapidserve.bench.sweep import make_row, records_path, summarize_configs, write_results
from rapidserve.bench.gpu_monitor import NO_GPU
from rapidserve.entrypoints.cli import build_parser

PROFILE = Path(__file__).resolve().parents[1] / "docs/results/2026-11-23-h100/profile.json"
RATES = (1.0, 2.0, 4.0)


def test_slo_dependence_and_parsing():
    assert fr.slo_dependent("rapid-rapid") and fr.slo_dependent("rapid-nexus")
    for name in ("hybrid-512", "disagg", "rapid", "rapid-static:40", "rapid-full"):
        assert not fr.slo_dependent(name)
    assert fr.parse_slos("50, 20,30,20", None) == [20.0, 30.0, 50.0]
    for bad in ("", "0", "-5", "abc", "inf"):
        with pytest.raises(ValueError, match="--itl-slos"):
            fr.parse_slos(bad, None)
    with pytest.raises(ValueError, match="needs --profile"):
        fr.parse_slos("2x", None)
    step = fr.reference_step_ms(str(PROFILE))
    assert 5.0 < step < 30.0  # an 8B model's batch-32 decode step on an H100
    assert fr.parse_slos("2x,50", str(PROFILE)) == sorted([round(2 * step, 3), 50.0])


# Each configuration's (ITL ms, TTFT ms) per offered rate, the same for every request of a run, so
# that attainment is 0 or 1 and the 90 % rate is hand-computable: between the last good rate r0 and
# the first bad r1 it is r0 + 0.1 (r1 - r0). Prompts of 500 tokens: a TTFT ceiling of 1000 ms.
def _timing(config: str, rate: float, slo: float) -> tuple[float, float]:
    if config == "hybrid-256":
        return 20.0, (500.0 if rate <= 2 else 1500.0)
    if config == "hybrid-512":
        return 35.0, 500.0
    if config == "disagg":
        return 10.0, (500.0 if rate <= 1 else 2000.0)
    if config == "rapid-rapid":
        return 0.8 * slo, 500.0  # aims under whatever SLO it is given
    if config == "rapid-static:32":  # a small decode group: slow steps, prompts keep up
        return 30.0, 500.0
    if config == "rapid-static:64":  # a large one: fast steps, prompts fall behind past 1 req/s
        return 12.0, (500.0 if rate <= 1 else 1500.0)
    raise AssertionError(config)


def _fake_sweep(calls: list[tuple[str, float]]):
    """A runner writing a sweep as `bench sweep` does: rows scored at the sweep's SLO, and every
    request's record under requests/."""
    def run(args: argparse.Namespace) -> dict:
        out = Path(args.output_dir)
        result = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "rates": list(RATES),
                  "attainment_target": 0.9, "configs": [], "rows": []}
        for config in args.configs.split(","):
            calls.append((config, args.slo_itl_ms))
            result["configs"].append({"name": config, "status": "ok"})
            for rate in RATES:
                itl, ttft = _timing(config, rate, args.slo_itl_ms)
                records = [RequestRecord(500, 5, ttft / 1000, (itl / 1000,) * 4, 1.0, True) for _ in range(10)]
                path = records_path(out, config, rate)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"request_rate": rate, "duration": 10.0,
                                            "requests": [r.to_dict() for r in records]}))
                summary = summarize(records, 10.0, args.slo_itl_ms, args.slo_ttft_ms_per_1k)
                result["rows"].append(make_row(config, rate, summary, NO_GPU))
        summarize_configs(result)
        write_results(result, out)
        return result
    return run


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args([
        "bench", "frontier", "--configs", "hybrid-256,hybrid-512,disagg,rapid-rapid", "--itl-slos", "15,25,50",
        "--request-rates", "1,2,4", "--output-dir", str(tmp_path), "--no-plots", *extra])


def test_frontier_from_hand_built_runs(tmp_path):
    calls: list[tuple[str, float]] = []
    result = fr.run_frontier(_args(tmp_path), _fake_sweep(calls))
    # SLO-independent configurations ran once; the SLO-aiming one once per SLO, given that SLO.
    assert sorted(c for c, _ in calls) == sorted(["hybrid-256", "hybrid-512", "disagg"] + ["rapid-rapid"] * 3)
    assert sorted(s for c, s in calls if c == "rapid-rapid") == [15.0, 25.0, 50.0]
    per = {e["slo_itl_ms"]: e for e in result["per_slo"]}
    approx = pytest.approx
    # 15 ms: no chunk meets the ITL SLO; disagg and rapid do.
    assert per[15.0]["rates"] == {"hybrid-256": None, "hybrid-512": None, "disagg": approx(1.1),
                                  "rapid-rapid": approx(4.0)}
    assert per[15.0]["best_hybrid"] is None
    assert math.isinf(per[15.0]["ratios"]["rapid-rapid"]["vs_best_hybrid"])
    # 25 ms: chunk 256 holds it up to 2.2 req/s (its TTFT breaks at 4); chunk 512 never.
    assert per[25.0]["best_hybrid"] == {"config": "hybrid-256", "rate": approx(2.2)}
    assert per[25.0]["ratios"]["rapid-rapid"] == {"vs_best_hybrid": approx(4.0 / 2.2),
                                                  "vs_disagg": approx(4.0 / 1.1)}
    assert per[25.0]["ratios"]["disagg"] == {"vs_best_hybrid": approx(0.5), "vs_disagg": None}
    # 50 ms: chunk 512 holds it at every rate run (a lower bound) and is the best chunk.
    assert per[50.0]["best_hybrid"] == {"config": "hybrid-512", "rate": approx(4.0)}
    notes = {(p["slo_itl_ms"], p["config"]): p["note"] for p in result["points"]}
    assert notes[(50.0, "hybrid-512")] == "lower bound" and notes[(15.0, "hybrid-256")] == "never reached"
    assert per[50.0]["ratios"]["rapid-rapid"]["vs_best_hybrid"] == approx(1.0)
    # The rescored shared sweeps and the per-SLO sweeps are on disk, as `bench rescore` writes them.
    assert (tmp_path / "shared" / "slo-itl-25" / "sweep.json").exists()
    assert (tmp_path / "slo-itl-15" / "sweep.json").exists()

    paths = fr.write_frontier(result, tmp_path)
    rows = (tmp_path / "frontier.csv").read_text().splitlines()
    assert rows[0] == "slo_itl_ms,config,max_good_rate,note,best_hybrid,vs_best_hybrid,best_static"
    assert len(rows) == 1 + 3 * 4
    assert json.loads(paths[0].read_text())["per_slo"][1]["best_hybrid"]["config"] == "hybrid-256"
    table = fr.format_frontier(result)
    line25 = next(line for line in table.splitlines() if line.strip().startswith("25"))
    assert "2.20" in line25 and "hybrid-256" in line25 and "1.82x" in line25
    assert "4.00+" in table and "never" in table
    png = fr.plot_frontier(result, tmp_path)
    assert png.stat().st_size > 10_000


def test_frontier_command_line(tmp_path, capsys):
    calls: list[tuple[str, float]] = []
    assert fr.main(_args(tmp_path), runner=_fake_sweep(calls)) == 0
    out = capsys.readouterr().out
    assert "ITL SLO ms" in out and "rapid-rapid/best" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"frontier.json", "frontier.csv", "shared"}


def test_simulated_frontier(tmp_path, capsys):
    """`rapidserve simulate --itl-slos`: the frontier on the simulator (the H100 profile), end to
    end: one simulated sweep of the SLO-independent configurations, one per SLO for rapid-rapid."""
    from rapidserve.entrypoints.cli import main

    rc = main(["simulate", "--profile", str(PROFILE), "--configs", "hybrid-256,hybrid-1024,rapid-rapid",
               "--request-rates", "2,8", "--dataset-name", "lmsys-like", "--num-prompts", "20",
               "--itl-slos", "2x,60", "--output-dir", str(tmp_path), "--quiet", "--no-plots"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "rapid-rapid/best" in out
    result = json.loads((tmp_path / "frontier.json").read_text())
    assert len(result["per_slo"]) == 2 and result["slos"][1] == 60.0
    assert {p["config"] for p in result["points"]} == {"hybrid-256", "hybrid-1024", "rapid-rapid"}
    # rapid-rapid was simulated at each SLO it aims at, the hybrids once.
    assert (tmp_path / "shared" / "sweep.json").exists()
    for slo in result["slos"]:
        sweep = json.loads((tmp_path / f"slo-itl-{slo:g}" / "sweep.json").read_text())
        assert sweep["args"]["slo_itl_ms"] == slo and "simulated" in sweep


def test_best_static_split_per_slo(tmp_path):
    """The best static split at each SLO (the reference an adaptive policy must beat): the static
    configurations run once and are rescored, and the best one changes with the SLO."""
    calls: list[tuple[str, float]] = []
    args = build_parser().parse_args([
        "bench", "frontier", "--configs", "hybrid-256,hybrid-512,rapid-static:32,rapid-static:64",
        "--itl-slos", "15,25,50", "--request-rates", "1,2,4", "--output-dir", str(tmp_path), "--no-plots"])
    result = fr.run_frontier(args, _fake_sweep(calls))
    assert sorted(c for c, _ in calls) == ["hybrid-256", "hybrid-512", "rapid-static:32", "rapid-static:64"]
    per = {e["slo_itl_ms"]: e for e in result["per_slo"]}
    approx = pytest.approx
    # 15 ms: only D64 meets it (to 1.1 req/s); no chunk does: inf x.
    assert per[15.0]["best_static"]["config"] == "rapid-static:64"
    assert per[15.0]["best_static"]["rate"] == approx(1.1)
    assert math.isinf(per[15.0]["best_static"]["vs_best_hybrid"])
    # 25 ms: D64 still the only one (D32's 30 ms steps break it); hybrid-256 holds to 2.2.
    assert per[25.0]["best_static"] == {"config": "rapid-static:64", "rate": approx(1.1),
                                        "vs_best_hybrid": approx(1.1 / 2.2)}
    # 50 ms: D32 holds at every rate (4.0+), past D64's 1.1.
    assert per[50.0]["best_static"] == {"config": "rapid-static:32", "rate": approx(4.0),
                                        "vs_best_hybrid": approx(1.0)}
    table = fr.format_frontier(result)
    assert "best static" in table and "static/best" in table
    line25 = next(line for line in table.splitlines() if line.strip().startswith("25"))
    assert "static:64" in line25 and "0.50x" in line25
    fr.write_frontier(result, tmp_path)
    rows = (tmp_path / "frontier.csv").read_text().splitlines()
    assert rows[0].endswith(",best_static") and all(r.endswith("rapid-static:32") for r in rows if r.startswith("50"))
    png = fr.plot_frontier(result, tmp_path)
    assert png.stat().st_size > 10_000


def test_a_configuration_that_could_not_run_has_no_ratio():
    """disagg failing at every rate (e.g. two copies of a 32B model on 80 GB): "no data", and no
    0.00x against the best chunk nor as anyone's disagg denominator."""
    from rapidserve.bench.sweep import failed_row

    def result(rows: list[dict]) -> dict:
        names = list(dict.fromkeys(r["config"] for r in rows))
        return {"attainment_target": 0.9, "configs": [{"name": n, "status": "ok"} for n in names], "rows": rows}

    def ok(config: str, rate: float, attained: float) -> dict:
        row = failed_row(config, rate, "")
        row.update(status="ok", error=None, attainment_p95_itl=attained)
        return row

    shared = result([ok("hybrid-256", 1.0, 1.0), ok("hybrid-256", 2.0, 0.0), ok("rapid-static:32", 1.0, 1.0),
                     ok("rapid-static:32", 2.0, 0.0), failed_row("disagg", None, "ValueError: no memory left")])
    f = fr.build_frontier([50.0], {50.0: shared}, {})
    e = f["per_slo"][0]
    notes = {p["config"]: p["note"] for p in f["points"]}
    assert notes["disagg"] == "no data"
    assert e["ratios"]["disagg"] == {"vs_best_hybrid": None, "vs_disagg": None}
    assert e["ratios"]["rapid-static:32"]["vs_disagg"] is None
    assert e["ratios"]["rapid-static:32"]["vs_best_hybrid"] == pytest.approx(1.0)
    line = fr.format_frontier(f).splitlines()[1]
    assert "0.00x" not in line
