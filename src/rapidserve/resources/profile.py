"""The offline profile the partitioning policies decide from (written by `rapidserve profile`).

Two tables, measured on the target GPU and model:
- decode step latency over decode SM counts × context lengths × batch sizes, alone and beside a
  running prefill (on the remainder of the split; for the full device, on a second full-device
  stream: over-allocation, where decode competes with prefill for every SM);
- prefill latency over SM counts × prompt tokens, alone and (from schema version 2, optional)
  beside decode steps of a fixed batch run back to back on the decode side of the same split
  (for the full device, again on a second full-device stream).

The decode table's SM counts include the whole device (`metadata.total_sms`): the over-allocated
partition. Schema version 3 adds, all optional (what the step-cost model, resources/cost_model.py, needs):
- `model_shape`: the model's weight bytes, KV bytes per token and FLOPs (its roofline features),
  and for a mixture of experts its routed experts (optional fields: absent, a dense model);
- `hybrid`: hybrid (chunked-prefill) steps on the whole device: one prefill chunk at a context
  offset plus a decode batch at that context, over chunk tokens × decode batch × context;
- `decode_beside_prompts`: decode steps beside prefills of several prompt lengths (the decode
  table's beside grid has one, `metadata.prefill_tokens_beside`);
- `kv_transfer`: copying KV blocks (the disagg topology's transfer) of several sizes;
- `host_overhead_ms`: the host time of a step that the device does not overlap;
- `fit_errors`: the step-cost model's largest relative error per table when it was measured.

JSON, with a schema version; `load_profile` checks every field and says which one is
wrong. Version 1 and 2 files still load.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from rapidserve.model.config import expected_distinct_experts

if TYPE_CHECKING:
    from rapidserve.model.config import ModelConfig

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: before prefill.beside_decode_ms; 2: before the step-cost model's tables

Grid3 = tuple[tuple[tuple[float, ...], ...], ...]  # [sm][context][batch], ms
Grid2 = tuple[tuple[float, ...], ...]  # [sm][prompt tokens], ms
Grid4 = tuple[Grid3, ...]  # [prompt tokens][sm][context][batch], ms


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}
FP8_WEIGHTS_LABEL, FP8_KV_LABEL = "+fp8-weights", "+fp8-kv"


class DtypeLabel(NamedTuple):
    """A profile's `metadata.dtype`: the compute dtype, and whether the decoder's projections
    hold FP8 weights (`--quantization fp8`) and the KV cache FP8 entries (`--kv-cache-dtype fp8`),
    e.g. "bfloat16+fp8-weights+fp8-kv" (a profile measured with them holds other step times)."""

    compute: str
    fp8_weights: bool = False
    fp8_kv: bool = False

    def __str__(self) -> str:
        return self.compute + (FP8_WEIGHTS_LABEL if self.fp8_weights else "") + (FP8_KV_LABEL if self.fp8_kv else "")

    @classmethod
    def parse(cls, label: str) -> DtypeLabel:
        compute, *parts = label.replace("torch.", "").split("+")
        flags = {"+" + f for f in parts}
        unknown = sorted(flags - {FP8_WEIGHTS_LABEL, FP8_KV_LABEL})
        if unknown:
            raise ValueError(f"dtype {label!r}: unknown part {unknown[0][1:]!r} (expected e.g. "
                             f"bfloat16{FP8_WEIGHTS_LABEL}{FP8_KV_LABEL})")
        return cls(compute, FP8_WEIGHTS_LABEL in flags, FP8_KV_LABEL in flags)


class ModelShape(NamedTuple):
    """What a step of the model moves and computes, for the step-cost model's roofline features.

    A mixture-of-experts model reads its dense weights every step, but of its routed experts
    only those its tokens route to: `weight_bytes_read(n)` counts them under uniform, independent
    routing (`expected_distinct_experts`). A trained router is skewed (popular experts take more
    tokens), so a real batch tends to touch fewer: for small decode batches this is an upper-ish
    estimate. Its FLOPs per token are the active experts' (top-k), not all experts'."""

    # Every dense weight a step reads, at its bytes per weight (1 for FP8 projections): attention,
    # dense MLPs, the MoE layers' routers and shared experts, the LM head. Embedding rows aside (a
    # step reads only its own), and the norms and biases too (a few MB, under 0.01 %).
    weight_bytes: int
    kv_bytes_per_token: int  # K and V of one token, all layers, at the KV cache's bytes per entry
    flops_per_token: int  # the layers' linear FLOPs per token: 2 x the parameters one token uses
    lm_head_flops: int  # per sampled row (decode: every sequence; prefill: the prompt's last token)
    attention_flops_per_pair: int  # QK^T and PV over one (query, key) pair, all layers
    # ---- mixture of experts (all 0: a dense model) ----
    expert_bytes: int = 0  # one routed expert (gate, up, down) of one MoE layer
    moe_layers: int = 0
    num_experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0  # top-k
    # ---- FP8 ----
    fp8_flops_per_token: int = 0  # the part of flops_per_token that runs as FP8 GEMMs (FP8 weights)

    def routed_bytes_read(self, num_tokens: float) -> float:
        """Expected bytes of routed experts a forward over `num_tokens` tokens reads, all MoE
        layers (uniform routing); 0 for a dense model."""
        if not self.num_experts or num_tokens <= 0:
            return 0.0
        touched = expected_distinct_experts(self.num_experts, self.experts_per_token, num_tokens)  # type: ignore[arg-type]
        return self.moe_layers * self.expert_bytes * touched

    def weight_bytes_read(self, num_tokens: float) -> float:
        """Weight bytes a forward over `num_tokens` tokens reads: the dense weights, plus the
        routed experts its tokens are expected to touch (a dense model: `weight_bytes`)."""
        return self.weight_bytes + self.routed_bytes_read(num_tokens) if self.num_experts else float(self.weight_bytes)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_config(cls, cfg: ModelConfig, dtype: str, kv_dtype: str | None = None) -> ModelShape:
        """dtype: a torch dtype name or a profile's dtype label ("bfloat16+fp8-weights+fp8-kv");
        FP8 weights also where `cfg.quantization == "fp8"`. kv_dtype: "fp8" (or the label's
        "+fp8-kv") for one byte per KV entry; default the compute dtype's."""
        label = DtypeLabel.parse(dtype)
        nbytes = _DTYPE_BYTES.get(label.compute, 2)
        fp8 = label.fp8_weights or cfg.quantization == "fp8"
        # NOTE: as the engine quantizes (model/quant.py, bench/floors.py): --quantization fp8 makes
        # the decoder's projections (q/k/v, o, the dense MLPs, a shared expert) one byte per weight;
        # the routed experts, the router and the LM head stay in the model's dtype.
        proj_bytes = 1 if fp8 else nbytes
        kv_bytes = 1 if (label.fp8_kv or kv_dtype == "fp8") else nbytes
        h, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
        attn = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h  # fused q/k/v, o_proj
        mlp = 3 * h * cfg.intermediate_size  # fused gate/up, down
        n_moe = cfg.num_moe_layers if cfg.is_moe else 0
        shared = 3 * h * cfg.shared_expert_intermediate_size if cfg.is_moe else 0
        router = h * cfg.num_experts + (h if shared else 0)  # + the shared expert's gate
        proj = layers * attn + (layers - n_moe) * mlp + n_moe * shared  # what FP8 quantizes
        head = cfg.vocab_size * h
        active = proj + n_moe * (router + cfg.experts_per_token * cfg.expert_params)
        return cls(weight_bytes=proj * proj_bytes + (n_moe * router + head) * nbytes,
                   kv_bytes_per_token=2 * layers * cfg.num_kv_heads * hd * kv_bytes,
                   flops_per_token=2 * active, lm_head_flops=2 * head,
                   attention_flops_per_pair=4 * layers * cfg.num_heads * hd,
                   expert_bytes=cfg.expert_params * nbytes if n_moe else 0, moe_layers=n_moe,
                   num_experts=cfg.num_experts if n_moe else 0, experts_per_token=cfg.experts_per_token if n_moe else 0,
                   fp8_flops_per_token=2 * proj if fp8 else 0)

    @classmethod
    def unit(cls) -> ModelShape:
        """Shape-free: every feature a count (tokens, KV tokens, (query, key) pairs)."""
        return cls(1, 1, 1, 0, 1)


