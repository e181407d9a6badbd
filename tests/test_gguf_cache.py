"""The GGUF parse cache: a warm start gives the same config, weights and tokenizer as a cold one
without parsing the file; a corrupt or stale entry is rebuilt; an unwritable cache or
RAPIDSERVE_NO_CACHE runs without one."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from rapidserve.model import gguf_cache, gguf_file
from rapidserve.model.gguf_file import load_gguf_tokenizer, read_gguf


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPIDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAPIDSERVE_NO_CACHE", raising=False)


@pytest.fixture
def gguf_copy(fresh_cache, tmp_path):
    """A tiny qwen3 GGUF file (as test_model_sources writes them) under a fresh cache."""
    from test_model_sources import _tiny_tensors, _write_gguf

    path = tmp_path / "tiny-qwen3.gguf"
    _write_gguf(path, "qwen3", _tiny_tensors(np.random.default_rng(0), heads=4, kv_heads=2, head_dim=8,
                                             qk_norm=True), head_dim=8)
    return str(path)


def _count_parses(monkeypatch) -> list[str]:
    parses: list[str] = []
    real = gguf_file._open_reader

    def counting(path):
        parses.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(gguf_file, "_open_reader", counting)
    return parses


def _sample(weights) -> dict[str, torch.Tensor]:
    return dict(weights)


def test_warm_start_skips_the_parse_and_gives_the_same_model(gguf_copy, monkeypatch):
    parses = _count_parses(monkeypatch)
    cold_config, cold_weights = read_gguf(gguf_copy)
    cold = _sample(cold_weights)
    assert len(parses) == 1
    entry = gguf_cache.entry_dir(gguf_copy)
    assert (entry / "index.json").is_file()
    warm_config, warm_weights = read_gguf(gguf_copy)
    warm = _sample(warm_weights)
    assert len(parses) == 1  # no second parse
    assert warm_config == cold_config
    assert cold.keys() == warm.keys() and "model.layers.0.self_attn.q_proj.weight" in cold
    for k in cold:
        assert torch.equal(cold[k], warm[k]), k


def test_cached_tokenizer_is_the_converted_one(fresh_cache, smollm2_gguf):
    cold = load_gguf_tokenizer(smollm2_gguf)
    assert (gguf_cache.entry_dir(smollm2_gguf) / "tokenizer" / "tokenizer.json").is_file()
    warm = load_gguf_tokenizer(smollm2_gguf)
    text = "Héllo wörld!  The capital of France is 🇫🇷 Paris.\n\tdef f(x): return x**2"
    assert warm.encode(text) == cold.encode(text)
    assert warm.decode(cold.encode(text)) == cold.decode(cold.encode(text))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert (warm.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == cold.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert (warm.eos_token_id, warm.bos_token_id) == (cold.eos_token_id, cold.bos_token_id)
    assert warm.all_special_ids == cold.all_special_ids


def test_a_corrupt_or_foreign_entry_is_rebuilt(gguf_copy, monkeypatch):
    config, _ = read_gguf(gguf_copy)
    index = gguf_cache.entry_dir(gguf_copy) / "index.json"
    parses = _count_parses(monkeypatch)
    for bad in ("{not json", json.dumps({"format": gguf_cache.CACHE_FORMAT + 1}),
                json.dumps({"format": gguf_cache.CACHE_FORMAT, "config": {}, "tensors": [
                    {"name": "x", "type": 0, "shape": [1], "offset": 10**12, "nbytes": 4,
                     "view_dtype": "<f4", "view_shape": [1]}]})):
        index.write_text(bad)
        assert read_gguf(gguf_copy).config == config
    assert len(parses) == 3
    assert json.loads(index.read_text())["format"] == gguf_cache.CACHE_FORMAT  # written again


def test_the_key_follows_the_bytes(tmp_path, gguf_copy):
    a = tmp_path / "a.gguf"
    shutil.copyfile(gguf_copy, a)
    key = gguf_cache.file_key(str(a))
    assert gguf_cache.file_key(gguf_copy) == key  # the same bytes elsewhere: the same entry
    with open(a, "r+b") as f:  # one byte of the metadata changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert gguf_cache.file_key(str(a)) != key


def test_unwritable_cache_and_no_cache(gguf_copy, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RAPIDSERVE_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    config, _ = read_gguf(gguf_copy)
    assert config["model_type"] == "qwen3"
    monkeypatch.setenv("RAPIDSERVE_NO_CACHE", "1")
    assert gguf_cache.cache_root() is None
    parses = _count_parses(monkeypatch)
    read_gguf(gguf_copy)
    read_gguf(gguf_copy)
    assert len(parses) == 2
