"""Property-based fuzzing of every route, generated from the server's own OpenAPI schema
(schemathesis + hypothesis), against a live server on loopback.

Each case must get no 5xx, OpenAI's error body with every 4xx, and an answer the schema allows
(status, content type, body); afterwards the server is healthy and every KV block is free. The
run is bounded and reproducible: a fixed number of examples per route, derandomized.

The model is a tiny random Llama with SmolLM2's vocabulary and tokenizer, so that text prompts,
chat templates and /tokenize work while a generation costs milliseconds.
"""

from __future__ import annotations

import collections
import os
import json
import re
import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")  # the `test` extra

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402 - the registry serves the built-in checks
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)

from conftest import LiveServer  # noqa: E402

from rapidserve.async_engine import AsyncEngine  # noqa: E402
from rapidserve.config import EngineConfig  # noqa: E402
from rapidserve.engine import LLMEngine  # noqa: E402
from rapidserve.entrypoints.openai.server import ServerConfig, build_app  # noqa: E402

# Per route: schema-valid cases (they reach the engine), then schema-invalid ones (each must be
# a 4xx); hypothesis stops early on routes with few distinct cases (GET /health).
MAX_EXAMPLES = 40
NEGATIVE_EXAMPLES = 25
# NOTE: a short context bounds every generation the fuzzer can ask for (max_tokens beyond it is
# a 400), so the run stays within seconds on two CPU cores.
MAX_MODEL_LEN = 64

SEEN: collections.Counter[tuple[str, int]] = collections.Counter()  # (route, status) -> cases


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory, smollm2_gguf):
    import torch
    import transformers

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-49k")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    engine = AsyncEngine(LLMEngine(EngineConfig(
        model=str(d), tokenizer=smollm2_gguf, device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64,
        max_num_seqs=16)))
    live = LiveServer(build_app(engine, ServerConfig(max_queue_len=8)))
    url = live.start()
    yield url
    live.stop()
    engine.shutdown()


def openai_error_body(ctx, response, case) -> bool | None:
    """Every 4xx carries {"error": {"message", "type", "param", "code"}}, code = the status."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        err = body["error"]
        assert isinstance(err["message"], str) and err["message"], body
        assert isinstance(err["type"], str) and err["type"], body
        assert err["code"] == response.status_code, body
        assert "param" in err, body
    return None


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          openai_error_body]


@pytest.mark.slow
def test_every_route_from_the_schema(fuzz_url):
    """Valid, then invalid cases (schemathesis' positive and negative modes) for each route."""
    schema = schemathesis.openapi.from_url(fuzz_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 9, [op.label for op in operations]
    for op in operations:
        for mode, examples in ((GenerationMode.POSITIVE, MAX_EXAMPLES), (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)):

            @given(case=op.as_strategy(mode))
            @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                response = case.call(base_url=fuzz_url, timeout=60)
                SEEN[(op.label, response.status_code)] += 1
                if os.environ.get("FUZZ_SHOW"):  # to see what the fuzzer sends and gets
                    print(op.label, response.status_code, response.text[:150], repr(case.body)[:200])
                case.validate_response(response, checks=CHECKS)

            try:
                fuzz()
            except Unsatisfiable:
                # A route without a body has no invalid input to send (a path is always a string).
                assert mode is GenerationMode.NEGATIVE and not op.body, op.label


@pytest.mark.slow
def test_the_server_is_healthy_and_every_block_free_after_fuzzing(fuzz_url):
    """Runs after the fuzz (file order): nothing leaked, nothing broken."""
    assert sum(SEEN.values()) > 0, "run with the fuzz test"
    assert not any(status >= 500 for _, status in SEEN), SEEN
    assert httpx.get(fuzz_url + "/health").status_code == 200
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(fuzz_url + "/metrics").text
        free = float(re.search(r"^rapidserve:kv_cache_free_blocks(?:{[^}]*})? (\S+)$", text, re.M).group(1))
        total = float(re.search(r"^rapidserve:kv_cache_total_blocks(?:{[^}]*})? (\S+)$", text, re.M).group(1))
        running = float(re.search(r"^rapidserve:num_requests_running(?:{[^}]*})? (\S+)$", text, re.M).group(1))
        if free == total and running == 0:
            break
        assert time.monotonic() < deadline, f"blocks not freed after fuzzing: {free}/{total}, running {running}"
        time.sleep(0.1)
    r = httpx.post(fuzz_url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text
    summary = ", ".join(f"{route} {status}: {n}" for (route, status), n in sorted(SEEN.items()))
    print(f"\nfuzzed {sum(SEEN.values())} cases: {summary}")
