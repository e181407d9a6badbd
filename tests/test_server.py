"""The OpenAI-compatible server, live on loopback, and the AsyncEngine under it.

One default-model engine serves two apps (a plain one, and one with an API key and a queue of
one) from one uvicorn event loop in a background thread; tiny random models cover the engine
unit tests, an engine failure and the `serve` command in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from conftest import random_prompts, served_url

from rapidserve import SamplingParams
from rapidserve.async_engine import AsyncEngine, EngineDeadError
from rapidserve.config import EngineConfig
from rapidserve.engine import LLMEngine, create_engine
from rapidserve.entrypoints.cli import build_parser
from rapidserve.entrypoints.openai.server import ServerConfig, build_app

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
API_KEY = "sekret"
TIMEOUT = httpx.Timeout(60.0)


class LiveServers:
    """uvicorn servers for several apps on one event loop, in a background thread."""

    def __init__(self, *apps) -> None:
        self.servers = [
            uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                          lifespan="off", timeout_graceful_shutdown=2))
            for app in apps
        ]
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        await asyncio.gather(*(s.serve() for s in self.servers))

    def start(self) -> list[str]:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not all(s.started for s in self.servers):
            assert time.monotonic() < deadline and self._thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return [f"http://127.0.0.1:{s.servers[0].sockets[0].getsockname()[1]}" for s in self.servers]

    def stop(self) -> None:
        for s in self.servers:
            s.should_exit = True
        self._thread.join(15)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(LLMEngine(EngineConfig(
        device="cpu", max_num_seqs=64, kv_cache_memory_bytes="256MiB", max_model_len=512)))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def urls(engine):
    live = LiveServers(build_app(engine, ServerConfig()),
                       build_app(engine, ServerConfig(api_key=API_KEY, max_queue_len=1)))
    yield live.start()
    live.stop()


@pytest.fixture(scope="module")
def url(urls) -> str:
    return urls[0]


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, **kw):
    return client.chat.completions.create(model=None, messages=QUESTION, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def paris(client):
    """The greedy answer to QUESTION (a live request, once per module): the reference several
    tests compare their streams, stop strings and extensions with (greedy: the same each time)."""
    return _chat(client, max_tokens=20, temperature=0)


def _sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _wait_idle(url: str, engine: AsyncEngine, timeout: float = 20.0) -> str:
    """Poll /metrics (bounded) until no request runs and every KV block is free."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        free = _metric(text, "rapidserve:kv_cache_free_blocks")
        total = _metric(text, "rapidserve:kv_cache_total_blocks")
        running = _metric(text, "rapidserve:num_requests_running")
        if free == total and running == 0 and engine.num_requests == 0:
            return text
        assert time.monotonic() < deadline, f"blocks not freed: {free}/{total}, running {running}"
        time.sleep(0.1)


