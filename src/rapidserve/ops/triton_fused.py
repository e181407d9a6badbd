"""Triton kernels fusing the decoder's elementwise chains, one launch each:

  rms_norm       x [T, H] (or [T, heads, H])       -> weight * (x * rsqrt(mean(x^2) + eps))
  add_rms_norm   x, residual [T, H]                -> (rms_norm(residual + x), residual + x)
  rotary         q [T, Hq, D], k [T, Hkv, D]       -> q, k rotated in place (rotate-half layout)
  silu_and_mul   x [T, 2I]                         -> silu(x[:, :I]) * x[:, I:]

Each reproduces the torch code of rapidserve.model (the HF-equivalent oracle) rounding step by
rounding step: every value torch holds in the activation dtype is rounded to that dtype here
too (fp32 math on dtype-rounded inputs, round-to-nearest-even after each torch op). What is
left to differ is where torch and Triton compute different fp32 values:
  - rms_norm / add_rms_norm: the fp32 sum of squares adds in another order (and rsqrt may
    differ by an fp32 ulp), which now and then moves the dtype-rounded x * rstd by one ulp,
    so the output by up to 2 ulp after `* weight` (fp32: ~3e-7 relative);
  - silu_and_mul: exp differs between libraries (same effect on silu, then `* up`); on
    NVIDIA tl.exp is ex2.approx(x * log2 e), up to ~1e-6 relative in fp32 for |x| ~ 16;
  - rotary: none, it is bit-exact (products and sums of dtype values only).
The residual sum of add_rms_norm is bit-exact as well. Measured under the interpreter against
torch on CPU (1.2M outputs per op and dtype): bf16 all bit-equal; fp16 <= 2 ulp on 0.02 %.

The kernels use long-stable triton.language APIs only and run on CUDA and under
TRITON_INTERPRET=1. The wrappers read no device values on the host and allocate only what
they return, so they can run inside CUDA graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A row is normalized in one tile; beyond this the tile would spill registers badly.
_MAX_HIDDEN = 65536
# Rows of small H (Qwen3's per-head q/k norm: H = head_dim) share a program up to this many
# elements per tile, so a prefill does not launch one tiny program per head.
_ROW_TILE_ELEMS = 2048
# Elements of the intermediate size one silu_and_mul program handles: several programs per
# row keep the GPU busy at T = 1.
_SILU_BLOCK = 1024


def _launch_options(tile_elems: int) -> dict[str, object]:
    # ~16 elements per thread; the kernels are memory-bound.
    # NOTE: enable_fp_fusion=False: with it on, the compiler may contract a * b + c into an
    # fma, which rounds once where torch (separate kernels) rounds twice (fp32 rotary). The
    # interpreter drops launch options it does not know.
    return {"num_warps": min(16, max(1, tile_elems // 512)), "enable_fp_fusion": False}


# ----------------------------------------------------------------------------------------------
# Shared helper
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """fp32 x -> DTYPE, rounded to nearest even (what torch's casts and dtype ops do)."""
    if DTYPE == tl.bfloat16:
        # NOTE: rounded by hand from the bits: the interpreter truncates fp32 -> bf16 casts
        # (triton 3.9), and the GPU's cvt.rn gives these same bits. Adding 0x7FFF plus the
        # kept LSB carries into the kept half exactly when round-to-nearest-even rounds up.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, y, x.to(tl.bfloat16))  # NaN: the add could carry into the sign
    else:
        return x.to(DTYPE)


# ----------------------------------------------------------------------------------------------
# rms_norm / add_rms_norm
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr,
    num_rows, num_heads, hidden, hidden_f, eps,
    stride_xt, stride_xh, stride_rt, stride_qt, stride_ot, stride_oh,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Rows are flat indices t * num_heads + head (num_heads == 1 for a 2-D x); the last dim
    # of every tensor is contiguous.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows < num_rows)[:, None] & (cols < hidden)[None, :]  # [BLOCK_R, BLOCK_H]
    t = (rows // num_heads).to(tl.int64)
    head = (rows % num_heads).to(tl.int64)
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    x_off = (t * stride_xt + head * stride_xh)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_H]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (t * stride_rt)[:, None] + cols[None, :], mask=mask, other=0.0)
        # torch's `h + o` rounds the sum to the dtype before the norm reads it.
        new_res = _cast(r.to(tl.float32) + x, X_DTYPE)
        # NOTE: the whole row is loaded above, so res_out may alias x or residual.
        tl.store(res_out_ptr + (t * stride_qt)[:, None] + cols[None, :], new_res, mask=mask)
        x = new_res.to(tl.float32)

    # mean(x^2) as torch's mean: a sum divided by the count (IEEE division, not the GPU's
    # approximate default).
    ssq = tl.sum(x * x, axis=1)  # [BLOCK_R]
    var = tl.math.div_rn(ssq, tl.zeros_like(ssq) + hidden_f)
    y = x * tl.rsqrt(var + eps)[:, None]
    # transformers: (x * rstd).to(dtype), then weight * that in the (promoted) output dtype.
    y = _cast(y, X_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)  # [BLOCK_H]
    out = _cast(w[None, :] * y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + (t * stride_ot + head * stride_oh)[:, None] + cols[None, :], out, mask=mask)


