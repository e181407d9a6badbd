"""Workloads for `bench serve` and `bench sweep`: the datasets and the arrival process.

- `random` follows vLLM's RandomDataset: lengths uniform in [len x (1 - r), len x (1 + r)] (both
  ends included), prompts of random token ids.
- `lmsys-like`, `arxiv-like`, `loogle-like`: synthetic stand-ins for the paper's three datasets
  (section 5.1): lognormal prompt and output lengths with the published means, clipped to a
  maximum, prompts of random token ids (`SYNTHETIC_WORKLOADS` documents each one's source).
- `sharegpt`: a ShareGPT-format JSON file as vLLM reads it; `jsonl`: one JSON object per line
  with a text `prompt` and an optional `output_len` / `max_tokens`. Both are tokenized by a
  `Tokenize` function (the server's /tokenize or a local tokenizer.json).

Arrivals are a gamma renewal process: shape = burstiness, scale = 1 / (rate x burstiness), so the
mean gap is 1 / rate whatever the burstiness, and burstiness 1 is Poisson (exponential gaps);
< 1 is burstier, > 1 more even.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class SampleRequest(NamedTuple):
    prompt: list[int] | str  # token ids, or text (sharegpt, jsonl) that the server tokenizes
    prompt_len: int
    output_len: int


# (text, add_special_tokens) -> token ids
Tokenize = Callable[[str, bool], list[int]]


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of a length drawn as vLLM's --random-range-ratio does (low >= 1)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    return max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int) -> list[SampleRequest]:
    """`num_prompts` requests of random token ids in [0, vocab_size), seeded."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if vocab_size < 1:
        raise ValueError(f"--random-vocab-size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lo, in_hi = length_range(input_len, range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio)
    in_lens = rng.integers(in_lo, in_hi + 1, size=num_prompts)
    out_lens = rng.integers(out_lo, out_hi + 1, size=num_prompts)
    reqs = []
    for n_in, n_out in zip(in_lens.tolist(), out_lens.tolist()):
        prompt = rng.integers(0, vocab_size, size=n_in).tolist()
        reqs.append(SampleRequest(prompt=prompt, prompt_len=n_in, output_len=n_out))
    return reqs


def arrival_times(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from the start) of `n` requests; rate inf sends them all at 0."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    # The first request goes at once: the run's clock starts with it, not one gap later.
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


# ---- synthetic length distributions ------------------------------------------------------------


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class LengthDist:
    """Lognormal lengths with mean `mean` (before clipping) and log-space std `sigma`, rounded and
    clipped to [1, max_len]."""

    mean: float
    sigma: float
    max_len: int

    def __post_init__(self) -> None:
        if self.mean < 1 or self.sigma < 0 or self.max_len < 1:
            raise ValueError(f"bad length distribution {self}")

    @property
    def mu(self) -> float:
        # E[lognormal] = exp(mu + sigma^2 / 2): this mu makes `mean` the mean.
        return math.log(self.mean) - self.sigma ** 2 / 2

    def expected_mean(self) -> float:
        """The mean after clipping at max_len (rounding and the floor of 1 aside)."""
        if self.sigma == 0:
            return float(min(self.mean, self.max_len))
        m, s, mu = self.max_len, self.sigma, self.mu
        below = math.exp(mu + s * s / 2) * _normal_cdf((math.log(m) - mu - s * s) / s)
        return below + m * (1.0 - _normal_cdf((math.log(m) - mu) / s))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n] int64 lengths."""
        x = rng.lognormal(self.mu, self.sigma, size=n)
        return np.clip(np.rint(x), 1, self.max_len).astype(np.int64)


@dataclass(frozen=True)
class SyntheticWorkload:
    name: str
    prompt: LengthDist
    output: LengthDist
    source: str


# NOTE: the means are published figures; the sigmas (spreads) and the clipping maxima are our
# choices, since the paper gives means only. The README's Benchmarks section repeats this table.
SYNTHETIC_WORKLOADS: dict[str, SyntheticWorkload] = {w.name: w for w in (
    SyntheticWorkload(
        "lmsys-like", prompt=LengthDist(2000, 1.0, 16384), output=LengthDist(215, 0.8, 2048),
        source="prompt mean 2000 tokens: the paper's LMSYS trace (section 5.1); output mean 215: "
               "LMSYS-Chat-1M (Zheng et al. 2023, Table 1: 214.5 tokens per response); a wide "
               "spread (sigma 1.0, 0.8) for the long tail of chat traffic"),
    SyntheticWorkload(
        "arxiv-like", prompt=LengthDist(8000, 0.5, 32768), output=LengthDist(300, 0.4, 1024),
        source="prompt mean 8000 tokens: the paper's arXiv summarization set (section 5.1; "
               "Cohan et al. 2018: articles of about 6000 words); output mean 300: an abstract "
               "(about 220 words in Cohan et al.)"),
    SyntheticWorkload(
        "loogle-like", prompt=LengthDist(20000, 0.3, 65536), output=LengthDist(300, 0.4, 1024),
        source="prompt mean 20000 tokens: the paper's LooGLE summarization set (section 5.1; "
               "LooGLE's documents run past 24K tokens, hence a narrow spread, sigma 0.3); output "
               "mean 300: its references are arXiv abstracts"),
)}


def cap_lengths(prompt_len: int, output_len: int, max_model_len: int | None) -> tuple[int, int]:
    """Fit prompt + output into max_model_len: the output first gets at most half of it, the
    prompt what is left."""
    if max_model_len is None:
        return prompt_len, output_len
    if max_model_len < 2:
        raise ValueError(f"--max-model-len must be >= 2, got {max_model_len}")
    output_len = min(output_len, max_model_len // 2)
    return min(prompt_len, max_model_len - output_len), output_len


def synthetic_requests(workload: SyntheticWorkload, num_prompts: int, vocab_size: int, seed: int,
                       max_model_len: int | None = None) -> list[SampleRequest]:
    """`num_prompts` requests with the workload's lengths, prompts of random token ids, seeded."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if vocab_size < 1:
        raise ValueError(f"--random-vocab-size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lens = workload.prompt.sample(rng, num_prompts)
    out_lens = workload.output.sample(rng, num_prompts)
    reqs = []
    for n_in, n_out in zip(in_lens.tolist(), out_lens.tolist()):
        n_in, n_out = cap_lengths(n_in, n_out, max_model_len)
        prompt = rng.integers(0, vocab_size, size=n_in).tolist()
        reqs.append(SampleRequest(prompt=prompt, prompt_len=n_in, output_len=n_out))
    return reqs


# ---- datasets from files -----------------------------------------------------------------------


def _fill(pairs: Iterable[tuple[str, int]], num_prompts: int, tokenize: Tokenize,
          max_model_len: int | None, min_len: int, what: str) -> list[SampleRequest]:
    """Tokenize (prompt text, output length) pairs, in order, until
    `num_prompts` are kept; too few are repeated to make up the number (as vLLM oversamples)."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    kept: list[SampleRequest] = []
    for text, output_len in pairs:
        if len(kept) == num_prompts:
            break
        prompt_len = len(tokenize(text, True))
        # vLLM's ShareGPT filter: too-short sequences carry no signal; too-long ones the server
        # would refuse.
        if prompt_len < min_len or output_len < min_len:
            continue
        if max_model_len is not None and prompt_len + output_len > max_model_len:
            continue
        kept.append(SampleRequest(prompt=text, prompt_len=prompt_len, output_len=output_len))
    if not kept:
        raise ValueError(f"{what}: no usable request (each needs >= {min_len} prompt and output "
                         f"tokens, and prompt + output <= max model len {max_model_len})")
    return [kept[i % len(kept)] for i in range(num_prompts)]


_HUMAN_ROLES = ("human", "user")
_GPT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing")


def _first_exchange(entry: Any, index: int, path: str) -> tuple[str, str] | None:
    """(first human turn, the first gpt turn after it) of one ShareGPT entry, or None to skip."""
    # A malformed file is the user's input error: ValueError, which the CLI reports as such.
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise ValueError(  # noqa: TRY004
            f"{path}: entry {index} has no 'conversations' list (ShareGPT format: "
            "[{\"conversations\": [{\"from\": \"human\", \"value\": ...}, ...]}, ...])")
    turns = entry["conversations"]
    if len(turns) < 2:  # as vLLM: a prompt without an answer gives no output length
        return None
    prompt = None
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise ValueError(f"{path}: entry {index}, turn {j}: expected {{\"from\": ..., \"value\": TEXT}}")
        role = str(turn["from"]).lower()
        if prompt is None and role in _HUMAN_ROLES:
            prompt = turn["value"]
        elif prompt is not None and role in _GPT_ROLES:
            return prompt, turn["value"]
    return None


def sharegpt_requests(path: str | Path, num_prompts: int, tokenize: Tokenize, seed: int,
                      output_len: int | None = None, max_model_len: int | None = None) -> list[SampleRequest]:
    """Requests from a ShareGPT JSON file, as vLLM's ShareGPT dataset: entries with >= 2 turns,
    shuffled by `seed`; the first human turn is the prompt (sent as text), the token count of the
    first gpt turn after it the output length (or `output_len` for all)."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")  # noqa: TRY004
    exchanges = [x for i, entry in enumerate(data) if (x := _first_exchange(entry, i, path)) is not None]
    order = np.random.default_rng(seed).permutation(len(exchanges)).tolist()

    def pairs() -> Iterable[tuple[str, int]]:
        for i in order:
            prompt, answer = exchanges[i]
            yield prompt, output_len if output_len is not None else len(tokenize(answer, False))

    # An explicit output length lifts vLLM's minimum on the output (it then checks only prompts).
    return _fill(pairs(), num_prompts, tokenize, max_model_len, 4 if output_len is None else 1,
                 f"{path} (ShareGPT)")