def _tokenize(url: str, prompt: str) -> list[int]:
    r = httpx.post(url + "/tokenize", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# ---- the openai client -----------------------------------------------------------------------


def test_models_and_health(url, engine):
    assert httpx.get(url + "/health").status_code == 200
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == engine.model_name and card["root"] and card["max_model_len"] == 512
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == [engine.model_name]
    assert httpx.get(url + "/version").json()["version"]


def test_completion_string_list_and_token_ids(client, url, engine):
    prompt = "The capital of France is"
    one = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=6, temperature=0)
    assert len(one.choices) == 1 and one.choices[0].text
    assert one.choices[0].finish_reason in ("stop", "length")
    ids = _tokenize(url, prompt)
    assert one.usage.prompt_tokens == len(ids)
    assert one.usage.completion_tokens <= 6
    assert one.usage.total_tokens == one.usage.prompt_tokens + one.usage.completion_tokens
    # A batch of prompts: one choice per prompt, in order; token ids give the same text.
    batch = client.completions.create(model=engine.model_name, prompt=[prompt, "Hello, my name is"],
                                      max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == one.choices[0].text
    by_ids = client.completions.create(model=engine.model_name, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    nested = client.completions.create(model=engine.model_name, prompt=[ids, ids[:3]], max_tokens=2,
                                       temperature=0)
    assert len(nested.choices) == 2 and nested.choices[0].text == one.choices[0].text[: len(nested.choices[0].text)]


def test_chat_answers_paris(client, paris):
    out = paris
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop"
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    # max_completion_tokens (the newer name) wins over max_tokens
    short = _chat(client, max_tokens=20, max_completion_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


def test_completion_logprobs_whole_and_streamed(client, engine):
    """OpenAI's completions logprobs object: one item per token, the chosen token's text and
    logprob among its step's alternatives (greedy: the best of them), offsets into the text; the
    streamed chunks' logprobs put together equal the whole answer's; none unless asked."""
    kw = dict(model=engine.model_name, prompt="The capital of France is", max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(logprobs=3, **kw)
    choice = full.choices[0]
    lp = choice.logprobs
    n = full.usage.completion_tokens
    assert n == 6 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 4 and top[token] == value == max(top.values())
    chunks = list(client.completions.create(logprobs=3, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    merged = {k: sum((getattr(c.choices[0].logprobs, k) for c in chunks), []) for k in
              ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert merged == {k: getattr(lp, k) for k in merged}
    assert client.completions.create(**kw).choices[0].logprobs is None


def test_completion_echo_whole_streamed_and_score_only(client, engine):
    """echo: the choice's text is the prompt then the generated text; with logprobs the object
    covers the prompt's tokens (the first with null logprob and top_logprobs) then the generated
    ones (those of the same request without echo), text offsets over the whole text; streamed,
    the first chunk carries the prompt and the chunks put together equal the whole answer;
    max_tokens 0 gives the prompt alone, scored, no completion token."""
    prompt = "The capital of France is"
    kw = dict(model=engine.model_name, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(logprobs=2, **kw).choices[0]
    assert client.completions.create(echo=True, **kw).choices[0].text == prompt + plain.text
    full = client.completions.create(echo=True, logprobs=2, **kw)
    choice, lp, n_prompt = full.choices[0], full.choices[0].logprobs, full.usage.prompt_tokens
    assert choice.text == prompt + plain.text and full.usage.completion_tokens == 4
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value <= 0 and 2 <= len(top) <= 3 and top[token] == value
    assert lp.token_logprobs[n_prompt:] == plain.logprobs.token_logprobs
    assert lp.top_logprobs[n_prompt:] == plain.logprobs.top_logprobs
    chunks = list(client.completions.create(echo=True, logprobs=2, stream=True, **kw))
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    merged = {k: sum((getattr(c.choices[0].logprobs, k) for c in chunks), []) for k in
              ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert merged == {k: getattr(lp, k) for k in merged}
    kw["max_tokens"] = 0
    only = client.completions.create(echo=True, logprobs=2, **kw)
    assert only.choices[0].text == prompt and only.choices[0].finish_reason == "length"
    assert only.usage.completion_tokens == 0 and only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n_prompt]
    streamed = list(client.completions.create(echo=True, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == prompt
    # score only ends by its length even when the token generated and dropped was a stop id
    stopped = {**kw, "extra_body": {"logit_bias": {"42": 100}, "stop_token_ids": [42]}}
    assert client.completions.create(echo=True, **stopped).choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in client.completions.create(echo=True, stream=True, **stopped)
            if c.choices[0].finish_reason] == ["length"]
    assert client.completions.create(**{**stopped, "max_tokens": 1}).choices[0].finish_reason == "stop"  # kept
    kw["max_tokens"] = 4
    two = client.completions.create(echo=True, logprobs=2, n=2, **kw)  # each choice echoes the prompt
    assert [c.text for c in two.choices] == [choice.text] * 2
    for c in two.choices:  # (a batch of two decodes: the same up to float rounding)
        assert c.logprobs.token_logprobs[0] is None
        assert c.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)


def test_completion_prompt_logprobs_extension(url, engine):
    """vLLM's `prompt_logprobs` extension: each choice's list (null, then per prompt token its id
    -> {logprob, rank, decoded_token}, the token and the k most likely), absent unless asked;
    beside echo with a smaller logprobs, the echo's object keeps its own k."""
    body = {"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}
    prompt_ids = _tokenize(url, body["prompt"])
    plain = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).json()
    assert "prompt_logprobs" not in plain["choices"][0]
    r = httpx.post(url + "/v1/completions", json={**body, "prompt_logprobs": 3, "echo": True, "logprobs": 1},
                   timeout=TIMEOUT).json()
    choice = r["choices"][0]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(prompt_ids) and plp[0] is None
    for token, entry in zip(prompt_ids[1:], plp[1:]):
        assert str(token) in entry and 3 <= len(entry) <= 4
        assert sorted(e["rank"] for t, e in entry.items() if t != str(token) or e["rank"] <= 3)[:3] == [1, 2, 3]
        assert all(e["logprob"] <= 0 and isinstance(e["decoded_token"], str) for e in entry.values())
    echo_lp = choice["logprobs"]
    assert echo_lp["token_logprobs"][1:len(prompt_ids)] == [plp[i][str(t)]["logprob"] for i, t in
                                                             enumerate(prompt_ids) if i]
    assert all(1 <= len(top) <= 2 for top in echo_lp["top_logprobs"][1:])  # its own k = 1


def test_chat_logprobs_whole_and_streamed(client):
    """Chat's choices[].logprobs.content: each token with its logprob, UTF-8 bytes and the
    top_logprobs most likely tokens, best first (greedy: the token itself leads); streamed, each
    chunk carries its token's."""
    full = _chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    # The tokens' texts are the answer's, and the end-of-sequence token's last (as in vLLM).
    assert "".join(c.token for c in content[:-1]) == full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop" and content[-1].token == "<|im_end|>"
    for c in content:
        assert c.bytes == list(c.token.encode("utf-8")) and c.logprob <= 0
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert (c.top_logprobs[0].token, c.top_logprobs[0].logprob) == (c.token, c.logprob)
    chunks = list(_chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True))
    assert [x for ch in chunks for x in ch.choices[0].logprobs.content] == content
    assert all(len(ch.choices[0].logprobs.content) == 1 for ch in chunks)
    alone = _chat(client, max_tokens=3, temperature=0, logprobs=True)
    assert [c.top_logprobs for c in alone.choices[0].logprobs.content] == [[], [], []]
    assert _chat(client, max_tokens=2, temperature=0).choices[0].logprobs is None


def test_chat_streaming_with_usage_matches_the_full_answer(client, paris):
    full = paris
    chunks = list(_chat(client, max_tokens=20, temperature=0, stream=True,
                        stream_options={"include_usage": True}))
    *token_chunks, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == full.usage.model_dump()
    # one token per chunk; the role rides on the first token's chunk
    assert len(token_chunks) == full.usage.completion_tokens
    assert all(len(c.choices) == 1 and c.usage is None for c in token_chunks)
    assert token_chunks[0].choices[0].delta.role == "assistant"
    assert token_chunks[0].choices[0].delta.content  # the first token's text, not an empty chunk
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert token_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in token_chunks)
    assert text == full.choices[0].message.content
    assert len({c.id for c in chunks}) == 1


def test_completion_streaming_raw_sse(url, engine):
    body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    full = httpx.post(url + "/v1/completions", json={**body, "stream": False, "stream_options": None},
                      timeout=TIMEOUT).json()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    token_chunks = chunks[:-1]
    assert len(token_chunks) == 5 == full["usage"]["completion_tokens"]
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == full["choices"][0]["text"]
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streaming_a_batch_of_prompts(url):
    body = {"prompt": ["The capital of France is", "One, two,"], "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    full = httpx.post(url + "/v1/completions", json={**body, "stream": False, "stream_options": None},
                      timeout=TIMEOUT).json()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        chunks = [json.loads(e) for e in _sse_events(r)[:-1]]
    assert chunks[-1]["usage"] == full["usage"] and full["usage"]["completion_tokens"] == 6
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
        assert len(mine) == 3 and mine[-1]["finish_reason"] == "length"
        assert "".join(c["text"] for c in mine) == full["choices"][i]["text"]


@pytest.mark.parametrize("stop", ["Paris", "of Fra", "is Par"])
def test_stop_strings_when_streaming(client, paris, stop):
    full = paris.choices[0].message.content
    assert stop in full
    cut = _chat(client, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    chunks = [c for c in _chat(client, max_tokens=20, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) == cut.usage.completion_tokens


def test_vllm_extensions(client, engine, paris):
    # ignore_eos + min_tokens: exactly max_tokens tokens even though the answer ends earlier
    natural = paris.usage.completion_tokens
    assert natural < 12 and paris.choices[0].finish_reason == "stop"
    # The requests at once (one batch, a third of the sequential decode steps): each request's
    # sampling is its own (per-request seeds), whatever else runs beside it.
    calls = {
        "ignore_eos": dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True}),
        "min_tokens": dict(max_tokens=12, temperature=0, extra_body={"min_tokens": 10}),
        "greedy": dict(max_tokens=8, temperature=0),
        "top_k=1": dict(max_tokens=8, temperature=1.5, extra_body={"top_k": 1}),
        "seeded": dict(max_tokens=8, temperature=1.0, seed=7),
        "seeded again": dict(max_tokens=8, temperature=1.0, seed=7),
    }
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(_chat, client, **kw) for name, kw in calls.items()}
        out = {name: f.result() for name, f in futures.items()}
    assert out["ignore_eos"].usage.completion_tokens == 12 and out["ignore_eos"].choices[0].finish_reason == "length"
    assert out["min_tokens"].usage.completion_tokens >= 10
    # top_k=1 is greedy whatever the temperature
    assert out["top_k=1"].choices[0].message.content == out["greedy"].choices[0].message.content
    assert out["seeded"].choices[0].message.content == out["seeded again"].choices[0].message.content


# ---- load, disconnects ---------------------------------------------------------------------


def test_64_simultaneous_streams(url, engine):
    prompts = [f"Request {i}: count to ten." for i in range(64)]
    with httpx.Client(timeout=TIMEOUT) as http:
        lengths = [len(http.post(url + "/tokenize", json={"prompt": p}).json()["tokens"]) for p in prompts]

    async def one(client: openai.AsyncOpenAI, prompt: str):
        stream = await client.completions.create(
            model=engine.model_name, prompt=prompt, max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks, usage = 0, None
        async for chunk in stream:
            if chunk.choices:
                chunks += 1
            else:
                usage = chunk.usage
        return chunks, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    for (chunks, usage), n_prompt in zip(results, lengths):
        assert usage is not None and usage.completion_tokens == chunks == 4
        assert usage.prompt_tokens == n_prompt
    _wait_idle(url, engine)


def test_disconnected_clients_free_their_blocks(url, engine, caplog):
    caplog.set_level(logging.INFO, logger="rapidserve.server")
    body = {"prompt": "Tell me a very long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as http:
        responses = []
        for _ in range(3):
            r = http.send(http.build_request("POST", url + "/v1/completions", json=body), stream=True)
            assert r.status_code == 200
            lines = r.iter_lines()  # NOTE: kept: dropping the iterator would close the response
            assert next(lines).startswith("data: ")
            responses.append((r, lines))
        text = httpx.get(url + "/metrics").text
        assert _metric(text, "rapidserve:num_requests_running") == 3
        assert _metric(text, "rapidserve:kv_cache_free_blocks") < _metric(text, "rapidserve:kv_cache_total_blocks")
        for r, _ in responses:
            r.close()  # leave after the first chunk; 400 tokens would take far longer than the wait
        _wait_idle(url, engine, timeout=10)
    # a non-streaming client that gives up (times out) is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    _wait_idle(url, engine, timeout=10)
    assert "client disconnected; aborted 1 request(s)" in caplog.text
    assert "unexpected error" not in caplog.text


# ---- errors ----------------------------------------------------------------------------------


def _assert_error(r: httpx.Response, status: int, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] == status and err["type"]
    assert contains in err["message"], err["message"]
    return err


def _still_serving(url: str) -> None:
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body,status,contains", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": 12.5}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "maximum context length is 512"),
    ("/v1/completions", {"prompt": "hello " * 600, "max_tokens": 1}, 400, "maximum context length is 512"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**6], "min_tokens": 1}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": QUESTION, "stop_token_ids": [2**40]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 129}, 400, "n: Input should be less than or equal to 128"),
    ("/v1/completions", {"prompt": "x", "n": 2.0}, 400, "n: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 2}, 400, "best_of must be 1"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21, "echo": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "echo": True}, 400, "echo is not supported in chat"),
    ("/v1/chat/completions", {"messages": QUESTION, "prompt_logprobs": 1}, 400, "completions only"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs requires logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": "yes"}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist."),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_completion_tokens": 10**6}, 400, "maximum context length"),
    ("/v1/chat/completions", {"messages": QUESTION, "model": "nope"}, 404, "does not exist"),
    ("/v1/chat/completions", {"messages": QUESTION, "stream_options": {"include_usage": True}}, 400, "stream"),
    ("/detokenize", {"tokens": [-1]}, 400, "vocabulary"),
    ("/tokenize", {}, 400, "prompt"),
])
def test_bad_requests_get_a_4xx_with_a_message(url, path, body, status, contains):
    _assert_error(httpx.post(url + path, json=body, timeout=TIMEOUT), status, contains)
    _still_serving(url)


def test_malformed_json_and_wrong_content(url):
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    _assert_error(r, 400, "JSON")
    _assert_error(httpx.post(url + "/v1/chat/completions", content=b"[1, 2]",
                             headers={"content-type": "application/json"}), 400)
    _assert_error(httpx.get(url + "/v1/nothing-here"), 404)
    _still_serving(url)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": QUESTION, "frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": "1"}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": QUESTION, "repetition_penalty": -1.0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": "1"}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": [5, 1]}, "logit_bias"),
    ("/v1/chat/completions", {"messages": QUESTION, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1.5": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": QUESTION, "logit_bias": {"99999999": 1}}, "logit_bias"),
])
def test_bad_penalties_get_a_400_naming_the_field(url, path, body, param):
    err = _assert_error(httpx.post(url + path, json=body, timeout=TIMEOUT), 400, param)
    assert err["param"] == param, err
    _still_serving(url)