def _rows_view(x: torch.Tensor, name: str) -> tuple[int, int, int, int]:
    """(T, heads, stride_t, stride_head) of a [T, H] or [T, heads, H] tensor."""
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), 0
    if x.dim() == 3:
        return x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    raise ValueError(f"{name} must be [T, H] or [T, heads, H], got {tuple(x.shape)}")


def _check_last_dim(x: torch.Tensor, name: str) -> None:
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, strides {x.stride()}")


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, residual_out: torch.Tensor | None,
    weight: torch.Tensor, eps: float, out: torch.Tensor,
) -> None:
    hidden = x.shape[-1]
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} > {_MAX_HIDDEN} is not supported")
    if weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [{hidden}], got {tuple(weight.shape)}")
    if out.shape != x.shape:
        raise ValueError(f"out {tuple(out.shape)} must have the shape of x {tuple(x.shape)}")
    for name, t in (("x", x), ("out", out), ("residual", residual), ("residual_out", residual_out)):
        if t is not None:
            _check_last_dim(t, name)
    num_t, num_heads, stride_xt, stride_xh = _rows_view(x, "x")
    _, _, stride_ot, stride_oh = _rows_view(out, "out")
    num_rows = num_t * num_heads
    if num_rows == 0:
        return
    block_h = triton.next_power_of_2(hidden)
    block_r = max(1, _ROW_TILE_ELEMS // block_h)
    has_res = residual is not None and residual_out is not None
    _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        x, residual if has_res else x, residual_out if has_res else x, weight, out,
        num_rows, num_heads, hidden, float(hidden), eps,
        stride_xt, stride_xh,
        residual.stride(0) if has_res else 0, residual_out.stride(0) if has_res else 0,
        stride_ot, stride_oh,
        HAS_RESIDUAL=has_res, BLOCK_R=block_r, BLOCK_H=block_h,
        **_launch_options(block_r * block_h),
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), over the last dim.

    x [T, H] or [T, heads, H] (Qwen3's per-head q/k norm), any strides but a contiguous last
    dim; weight [H]. Returns out (allocated if None) [same shape as x] in the dtype torch's
    `weight * y` would have (promote(weight.dtype, x.dtype)).
    """
    if out is None:
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _launch_rms_norm(x, None, None, weight, eps, out)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    *, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): torch's `h = h + o; norm(h)` in one launch.

    x, residual [T, H] of one dtype (row strides allowed, last dim contiguous). The new
    residual (rounded to the dtype, as torch's add) is written IN PLACE into `residual`, or
    into `residual_out` when given (which may be x itself, or any [T, H] tensor of the dtype);
    that tensor is returned second. The normed output [T, H] is newly allocated.
    """
    if x.dim() != 2 or residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} {residual.dtype}"
            " must be [T, H] of one dtype"
        )
    res_out = residual if residual_out is None else residual_out
    if res_out.shape != x.shape or res_out.dtype != x.dtype:
        raise ValueError(
            f"residual_out must be [T, H] {x.dtype}, got {tuple(res_out.shape)} {res_out.dtype}"
        )
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch_rms_norm(x, residual, res_out, weight, eps, out)
    return out, res_out


