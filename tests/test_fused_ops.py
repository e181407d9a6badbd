"""The fused Triton elementwise kernels (rapidserve.ops.triton_fused) against the torch code
they replace (the model's CPU path, itself checked against transformers).

Without CUDA the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1).
bf16 runs there too: the kernels only load/store bf16 and compute in fp32, and round to bf16
by hand (the interpreter's own fp32 -> bf16 cast truncates).

What is checked (ulp: units in the last place of the dtype):
  rotary, add_rms_norm's residual sum: bit-exact in every dtype;
  rms_norm, silu_and_mul: fp32 within rtol 1e-6 (silu on CUDA: 4e-6, see SILU_RTOL_FP32);
    fp16 / bf16 within 2 ulp. The fp32 value
    before the first rounding to the dtype differs by an fp32 ulp or so (rms_norm: the sum
    of squares adds in another order; silu: exp differs between libraries), which now and
    then moves that rounded intermediate by one ulp; the final `* weight` / `* up` can turn
    that into 2 ulp of the output. Almost all outputs are bit-equal in fp16 / bf16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rapidserve import ops
from rapidserve.model.config import ModelConfig
from rapidserve.model.llama import CausalLM
from rapidserve.model.rope import RotaryEmbedding, rotate_half
from rapidserve.ops import triton_fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6
# On NVIDIA GPUs tl.exp(x) of fp32 is ex2.approx(x * log2(e)): rounding the product costs up
# to |x| * 2^-24 * ln 2 of relative error (~1e-6 at |x| = 16), against ~1 fp32 ulp for the
# interpreter's numpy exp and for torch's expf.
SILU_RTOL_FP32 = 4e-6 if DEVICE == "cuda" else 1e-6


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance between a and b counted in representable values of their dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_dtype = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    bits = a.dtype.itemsize * 8
    sign = 1 << (bits - 1)

    def ordered(x: torch.Tensor) -> torch.Tensor:
        # sign-magnitude -> a line of integers (+0 and -0 both at 0)
        i = x.contiguous().view(int_dtype[x.dtype]).to(torch.int64)
        mag = i & (sign - 1)
        return torch.where(i < 0, -mag, mag)

    if a.numel() == 0:
        return 0
    return int((ordered(a) - ordered(b)).abs().max())


def assert_near(out: torch.Tensor, ref: torch.Tensor, rtol_fp32: float = 1e-6) -> None:
    """Agreement where a kernel cannot be bit-exact (see the module docstring)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=rtol_fp32, atol=1e-12)
    else:
        assert ulp_distance(out, ref) <= 2
        assert (out != ref).float().mean() < 0.01


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


# ---- the torch formulas (as in rapidserve.model) ---------------------------------------------


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def torch_rotary(
    q: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    c = cos[positions].to(q.dtype)[:, None, :]
    s = sin[positions].to(q.dtype)[:, None, :]
    return q * c + rotate_half(q) * s


# ---- rms_norm / add_rms_norm ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 576), (64, 1000), (7, 64), (1, 1000), (2, 16384)])
def test_rms_norm(dtype, num_tokens, hidden):
    gen = _gen(hidden + num_tokens)
    x = _randn(num_tokens, hidden, dtype=dtype, gen=gen, scale=3.0)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype).to(DEVICE)
    out = triton_fused.rms_norm(x, weight, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert_near(out, torch_rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_strided_view(dtype):
    # Qwen3's q norm: [T, heads, head_dim] heads of a fused qkv output (row stride != H * D).
    gen = _gen(1)
    num_tokens, heads, head_dim = 5, 6, 128
    qkv = _randn(num_tokens, (heads + 4) * head_dim, dtype=dtype, gen=gen)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    weight = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(DEVICE)
    ref = torch_rms_norm(q, weight, EPS)
    assert_near(triton_fused.rms_norm(q, weight, EPS), ref)
    # out= may be the input itself (normalizing in place)
    before = qkv.clone()
    assert triton_fused.rms_norm(q, weight, EPS, out=q) is q
    assert_near(q, ref)
    assert torch.equal(qkv[:, heads * head_dim:], before[:, heads * head_dim:])


def test_rms_norm_fp32_weight_promotes():
    # torch's `weight * y` with an fp32 weight and bf16 y is fp32: so is the kernel's output.
    gen = _gen(2)
    x = _randn(3, 576, dtype=torch.bfloat16, gen=gen)
    weight = (torch.rand(576, generator=gen) + 0.5).to(DEVICE)
    out = triton_fused.rms_norm(x, weight, EPS)
    assert out.dtype == torch.float32
    assert_near(out, torch_rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 576), (64, 1000)])