def test_penalties_and_logit_bias_are_honoured(url, client):
    """One 200 per field: logit_bias (token id strings) forces a token in completions and chat;
    the penalties change the greedy answer."""
    token = _tokenize(url, "Hello")[-1]
    forced = httpx.post(url + "/detokenize", json={"tokens": [token] * 3}).json()["prompt"]
    r = httpx.post(url + "/v1/completions", timeout=TIMEOUT, json={
        "prompt": "x", "max_tokens": 3, "temperature": 0, "logit_bias": {str(token): 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == forced, r.text
    chat = _chat(client, max_tokens=3, temperature=0, logit_bias={str(token): 100})
    assert chat.choices[0].message.content == forced
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}

    def text(**fields) -> str:
        r = httpx.post(url + "/v1/completions", json={**body, **fields}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    plain = text()
    assert plain == text(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1, logit_bias={})
    for field, value in (("presence_penalty", 2.0), ("frequency_penalty", 2), ("repetition_penalty", 3.0)):
        assert text(**{field: value}) != plain, (field, plain)
    assert _chat(client, max_tokens=3, temperature=0, frequency_penalty=1.0,
                 extra_body={"repetition_penalty": 1.2}).choices[0].message.content


def test_openai_client_error_types(client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, n=129)
    assert "less than or equal to 128" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        _chat(client, max_tokens=100_000)


def test_api_key(urls):
    url = urls[1]
    assert httpx.get(url + "/health").status_code == 200  # open
    assert httpx.get(url + "/metrics").status_code == 200  # open
    body = {"prompt": "Hi", "max_tokens": 1}
    _assert_error(httpx.post(url + "/v1/completions", json=body), 401, "API key")
    _assert_error(httpx.post(url + "/v1/completions", json=body,
                             headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(httpx.get(url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert good.completions.create(model=None, prompt="Hi", max_tokens=1).choices  # type: ignore[arg-type]


def test_full_queue_answers_503(urls, engine):
    url = urls[1]  # max_queue_len=1
    auth = {"Authorization": f"Bearer {API_KEY}"}
    long = {"prompt": "Tell me a story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT, headers=auth) as http:
        with http.stream("POST", url + "/v1/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # NOTE: kept: dropping the iterator would close the response
            assert next(lines).startswith("data: ")  # the request holds the only slot
            full = http.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            _assert_error(full, 503, "capacity")
            assert full.headers.get("retry-after")
        # the slot comes back once the first client has gone
        deadline = time.monotonic() + 10
        while (r := http.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1})).status_code == 503:
            assert time.monotonic() < deadline, "the slot was never released"
            time.sleep(0.05)
        assert r.status_code == 200, r.text
    _wait_idle(urls[0], engine)


# ---- back-pressure ---------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_before_parsing(url, engine):
    limit = (1 << 20) + 64 * 512  # the default for a 512-token context
    big = json.dumps({"prompt": "x" * (limit + 10), "max_tokens": 1}).encode()
    _assert_error(httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"},
                             timeout=TIMEOUT), 413, "larger than this server accepts")

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 32768
        yield b'"}'

    _assert_error(httpx.post(url + "/tokenize", content=chunks(), headers={"content-type": "application/json"},
                             timeout=TIMEOUT), 413, str(limit))
    # under the limit, but more characters than the context could hold: refused untokenized
    r = httpx.post(url + "/v1/completions", json={"prompt": "z" * (limit // 2), "max_tokens": 1}, timeout=TIMEOUT)
    _assert_error(r, 400, "maximum context length is 512 tokens. However, your prompt has")
    assert "characters" in r.json()["error"]["message"]
    _still_serving(url)


def test_prompts_are_tokenized_off_the_engine_thread(url, engine, monkeypatch):
    threads = []
    tokenizer = engine._engine.tokenizer
    real = type(tokenizer).encode

    def encode(self, *a, **kw):
        threads.append(threading.current_thread().name)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(tokenizer), "encode", encode)
    assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=TIMEOUT).status_code == 200
    assert httpx.post(url + "/tokenize", json={"prompt": "Hi"}, timeout=TIMEOUT).status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 1}, timeout=TIMEOUT)
    assert r.status_code == 200
    assert len(threads) >= 3 and all(t.startswith("rapidserve-tokenizer") for t in threads), threads


@pytest.mark.parametrize("body", [
    {"prompt": "caf\ud800"}, {"prompt": ["ok", "\udfff"]}, {"prompt": "x", "model": "\ud800"},
    {"prompt": "x", "stop": ["\ud800"]}, {"messages": [{"role": "user", "content": "\ud83d"}]},
    {"messages": [{"role": "\ud800", "content": "hi"}]},
])
def test_lone_surrogates_get_a_400(url, body, caplog):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    raw = json.dumps(body).replace("\\\\u", "\\u").encode()  # the escape as a client sends it
    for p in (path, "/tokenize"):
        r = httpx.post(url + p, content=raw, headers={"content-type": "application/json"}, timeout=TIMEOUT)
        _assert_error(r, 400, "not valid Unicode")
    assert "unexpected error" not in caplog.text and "Traceback" not in caplog.text


def test_a_batch_larger_than_the_queue_gets_a_400(urls):
    url = urls[1]  # max_queue_len=1
    r = httpx.post(url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT)
    err = _assert_error(r, 400, "smaller batches")
    assert err["param"] == "prompt" and "retry-after" not in r.headers


# ---- parallel sampling (n) -------------------------------------------------------------------

SAMPLED_N = {"temperature": 1.0, "seed": 5, "max_tokens": 4, "ignore_eos": True}


def test_n_choices_per_prompt_and_usage(url, engine):
    """n choices per prompt (index = prompt * n + choice), seeded: different, reproducible, each
    what a single request with seed + choice gives; usage counts each prompt once and every
    choice's tokens; /metrics counts the request once, its tokens all."""
    prompts = ["The capital of France is", "One, two,"]
    before = httpx.get(url + "/metrics").text
    r = httpx.post(url + "/v1/completions", json={"prompt": prompts, "n": 3, **SAMPLED_N}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    out = r.json()
    after = httpx.get(url + "/metrics").text
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert all(c["finish_reason"] == "length" for c in out["choices"])
    texts = [c["text"] for c in out["choices"]]
    assert len(set(texts[:3])) == 3, "seeded choices must differ"
    prompt_tokens = sum(len(_tokenize(url, p)) for p in prompts)
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 24,
                            "total_tokens": prompt_tokens + 24}
    single = httpx.post(url + "/v1/completions", json={"prompt": prompts[1], **SAMPLED_N, "seed": 7},
                        timeout=TIMEOUT).json()
    assert single["choices"][0]["text"] == texts[5]
    # one HTTP request, two engine requests (one per prompt, each one TTFT), 24 tokens, and the
    # gaps between each choice's own tokens (6 choices x 3)
    for name, delta in (("e2e_request_latency_seconds_count", 2), ("time_to_first_token_seconds_count", 2),
                        ("inter_token_latency_seconds_count", 18), ("prompt_tokens_total", prompt_tokens),
                        ("generation_tokens_total", 24)):
        assert _metric(after, f"rapidserve:{name}") - _metric(before, f"rapidserve:{name}") == delta, name
    again = httpx.post(url + "/v1/completions", json={"prompt": prompts, "n": 3, **SAMPLED_N},
                       timeout=TIMEOUT).json()
    assert [c["text"] for c in again["choices"]] == texts
    _wait_idle(url, engine)


def test_chat_n_streamed_equals_whole(client):
    """Streaming n choices: each chunk carries one choice's token with its index, each choice its
    role first and its own finish_reason; put together, each equals the non-streamed choice; the
    usage chunk and [DONE] come once, after every choice."""
    kw = dict(n=3, max_tokens=6, temperature=1.0, seed=11)
    full = _chat(client, **kw)
    assert [c.index for c in full.choices] == [0, 1, 2]
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}, **kw))
    *token_chunks, last = chunks
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()
    assert len(token_chunks) == full.usage.completion_tokens
    for i, choice in enumerate(full.choices):
        mine = [c.choices[0] for c in token_chunks if c.choices[0].index == i]
        assert mine and mine[0].delta.role == "assistant" and all(m.delta.role is None for m in mine[1:])
        assert "".join(m.delta.content or "" for m in mine) == choice.message.content
        assert [m.finish_reason for m in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
    assert len({c.message.content for c in full.choices}) > 1


def test_completion_n_raw_sse(url):
    """Each choice's chunks (text, logprobs) put together are its non-streamed choice."""
    body = {"prompt": "Once upon a time", "n": 2, **SAMPLED_N, "logprobs": 1, "stream": True}
    full = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=TIMEOUT).json()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        events = _sse_events(r)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e)["choices"] for e in events[:-1]]
    assert all(len(c) == 1 for c in chunks) and len(chunks) == 8
    for i in (0, 1):
        mine = [c[0] for c in chunks if c[0]["index"] == i]
        assert "".join(m["text"] for m in mine) == full["choices"][i]["text"]
        assert [m["finish_reason"] for m in mine] == [None] * 3 + ["length"]
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert sum((m["logprobs"][key] for m in mine), []) == full["choices"][i]["logprobs"][key]
    assert full["choices"][0]["logprobs"] != full["choices"][1]["logprobs"]


