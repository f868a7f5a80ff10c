"""Float64 truth for the TP QK RMSNorm (and the RoPE after it), shard/gather helpers and
bf16 <-> float32.

    out = x * w / sqrt(mean(x_full ** 2) + eps)      over the FULL (unsharded) row

then, with RoPE, the first rotary_dim elements of every head of `out` rotate by the angles
of the row's position (apply_rope); with a paged KV cache, k's output rows and v's rows
land at their tokens' slots (expected_cache, FP8 through ml_dtypes). bf16 values are held
as uint16 bit patterns (CuPy and plain numpy have no bfloat16).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .host import bf16_to_f32, f32_to_bf16, from_f64, to_f64  # noqa: F401 - re-exported
from .rope import shared_table, table as rope_table  # noqa: F401 - the table is an input

DTYPES = ("bfloat16", "float16", "float32")


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Float64 RMSNorm of full rows: x [T, D], w [D]. A zero row with eps = 0 is 0/0: NaN."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + eps) * w


def qk_norm(q, k, q_weight, k_weight, eps: float):
    """Float64 reference of the whole op on full (gathered) rows."""
    return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)


def shard(x: np.ndarray, world: int, rank: int) -> np.ndarray:
    """Rank `rank`'s contiguous slice of the last dim."""
    d = x.shape[-1]
    if d % world:
        raise ValueError(f"width {d} does not split evenly over {world} ranks")
    n = d // world
    return x[..., rank * n:(rank + 1) * n]


def gather(parts) -> np.ndarray:
    """Inverse of shard: concatenate the ranks' slices along the last dim."""
    return np.concatenate([np.asarray(p) for p in parts], axis=-1)


