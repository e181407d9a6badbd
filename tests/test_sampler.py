import math

import pytest
import torch

from rapidserve.sampling import Sampler, SamplingBatch, apply_filters, make_generator
from rapidserve.sampling.sampler import CPU_CANDIDATES, _top_k_top_p_by_candidates, _top_k_top_p_sorted
from rapidserve.sampling_params import SamplingParams

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]

# Probabilities with no ties, so every filter's kept set is unambiguous.
PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def _logits(probs: list[float], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float().to(device)


def _kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in filtered.cpu()]


def _batch(params, generators=None, banned=None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(list(params), generators or [None] * n, banned or [()] * n)


# ---- filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, kept",
    [
        (dict(top_p=0.7), {0, 1}),  # 0.5 + 0.2 reaches 0.7 exactly
        (dict(top_p=0.71), {0, 1, 2}),
        (dict(top_p=0.5), {0}),
        (dict(top_p=1e-6), {0}),  # the top token always stays
        (dict(top_p=1.0), {0, 1, 2, 3, 4}),
        (dict(top_k=2), {0, 1}),
        (dict(top_k=1), {0}),
        (dict(top_k=100), {0, 1, 2, 3, 4}),
        (dict(top_k=0), {0, 1, 2, 3, 4}),
        (dict(min_p=0.3), {0, 1, 2}),  # keeps prob >= 0.15, the boundary included
        (dict(min_p=0.31), {0, 1}),
        (dict(min_p=0.0), {0, 1, 2, 3, 4}),
        (dict(min_p=1.0), {0}),
        # top-p sees probabilities renormalized over the top-k survivors:
        # [0.5, 0.2, 0.15] / 0.85 -> 0.588 + 0.235 already reaches 0.8, so 2 tokens
        # (without renormalization 0.5 + 0.2 < 0.8 would keep 3).
        (dict(top_k=3, top_p=0.8), {0, 1}),
        (dict(top_p=0.9, min_p=0.25), {0, 1, 2}),  # top-p keeps 4, min-p then drops 0.1
        (dict(top_k=4, top_p=0.95, min_p=0.05), {0, 1, 2, 3}),
    ],
)
def test_filters_keep_exact_set(device, kwargs, kept):
    # Shuffle the vocabulary so the sort/unsort really has to put tokens back in place.
    perm = torch.tensor([3, 0, 4, 1, 2])
    logits = _logits(PROBS)[perm][None, :].to(device)  # [1, 5]
    args = {}
    if "top_k" in kwargs:
        args["top_k"] = torch.tensor([kwargs["top_k"]], device=device)
    if "top_p" in kwargs:
        args["top_p"] = torch.tensor([kwargs["top_p"]], device=device)
    if "min_p" in kwargs:
        args["min_p"] = torch.tensor([kwargs["min_p"]], device=device)
    out = apply_filters(logits, **args)
    expect = {i for i, orig in enumerate(perm.tolist()) if orig in kept}
    assert _kept(out) == [expect]
    # Survivors keep their logits unchanged.
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])


def test_filters_per_row_parameters(device):
    logits = _logits(PROBS, device).repeat(4, 1)  # [4, 5]
    out = apply_filters(
        logits,
        top_k=torch.tensor([0, 2, 0, 0], device=device),
        top_p=torch.tensor([1.0, 1.0, 0.7, 1.0], device=device),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.3], device=device),
    )
    assert _kept(out) == [{0, 1, 2, 3, 4}, {0, 1}, {0, 1}, {0, 1, 2}]
    assert torch.equal(logits, _logits(PROBS, device).repeat(4, 1))  # input untouched


def test_disabled_filters_keep_tiny_probabilities():
    logits = torch.tensor([[0.0, -60.0, -80.0, float("-inf")]])  # probs ~1, 9e-27, 2e-35, 0
    out = apply_filters(
        logits, top_k=torch.tensor([0]), top_p=torch.tensor([1.0]), min_p=torch.tensor([0.0])
    )
    assert _kept(out) == [{0, 1, 2}]


def test_filters_on_large_vocab_keep_a_sorted_prefix():
    torch.manual_seed(0)
    logits = torch.randn(3, 50_000) * 3
    top_p = torch.tensor([0.9, 0.5, 0.99])
    out = apply_filters(logits, top_p=top_p)
    probs = logits.softmax(-1)
    for row in range(3):
        kept = torch.isfinite(out[row])
        # Every kept token is more likely than every dropped one...
        assert probs[row][kept].min() > probs[row][~kept].max()
        # ...and the kept set is the smallest one reaching top_p.
        mass = probs[row][kept].sum().item()
        assert mass >= top_p[row].item() - 1e-4
        assert mass - probs[row][kept].min().item() < top_p[row].item() + 1e-4