def test_a_client_leaving_aborts_every_choice(url, engine):
    body = {"prompt": "Tell me a very long story.", "n": 4, "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=TIMEOUT) as http:
        r = http.send(http.build_request("POST", url + "/v1/completions", json=body), stream=True)
        assert r.status_code == 200
        lines = r.iter_lines()  # NOTE: kept: dropping the iterator would close the response
        assert next(lines).startswith("data: ")
        assert _metric(httpx.get(url + "/metrics").text, "rapidserve:num_requests_running") == 4
        r.close()
        _wait_idle(url, engine, timeout=10)


def test_n_larger_than_the_queue_gets_a_400(urls):
    r = httpx.post(urls[1] + "/v1/completions", json={"prompt": "a", "n": 2, "max_tokens": 1},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT)
    assert _assert_error(r, 400, "n=2 choices")["param"] == "n"


# ---- tokenizer, metrics ----------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(url, engine):
    r = httpx.post(url + "/tokenize", json={"prompt": "Hello, world!", "model": engine.model_name}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 512
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello, world!"
    chat = httpx.post(url + "/tokenize", json={"messages": QUESTION}).json()
    full = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60).chat.completions.create(
        model=engine.model_name, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]
    assert chat["count"] == full.usage.prompt_tokens


def test_metrics_after_requests(url, engine, client):
    client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    text = _wait_idle(url, engine)
    for name in ("rapidserve:num_requests_running", "rapidserve:num_requests_waiting",
                 "rapidserve:kv_cache_usage_perc", "rapidserve:sm_partition_decode_sms",
                 "rapidserve:num_preemptions_total"):
        assert _metric(text, name) >= 0
    assert _metric(text, "rapidserve:kv_cache_usage_perc") == 0.0
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert _metric(text, f"rapidserve:{name}_count") > 0
        assert _metric(text, f"rapidserve:{name}_sum") > 0
    assert _metric(text, "rapidserve:prompt_tokens_total") > 0
    assert _metric(text, "rapidserve:generation_tokens_total") >= 3


# ---- AsyncEngine -----------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _tiny_engine(tiny_model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_model_dir("llama")[0], device="cpu", num_kv_blocks=64, **kw))


def test_async_engine_matches_llm_engine(tiny_model_dir):
    prompts = random_prompts(6, seed=5, max_len=40)
    sync = _tiny_engine(tiny_model_dir)
    ids = [sync.add_request(p, GREEDY) for p in prompts]
    done = {}
    while sync.has_unfinished_requests():
        for out in sync.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    expected = [done[i] for i in ids]

    eng = AsyncEngine(_tiny_engine(tiny_model_dir))

    async def run(p):
        tokens = []
        async for out in await eng.generate(p, GREEDY):
            tokens += out.delta_token_ids
            assert len(out.delta_token_ids) == 1  # one token per output
        return tokens, out.outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(run(p) for p in prompts))

    try:
        results = asyncio.run(main())
        assert [r[0] for r in results] == expected == [r[1] for r in results]
        assert eng.num_requests == 0
    finally:
        eng.shutdown()