# ----------------------------------------------------------------------------------------------
# rotary
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    ptr, stride_t, stride_h, t, num_heads, half, c1, c2, s1, s2,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Rotates token t's heads [num_heads, 2 * half] in place; c1/c2/s1/s2 [1, BLOCK_HALF] are
    # cos/sin of the two halves, already rounded to the tensor's dtype (held in fp32).
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads < num_heads)[:, None] & (cols < half)[None, :]  # [BLOCK_H, BLOCK_HALF]
    p1 = ptr + t * stride_t + heads[:, None].to(tl.int64) * stride_h + cols[None, :]
    p2 = p1 + half
    DTYPE: tl.constexpr = ptr.dtype.element_ty
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    # torch: x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1), every op in
    # the dtype: round each product, then the sum. The fp32 product of two bf16 / fp16 values
    # is exact, so each rounding is the one torch does.
    a1 = _cast(x1 * c1, DTYPE).to(tl.float32)
    b1 = _cast(-x2 * s1, DTYPE).to(tl.float32)
    a2 = _cast(x2 * c2, DTYPE).to(tl.float32)
    b2 = _cast(x1 * s2, DTYPE).to(tl.float32)
    tl.store(p1, _cast(a1 + b1, DTYPE), mask=mask)
    tl.store(p2, _cast(a2 + b2, DTYPE), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    num_q_heads, num_kv_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Grid (T, 2): token t, then q (0) or k (1).
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < half
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    # torch casts the (fp32) cos/sin rows to the activation dtype first.
    cos_row = cos_ptr + pos * stride_cos
    sin_row = sin_ptr + pos * stride_sin
    c1 = tl.load(cos_row + cols, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + half + cols, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + cols, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + half + cols, mask=cmask, other=0.0).to(tl.float32)
    c1 = _cast(c1, DTYPE).to(tl.float32)[None, :]  # [1, BLOCK_HALF]
    c2 = _cast(c2, DTYPE).to(tl.float32)[None, :]
    s1 = _cast(s1, DTYPE).to(tl.float32)[None, :]
    s2 = _cast(s2, DTYPE).to(tl.float32)[None, :]
    if tl.program_id(1) == 0:
        _rotate_heads(q_ptr, stride_qt, stride_qh, t, num_q_heads, half, c1, c2, s1, s2,
                      BLOCK_HQ, BLOCK_HALF)
    else:
        _rotate_heads(k_ptr, stride_kt, stride_kh, t, num_kv_heads, half, c1, c2, s1, s2,
                      BLOCK_HKV, BLOCK_HALF)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q * cos + rotate_half(q) * sin (and the same for k), IN PLACE; returns (q, k).

    q [T, Hq, D], k [T, Hkv, D] of one dtype, any strides but a contiguous last dim (e.g.
    slices of a fused qkv output); positions [T] int32/int64; cos, sin [P, D] tables (float32
    in the model; cast to q's dtype per element, as torch does), indexed by position without
    bounds checks.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} must be [T, H, D] alike")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} {k.dtype}")
    num_t, num_q_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if positions.shape != (num_t,):
        raise ValueError(f"positions {tuple(positions.shape)} must be [{num_t}]")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != head_dim or not table.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a float [P, {head_dim}] table, got {tuple(table.shape)} {table.dtype}"
            )
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_last_dim(t, name)
    if num_t == 0:
        return q, k
    half = head_dim // 2
    num_kv_heads = k.shape[1]
    block_half = triton.next_power_of_2(half)
    block_hq = triton.next_power_of_2(num_q_heads)
    _rotary_kernel[(num_t, 2)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        num_q_heads, num_kv_heads, half,
        BLOCK_HQ=block_hq, BLOCK_HKV=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=block_half,
        **_launch_options(block_hq * block_half * 2),
    )
    return q, k


# ----------------------------------------------------------------------------------------------
# silu_and_mul
# ----------------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_xt, stride_ot, inter,
    BLOCK: tl.constexpr,
):
    # Grid (T, cdiv(I, BLOCK)): one chunk of one row.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < inter
    gate_ptr = x_ptr + t * stride_xt + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + inter, mask=mask, other=0.0).to(tl.float32)
    # torch's F.silu: x / (1 + exp(-x)) in fp32, rounded to the dtype; then `* up` in the
    # dtype. IEEE division, not the GPU's approximate default.
    silu = tl.math.div_rn(gate, 1.0 + tl.exp(-gate))
    silu = _cast(silu, x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, _cast(silu * up, out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [T, 2I] (row stride allowed, last dim contiguous).

    Returns out (allocated if None) [T, I] in x's dtype.
    """
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2I], got {tuple(x.shape)}")
    _check_last_dim(x, "x")
    num_t, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_t, inter, dtype=x.dtype, device=x.device)
    elif out.shape != (num_t, inter) or out.dtype != x.dtype:
        raise ValueError(f"out must be [{num_t}, {inter}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    _check_last_dim(out, "out")
    if num_t == 0 or inter == 0:
        return out
    block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_t, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), inter,
        BLOCK=block, **_launch_options(block),
    )
    return out