@dataclass(frozen=True)
class ProfileMetadata:
    gpu_name: str  # torch.cuda.get_device_name, or "cpu"
    total_sms: int  # SMs (CUs) of the device; 1 on CPU
    sm_granularity: int  # decode SM counts are multiples of this (1 without partitioning)
    partitioning: str  # the mechanism measured: green-contexts, cu-mask or none
    model: str
    dtype: str
    created: str  # ISO 8601
    rapidserve_version: str
    prefill_tokens_beside: int  # prompt tokens of the prefill run beside the timed decode steps
    notes: str = ""
    # The decode steps run beside the timed prefills (prefill.beside_decode_ms): that many
    # sequences of that many context tokens; 0 where the profile has no such grid.
    decode_batch_beside: int = 0
    decode_context_beside: int = 0


@dataclass(frozen=True)
class DecodeTable:
    sm_counts: tuple[int, ...]  # decode group sizes, increasing; the last is the whole device
    context_lens: tuple[int, ...]  # increasing
    batch_sizes: tuple[int, ...]  # increasing
    alone_ms: Grid3  # [sm][context][batch]
    beside_prefill_ms: Grid3  # same shape


@dataclass(frozen=True)
class PrefillTable:
    sm_counts: tuple[int, ...]  # increasing
    prompt_tokens: tuple[int, ...]  # increasing
    latency_ms: Grid2  # [sm][prompt tokens], alone
    beside_decode_ms: Grid2 | None = None  # same shape, beside a running decode; None: not measured