def shard_heads(x: np.ndarray, world: int, rank: int, heads: int) -> np.ndarray:
    """Rank `rank`'s slice of a row of `heads` whole heads: shard() where the heads split
    evenly over `world` ranks, else (world a multiple of heads: replicated) the one head
    r * heads // world, which world / heads ranks hold alike."""
    if heads % world == 0:
        return shard(x, world, rank)
    if world % heads:
        raise ValueError(f"{heads} heads neither split nor replicate evenly over {world} ranks")
    return shard(x, heads, rank * heads // world)


def gather_heads(parts, heads: int) -> np.ndarray:
    """Inverse of shard_heads: every distinct head once (the first rank of each replica
    group's slice), in order."""
    world = len(parts)
    if heads % world == 0:
        return gather(parts)
    return gather([parts[r] for r in range(0, world, world // heads)])


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """Units in the last place between two arrays of `dtype` (bf16 as uint16 bits).

    Works on the ordered integer image of the bit patterns, so it is exact across zero and
    binades. NaN vs NaN counts 0; NaN vs a number counts as infinitely far."""
    if dtype == "float32":
        ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
        ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
        sign = 1 << 31
        fa, fb = np.asarray(a, np.float32), np.asarray(b, np.float32)
    else:
        bits = np.uint16
        ia = np.asarray(a).view(bits).astype(np.int64)
        ib = np.asarray(b).view(bits).astype(np.int64)
        sign = 1 << 15
        fa, fb = to_f64(a, dtype), to_f64(b, dtype)
    # sign-magnitude bits -> a monotone integer line, so that the difference counts ulps
    ia = _ordered(ia, sign)
    ib = _ordered(ib, sign)
    d = np.abs(ia - ib).astype(np.float64)
    na, nb = np.isnan(fa), np.isnan(fb)
    d[na & nb] = 0.0
    d[na ^ nb] = np.inf
    return d


def _ordered(i: np.ndarray, sign: int) -> np.ndarray:
    mag = i & (sign - 1)
    return np.where(i & sign, -mag, mag)


# How far an output may be from the float64 reference, per dtype: bf16 and fp16 within one
# unit in the last place of the reference rounded to the dtype; fp32 relative.
TOLERANCE = {"bfloat16": ("ulp", 1.0), "float16": ("ulp", 1.0), "float32": ("rel", 4e-6)}


def compare(out, ref64, dtype: str):
    """(max error in the table's unit, number of elements past tolerance). NaN must meet NaN."""
    kind, tol = TOLERANCE[dtype]
    out = np.asarray(out)
    ref64 = np.asarray(ref64, dtype=np.float64)
    if out.size == 0:
        return 0.0, 0
    if kind == "ulp":
        err = ulp_distance(out, from_f64(ref64, dtype), dtype)
    else:
        o = out.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.abs(o - ref64) / np.maximum(np.abs(ref64), 1e-30)
        err[np.isnan(o) & np.isnan(ref64)] = 0.0
        err[np.isnan(o) ^ np.isnan(ref64)] = np.inf
        same_inf = np.isinf(o) & (o == ref64)
        err[same_inf] = 0.0
    return float(err.max()), int((err > tol).sum())


def random_rows(rng, tokens: int, width: int, log10_rms=(-4.0, 3.0)) -> np.ndarray:
    """float64 rows of standard normals, each scaled to an RMS of 10^U(log10_rms)."""
    x = rng.standard_normal((tokens, width))
    return x * 10.0 ** rng.uniform(*log10_rms, size=(tokens, 1))


def make_case(seed: int, tokens: int, q_dim: int, k_dim: int, dtype: str,
              weight_dtype: str | None = None, eps: float = 1e-6, log10_rms=(-4.0, 3.0)):
    """Full-row inputs in `dtype` (numpy; bf16 as uint16) and their float64 reference.

    Every rank calls it with the same seed and takes its shard. Returns
    (q, k, q_weight, k_weight, q_ref64, k_ref64); the reference is computed from the
    already-rounded inputs, so only the op's own error is measured."""
    rng = np.random.default_rng(seed)
    wdt = weight_dtype or dtype
    q = from_f64(random_rows(rng, tokens, q_dim, log10_rms), dtype)
    k = from_f64(random_rows(rng, tokens, k_dim, log10_rms), dtype)
    qw = from_f64(1.0 + 0.25 * rng.standard_normal(q_dim), wdt)
    kw = from_f64(1.0 + 0.25 * rng.standard_normal(k_dim), wdt)
    qr, kr = qk_norm(to_f64(q, dtype), to_f64(k, dtype), to_f64(qw, wdt), to_f64(kw, wdt), eps)
    return q, k, qw, kw, qr, kr


def poison(dtype: str):
    """A value no correct output has: NaN with a recognisable payload."""
    return {"bfloat16": np.uint16(0x7FA5), "float16": np.float16(np.nan),
            "float32": np.float32(np.nan)}[dtype]


# ---------------------------------------------------------------------------------------
# RoPE after the norm. Head h of a full row is its elements [h head_dim, (h + 1) head_dim);
# the first rotary_dim of each rotate in pairs by the angles of the row's position:
#   neox (rotate-half): pairs (i, i + rotary_dim / 2)     gptj: pairs (2i, 2i + 1)
#   y_first = x_first cos_i - x_second sin_i,   y_second = x_second cos_i + x_first sin_i
# The rest of the head passes through.
ROPE_STYLES = ("neox", "gptj")


def _pairs(rotary_dim: int, style: str):
    """Indices within a head of the first and second element of each rotated pair; pair i
    turns by angle i."""
    half = rotary_dim // 2
    i = np.arange(half)
    if style == "neox":
        return i, i + half
    if style == "gptj":
        return 2 * i, 2 * i + 1
    raise ValueError(f"style must be one of {ROPE_STYLES}, got {style!r}")


def apply_rope(x64, positions, table, head_dim: int, rotary_dim: int, style: str):
    """Rotates full rows x64 [T, D] (D a multiple of head_dim) by the angles of
    `positions` [T] in `table` (rope_table's layout; its fp32 values taken exactly).

    Returns (y64, magnitude64): magnitude is |x_first cos| + |x_second sin| (for the first
    element of a pair; |x_second cos| + |x_first sin| for the second) where an element
    rotates, |x| where it passes through: the size of the terms whose rounding an output
    may carry, so that a result near zero by cancellation is judged against it."""
    x = np.asarray(x64, dtype=np.float64)
    table = np.asarray(table)
    positions = np.asarray(positions)
    t, d = x.shape
    if head_dim <= 0 or d % head_dim:
        raise ValueError(f"row width {d} is not a multiple of head_dim {head_dim}")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim], got {rotary_dim}")
    if table.ndim != 2 or table.shape[1] != rotary_dim:
        raise ValueError(f"table must be [max_position, {rotary_dim}], got {table.shape}")
    if positions.shape != (t,):
        raise ValueError(f"positions must be [{t}], got {positions.shape}")
    if t and (positions.min() < 0 or positions.max() >= table.shape[0]):
        raise ValueError(f"positions must lie in [0, {table.shape[0]})")
    first, second = _pairs(rotary_dim, style)
    half = rotary_dim // 2
    rows = table[positions].astype(np.float64)
    cos, sin = rows[:, None, :half], rows[:, None, half:]  # [T, 1 (heads), half]
    heads = x.reshape(t, d // head_dim, head_dim)
    y = heads.copy()
    mag = np.abs(heads)
    a, b = heads[..., first], heads[..., second]
    y[..., first] = a * cos - b * sin
    y[..., second] = b * cos + a * sin
    mag[..., first] = np.abs(a * cos) + np.abs(b * sin)
    mag[..., second] = np.abs(b * cos) + np.abs(a * sin)
    return y.reshape(t, d), mag.reshape(t, d)


def qk_norm_rope(q, k, q_weight, k_weight, eps: float, positions, table, head_dim: int,
                 rotary_dim: int, style: str):
    """Float64 reference of the norm then RoPE on full (gathered) rows.

    Returns (q_y64, k_y64, q_mag64, k_mag64); see apply_rope for the magnitudes."""
    qn, kn = qk_norm(q, k, q_weight, k_weight, eps)
    with np.errstate(invalid="ignore"):  # NaN rows (eps = 0 and a zero row) stay NaN
        qy, qm = apply_rope(qn, positions, table, head_dim, rotary_dim, style)
        ky, km = apply_rope(kn, positions, table, head_dim, rotary_dim, style)
    return qy, ky, qm, km


# A 16-bit result after RoPE may carry one rounding of terms of the size `magnitude`, even
# where they cancel: its error is counted in the dtype's ulps at that magnitude
# (explicit mantissa bits, exponent of the smallest normal).
_ULP_BITS = {"bfloat16": (7, -126), "float16": (10, -14)}


def ulp_at(mag64, dtype: str) -> np.ndarray:
    """The spacing of `dtype` values (bf16 or fp16) at magnitude `mag64`: 2^(e - mantissa
    bits) for 2^e <= mag < 2^(e+1), and never less than at the smallest normal."""
    bits, emin = _ULP_BITS[dtype]
    mag = np.abs(np.asarray(mag64, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        _, e = np.frexp(mag)  # mag = m 2^e with 0.5 <= m < 1: floor(log2 mag) = e - 1
    e = np.where(mag > 0, e - 1, emin)
    return np.ldexp(1.0, np.maximum(e, emin) - bits)


def compare_rope(out, y64, mag64, dtype: str):
    """(max error in the table's unit, number of elements past tolerance) of `out` (dtype;
    bf16 as uint16 bits) against apply_rope's reference y64 and magnitude mag64.

    bf16 / fp16: |out - y64| in ulps of the dtype at mag64 (ulp_at), at most 1; fp32:
    |out - y64| / mag64, at most TOLERANCE's 4e-6, and exactly y64 where mag64 is 0. NaN
    must meet NaN, and an infinity the same infinity."""
    kind, tol = TOLERANCE[dtype]
    o = to_f64(out, dtype)
    y = np.asarray(y64, dtype=np.float64)
    mag = np.asarray(mag64, dtype=np.float64)
    if o.shape != y.shape or mag.shape != y.shape:
        raise ValueError(f"shapes differ: out {o.shape}, y64 {y.shape}, mag64 {mag.shape}")
    if o.size == 0:
        return 0.0, 0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.abs(o - y)
        if kind == "ulp":
            err = diff / ulp_at(mag, dtype)
        else:
            err = np.where(mag > 0, diff / mag, np.where(diff == 0, 0.0, np.inf))
    err = np.where(np.isinf(y), np.where(o == y, 0.0, np.inf), err)
    err[np.isnan(o) & np.isnan(y)] = 0.0
    err[np.isnan(err)] = np.inf  # NaN against a number (either way), or Inf magnitudes
    return float(err.max()), int((err > tol).sum())


class RopeCase(NamedTuple):
    """make_rope_case's inputs (dtype; bf16 as uint16) and float64 references."""
    q: np.ndarray
    k: np.ndarray
    q_weight: np.ndarray
    k_weight: np.ndarray
    positions: np.ndarray  # int64 [tokens]
    table: np.ndarray      # float32 [max_position, rotary_dim], read-only
    q_ref: np.ndarray
    k_ref: np.ndarray
    q_mag: np.ndarray
    k_mag: np.ndarray


def make_rope_case(seed: int, tokens: int, q_dim: int, k_dim: int, dtype: str,
                   head_dim: int = 128, rotary_dim: int = 64, theta: float = 5e6,
                   style: str = "neox", max_position: int = 196608,
                   weight_dtype: str | None = None, eps: float = 1e-6,
                   log10_rms=(-4.0, 3.0)) -> RopeCase:
    """make_case's full-row inputs plus positions (int64, uniform in [0, max_position),
    the last one max_position - 1) and the table, with the float64 references of the norm
    then RoPE, computed from the already-rounded inputs. Defaults: MiniMax M2's RoPE.
    Every rank calls it with the same seed and takes its shard of q, k and the weights."""
    q, k, qw, kw, _, _ = make_case(seed, tokens, q_dim, k_dim, dtype, weight_dtype, eps,
                                   log10_rms)
    rng = np.random.default_rng([seed, 1])  # a stream apart from make_case's
    positions = rng.integers(0, max_position, size=tokens, dtype=np.int64)
    if tokens:
        positions[-1] = max_position - 1
    table = shared_table(max_position, rotary_dim, theta)
    wdt = weight_dtype or dtype
    refs = qk_norm_rope(to_f64(q, dtype), to_f64(k, dtype), to_f64(qw, wdt), to_f64(kw, wdt),
                        eps, positions, table, head_dim, rotary_dim, style)
    return RopeCase(q, k, qw, kw, positions, table, *refs)


# ---------------------------------------------------------------------------------------
# The paged KV-cache write (cupy_qknorm.kvcache states the layout and the conversion).
def expected_cache(cache_before: np.ndarray, out_rows, slots, kv, heads: int,
                   data_dtype: str, scale: float) -> np.ndarray:
    """A copy of `cache_before` (the numpy cache as passed: [num_blocks, block_size, heads,
    head_dim] or a token pool [slots, heads, head_dim]) with token t's row of `out_rows`
    ([T, heads * head_dim], data_dtype, bf16 as uint16: the op's rounded k output, or v)
    written at slot slots[t], one token after another (a later token wins a repeated
    slot), slot -1 skipped. FP8 caches get ml_dtypes.float8_e4m3fn of
    clip(f32(row) / f32(scale), -448, 448) as uint8 bits, every NaN as 0x7F (the GPU's
    canonical NaN: ml_dtypes keeps a NaN's sign, the hardware does not)."""
    import ml_dtypes  # the test extra's: a library's FP8, not the package's own encoder

    from .kvcache import FP8_MAX
    cache_dtype = kv.cache_dtype(data_dtype)
    storage = kv.storage_dtype(data_dtype)
    rows = np.asarray(out_rows)
    if cache_dtype == data_dtype:
        values = rows.view(storage) if rows.dtype != storage else rows
    else:
        f32 = bf16_to_f32(rows) if data_dtype == "bfloat16" else rows.astype(np.float32)
        with np.errstate(all="ignore"):
            x = np.clip(f32 / np.float32(scale), -FP8_MAX, FP8_MAX)
            values = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
            values = np.where(np.isnan(x), np.uint8(0x7F), values)
    out = np.array(cache_before, copy=True)
    if out.dtype.itemsize != storage.itemsize:
        raise ValueError(f"cache_before: {out.dtype} cannot hold a {cache_dtype} cache")
    cells = out.view(storage) if out.dtype != storage else out
    for t, s in enumerate(np.asarray(slots).tolist()):
        if s == -1:
            continue
        if not 0 <= s < cells.shape[0] * (1 if cells.ndim == 3 else kv.block_size):
            raise ValueError(f"token {t}: slot {s} is outside the cache")
        cell = cells[s] if cells.ndim == 3 else cells[s // kv.block_size, s % kv.block_size]
        cell[...] = values[t].reshape(heads, kv.head_dim)
    return out