def test_add_rms_norm(dtype, num_tokens, hidden):
    gen = _gen(hidden + num_tokens)
    # x as a row-strided slice, as an o_proj output never is but a caller's view might be
    x = _randn(num_tokens, hidden + 8, dtype=dtype, gen=gen)[:, :hidden]
    residual = _randn(num_tokens, hidden, dtype=dtype, gen=gen, scale=4.0)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype).to(DEVICE)
    ref_res = residual + x  # torch: `h = h + o`
    ref_out = torch_rms_norm(ref_res, weight, EPS)
    x_before = x.clone()

    out, new_res = triton_fused.add_rms_norm(x, residual, weight, EPS)
    assert new_res is residual  # written in place
    assert torch.equal(residual, ref_res)  # bit-exact
    assert torch.equal(x, x_before)
    assert_near(out, ref_out)


def test_add_rms_norm_into_x():
    # residual_out=x: the sum overwrites x (the model's o_proj temporary), residual untouched.
    gen = _gen(3)
    x = _randn(7, 576, dtype=torch.bfloat16, gen=gen)
    residual = _randn(7, 576, dtype=torch.bfloat16, gen=gen)
    weight = (torch.rand(576, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE)
    res_before = residual.clone()
    ref_res = residual + x
    out, new_res = triton_fused.add_rms_norm(x, residual, weight, EPS, residual_out=x)
    assert new_res is x and torch.equal(x, ref_res)
    assert torch.equal(residual, res_before)
    assert_near(out, torch_rms_norm(ref_res, weight, EPS))


# ---- rotary ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens,heads,kv_heads,head_dim,scaling",
    [
        (1, 4, 2, 64, None),
        (7, 6, 1, 128, None),
        (64, 8, 8, 64, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        (7, 3, 3, 96, {"rope_type": "linear", "factor": 2.0}),  # D / 2 not a power of two
    ],
)
def test_rotary_bit_exact(dtype, num_tokens, heads, kv_heads, head_dim, scaling):
    gen = _gen(num_tokens * heads + head_dim)
    max_pos = 4096
    rope = RotaryEmbedding(head_dim, max_pos, 500000.0, scaling).to(DEVICE)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, gen=gen, scale=2.0)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, heads, head_dim)  # row stride q_size + 2 * kv_size
    k = k.view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(DEVICE)
    ref_q = torch_rotary(q, positions, rope.cos, rope.sin)
    ref_k = torch_rotary(k, positions, rope.cos, rope.sin)
    v_before = v.clone()

    out_q, out_k = triton_fused.rotary(q, k, positions, rope.cos, rope.sin)
    assert out_q is q and out_k is k  # in place
    assert torch.equal(q, ref_q)
    assert torch.equal(k, ref_k)
    assert torch.equal(v, v_before)


# ---- silu_and_mul ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 64), (7, 576), (64, 1000), (2, 3000)])
def test_silu_and_mul(dtype, num_tokens, inter):
    gen = _gen(inter + num_tokens)
    # gate_up as a row-strided slice of a wider buffer
    x = _randn(num_tokens, 2 * inter + 16, dtype=dtype, gen=gen, scale=4.0)[:, : 2 * inter]
    out = triton_fused.silu_and_mul(x)
    ref = F.silu(x[:, :inter]) * x[:, inter:]
    assert out.shape == (num_tokens, inter) and out.dtype == dtype
    assert_near(out, ref, rtol_fp32=SILU_RTOL_FP32)