def test_async_engine_validation_abort_and_shutdown(tiny_model_dir):
    eng = AsyncEngine(_tiny_engine(tiny_model_dir))
    total = eng.stats().num_total_blocks

    async def free_blocks_after(predicate) -> None:
        for _ in range(200):  # bounded: 10 s
            if predicate(eng.stats()):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"engine never became idle: {eng.stats()}")

    async def main():
        for bad in ([], [10**6], "text without a tokenizer"):
            with pytest.raises(ValueError):
                await eng.generate(bad, GREEDY)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="maximum context length"):
            await eng.generate([1, 2, 3], SamplingParams(max_tokens=10_000))
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        # close() mid-stream aborts
        stream = await eng.generate([1, 2, 3], long)
        for _ in range(2):
            await stream.__anext__()
        assert eng.stats().num_free_blocks < total
        stream.close()
        await free_blocks_after(lambda s: s.num_free_blocks == total and s.num_running == 0)
        # so does cancelling the consumer
        stream = await eng.generate([4, 5, 6], long)

        async def consume():
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        await free_blocks_after(lambda s: s.num_free_blocks == total and s.num_running == 0)
        assert eng.num_requests == 0
        assert await eng.call(lambda e: e.max_model_len) == eng.max_model_len

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    assert not eng._thread.is_alive() and not eng.healthy and eng.error is None

    async def after():
        with pytest.raises(EngineDeadError):
            await eng.generate([1, 2], GREEDY)

    asyncio.run(after())


