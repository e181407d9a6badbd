"""`rapidserve bench sweep`: configuration and rate parsing, the interpolated 90 %-attainment
rate on hand-built data, outputs and plots from a hand-built result, the GPU monitor with and
without NVML, server start failures, and one tiny sweep against live CPU servers."""

from __future__ import annotations

import csv
import gzip
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rapidserve.bench.gpu_monitor import NO_GPU, GpuMonitor
from rapidserve.bench.plots import baseline_value, plot_sweep
from rapidserve.bench.sweep import (
    ROW_KEYS,
    ServerProcess,
    ServerStartError,
    auto_rates,
    failed_row,
    TABLE_COLUMNS,
    format_table,
    max_rate_at_attainment,
    parse_config,
    parse_partition_times,
    partition_shares,
    parse_configs,
    parse_rates,
    require_healthy,
    summarize_configs,
    write_results,
)
from rapidserve.entrypoints.cli import main


def test_configs_and_rates():
    assert parse_config("hybrid-1024").server_flags == ("--mode", "hybrid", "--max-num-batched-tokens", "1024")
    assert parse_config("rapid").server_flags == ("--mode", "rapid")
    assert parse_config("rapid-adaptive").server_flags == ("--mode", "rapid", "--partition-policy", "adaptive")
    assert parse_config("disagg").server_flags == ("--mode", "disagg")
    assert [c.name for c in parse_configs("hybrid-512, rapid")] == ["hybrid-512", "rapid"]
    for bad in ("hybrid-x", "hybrid-0", "rapid-", "chunked", ""):
        with pytest.raises(ValueError):
            parse_configs(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_configs("rapid,rapid")
    assert parse_rates("4, 1,2,2") == [1.0, 2.0, 4.0]
    assert parse_rates("auto") is None
    for bad in ("1,inf", "0", "a", ""):
        with pytest.raises(ValueError):
            parse_rates(bad)
    assert auto_rates(8.0, 6) == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert auto_rates(3.0, 1) == [3.0]
    with pytest.raises(ValueError):
        auto_rates(0.0, 4)


def _at(rates, attainments, **kw):
    r = max_rate_at_attainment(rates, attainments, **kw)
    return (None if r.rate is None else pytest.approx(r.rate)), r.note


def test_max_rate_at_attainment():
    # Interpolated between 2 (95 %) and 4 (85 %): 90 % at 3.
    assert _at([1, 2, 4, 8], [1.0, 0.95, 0.85, 0.2]) == (3.0, "interpolated")
    # Order of the input does not matter.
    assert _at([8, 1, 4, 2], [0.2, 1.0, 0.85, 0.95]) == (3.0, "interpolated")
    # The first drop below the target counts, even if a higher rate recovers (noise).
    assert _at([1, 2, 3], [0.92, 0.80, 0.95]) == (1 + 0.02 / 0.12, "interpolated")
    # Exactly at the target is meeting it.
    assert _at([1, 2, 3], [1.0, 0.9, 0.5]) == (2.0, "interpolated")
    # Never reaches 90 %, even at the lightest load.
    assert _at([1, 2], [0.85, 0.1]) == (None, "never reached")
    # Always above: the highest measured rate, a lower bound.
    assert _at([1, 2, 4], [1.0, 0.99, 0.93]) == (4.0, "lower bound")
    assert _at([], []) == (None, "no data")
    assert _at([1, 2], [None, None]) == (None, "no data")
    assert _at([1, 3], [1.0, 0.0], target=0.5) == (2.0, "interpolated")


def _row(config, rate, **metrics):
    row = dict.fromkeys(ROW_KEYS)
    row.update(config=config, request_rate=rate, status="ok", completed=10, failed=0)
    row.update(metrics)
    return row


def _result():
    rows = [
        _row("hybrid-512", 1.0, output_throughput=100.0, request_throughput=1.0, goodput_p95_itl=1.0,
             goodput_max_itl=0.9, goodput_itl_only=1.0, attainment_p95_itl=1.0, attainment_max_itl=0.9,
             attainment_itl_only=1.0, p95_ttft_ms=50.0, p95_itl_ms=20.0),
        _row("hybrid-512", 2.0, output_throughput=180.0, request_throughput=1.8, goodput_p95_itl=1.2,
             goodput_max_itl=0.5, goodput_itl_only=1.5, attainment_p95_itl=0.6, attainment_max_itl=0.25,
             attainment_itl_only=0.8, p95_ttft_ms=400.0, p95_itl_ms=60.0),
        _row("rapid", 1.0, output_throughput=110.0, request_throughput=1.0, goodput_p95_itl=1.0,
             goodput_max_itl=1.0, goodput_itl_only=1.0, attainment_p95_itl=1.0, attainment_max_itl=1.0,
             attainment_itl_only=1.0, p95_ttft_ms=30.0, p95_itl_ms=15.0, gpu_util_pct=40.0),
        _row("rapid", 2.0, output_throughput=220.0, request_throughput=2.0, goodput_p95_itl=2.0,
             goodput_max_itl=1.9, goodput_itl_only=2.0, attainment_p95_itl=1.0, attainment_max_itl=0.95,
             attainment_itl_only=1.0, p95_ttft_ms=35.0, p95_itl_ms=16.0, gpu_util_pct=70.0),
        failed_row("disagg", None, "the server exited with code 2 before listening:\nerror: boom"),
    ]
    result = {"attainment_target": 0.9, "rows": rows, "configs": [
        {"name": "hybrid-512", "status": "ok"}, {"name": "rapid", "status": "ok"},
        {"name": "disagg", "status": "failed"}]}
    summarize_configs(result)
    return result


def test_outputs_from_hand_built_result(tmp_path):
    result = _result()
    hybrid, rapid, disagg = result["configs"]
    # hybrid: 1.0 -> 0.6 between 1 and 2 req/s: 90 % at 1.25.
    assert hybrid["max_rate_at_attainment"]["p95_itl"] == {"rate": pytest.approx(1.25), "note": "interpolated"}
    assert hybrid["max_rate_at_attainment"]["max_itl"] == {"rate": 1.0, "note": "interpolated"}
    assert rapid["max_rate_at_attainment"]["p95_itl"] == {"rate": 2.0, "note": "lower bound"}
    assert disagg["max_rate_at_attainment"]["p95_itl"] == {"rate": None, "note": "no data"}
    table = format_table(result)
    assert "hybrid-512" in table and "FAILED: the server exited with code 2 before listening: ... error: boom" in table
    assert "1.25" in table and "2 (or more)" in table and "disagg         failed" in table

    csv_path, json_path = write_results(result, tmp_path)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(ROW_KEYS) and len(rows) == 5
    assert rows[-1]["status"] == "failed" and rows[-1]["request_rate"] == ""
    assert json.loads(json_path.read_text())["configs"][0]["max_rate_at_attainment"]["p95_itl"]["rate"] == 1.25

    assert baseline_value(result["rows"], "output_throughput", "hybrid-512") == (100.0, 1.0)
    assert baseline_value(result["rows"], "gpu_util_pct", "hybrid-512") is None  # no value: raw
    assert baseline_value(result["rows"], "output_throughput", "hybrid-2048") is None
    paths = plot_sweep(result["rows"], tmp_path)
    assert {p.name for p in paths} == {"throughput.png", "goodput.png", "goodput_itl_only.png",
                                       "latency_p95.png", "gpu_util.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without a GPU's numbers there is no utilization figure.
    no_gpu = [dict(r, gpu_util_pct=None) for r in result["rows"]]
    assert "gpu_util.png" not in {p.name for p in plot_sweep(no_gpu, tmp_path / "..")}


def test_table_header_has_one_short_name_per_column_and_a_legend():
    lines = format_table(_result()).splitlines()
    header = lines[0].split()
    assert header == [name for _, name, _, _ in TABLE_COLUMNS]  # one token per column
    legend = []
    for line in lines[1:]:
        if set(line) == {"-"}:
            break
        legend.append(line)
    text = " ".join(legend)
    for name in header[1:]:
        assert name in text, f"the legend does not explain {name}"
    # the numbers line up under the header: each cell ends where its column name ends
    ends = [m.end() for m in re.finditer(r"\S+", lines[0])]
    row = next(ln for ln in lines if ln.startswith("rapid "))
    assert [m.end() for m in re.finditer(r"\S+", row)][1:] == ends[1:]


def test_plots_show_absolute_units_above_the_normalized_view():
    from rapidserve.bench.plots import FIGURES, sweep_figure

    rows = [dict(r, goodput_p95_itl=0.0) if r["status"] == "ok" else r for r in _result()["rows"]]
    _, title, panels = next(f for f in FIGURES if f[0] == "goodput.png")
    fig = sweep_figure(rows, title, panels)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    labels = [ax.get_ylabel() for ax in axes]
    assert "goodput, max ITL (req/s)" in labels  # absolute, in its unit
    assert any("x hybrid-512 at 1 QPS" in lb for lb in labels)  # the normalized panel below it
    # p95-ITL goodput is all zero: no baseline to divide by, so no normalized panel for it
    assert "goodput, p95 ITL (req/s)" in labels and len(axes) == 3
    assert all(ax.get_legend() is None for ax in axes) and len(fig.legends) == 1  # outside the data
    zero = next(ax for ax in axes if ax.get_ylabel() == "goodput, p95 ITL (req/s)")
    sizes = [line.get_markersize() for line in zero.get_lines()]
    faces = {line.get_markerfacecolor() for line in zero.get_lines()}
    assert len(sizes) == 2 and sizes[0] > sizes[1] and faces == {"none"}  # coinciding series stay visible


class FakeNvml:
    """pynvml's surface as GpuMonitor uses it."""

    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_METRIC_SM_UTIL = 2
    NVML_GPM_METRIC_SM_OCCUPANCY = 3

    class NVMLError(Exception):
        pass

    def __init__(self, gpm: bool, fail_init: bool = False) -> None:
        self.gpm, self.fail_init, self.freed, self.shut = gpm, fail_init, 0, False

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlGpmQueryDeviceSupport(self, handle):
        return SimpleNamespace(isSupportedDevice=int(self.gpm))

    def nvmlGpmSampleAlloc(self):
        return SimpleNamespace()

    def nvmlGpmSampleFree(self, sample):
        self.freed += 1

    def nvmlGpmSampleGet(self, handle, sample):
        pass

    def c_nvmlGpmMetricsGet_t(self):
        return SimpleNamespace(metrics=[SimpleNamespace(metricId=0, value=0.0) for _ in range(2)])

    def nvmlGpmMetricsGet(self, get):
        for m in get.metrics:
            m.value = {self.NVML_GPM_METRIC_SM_UTIL: 80.0, self.NVML_GPM_METRIC_SM_OCCUPANCY: 30.0}[m.metricId]

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=55, memory=10)


def test_gpu_monitor():
    for gpm, util, source, occ in ((True, 80.0, "nvml-gpm-sm-util", 30.0), (False, 55.0, "nvml-utilization", None)):
        nv = FakeNvml(gpm)
        mon = GpuMonitor(0, interval_s=0.01, nvml=nv)
        assert mon.open()
        mon.start()
        time.sleep(0.1)
        got = mon.stop()
        mon.close()
        assert (got.util_pct, got.source, got.sm_occupancy_pct) == (util, source, occ) and got.samples >= 2
        assert nv.shut and nv.freed == (2 if gpm else 0)
    # No driver: nothing sampled, no error.
    mon = GpuMonitor(nvml=FakeNvml(True, fail_init=True))
    assert not mon.open()
    mon.start()
    assert mon.stop() == NO_GPU


def test_server_process_start_failures(tmp_path):
    crash = ServerProcess([sys.executable, "-c", "import sys; print('boom: bad flag', file=sys.stderr); sys.exit(3)"],
                          tmp_path / "crash.log")
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: bad flag"):
        crash.start(60)
    assert time.monotonic() - t0 < 20
    hang = ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "hang.log")
    with pytest.raises(ServerStartError, match="not listening after 1 s"):
        hang.start(1)
    assert not hang.alive()
    script = "import time; print('rapidserve: serving m at http://127.0.0.1:1234/v1', flush=True); time.sleep(60)"
    ok = ServerProcess([sys.executable, "-c", script], tmp_path / "ok.log")
    assert ok.start(30) == "http://127.0.0.1:1234"
    assert ok.alive()
    assert ok.stop() == -15  # SIGTERM
    assert "rapidserve: serving m" in (tmp_path / "ok.log").read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stopping_a_server_leaves_none_of_its_children(tmp_path):
    """A server that exits on SIGTERM but leaves a child behind (a worker it failed to stop, which
    would hold the GPU the next configuration needs): stop() kills the child too, and does not
    hang on the pipe the child still holds."""
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(c.pid))\n"
        "print('rapidserve: serving m at http://127.0.0.1:1234/v1', flush=True)\n"
        "time.sleep(300)\n"
    )
    server = ServerProcess([sys.executable, "-c", script], tmp_path / "s.log")
    server.start(30)
    pid = int(child_pid.read_text())
    assert _alive(pid)
    t0 = time.monotonic()
    assert server.stop() == -15
    assert time.monotonic() - t0 < 15
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_a_listening_but_unhealthy_server_is_refused(tmp_path):
    """A server whose engine died at start-up still listens; the sweep must not send it load."""
    script = (
        "import http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(503 if self.path == '/health' else 200); self.end_headers()\n"
        "        self.wfile.write(b'the engine failed: ValueError: boom')\n"
        "s = http.server.HTTPServer(('127.0.0.1', 0), H)\n"
        "print(f'rapidserve: serving m at http://127.0.0.1:{s.server_port}/v1', flush=True)\n"
        "s.serve_forever()\n"
    )
    server = ServerProcess([sys.executable, "-c", script], tmp_path / "sick.log")
    url = server.start(30)
    try:
        with pytest.raises(ServerStartError, match=r"unhealthy \(503\).*boom"):
            require_healthy(url)
    finally:
        server.stop()
    with pytest.raises(ServerStartError, match="/health failed"):
        require_healthy(url, timeout_s=5)  # nothing listens any more


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path, capsys):
    """hybrid-512 and rapid (threads) on the embedded model, 2 rates x 4 jsonl prompts; a third
    configuration whose server cannot start is recorded as failed and the sweep goes on."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}:", "output_len": 3}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    rc = main(["bench", "sweep", "--configs", "hybrid-512,rapid-nosuchpolicy,rapid", "--request-rates", "4,16",
               "--dataset-name", "jsonl", "--dataset-path", str(data), "--num-prompts", "4",
               "--device", "cpu", "--placement", "thread", "--num-kv-blocks", "64",
               "--slo-itl-ms", "10000", "--slo-ttft-ms-per-1k", "20000", "--timeout", "60",
               "--server-start-timeout", "120", "--output-dir", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed
    result = json.loads((out / "sweep.json").read_text())
    status = {c["name"]: c["status"] for c in result["configs"]}
    assert status == {"hybrid-512": "ok", "rapid-nosuchpolicy": "failed", "rapid": "ok"}, result["configs"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert sorted((r["config"], r["request_rate"]) for r in ok) == [
        ("hybrid-512", 4.0), ("hybrid-512", 16.0), ("rapid", 4.0), ("rapid", 16.0)]
    for r in ok:
        assert r["completed"] == 4 and r["failed"] == 0, r
        assert r["attainment_p95_itl"] == 1.0 and r["p95_ttft_ms"] > 0 and r["gpu_util_pct"] is None
        assert r["sm_partitions"] is None  # no SM partitioning on CPU: the servers report none
    failed = next(c for c in result["configs"] if c["name"] == "rapid-nosuchpolicy")
    assert "before listening" in failed["error"]
    for c in result["configs"]:
        if c["status"] == "ok":
            assert c["max_rate_at_attainment"]["p95_itl"] == {"rate": 16.0, "note": "lower bound"}
            assert c["server_exit_code"] == 0  # stopped cleanly by SIGTERM
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert (out / "throughput.png").stat().st_size > 0 and (out / "latency_p95.png").exists()
    assert "highest rate with >= 90% SLO attainment" in printed.out and "FAILED" in printed.out
    assert "sweep" in printed.err  # the progress bar
    # each server's start is announced before the wait, and timed after it
    assert "[hybrid-512] starting its server (log: " in printed.err
    assert re.search(r"\[hybrid-512\] serving at http://\S+ \(started in [0-9.]+ s\)", printed.err)
    assert Path(out / "server-rapid.log").exists()
    # Every run's requests are kept: scored again, they give the row's figures.
    from rapidserve.bench.metrics import RequestRecord, summarize

    for r in ok:
        saved = json.loads((out / "requests" / f"{r['config']}@{r['request_rate']:g}.json").read_text())
        records = [RequestRecord(**{**q, "itls": tuple(q["itls"])}) for q in saved["requests"]]
        again = summarize(records, saved["duration"], 10000, 20000)
        assert len(records) == 4 and again["p95_ttft_ms"] == pytest.approx(r["p95_ttft_ms"], abs=0.01)  # µs kept
        assert again["attainment_p95_itl"] == r["attainment_p95_itl"]
        assert 0 <= r["drain_pct"] <= 100
    # Scored again under an ITL SLO no token meets: every run's attainment drops to 0; the
    # throughput is the run's own.
    assert main(["bench", "rescore", str(out), "--slo-itl-ms", "0.001", "--no-plots"]) == 0
    rescored = json.loads((out / "slo-itl-0.001-ttft-20000" / "sweep.json").read_text())
    for before, after in zip(result["rows"], rescored["rows"]):
        assert after["request_throughput"] == before["request_throughput"]
        if before["status"] == "ok":
            assert after["attainment_p95_itl"] == 0.0 and after["attainment_ttft_only"] == 1.0
    assert "SLOs: ITL 0.001 ms" in capsys.readouterr().out


def _hand_built_sweep(tmp_path: Path) -> Path:
    """A sweep of one configuration at rates 1 and 2 with known per-request records: at rate 1 two
    requests, ITLs 10 and 30 ms, TTFTs 100 and 900 ms (prompts of 500 tokens); at rate 2 the same
    but every ITL 60 ms."""
    from rapidserve.bench.metrics import RequestRecord, summarize
    from rapidserve.bench.sweep import make_row, records_path

    out = tmp_path / "sweep"
    result = {"args": {"slo_itl_ms": 100.0, "slo_ttft_ms_per_1k": 1000.0, "burstiness": 1.0, "seed": 0},
              "attainment_target": 0.9, "configs": [{"name": "hybrid-512", "status": "ok"}], "rows": []}
    for rate, itl in ((1.0, None), (2.0, 0.06)):
        recs = [RequestRecord(500, 4, 0.1, (itl or 0.01,) * 3, 0.2, True),
                RequestRecord(500, 4, 0.9, (itl or 0.03,) * 3, 1.0, True)]
        path = records_path(out, "hybrid-512", rate)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"request_rate": rate, "duration": 2.0, "requests": [r.to_dict() for r in recs]}))
        summary = summarize(recs, 2.0, 100.0, 1000.0)
        result["rows"].append(make_row("hybrid-512", rate, summary, NO_GPU))
    summarize_configs(result)
    write_results(result, out)
    return out


def test_rescore_scores_the_kept_records_under_other_slos(tmp_path):
    from rapidserve.bench.sweep import rescore
    from rapidserve.bench.workloads import arrival_times

    out = _hand_built_sweep(tmp_path)
    same = rescore(out, None, None)  # the sweep's own SLOs: its own figures
    assert [r["goodput_p95_itl"] for r in same["rows"]] == [1.0, 1.0]
    # ITL 20 ms: only the 10 ms request at rate 1; TTFT 200 ms per 1K (500 tokens: 200 ms): only
    # the 100 ms TTFT.
    r = rescore(out, 20.0, None)["rows"]
    assert [x["attainment_p95_itl"] for x in r] == [0.5, 0.0] and [x["attainment_itl_only"] for x in r] == [0.5, 0.0]
    r = rescore(out, None, 200.0)
    assert [x["attainment_p95_itl"] for x in r["rows"]] == [0.5, 0.5]
    assert r["args"]["slo_ttft_ms_per_1k"] == 200.0 and r["args"]["slo_itl_ms"] == 100.0
    assert r["configs"][0]["max_rate_at_attainment"]["p95_itl"]["rate"] is None
    last_sent = arrival_times(2, 1.0, 1.0, 0)[-1]  # the run lasted 2 s
    assert r["rows"][0]["drain_pct"] == pytest.approx(100 * (2.0 - last_sent) / 2.0)
    with pytest.raises(ValueError, match="must be > 0"):
        rescore(out, 0.0, None)
    # Archived records (gzip) score the same.
    plain = out / "requests" / "hybrid-512@1.json"
    with gzip.open(str(plain) + ".gz", "wt", encoding="utf-8") as f:
        f.write(plain.read_text())
    plain.unlink()
    assert rescore(out, None, 200.0)["rows"] == r["rows"]
    (out / "requests" / "hybrid-512@2.json").unlink()
    with pytest.raises(ValueError, match="kept no per-request records"):
        rescore(out, 20.0, None)
    with pytest.raises(ValueError, match="cannot read the sweep"):
        rescore(tmp_path / "nowhere", 20.0, None)

def test_rescore_refuses_to_overwrite_the_sweep(tmp_path, capsys):
    out = _hand_built_sweep(tmp_path)
    before = (out / "sweep.json").read_text()
    assert main(["bench", "rescore", str(out), "--slo-itl-ms", "20", "--output-dir", str(out)]) == 2
    assert "overwritten" in capsys.readouterr().err
    assert (out / "sweep.json").read_text() == before


def test_policy_configs_get_the_profile_and_the_itl_slo(tmp_path):
    from rapidserve.entrypoints.cli import build_parser
    from rapidserve.bench.sweep import run_sweep, server_command

    args = build_parser().parse_args(["bench", "sweep", "--profile", "p.json", "--slo-itl-ms", "30"])
    cmd = server_command(parse_config("rapid-nexus"), args)
    assert cmd[-4:] == ["--mode", "rapid", "--partition-policy", "nexus"]
    assert cmd[cmd.index("--profile") + 1] == "p.json" and cmd[cmd.index("--slo-itl-ms") + 1] == "30.0"
    assert "--profile" not in server_command(parse_config("rapid-static:40"), args)
    bare = build_parser().parse_args(["bench", "sweep", "--configs", "hybrid-512,rapid-rapid",
                                      "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="needs --profile"):
        run_sweep(bare)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_resume_adds_configurations_to_a_sweep(tmp_path, monkeypatch):
    """--resume: configurations that ran are kept and skipped, a failed one runs again, the first
    part's probed rates are reused, results are written after every configuration, and a sweep
    of another workload is refused."""
    from rapidserve.bench import sweep as sw
    from rapidserve.entrypoints.cli import build_parser

    ran: list[tuple[str, list[float] | None]] = []

    def fake_config(config, args, rates, out_dir, monitor, progress, result):
        ran.append((config.name, rates))
        if config.name == "disagg" and len(ran) == 2:  # fails the first time
            result["configs"].append({"name": config.name, "status": "failed", "error": "boom"})
            result["rows"].append(failed_row(config.name, None, "boom"))
            return rates
        rates = rates or [1.0, 2.0]  # as if probed
        result["rates"] = rates
        result["configs"].append({"name": config.name, "status": "ok", "error": None})
        for rate in rates:
            result["rows"].append({**failed_row(config.name, rate, None), "status": "ok",
                                   "attainment_p95_itl": 1.0, "attainment_max_itl": 1.0, "attainment_itl_only": 1.0})
        return rates

    monkeypatch.setattr(sw, "_sweep_config", fake_config)
    out = tmp_path / "out"
    argv = ["bench", "sweep", "--slo-itl-ms", "50", "--output-dir", str(out), "--device", "cpu"]
    parse = build_parser().parse_args
    first = sw.run_sweep(parse([*argv, "--configs", "hybrid-512,disagg"]))
    assert [c["status"] for c in first["configs"]] == ["ok", "failed"]
    on_disk = json.loads((out / "sweep.json").read_text())  # written as it went
    assert [c["name"] for c in on_disk["configs"]] == ["hybrid-512", "disagg"]

    ran.clear()
    second = sw.run_sweep(parse([*argv, "--configs", "hybrid-512,disagg,rapid", "--resume"]))
    assert ran == [("disagg", [1.0, 2.0]), ("rapid", [1.0, 2.0])]  # hybrid-512 skipped; same rates
    assert [c["name"] for c in second["configs"]] == ["hybrid-512", "disagg", "rapid"]
    assert all(c["status"] == "ok" for c in second["configs"])
    assert sorted({r["config"] for r in second["rows"]}) == ["disagg", "hybrid-512", "rapid"]
    assert all(r["status"] == "ok" for r in second["rows"])  # the first disagg failure is gone

    ran.clear()
    with pytest.raises(ValueError, match=r"another workload or SLO \(slo_itl_ms: 50.0 there, 30.0 here\)"):
        sw.run_sweep(parse(["bench", "sweep", "--slo-itl-ms", "30", "--output-dir", str(out), "--device", "cpu",
                            "--configs", "hybrid-1024", "--resume"]))
    assert ran == []
    fresh = sw.run_sweep(parse([*argv, "--configs", "hybrid-1024"]))  # without --resume: a new sweep
    assert [c["name"] for c in fresh["configs"]] == ["hybrid-1024"]


def test_sm_partition_shares_from_the_servers_metrics():
    """What `bench sweep` records of a rapid server's partitions per run: the /metrics counters
    (as the server writes them) before and after, as shares of the decode worker's time."""
    from prometheus_client import CollectorRegistry, generate_latest

    from rapidserve.entrypoints.openai.metrics import _PartitionCollector
    from rapidserve.resources.policy import PartitionStats

    registry, collector = CollectorRegistry(), _PartitionCollector("m")
    registry.register(collector)
    assert parse_partition_times(generate_latest(registry).decode()) is None  # no policy: nothing
    collector.stats = PartitionStats("D32/P100", {"full": 10.0, "D32/P100": 5.0}, 3, 0.2, 15.0)
    before = parse_partition_times(generate_latest(registry).decode())
    assert before is not None and before.seconds == {"full": 10.0, "D32/P100": 5.0} and before.switches == 3
    collector.stats = PartitionStats("D16/P116", {"full": 12.0, "D32/P100": 13.0, "D16/P116": 5.0}, 10, 0.3, 30.0)
    after = parse_partition_times(generate_latest(registry).decode())
    assert partition_shares(before, after) == "D32/P100 53 %, D16/P116 33 %, full 13 %; 7 switches"
    assert partition_shares(None, after) == "D32/P100 43 %, full 40 %, D16/P116 17 %; 10 switches"
    assert partition_shares(before, before) == "" and partition_shares(None, None) == ""