def jsonl_requests(path: str | Path, num_prompts: int, tokenize: Tokenize, seed: int,
                   default_output_len: int = 256, max_model_len: int | None = None) -> list[SampleRequest]:
    """Requests from a JSON-lines file: {"prompt": TEXT, "output_len" or "max_tokens": N
    (optional, else `default_output_len`)} per line, shuffled by `seed` (as vLLM's custom dataset)."""
    path = str(path)
    rows: list[tuple[str, int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({e})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise ValueError(f"{path} line {lineno}: expected an object with a non-empty text 'prompt'")
            n = obj.get("output_len", obj.get("max_tokens", default_output_len))
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{path} line {lineno}: output_len / max_tokens must be an integer >= 1, got {n!r}")
            rows.append((obj["prompt"], n))
    if not rows:
        raise ValueError(f"{path}: no request (expected one JSON object per line)")
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    return _fill((rows[i] for i in order), num_prompts, tokenize, max_model_len, 1, f"{path} (jsonl)")


def local_tokenizer(path: str | Path) -> Tokenize:
    """A Tokenize from a tokenizer.json file, or a directory that holds one (no model needed)."""
    from tokenizers import Tokenizer

    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"--tokenizer: no tokenizer.json at {path}")
    tok = Tokenizer.from_file(str(file))
    return lambda text, special: tok.encode(text, add_special_tokens=special).ids