@dataclass(frozen=True)
class HybridTable:
    """Hybrid steps on the whole device: one prefill chunk of `chunk_tokens` at offset `context`
    (its KV before it) plus `decode_batch` decode sequences at context `context` each."""

    chunk_tokens: tuple[int, ...]  # increasing
    decode_batches: tuple[int, ...]  # increasing; 0: the chunk alone
    context_lens: tuple[int, ...]  # increasing
    latency_ms: Grid3  # [chunk][batch][context]


@dataclass(frozen=True)
class DecodeBesidePromptsTable:
    """Decode steps beside prefill steps of one prompt of `prompt_tokens` tokens run back to back
    on the rest of the device (the whole device: over-allocated)."""

    prompt_tokens: tuple[int, ...]  # increasing
    sm_counts: tuple[int, ...]  # decode SMs, increasing; the whole device: over-allocation
    context_lens: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    latency_ms: Grid4  # [prompt][sm][context][batch]


@dataclass(frozen=True)
class KVTransferTable:
    """Copies of KV blocks between two block sets of the cache (index_select, index_copy_) on the
    whole device: the disagg topology's transfer on one GPU."""

    num_bytes: tuple[int, ...]  # increasing
    latency_ms: tuple[float, ...]


@dataclass(frozen=True)
class Profile:
    metadata: ProfileMetadata
    decode: DecodeTable
    prefill: PrefillTable
    # schema version 3 (None: not measured, or an older file)
    model_shape: ModelShape | None = None
    hybrid: HybridTable | None = None
    decode_beside_prompts: DecodeBesidePromptsTable | None = None
    kv_transfer: KVTransferTable | None = None
    host_overhead_ms: float | None = None
    fit_errors: dict[str, float] | None = None  # the step-cost model's, when measured (informational)

    def __post_init__(self) -> None:
        _validate(self.to_json(), "profile")

    # ---- lookups the policies need ------------------------------------------------------------

    @property
    def total_sms(self) -> int:
        return self.metadata.total_sms

    @property
    def split_sm_counts(self) -> tuple[int, ...]:
        """Decode group sizes of the measured splits (the full device excluded)."""
        return tuple(n for n in self.decode.sm_counts if n < self.total_sms)

    def decode_ms(self, sms: int, batch: float, context: float, beside_prefill: bool) -> float:
        """Decode step latency with `sms` decode SMs (the full device: over-allocated when
        `beside_prefill`) at a batch and mean context, interpolated between measured points
        (bilinear in batch and context; linear in 1/SMs between measured SM counts) and
        extrapolated linearly past the largest batch and context."""
        d = self.decode
        grid = d.beside_prefill_ms if beside_prefill else d.alone_ms

        def at(i: int) -> float:
            rows = [_interp(d.batch_sizes, row, batch) for row in grid[i]]
            return _interp(d.context_lens, rows, context)

        return _interp_sms(d.sm_counts, sms, at)

    def limitations(self) -> list[str]:
        """What the policies cannot predict well from this profile (logged when one is loaded)."""
        notes = []
        if len(self.decode.context_lens) < 2:
            notes.append(
                f"the profile measured decode at one context length ({self.decode.context_lens[0]}): longer "
                "contexts rest on the step-cost model's KV-bytes term, which one context cannot tell from the "
                "per-sequence cost (its interpolation alone predicts every context as that one), so they can take "
                "longer than predicted and the ITL SLO can break (measured on the H100: batch 64 on 16 SMs, "
                "28.6 ms at 1024 vs 40.3 ms at 2048); profile two or more (`rapidserve profile --context-lens "
                "1024,4096`)")
        if self.metadata.notes.startswith("DERIVED"):
            notes.append(f"the profile was not measured: {self.metadata.notes}")
        return notes

    def model_shape_or_preset(self) -> tuple[ModelShape | None, str]:
        """The model's shapes: (shape, where from: "profile" or "preset NAME"), or (None, "none")
        where the profile does not record them and its model is no built-in preset."""
        from rapidserve.model.config import ModelConfig
        from rapidserve.model.presets import list_presets, load_preset

        if self.model_shape is not None:
            return self.model_shape, "profile"
        name = self.metadata.model.removeprefix("preset:")
        if name in list_presets():
            return ModelShape.from_config(ModelConfig.from_hf(load_preset(name)), self.metadata.dtype), f"preset {name}"
        return None, "none"

    @property
    def has_prefill_beside_decode(self) -> bool:
        return self.prefill.beside_decode_ms is not None

    def prefill_ms(self, sms: int, tokens: float, beside_decode: bool = False) -> float:
        """Prefill latency of `tokens` prompt tokens on `sms` SMs (interpolated likewise), alone
        or beside a running decode (the full device: over-allocated). The latter needs a profile
        that measured it (`has_prefill_beside_decode`)."""
        p = self.prefill
        grid = p.beside_decode_ms if beside_decode else p.latency_ms
        if grid is None:
            raise ValueError("the profile has no prefill latency beside a decode (schema version 1, or not "
                             "measured): run `rapidserve profile` again")
        return _interp_sms(p.sm_counts, sms, lambda i: _interp(p.prompt_tokens, grid[i], tokens))

    # ---- JSON ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out = {"schema_version": SCHEMA_VERSION, "metadata": asdict(self.metadata),
               "decode": _listify(asdict(self.decode)), "prefill": _listify(asdict(self.prefill))}
        if self.model_shape is not None:
            out["model_shape"] = dict(self.model_shape._asdict())
        for key in ("hybrid", "decode_beside_prompts", "kv_transfer"):
            table = getattr(self, key)
            if table is not None:
                out[key] = _listify(asdict(table))
        if self.host_overhead_ms is not None:
            out["host_overhead_ms"] = self.host_overhead_ms
        if self.fit_errors is not None:
            out["fit_errors"] = dict(self.fit_errors)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "profile") -> Profile:
        _validate(data, where)
        d, p = data["decode"], data["prefill"]
        return cls(
            ProfileMetadata(**{k: data["metadata"][k] for k in _META_FIELDS if k in data["metadata"]}),
            DecodeTable(tuple(d["sm_counts"]), tuple(d["context_lens"]), tuple(d["batch_sizes"]),
                        _tuplify(d["alone_ms"]), _tuplify(d["beside_prefill_ms"])),
            PrefillTable(tuple(p["sm_counts"]), tuple(p["prompt_tokens"]), _tuplify(p["latency_ms"]),
                         None if p.get("beside_decode_ms") is None else _tuplify(p["beside_decode_ms"])),
            model_shape=None if data.get("model_shape") is None else ModelShape(**data["model_shape"]),
            hybrid=_table(HybridTable, data.get("hybrid")),
            decode_beside_prompts=_table(DecodeBesidePromptsTable, data.get("decode_beside_prompts")),
            kv_transfer=_table(KVTransferTable, data.get("kv_transfer")),
            host_overhead_ms=None if data.get("host_overhead_ms") is None else float(data["host_overhead_ms"]),
            fit_errors=None if data.get("fit_errors") is None else {k: float(v) for k, v in data["fit_errors"].items()},
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_json(), fh, indent=1)
            fh.write("\n")


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and check a profile; a ValueError names the file and the bad field."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as e:
        raise ValueError(f"cannot read the profile {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    return Profile.from_json(data, where=str(path))


# ---- interpolation -----------------------------------------------------------------------------


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys); below xs[0] the first value; past xs[-1] the last
    segment extended (latency keeps growing with batch and context), never below ys[-1]."""
    if len(xs) == 1 or x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        x0, x1, y0, y1 = xs[-2], xs[-1], ys[-2], ys[-1]
        return max(float(y1), y1 + (y1 - y0) * (x - x1) / (x1 - x0))
    i = bisect.bisect_right(xs, x) - 1
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _interp_sms(sm_counts: Sequence[int], sms: int, at: Any) -> float:
    """A measured SM count's value, or linear in 1/SMs between the two around it (the work
    that scales with SMs scales as 1/SMs); outside the measured range the nearest one."""
    i = bisect.bisect_left(sm_counts, sms)
    if i < len(sm_counts) and sm_counts[i] == sms:
        return at(i)
    if i == 0:
        return at(0)
    if i == len(sm_counts):
        return at(len(sm_counts) - 1)
    lo, hi = sm_counts[i - 1], sm_counts[i]
    w = (1 / lo - 1 / sms) / (1 / lo - 1 / hi)
    return at(i - 1) * (1 - w) + at(i) * w


# ---- validation --------------------------------------------------------------------------------

_META_FIELDS: dict[str, type] = {
    "gpu_name": str, "total_sms": int, "sm_granularity": int, "partitioning": str, "model": str,
    "dtype": str, "created": str, "rapidserve_version": str, "prefill_tokens_beside": int, "notes": str,
    "decode_batch_beside": int, "decode_context_beside": int,
}
_META_OPTIONAL = {"notes", "decode_batch_beside", "decode_context_beside"}  # the last two: new in version 2
_META_MAY_BE_ZERO = {"prefill_tokens_beside", "decode_batch_beside", "decode_context_beside"}
_PARTITIONING = ("green-contexts", "cu-mask", "none")


def _listify(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _listify(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_listify(v) for v in x]
    return x


def _table(cls: Any, d: dict[str, Any] | None) -> Any:
    """A version 3 table from its (validated) JSON: integer axes, float grids."""
    if d is None:
        return None
    return cls(**{k: tuple(v) if k in _INT_AXES else _tuplify(v) for k, v in d.items()})


_INT_AXES = {"chunk_tokens", "decode_batches", "context_lens", "prompt_tokens", "sm_counts", "batch_sizes",
             "num_bytes"}


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else float(x)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ValueError(f"{where or 'the profile'}: expected an object, got {type(obj).__name__}")  # noqa: TRY004 - a bad file, one error type
    if key not in obj:
        raise ValueError(f"{_join(where, key)}: missing")
    return obj[key]


def _int(x: Any, where: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{where}: expected an integer, got {x!r}")  # noqa: TRY004
    if x < minimum:
        raise ValueError(f"{where}: must be at least {minimum}, got {x}")
    return x


def _axis(x: Any, where: str, minimum: int = 1) -> list[int]:
    if not isinstance(x, list) or not x:
        raise ValueError(f"{where}: expected a non-empty list of integers, got {x!r}")
    values = [_int(v, f"{where}[{i}]", minimum) for i, v in enumerate(x)]
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            raise ValueError(f"{where}: must be strictly increasing, but [{i}] = {values[i]} follows "
                             f"{values[i - 1]}")
    return values


def _grid(x: Any, shape: Sequence[int], where: str) -> None:
    """A nested list of positive finite numbers (ms) of the given shape."""
    if not shape:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ValueError(f"{where}: expected a number (ms), got {x!r}")
        if not math.isfinite(x) or x <= 0:
            raise ValueError(f"{where}: latency must be a positive number of ms, got {x!r}")
        return
    if not isinstance(x, list) or len(x) != shape[0]:
        got = f"{len(x)} entries" if isinstance(x, list) else type(x).__name__
        raise ValueError(f"{where}: expected a list of {shape[0]} entries, got {got}")
    for i, v in enumerate(x):
        _grid(v, shape[1:], f"{where}[{i}]")


def _validate(data: Any, source: str) -> None:
    """Raise a ValueError "<source>: <field>: <what is wrong>" for the first bad field."""
    try:
        _check(data)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _check(data: Any) -> None:
    where = ""
    version = _field(data, "schema_version", where)
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"schema_version: this rapidserve reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS[:-1]))} and {READABLE_VERSIONS[-1]}, the file has "
                         f"{version!r}: run "
                         "`rapidserve profile` again")
    meta = _field(data, "metadata", where)
    for key, kind in _META_FIELDS.items():
        w = f"metadata.{key}"
        if key not in (meta if isinstance(meta, dict) else {}) and key in _META_OPTIONAL:
            continue
        value = _field(meta, key, "metadata")
        if kind is int:
            _int(value, w, minimum=0 if key in _META_MAY_BE_ZERO else 1)
        elif not isinstance(value, str):
            raise ValueError(f"{w}: expected a string, got {value!r}")
    if meta["partitioning"] not in _PARTITIONING:
        raise ValueError(f"metadata.partitioning: expected one of {', '.join(_PARTITIONING)}, "
                         f"got {meta['partitioning']!r}")
    total = meta["total_sms"]

    dec = _field(data, "decode", where)
    w = "decode"
    sms = _axis(_field(dec, "sm_counts", w), f"{w}.sm_counts")
    if sms[-1] != total:
        raise ValueError(f"{w}.sm_counts: the last must be the whole device ({total} SMs: the "
                         f"over-allocated partition), got {sms[-1]}")
    ctx = _axis(_field(dec, "context_lens", w), f"{w}.context_lens")
    batch = _axis(_field(dec, "batch_sizes", w), f"{w}.batch_sizes")
    for key in ("alone_ms", "beside_prefill_ms"):
        _grid(_field(dec, key, w), (len(sms), len(ctx), len(batch)), f"{w}.{key}")

    pre = _field(data, "prefill", where)
    w = "prefill"
    psms = _axis(_field(pre, "sm_counts", w), f"{w}.sm_counts")
    if psms[-1] > total:
        raise ValueError(f"{w}.sm_counts: {psms[-1]} exceeds the device's {total} SMs")
    tokens = _axis(_field(pre, "prompt_tokens", w), f"{w}.prompt_tokens")
    _grid(_field(pre, "latency_ms", w), (len(psms), len(tokens)), f"{w}.latency_ms")
    beside = pre.get("beside_decode_ms")  # optional: absent (version 1) or null, not measured
    if beside is not None:
        _grid(beside, (len(psms), len(tokens)), f"{w}.beside_decode_ms")
        for key in ("decode_batch_beside", "decode_context_beside"):
            if meta.get(key, 0) < 1:
                raise ValueError(f"metadata.{key}: must be at least 1 where prefill.beside_decode_ms is "
                                 f"measured, got {meta.get(key, 0)}")
    _check_v3(data, total)


def _check_v3(data: dict[str, Any], total: int) -> None:
    """The optional tables of schema version 3 (absent or null: not measured)."""
    shape = data.get("model_shape")
    if shape is not None:
        if not isinstance(shape, dict):
            raise ValueError(f"model_shape: expected an object, got {type(shape).__name__}")
        for key in ModelShape._fields:
            if key in ModelShape._field_defaults and key not in shape:  # absent: a dense bf16 model
                continue
            _int(_field(shape, key, "model_shape"), f"model_shape.{key}", minimum=0)
        extra = set(shape) - set(ModelShape._fields)
        if extra:
            raise ValueError(f"model_shape: unknown field {sorted(extra)[0]!r}")
        moe = [shape.get(k, 0) for k in ("expert_bytes", "moe_layers", "num_experts", "experts_per_token")]
        if any(moe) and not all(moe):
            raise ValueError("model_shape: expert_bytes, moe_layers, num_experts and experts_per_token must be all "
                             f"> 0 (a mixture of experts) or all 0 (dense), got {moe}")
        if shape.get("experts_per_token", 0) > shape.get("num_experts", 0):
            raise ValueError(f"model_shape.experts_per_token: must be at most num_experts ({shape['num_experts']}), "
                             f"got {shape['experts_per_token']}")
        if shape.get("fp8_flops_per_token", 0) > shape["flops_per_token"]:
            raise ValueError(f"model_shape.fp8_flops_per_token: must be at most flops_per_token "
                             f"({shape['flops_per_token']}), got {shape['fp8_flops_per_token']}")
    hyb = data.get("hybrid")
    if hyb is not None:
        w = "hybrid"
        chunks = _axis(_field(hyb, "chunk_tokens", w), f"{w}.chunk_tokens")
        batches = _axis(_field(hyb, "decode_batches", w), f"{w}.decode_batches", minimum=0)
        ctx = _axis(_field(hyb, "context_lens", w), f"{w}.context_lens", minimum=0)
        _grid(_field(hyb, "latency_ms", w), (len(chunks), len(batches), len(ctx)), f"{w}.latency_ms")
    dbp = data.get("decode_beside_prompts")
    if dbp is not None:
        w = "decode_beside_prompts"
        prompts = _axis(_field(dbp, "prompt_tokens", w), f"{w}.prompt_tokens")
        sms = _axis(_field(dbp, "sm_counts", w), f"{w}.sm_counts")
        if sms[-1] > total:
            raise ValueError(f"{w}.sm_counts: {sms[-1]} exceeds the device's {total} SMs")
        ctx = _axis(_field(dbp, "context_lens", w), f"{w}.context_lens")
        batch = _axis(_field(dbp, "batch_sizes", w), f"{w}.batch_sizes")
        _grid(_field(dbp, "latency_ms", w), (len(prompts), len(sms), len(ctx), len(batch)), f"{w}.latency_ms")
    kv = data.get("kv_transfer")
    if kv is not None:
        w = "kv_transfer"
        nbytes = _axis(_field(kv, "num_bytes", w), f"{w}.num_bytes")
        _grid(_field(kv, "latency_ms", w), (len(nbytes),), f"{w}.latency_ms")
    host = data.get("host_overhead_ms")
    if host is not None and (isinstance(host, bool) or not isinstance(host, (int, float))
                             or not math.isfinite(host) or host < 0):
        raise ValueError(f"host_overhead_ms: expected a number of ms >= 0, got {host!r}")
    errs = data.get("fit_errors")
    if errs is not None:
        if not isinstance(errs, dict):
            raise ValueError(f"fit_errors: expected an object, got {type(errs).__name__}")
        for k, v in errs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"fit_errors.{k}: expected a relative error >= 0, got {v!r}")
