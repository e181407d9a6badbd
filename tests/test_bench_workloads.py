"""Workloads of `bench serve` / `bench sweep`: the synthetic length distributions follow their
parameters, and the sharegpt / jsonl files parse (and fail clearly) as documented."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from rapidserve.bench.serve import add_cli_args, build_requests
from rapidserve.bench.workloads import (
    SYNTHETIC_WORKLOADS,
    LengthDist,
    cap_lengths,
    jsonl_requests,
    local_tokenizer,
    sharegpt_requests,
    synthetic_requests,
)


def words(text: str, special: bool) -> list[int]:
    """A stand-in tokenizer: one token per word, plus a BOS when asked for special tokens."""
    return [0] * (len(text.split()) + (1 if special else 0))


@pytest.mark.parametrize("name", sorted(SYNTHETIC_WORKLOADS))
def test_synthetic_lengths_follow_parameters(name):
    w = SYNTHETIC_WORKLOADS[name]
    for dist in (w.prompt, w.output):
        # The maxima clip little: the mean after clipping stays within 2 % of the published one.
        assert dist.expected_mean() == pytest.approx(dist.mean, rel=0.02)
        x = dist.sample(np.random.default_rng(0), 200_000)
        assert x.min() >= 1 and x.max() <= dist.max_len
        assert x.mean() == pytest.approx(dist.expected_mean(), rel=0.02), (name, dist)
        # log-space spread is sigma (clipping and rounding aside)
        unclipped = x[x < dist.max_len]
        assert np.log(unclipped).std() == pytest.approx(dist.sigma, rel=0.06, abs=0.02), (name, dist)
    # The paper's means: ~2K, ~8K, ~20K prompt tokens.
    assert {"lmsys-like": 2000, "arxiv-like": 8000, "loogle-like": 20000}[name] == w.prompt.mean


def test_length_dist_clipping_and_mean():
    d = LengthDist(100, 1.0, 150)  # heavy clipping
    x = d.sample(np.random.default_rng(1), 100_000)
    assert x.max() == 150 and d.expected_mean() < 100
    assert x.mean() == pytest.approx(d.expected_mean(), rel=0.02)
    assert LengthDist(50, 0.0, 40).expected_mean() == 40
    with pytest.raises(ValueError):
        LengthDist(0, 1.0, 10)


def test_synthetic_requests_seeded_and_capped():
    w = SYNTHETIC_WORKLOADS["lmsys-like"]
    reqs = synthetic_requests(w, 64, vocab_size=1000, seed=5)
    assert reqs == synthetic_requests(w, 64, vocab_size=1000, seed=5)
    assert reqs != synthetic_requests(w, 64, vocab_size=1000, seed=6)
    assert all(len(r.prompt) == r.prompt_len and 0 <= min(r.prompt) and max(r.prompt) < 1000 for r in reqs)
    capped = synthetic_requests(SYNTHETIC_WORKLOADS["loogle-like"], 32, 1000, seed=5, max_model_len=512)
    assert all(r.prompt_len + r.output_len <= 512 and r.output_len <= 256 for r in capped)
    assert all(len(r.prompt) == r.prompt_len for r in capped)
    assert cap_lengths(1000, 300, 512) == (256, 256)
    assert cap_lengths(100, 30, 512) == (100, 30)
    assert cap_lengths(100, 30, None) == (100, 30)
    with pytest.raises(ValueError):
        cap_lengths(10, 10, 1)


def _sharegpt(path, entries):
    path.write_text(json.dumps(entries))
    return path


def test_sharegpt_parsing(tmp_path):
    entries = [
        {"id": "a", "conversations": [{"from": "human", "value": "one two three four five"},
                                      {"from": "gpt", "value": "six seven eight nine"}]},
        {"id": "short", "conversations": [{"from": "human", "value": "only a question here"}]},
        {"id": "sys", "conversations": [{"from": "system", "value": "be nice"},
                                        {"from": "human", "value": "a b c d e f"},
                                        {"from": "gpt", "value": "g h i j k l m"},
                                        {"from": "human", "value": "later turn"}]},
        {"id": "tiny", "conversations": [{"from": "human", "value": "hi there you all"},
                                         {"from": "gpt", "value": "hello"}]},  # output < 4 tokens
        {"id": "nogpt", "conversations": [{"from": "human", "value": "x y z w"},
                                          {"from": "human", "value": "again"}]},
    ]
    path = _sharegpt(tmp_path / "sg.json", entries)
    reqs = sharegpt_requests(path, 2, words, seed=0)
    # prompt tokens = words + BOS; output tokens = words of the first gpt turn after the prompt.
    assert sorted((r.prompt, r.prompt_len, r.output_len) for r in reqs) == [
        ("a b c d e f", 7, 7), ("one two three four five", 6, 4)]
    assert sharegpt_requests(path, 2, words, seed=0) == reqs
    # More requests than usable conversations: repeated (as vLLM oversamples).
    many = sharegpt_requests(path, 5, words, seed=1)
    assert len(many) == 5 and {r.prompt for r in many} == {"a b c d e f", "one two three four five"}
    # A fixed output length: every request gets it, and the short answer is no longer filtered.
    fixed = sharegpt_requests(path, 3, words, seed=0, output_len=9)
    assert {r.output_len for r in fixed} == {9} and "hi there you all" in {r.prompt for r in fixed}
    # The model length cap drops what would not fit.
    assert {r.prompt for r in sharegpt_requests(path, 2, words, seed=0, max_model_len=11)} == {
        "one two three four five"}


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"conversations": []}), "expected a JSON list"),
    (json.dumps([{"id": 1}]), "entry 0 has no 'conversations'"),
    (json.dumps([{"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}]), "entry 0, turn 0"),
    (json.dumps([{"conversations": [{"from": "human", "value": "q"}]}]), "no usable request"),
])
def test_sharegpt_malformed(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        sharegpt_requests(path, 4, words, seed=0)


def test_jsonl_parsing(tmp_path):
    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "alpha beta gamma", "output_len": 5}),
        "",
        json.dumps({"prompt": "delta epsilon", "max_tokens": 7}),
        json.dumps({"prompt": "zeta", "extra": 1}),
    ]) + "\n")
    reqs = jsonl_requests(path, 3, words, seed=0, default_output_len=11)
    assert sorted((r.prompt, r.prompt_len, r.output_len) for r in reqs) == [
        ("alpha beta gamma", 4, 5), ("delta epsilon", 3, 7), ("zeta", 2, 11)]
    assert jsonl_requests(path, 3, words, seed=0, default_output_len=11) == reqs
    assert len(jsonl_requests(path, 7, words, seed=0)) == 7
    assert {r.prompt for r in jsonl_requests(path, 3, words, seed=0, max_model_len=9)} == {"alpha beta gamma"}


@pytest.mark.parametrize("line, match", [
    ("[1, 2]", "line 1: expected an object"),
    ('{"prompt": ""}', "line 1: expected an object"),
    ('{"text": "x"}', "line 1: expected an object"),
    ('{"prompt": "x", "output_len": 0}', "line 1: output_len"),
    ('{"prompt": "x", "max_tokens": "3"}', "line 1: output_len"),
    ('{"prompt": "x",', "line 1: not valid JSON"),
    ("", "no request"),
])
def test_jsonl_malformed(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        jsonl_requests(path, 2, words, seed=0)


def test_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path, tmp_path / "tokenizer.json"):
        assert local_tokenizer(where)("hello world again", True) == [1, 2, 0]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        local_tokenizer(tmp_path / "missing")


def test_build_requests_dispatch(tmp_path):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(["--dataset-name", "arxiv-like", "--num-prompts", "3", "--random-vocab-size", "50"])
    reqs = build_requests(args, lambda: pytest.fail("no tokenizer needed"), max_model_len=300)
    assert len(reqs) == 3 and all(r.prompt_len + r.output_len <= 300 for r in reqs)
    args = parser.parse_args(["--dataset-name", "jsonl"])
    with pytest.raises(ValueError, match="needs --dataset-path"):
        build_requests(args, lambda: words, None)
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a b c"}\n')
    args = parser.parse_args(["--dataset-name", "jsonl", "--dataset-path", str(path), "--num-prompts", "2",
                              "--custom-output-len", "3"])
    assert [(r.prompt_len, r.output_len) for r in build_requests(args, lambda: words, None)] == [(4, 3)] * 2
    assert math.isfinite(SYNTHETIC_WORKLOADS["lmsys-like"].output.expected_mean())
