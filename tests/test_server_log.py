"""The server's log: one line per request (with its tokens and latency), the engine's load every
few seconds while busy and nothing while idle, several served model names."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from rapidserve.async_engine import AsyncEngine
from rapidserve.config import EngineConfig
from rapidserve.serving.hybrid import LLMEngine
from rapidserve.entrypoints.openai.server import ServerConfig, build_app
from rapidserve.entrypoints.openai.server_log import StatsLogger


@pytest.fixture(scope="module")
def engine(tiny):
    eng = AsyncEngine(LLMEngine(EngineConfig(model=tiny, device="cpu", num_kv_blocks=64,
                                             served_model_name="tiny")))
    yield eng
    eng.shutdown()


def _run(coro):
    return asyncio.run(coro)


async def _requests(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
        return [await c.request(m, path, json=body) for m, path, body in bodies]


def test_one_line_per_request_with_tokens_and_latency(engine, caplog):
    app = build_app(engine, ServerConfig(stats_interval_s=0))
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}
    with caplog.at_level(logging.DEBUG, logger="rapidserve.server"):
        rs = _run(_requests(app, [
            ("POST", "/v1/completions", body),
            ("POST", "/v1/completions", {**body, "stream": True, "prompt": [[1, 2], [3, 4, 5]]}),
            ("POST", "/v1/completions", {**body, "model": "nope"}),
            ("GET", "/health", None),
        ]))
    assert [r.status_code for r in rs] == [200, 200, 404, 200]
    lines = [r for r in caplog.records if r.name == "rapidserve.server"]
    info = [r.getMessage() for r in lines if r.levelno == logging.INFO]
    assert len(info) == 3, info
    assert "POST /v1/completions 200 | prompt 3 tok, output 4 tok |" in info[0] and info[0].endswith(" s")
    assert "POST /v1/completions 200 | prompt 5 tok, output 8 tok |" in info[1]  # a stream, two prompts
    assert "POST /v1/completions 404 |" in info[2] and "tok" not in info[2]
    assert any("GET /health 200" in r.getMessage() for r in lines if r.levelno == logging.DEBUG)


def test_several_served_model_names(engine):
    app = build_app(engine, ServerConfig(served_model_names=("tiny", "alias"), stats_interval_s=0))
    body = {"prompt": [1, 2], "max_tokens": 2, "ignore_eos": True}
    models, by_alias, other = _run(_requests(app, [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {**body, "model": "alias"}),
        ("POST", "/v1/completions", {**body, "model": "other"}),
    ]))
    assert [m["id"] for m in models.json()["data"]] == ["tiny", "alias"]
    assert by_alias.status_code == 200 and by_alias.json()["model"] == "tiny"  # responses carry the first
    assert other.status_code == 404


def test_stats_line_while_busy_and_quiet_when_idle(engine):
    stats = StatsLogger(engine, interval_s=5.0)

    async def scenario():
        app = build_app(engine, ServerConfig(stats_interval_s=0))
        stats.line()  # start the interval here
        await _requests(app, [("POST", "/v1/completions",
                               {"prompt": [1, 2, 3, 4], "max_tokens": 6, "ignore_eos": True})])
        for _ in range(200):  # the engine thread publishes its stats just after the last output
            if engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        return stats.line(), stats.line()

    busy, idle = _run(scenario())
    assert busy is not None and idle is None
    assert busy.startswith("engine (hybrid): 0 running, 0 waiting | prompt ")
    assert "generation " in busy and " tok/s" in busy and "KV cache 0.0 % used" in busy
    gen_rate = float(busy.split("generation ")[1].split(" tok/s")[0])
    assert gen_rate > 0


def test_stats_logger_task_logs_while_busy(engine, caplog):
    """The periodic task: started by the first request, it writes a line per busy interval."""
    app = build_app(engine, ServerConfig(stats_interval_s=0.05))

    async def scenario():
        await _requests(app, [("POST", "/v1/completions",
                               {"prompt": [1, 2, 3], "max_tokens": 30, "ignore_eos": True})])
        await asyncio.sleep(0.3)  # the line for the busy interval, then idle ones (silent)

    with caplog.at_level(logging.INFO, logger="rapidserve.stats"):
        _run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "rapidserve.stats"]
    assert lines and all(line.startswith("engine (hybrid):") for line in lines)
    assert len(lines) <= 0.35 / 0.05  # not one per poll regardless of load


def test_server_config_checks_its_log_settings():
    with pytest.raises(ValueError, match="stats_interval_s"):
        ServerConfig(stats_interval_s=-1)
    with pytest.raises(ValueError, match="served_model_names"):
        ServerConfig(served_model_names=("a", ""))