def test_engine_thread_failing_to_start_fails_requests(tiny_model_dir):
    """The engine thread's own set-up (binding it to the engine's CUDA device) failing is an
    engine failure like a step's: requests get an error, never a hang (on the H100 a plain
    "cuda" device once killed the thread before its loop, and every request waited forever)."""
    llm = _tiny_engine(tiny_model_dir)
    llm.device = torch.device("cuda", 7)  # no such device here: binding the thread fails
    eng = AsyncEngine(llm)
    try:
        eng._thread.join(timeout=30)
        assert not eng._thread.is_alive() and not eng.healthy
        assert eng.error is not None

        async def main():
            with pytest.raises(EngineDeadError, match="the engine failed"):
                await eng.generate([1, 2, 3], GREEDY)

        asyncio.run(main())
    finally:
        eng.shutdown()


def test_engine_failure_answers_500_and_health_503(tiny_model_dir):
    llm = _tiny_engine(tiny_model_dir)
    real_step, calls = llm.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated device failure")
        return real_step()

    llm.step = failing_step  # type: ignore[method-assign]
    eng = AsyncEngine(llm)
    live = LiveServers(build_app(eng, ServerConfig()))
    (url,) = live.start()
    try:
        assert httpx.get(url + "/health").status_code == 200
        body = {"prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
            events = _sse_events(r)
        assert events[-1] == "[DONE]"
        assert json.loads(events[0])["choices"][0]["index"] == 0  # the step that worked
        error = json.loads(events[-2])["error"]
        assert error["code"] == 500 and "simulated device failure" in error["message"]
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503 and "simulated device failure" in health.text
        for stream in (False, True):
            r = httpx.post(url + "/v1/completions", json={**body, "stream": stream}, timeout=10)
            _assert_error(r, 500, "engine")
        assert isinstance(eng.error, RuntimeError) and not eng.healthy
    finally:
        live.stop()
        eng.shutdown()


def test_rapid_mode_serves_streams_and_frees_blocks(tiny_model_dir):
    eng = AsyncEngine(create_engine(EngineConfig(
        model=tiny_model_dir("llama")[0], device="cpu", mode="rapid", placement="thread", num_kv_blocks=64)))
    live = LiveServers(build_app(eng, ServerConfig()))
    (url,) = live.start()
    try:
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "ignore_eos": True, "temperature": 0}
        full = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).json()
        assert full["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=stream, timeout=TIMEOUT) as r:
            events = _sse_events(r)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"] == full["usage"]
        assert len(events) == 6 + 2
        # a client that leaves mid-stream: the decode worker frees its blocks, /metrics shows it
        with httpx.Client(timeout=TIMEOUT) as http:
            r = http.send(http.build_request("POST", url + "/v1/completions",
                                             json={**stream, "max_tokens": 400}), stream=True)
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            r.close()
        _wait_idle(url, eng, timeout=10)
    finally:
        live.stop()
        eng.shutdown()
    assert not eng.healthy


# ---- the serve command -----------------------------------------------------------------------


def test_serve_flags_use_vllm_names():
    args = build_parser().parse_args([
        "serve", "some/model", "--host", "0.0.0.0", "--port", "9001", "--api-key", "k",
        "--max-queue-len", "8", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
        "--gpu-memory-utilization", "0.5", "--block-size", "32", "--dtype", "bfloat16", "--seed", "3",
        "--served-model-name", "m", "--max-model-len", "128", "--load-format", "dummy", "--enforce-eager",
        "--mode", "hybrid",
    ])
    assert (args.model_tag, args.host, args.port, args.api_key, args.max_queue_len) == ("some/model", "0.0.0.0", 9001, "k", 8)
    assert args.enforce_eager and args.served_model_name == ["m"] and args.block_size == 32
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.host, defaults.port, defaults.api_key) == ("127.0.0.1", 8000, None)