def test_empty_batches():
    x = torch.empty(0, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert triton_fused.rms_norm(x, w, EPS).shape == (0, 64)
    assert triton_fused.add_rms_norm(x, x.clone(), w, EPS)[0].shape == (0, 64)
    assert triton_fused.silu_and_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)
    q, k = torch.empty(0, 2, 64, device=DEVICE), torch.empty(0, 1, 64, device=DEVICE)
    rope = RotaryEmbedding(64, 16, 10000.0, None).to(DEVICE)
    triton_fused.rotary(q, k, torch.empty(0, dtype=torch.int64, device=DEVICE), rope.cos, rope.sin)


# ---- the model's fused path -----------------------------------------------------------------


def _tiny_model(arch: str, dtype: torch.dtype) -> CausalLM:
    cfg = ModelConfig.from_hf({
        "architectures": [arch], "vocab_size": 128, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    })
    # Built as the loader does, under the default dtype: the rotary tables stay float32.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = CausalLM(cfg, max_positions=256)
    finally:
        torch.set_default_dtype(old)
    model.init_dummy_weights(seed=0)
    gen = _gen(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # make the norm weights count
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    assert model.layers[0].self_attn.rotary.cos.dtype == torch.float32
    return model.eval()


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one causal sequence: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        is_causal=True, scale=1.0 / math.sqrt(q.shape[-1]),
    )
    return o.transpose(0, 1).to(q.dtype)


class _SdpaAttention(torch.nn.Module):
    """Stands in for PagedAttention (which needs a KV cache and a batch layout)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _causal_sdpa(q, k, v)


def _forward_in_halves(model: CausalLM, ids: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """The model through before/after_attention (the piecewise-graph path); returns every
    layer's output and the final normed hidden."""
    h = model.embed_tokens(ids)
    outs = []
    for layer in model.layers:
        h_in = h.clone()
        o = _causal_sdpa(*layer.before_attention(positions, h))
        h_next = layer.after_attention(o, h)
        assert torch.equal(h, h_in)  # the layer's input is left as it was
        h = h_next
        outs.append(h)
    outs.append(model.norm(h))
    return outs


def _assert_paths_agree(got: torch.Tensor, ref: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        # the norms' sums of squares add in another order: fp32-ulp noise, spread by matmuls
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    elif DEVICE == "cpu":
        # The same torch matmuls on both sides and kernels that round as torch does: measured
        # bit-identical (an rms_norm / silu output one ulp off would show up here).
        assert torch.equal(got, ref)
    else:
        # torch's CUDA reductions / exp differ from the kernels' by an fp32 ulp now and then,
        # which can move a bf16 output by an ulp and spread through the matmuls.
        torch.testing.assert_close(got.float(), ref.float(), rtol=0.0, atol=2**-5 * float(ref.abs().max()))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_model_fused_path_matches_torch_path(arch, dtype, monkeypatch):
    model = _tiny_model(arch, dtype)
    for layer in model.layers:
        monkeypatch.setattr(layer.self_attn, "attn", _SdpaAttention())
    gen = _gen(5)
    ids = torch.randint(0, 128, (11,), generator=gen).to(DEVICE)
    positions = torch.arange(11).to(DEVICE)

    def run() -> list[torch.Tensor]:
        halves = _forward_in_halves(model, ids, positions)
        whole = model(ids, positions)  # CausalLM.forward -> DecoderLayer.forward
        torch.testing.assert_close(whole, halves[-1], rtol=0.0, atol=0.0)
        return halves

    monkeypatch.setattr(ops, "fused_enabled", lambda x: False)  # torch path (CPU's own)
    ref = run()
    monkeypatch.setattr(ops, "fused_enabled", lambda x: True)  # Triton kernels
    got = run()
    for a, b in zip(got, ref):
        _assert_paths_agree(a, b)