@pytest.mark.parametrize("candidates", [(8, 64), (16,), CPU_CANDIDATES])
def test_cpu_candidates_give_the_sort_s_result(candidates):
    """The CPU path decides top-k/top-p from the K highest logits where it can (a partial sort)
    and sorts only the rows it cannot: the same result as sorting every row, for every mix of
    rows (peaked and flat, k inside and past the candidates, top-p reached inside them or not,
    no filter at all)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch, vocab = 12, 500
        logits = torch.randn(batch, vocab, generator=g) * (torch.rand(batch, 1, generator=g) * 8 + 0.2)
        top_k = torch.randint(-1, 60, (batch,), generator=g)
        top_k[torch.rand(batch, generator=g) < 0.3] = 0
        top_k[0] = 300  # past every candidate count: normalized over its 300, not over the K
        top_p = torch.rand(batch, generator=g)
        top_p[torch.rand(batch, generator=g) < 0.3] = 1.0
        for k, p in [(top_k, top_p), (None, top_p), (top_k, None)]:
            got = _top_k_top_p_by_candidates(logits, k, p, candidates)
            assert torch.equal(got, _top_k_top_p_sorted(logits, k, p))


# ---- greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_greedy_is_argmax(device, dtype):
    torch.manual_seed(1)
    logits = torch.randn(6, 300, device=device).to(dtype)
    out = Sampler()(logits, _batch([SamplingParams(temperature=0.0)] * 6))
    assert out.dtype == torch.int64 and out.shape == (6,) and out.device == logits.device
    assert torch.equal(out, logits.float().argmax(-1))


def test_greedy_rows_in_mixed_batch_are_argmax(device):
    torch.manual_seed(2)
    logits = torch.randn(8, 500, device=device)
    params = [
        SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.5, top_k=50)
        for i in range(8)
    ]
    out = Sampler()(logits, _batch(params))
    assert torch.equal(out[0::2], logits[0::2].argmax(-1))
    # Sampled rows respect their own top-k.
    top50 = logits[1::2].topk(50, dim=-1).indices
    assert bool((top50 == out[1::2, None]).any(-1).all())


def test_sampler_does_not_modify_logits(device):
    torch.manual_seed(3)
    logits = torch.randn(3, 64, device=device)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.5, min_p=0.1),
    ]
    Sampler()(logits, _batch(params, banned=[(1, 2), (3,), (4,)]))
    assert torch.equal(logits, before)


# ---- seeds ------------------------------------------------------------------------------------


def _run_seeded(logit_steps, seed, row, batch_size, device, params):
    """Sample the seeded request at `row` of a batch padded with other requests."""
    gen = make_generator(seed, device)
    sampler = Sampler()
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3),
        SamplingParams(top_k=5, seed=99),
        SamplingParams(top_p=0.3),
    ]
    tokens = []
    for step, logits in enumerate(logit_steps):
        batch_params, gens = [], []
        for i in range(batch_size):
            if i == row:
                batch_params.append(params)
                gens.append(gen)
            else:
                p = others[(i + step) % len(others)]
                batch_params.append(p)
                gens.append(make_generator(1000 + step * 7 + i, device) if p.seed is not None else None)
        rows = torch.stack([logits if i == row else torch.randn_like(logits) for i in range(batch_size)])
        tokens.append(sampler(rows, _batch(batch_params, gens))[row].item())
    return tokens


@pytest.mark.parametrize(
    "params",
    [SamplingParams(seed=7), SamplingParams(seed=7, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02)],
)
def test_seeded_request_independent_of_batch(device, params):
    torch.manual_seed(4)
    steps = [torch.randn(1000, device=device) for _ in range(12)]
    alone = _run_seeded(steps, 7, row=0, batch_size=1, device=device, params=params)
    torch.manual_seed(123)  # different default-RNG state for the unseeded neighbours
    in_batch = _run_seeded(steps, 7, row=3, batch_size=6, device=device, params=params)
    torch.manual_seed(5)
    first_of_many = _run_seeded(steps, 7, row=0, batch_size=4, device=device, params=params)
    assert alone == in_batch == first_of_many


def test_different_seeds_differ(device):
    logits = torch.zeros(1, 1000, device=device)  # uniform: any two streams of 10 collide ~never
    runs = []
    for seed in (1, 2, -1):
        gen = make_generator(seed, device)
        batch = _batch([SamplingParams(seed=seed)], [gen])
        runs.append([Sampler()(logits, batch).item() for _ in range(10)])
    assert runs[0] != runs[1] and runs[0] != runs[2] and runs[1] != runs[2]


def test_generator_advances_between_steps(device):
    gen = make_generator(3, device)
    logits = torch.zeros(1, 1000, device=device)
    batch = _batch([SamplingParams(seed=3)], [gen])
    tokens = [Sampler()(logits, batch).item() for _ in range(10)]
    assert len(set(tokens)) > 1


# ---- distributions ----------------------------------------------------------------------------


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
_CHI2_999 = {2: 13.82, 4: 18.47}


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(), PROBS),
        (SamplingParams(top_p=0.71), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0.0, 0.0]),
        (SamplingParams(top_k=3), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0.0, 0.0]),
        (SamplingParams(min_p=0.3), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0.0, 0.0]),
        # Temperature 2 flattens: p ** (1/2), renormalized.
        (SamplingParams(temperature=2.0), [math.sqrt(p) for p in PROBS]),
        # Temperature 0.5 sharpens: p ** 2, renormalized.
        (SamplingParams(temperature=0.5), [p * p for p in PROBS]),
    ],
)
def test_sampling_frequencies(device, params, expected):
    n = 40_000
    logits = _logits(PROBS, device).repeat(n, 1)  # [n, 5]: n independent draws in one call
    torch.manual_seed(0)  # fixed noise: the test cannot flake
    tokens = Sampler()(logits, _batch([params] * n))
    counts = torch.bincount(tokens.cpu(), minlength=5).double()
    probs = torch.tensor(expected, dtype=torch.float64)
    probs /= probs.sum()
    support = probs > 0
    assert counts[~support].sum() == 0
    dof = int(support.sum()) - 1
    assert _chi_square(counts[support], probs[support]) < _CHI2_999[dof]


def test_seeded_rows_frequencies():
    # Noise drawn from per-request generators follows the same distribution.
    probs = torch.tensor(PROBS, dtype=torch.float64)
    gen = make_generator(11, "cpu")
    batch = _batch([SamplingParams(seed=11)], [gen])
    logits = _logits(PROBS)[None, :]
    tokens = torch.tensor([Sampler()(logits, batch).item() for _ in range(4000)])
    counts = torch.bincount(tokens, minlength=5).double()
    assert _chi_square(counts, probs) < _CHI2_999[4]


def test_low_temperature_concentrates_on_argmax():
    n = 5_000
    logits = _logits(PROBS).repeat(n, 1)
    torch.manual_seed(0)
    tokens = Sampler()(logits, _batch([SamplingParams(temperature=0.05)] * n))
    # p0 / p1 = 2.5, so at T=0.05 token 1 has odds 2.5 ** -20 ~ 1e-8.
    assert bool((tokens == 0).all())


# ---- banned tokens ----------------------------------------------------------------------------


def test_banned_ids_never_sampled(device):
    n = 2_000
    logits = torch.zeros(n, 8, device=device)
    logits[:, 2] = 10.0  # the banned token would win almost always
    params = [
        SamplingParams(temperature=0.0) if i % 4 == 0 else SamplingParams(seed=i, top_p=0.99)
        if i % 4 == 1 else SamplingParams(temperature=1.0)
        for i in range(n)
    ]
    gens = [make_generator(p.seed, device) if p.seed is not None else None for p in params]
    banned = [(2, 5) if i % 2 == 0 else (2,) for i in range(n)]
    torch.manual_seed(0)
    tokens = Sampler()(logits, _batch(params, gens, banned)).cpu()
    assert not bool((tokens == 2).any())
    assert not bool((tokens[0::2] == 5).any())
    assert bool((tokens[1::2] == 5).any())  # not banned there, so it does occur
    # Greedy rows pick the best remaining token (all zeros -> the first non-banned one).
    assert bool((tokens[0::4] == 0).all())


def test_banned_id_outside_vocab_rejected():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(1, 4), _batch([SamplingParams()], banned=[(4,)]))


def test_batch_length_mismatch_rejected():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 4), _batch([SamplingParams()]))


def test_from_params_builds_plain_batch():
    batch = SamplingBatch.from_params([SamplingParams(), SamplingParams(temperature=0)])
    assert batch.generators == [None, None] and batch.banned_token_ids == [(), ()]