def test_serve_command_runs_and_stops_on_sigterm(tiny_model_dir):
    """... and streams still open when the grace period ends get an error event (one log line
    each, no traceback); the body limit flag is read."""
    model = tiny_model_dir("llama")[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rapidserve.entrypoints.cli", "--log-level", "INFO", "serve", model,
         "--device", "cpu", "--port", "0", "--num-kv-blocks", "64", "--served-model-name", "tiny",
         "--graceful-shutdown-timeout", "0", "--max-request-body-bytes", "64KiB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = served_url(proc, 90, lambda: proc.stderr.read() if proc.poll() is not None else "slow")
        out = httpx.post(url + "/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3,
                                                     "ignore_eos": True}, timeout=30).json()
        assert out["usage"]["completion_tokens"] == 3
        r = httpx.post(url + "/completions", json={"prompt": "x" * 70_000}, timeout=30)
        assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]
        body = {"prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/completions", json=body) as a, \
                    http.stream("POST", url + "/completions", json=body) as b:
                streams = [a.iter_lines(), b.iter_lines()]
                assert all(next(s).startswith("data: ") for s in streams)
                proc.send_signal(signal.SIGTERM)
                for s in streams:
                    events = [x[6:] for x in s if x.startswith("data: ")]
                    assert events[-1] == "[DONE]", events[-3:]
                    error = json.loads(events[-2])["error"]
                    assert error["code"] == 503 and "shutting down" in error["message"]
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "rapidserve.server" in err and "engine thread stopped" in err
        # the server's log: ready, one line per request, the shutdown
        assert "engine ready in" in err
        assert re.search(r"POST /v1/completions 200 \| prompt 3 tok, output 3 tok \| [0-9.]+ s", err), err
        assert re.search(r"shut down: \d+ request\(s\) answered", err), err
        assert err.count("ended with an error: the server is shutting down") == 2, err
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _group_workers(pgid: int) -> list[int]:
    """The multiprocessing workers alive in process group `pgid`."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid and b"multiprocessing.spawn" in cmd:
            pids.append(int(d))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_while_the_rapid_workers_start_leaves_no_worker(tiny_model_dir):
    """SIGTERM before the server listens (its workers still loading): the workers are stopped,
    not orphaned (an orphan would keep its share of the GPU)."""
    model = tiny_model_dir("llama")[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rapidserve.entrypoints.cli", "serve", model, "--device", "cpu", "--port", "0",
         "--num-kv-blocks", "32", "--mode", "rapid", "--placement", "process"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _group_workers(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert "serving" not in proc.stdout.read()  # it was stopped while starting
        deadline = time.monotonic() + 10
        while _group_workers(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_workers(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_serve_turns_sigterm_into_an_exit_while_the_engine_starts(monkeypatch):
    """Before uvicorn installs its handlers, SIGTERM's default action would kill the process at
    once and orphan the workers already spawned; `serve` makes it a SystemExit first."""
    import rapidserve.engine
    from rapidserve.entrypoints import cli

    seen = []

    def create_engine(config):
        seen.append(signal.getsignal(signal.SIGTERM))
        if seen[-1] is cli._exit_on_sigterm:  # (the default action would kill the test run)
            with pytest.raises(SystemExit):
                signal.raise_signal(signal.SIGTERM)  # while "starting": unwinds through Python
        raise ValueError("stop here")

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(rapidserve.engine, "create_engine", create_engine)
    try:
        assert cli.main(["serve", "--device", "cpu"]) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [cli._exit_on_sigterm]
