"""A profile for another model (or a faster-memory GPU) derived from a measured one.

`rapidserve profile --derive-from MEASURED.json --model preset:qwen2.5-32b --output ...` writes a
profile whose every table point is the measured point scaled by the step-cost model's roofline
fit: measured(point) x fit(new model, point) / fit(measured model, point), each table with its
own fit (`StepCostModel`, fitted once on the measured profile). So:

- deriving a model from its own profile gives back its points exactly (the ratio is 1);
- a table's residual (what the roofline shape does not explain on that GPU: kernel efficiency at
  that batch, SM count and context) is carried over unchanged to the new model, and the fit's
  coefficients (bytes/s and FLOP/s per SM share, SM saturation) are the GPU's, measured;
- the new model's weight bytes, KV bytes per token and FLOPs change the features.

A GPU with more memory bandwidth and the same SMs (the H200 beside the H100) is derived by
`bandwidth_scale`: every bytes term of the fits is that many times faster; compute, fixed and
per-sequence costs are not. The fits' fixed cost holds most of the weight read (on one model the two are
nearly collinear): the weight read at the fit's KV bandwidth is taken out of it and carried as
the new model's weight bytes; the rest of it and the per-sequence cost (kernel launches,
per-layer work that is neither bytes nor FLOPs) are scaled by the ratio of layer counts.

NOTE: a derived profile is an estimate owed a measurement: its `metadata.notes` starts with
`DERIVED` and says from what, and `Profile.limitations()` (printed by the simulator and the
policies) lists it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np

from rapidserve.resources.cost_model import PrefillLoad, StepCostModel, _Fit
from rapidserve.resources.profile import (
    DecodeBesidePromptsTable,
    DecodeTable,
    DtypeLabel,
    HybridTable,
    KVTransferTable,
    ModelShape,
    PrefillTable,
    Profile,
)

DERIVED_PREFIX = "DERIVED"

# Columns of each fit's features that are bytes (see cost_model's _decode_row, _decode_full_row,
# _hybrid_row); the rest are FLOPs (compute), fixed costs or per-sequence costs.
_BYTES_COLUMNS = {"decode_alone": (2, 3, 4, 6), "decode_beside_prefill": (2, 3, 4, 6), "decode_overallocated": (2, 3),
                  "hybrid": (2, 5)}
# The column of the routed experts' bytes (MoE) in each fit with a fixed cost.
_ROUTED_COLUMN = {"decode_alone": 6, "decode_beside_prefill": 6, "decode_overallocated": 3, "hybrid": 5}
DEFAULT_FP8_FLOPS_SCALE = 2.0  # FP8 matmul rate / bf16 on Hopper (dense tensor cores): assumed, owed a measurement
# Fits with a fixed cost (column 0, the weight read in it) and a per-sequence cost (column 1).
_LAYER_COLUMNS = ("decode_alone", "decode_beside_prefill", "decode_overallocated", "hybrid")


class Target(NamedTuple):
    """What to derive for: the model (its preset name and shapes) and the GPU."""

    model: str  # metadata.model of the derived profile (a preset name, so the simulator finds it)
    dtype: str
    shape: ModelShape
    num_layers: int
    gpu_name: str | None = None  # None: the measured profile's
    bandwidth_scale: float = 1.0  # the target GPU's memory bandwidth / the measured GPU's
    # FP8 GEMMs' FLOP rate / the measured bf16 rate, for the target's FP8 FLOPs
    # (shape.fp8_flops_per_token) where the measured model had none
    fp8_flops_scale: float = DEFAULT_FP8_FLOPS_SCALE


def preset_target(model: str, dtype: str | None = None, gpu_name: str | None = None,
                  bandwidth_scale: float = 1.0, quantization: str | None = None, kv_cache_dtype: str = "auto",
                  fp8_flops_scale: float = DEFAULT_FP8_FLOPS_SCALE) -> Target:
    """A Target for `preset:NAME` (or NAME), in `dtype` (default: the preset's torch_dtype),
    with FP8 weights (quantization "fp8") and/or an FP8 KV cache (kv_cache_dtype "fp8")."""
    from rapidserve.model.config import ModelConfig
    from rapidserve.model.presets import list_presets, load_preset

    name = model.removeprefix("preset:")
    if name not in list_presets():
        raise ValueError(f"--model: deriving a profile needs a preset (preset:NAME), one of "
                         f"{', '.join(list_presets())}; got {model!r}")
    if quantization not in (None, "fp8"):
        raise ValueError(f"--quantization: deriving knows fp8 only, got {quantization!r}")
    if kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"--kv-cache-dtype: expected auto or fp8, got {kv_cache_dtype!r}")
    if not (fp8_flops_scale > 0 and math.isfinite(fp8_flops_scale)):
        raise ValueError(f"--fp8-flops-scale must be a finite number > 0, got {fp8_flops_scale}")
    hf = load_preset(name)
    cfg = ModelConfig.from_hf(hf)
    label = DtypeLabel(DtypeLabel.parse(dtype or str(hf.get("torch_dtype", "bfloat16"))).compute,
                       quantization == "fp8", kv_cache_dtype == "fp8")
    return Target(name, str(label), ModelShape.from_config(cfg, str(label)), cfg.num_layers, gpu_name,
                  bandwidth_scale, fp8_flops_scale)


def _layers_of(profile: Profile) -> int | None:
    from rapidserve.model.config import ModelConfig
    from rapidserve.model.presets import list_presets, load_preset

    name = profile.metadata.model.removeprefix("preset:")
    return ModelConfig.from_hf(load_preset(name)).num_layers if name in list_presets() else None


def _weight_bandwidth(model: StepCostModel) -> float:
    """Bytes/s the decode fit reads KV at on the whole device: the rate weights stream at too."""
    fit = model._fits["decode_alone"]
    assert fit is not None
    per_byte = fit.coef_list[2] + fit.coef_list[4] / max(1.0, fit.s_bw)
    return 1.0 / per_byte if per_byte > 0 else math.inf


def _scaled_fit(fit: _Fit, name: str, target: Target, old: StepCostModel, layer_scale: float,
                flops_scale: float) -> _Fit:
    coef = list(fit.coef_list)
    for i in _BYTES_COLUMNS.get(name, ()):
        coef[i] /= target.bandwidth_scale
    if name in _LAYER_COLUMNS:
        # NOTE: on one model the fixed cost and the weight read are nearly collinear (the fit on
        # the H100 8B profile put ~5.6 of a 6.5 ms step in the constant and 0.6 ms in the weights):
        # the weight read at the KV bandwidth is taken out of the constant, carried as the new
        # model's weight bytes at the new bandwidth; the rest scales with the layers (a decode
        # over-allocated beside a prefill: with the prefill's FLOPs, the contention it measures).
        weights = min(coef[0], old.shape.weight_bytes / _weight_bandwidth(old))
        rest = coef[0] - weights
        rest_scale = flops_scale if name == "decode_overallocated" else layer_scale
        per_byte = weights / old.shape.weight_bytes / target.bandwidth_scale
        coef[0] = rest * rest_scale + per_byte * target.shape.weight_bytes
        coef[1] *= layer_scale
        if not old.shape.is_moe:
            # NOTE: a dense measured model gives its fit no rate for routed experts (their column
            # is 0 throughout): the experts a step touches stream at the rate of the dense weight
            # read taken out of the fixed cost, per step, as many as its tokens route to.
            coef[_ROUTED_COLUMN[name]] = per_byte
    return fit._replace(coef=np.array(coef), coef_list=coef)


def _compute_shape(target: Target, measured: ModelShape) -> ModelShape:
    """The target's shape as the measured GPU's bf16 fits see its compute: FP8 FLOPs count
    1 / fp8_flops_scale each (they run that much faster), where the measured model had none."""
    fp8 = target.shape.fp8_flops_per_token
    if not fp8 or measured.fp8_flops_per_token:
        return target.shape
    flops = target.shape.flops_per_token - fp8 + fp8 / target.fp8_flops_scale
    return target.shape._replace(flops_per_token=round(flops), fp8_flops_per_token=round(fp8 / target.fp8_flops_scale))


def _retargeted(model: StepCostModel, target: Target, layer_scale: float) -> StepCostModel:
    """The same fits (not fitted again) with the target's shapes and scaled coefficients."""
    clone = object.__new__(StepCostModel)
    clone.__dict__.update(model.__dict__)
    clone.shape = _compute_shape(target, model.shape)
    flops_scale = clone.shape.flops_per_token / model.shape.flops_per_token
    clone._fits = {k: None if f is None else _scaled_fit(f, k, target, model, layer_scale, flops_scale)
                   for k, f in model._fits.items()}
    return clone


def derive_profile(measured: Profile, target: Target, context_lens: Sequence[int] | None = None,
                   batch_sizes: Sequence[int] | None = None) -> Profile:
    """The profile `target` would measure on the same GPU (or one `bandwidth_scale` faster in
    memory), derived point by point from `measured` (see the module doc). The decode table's
    contexts and batches default to the measured ones; others are the measured model's step-cost
    prediction there (the fit times its interpolated residual), scaled likewise."""
    if not target.bandwidth_scale > 0:
        raise ValueError(f"--bandwidth-scale must be > 0, got {target.bandwidth_scale}")
    old = StepCostModel.from_profile(measured)
    if old.shape_source == "none":
        raise ValueError(f"--derive-from: the profile's model {measured.metadata.model!r} has no recorded shapes and "
                         "is no preset: its fits are shape-free and cannot be carried to another model")
    src_layers = _layers_of(measured)
    layer_scale = 1.0 if src_layers is None else target.num_layers / src_layers
    new = _retargeted(old, target, layer_scale)
    total = measured.total_sms

    def ratio(fit_s: str, *args: object) -> float:
        f = getattr(new, fit_s)(*args) / getattr(old, fit_s)(*args)
        return f

    d = measured.decode
    ctxs = tuple(sorted(set(context_lens))) if context_lens else d.context_lens
    batches = tuple(sorted(set(batch_sizes))) if batch_sizes else d.batch_sizes
    if ctxs[0] < 1 or batches[0] < 1:
        raise ValueError("derived context lengths and batch sizes must be >= 1")
    beside_load = [PrefillLoad(measured.metadata.prefill_tokens_beside)]

    def measured_decode_ms(n: int, b: int, c: int, beside: bool) -> float:
        # NOTE: at a measured point the step-cost model returns the measurement itself
        return 1e3 * old.decode_step_s(b, b * c, sms=None if n >= total else n, beside=beside_load if beside else ())

    def decode_grid(beside: bool) -> tuple:
        out = []
        for n in d.sm_counts:
            name = "decode_alone" if not beside else (
                "decode_overallocated" if n >= total else "decode_beside_prefill")
            if old._fits.get(name) is None:
                name = "decode_alone"
            out.append(tuple(tuple(measured_decode_ms(n, b, c, beside) * ratio("_decode_fit_s", name, n / total, b, b * c)
                                   for b in batches) for c in ctxs))
        return tuple(out)

    decode = DecodeTable(d.sm_counts, ctxs, batches, decode_grid(False), decode_grid(True))
    p = measured.prefill

    def prefill_grid(grid: tuple, beside: bool) -> tuple:
        out = []
        for i, n in enumerate(p.sm_counts):
            name = "prefill_alone" if not beside else (
                "prefill_overallocated" if n >= total else "prefill_beside_decode")
            if old._fits.get(name) is None:
                name = "prefill_alone"
            out.append(tuple(grid[i][j] * ratio("_prefill_fit_s", name, n, [PrefillLoad(t)])
                             for j, t in enumerate(p.prompt_tokens)))
        return tuple(out)

    prefill = PrefillTable(p.sm_counts, p.prompt_tokens, prefill_grid(p.latency_ms, False),
                           None if p.beside_decode_ms is None else prefill_grid(p.beside_decode_ms, True))
    hybrid = None
    if measured.hybrid is not None and old._fits.get("hybrid") is not None:
        h = measured.hybrid
        hybrid = HybridTable(h.chunk_tokens, h.decode_batches, h.context_lens, tuple(
            tuple(tuple(h.latency_ms[i][j][k] * ratio("_hybrid_fit_s", [PrefillLoad(n, c)], b, b * c)
                        for k, c in enumerate(h.context_lens)) for j, b in enumerate(h.decode_batches))
            for i, n in enumerate(h.chunk_tokens)))
    dbp = None
    if measured.decode_beside_prompts is not None:
        t = measured.decode_beside_prompts

        def dbp_ratio(n: int, b: int, c: int) -> float:
            name = "decode_overallocated" if n >= total else "decode_beside_prefill"
            if old._fits.get(name) is None:
                name = "decode_alone"
            return ratio("_decode_fit_s", name, n / total, b, b * c)

        dbp = DecodeBesidePromptsTable(t.prompt_tokens, t.sm_counts, t.context_lens, t.batch_sizes, tuple(
            tuple(tuple(tuple(t.latency_ms[q][i][j][k] * dbp_ratio(n, b, c) for k, b in enumerate(t.batch_sizes))
                        for j, c in enumerate(t.context_lens)) for i, n in enumerate(t.sm_counts))
            for q in range(len(t.prompt_tokens))))
    kv = None
    if measured.kv_transfer is not None:
        k = measured.kv_transfer
        kv = KVTransferTable(k.num_bytes, tuple(ms / target.bandwidth_scale for ms in k.latency_ms))

    m = measured.metadata
    gpu = target.gpu_name or m.gpu_name
    how = [f"from {m.model} {m.dtype} measured on {m.gpu_name} ({m.created})",
           f"to {target.model} {target.dtype}"]
    if gpu != m.gpu_name or target.bandwidth_scale != 1.0:
        how.append(f"on {gpu} (memory bandwidth x{target.bandwidth_scale:g}, same SMs and compute assumed)")
    if target.shape.is_moe:
        how.append(f"routed experts read as {target.shape.num_experts} experts, top-{target.shape.experts_per_token}, "
                   "routed uniformly (a real router is skewed: fewer experts per small batch)")
    if _compute_shape(target, old.shape) is not target.shape:
        how.append(f"FP8 GEMMs at x{target.fp8_flops_scale:g} the measured bf16 FLOP rate (assumed)")
    notes = (f"{DERIVED_PREFIX} (owed a measurement): every point is the measured one scaled by the step-cost "
             f"model's roofline fit, {'; '.join(how)}; the weight read taken out of the fits' fixed "
             f"cost at {_weight_bandwidth(old) / 1e12:.2f} TB/s, the rest of it and the per-sequence cost scaled by "
             f"the layer count (x{layer_scale:.2f})")
    # NOTE: the decode steps beside the timed prefills keep the measured batch and context; their
    # weights and KV are the new model's only through the fits.
    meta = dataclasses.replace(m, model=target.model, dtype=target.dtype, gpu_name=gpu, notes=notes,
                               created=datetime.now(UTC).isoformat(timespec="seconds"))
    return Profile(meta, decode, prefill, model_shape=target.shape, hybrid=hybrid, decode_beside_prompts=dbp,
                   kv_transfer=kv, host_overhead_ms=measured.host_overhead_ms)


def is_derived(profile: Profile) -> bool:
    return profile.metadata.notes.startswith(DERIVED_PREFIX)
