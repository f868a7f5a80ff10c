"""Float64 truth for the TP QK RMSNorm, shard/gather helpers and bf16 <-> float32.

    out = x * w / sqrt(mean(x_full ** 2) + eps)      over the FULL (unsharded) row

bf16 values are held as uint16 bit patterns (CuPy and plain numpy have no bfloat16).
"""
from __future__ import annotations

import numpy as np

DTYPES = ("bfloat16", "float16", "float32")


def bf16_to_f32(bits) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact)."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:  # ml_dtypes' "bfloat16" (2 bytes): reinterpret the bits
        bits = bits.view(np.uint16) if bits.dtype.itemsize == 2 else bits.astype(np.uint16)
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x) -> np.ndarray:
    """float32 -> uint16 bf16 bit patterns, round to nearest even; NaN stays NaN."""
    x = np.asarray(x, dtype=np.float32).copy()  # contiguous, shape kept (0-d too)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    quiet_nan = (u >> 16) | 0x40  # keep the sign, force a quiet NaN
    return np.asarray(np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16))


def to_f64(x, dtype: str) -> np.ndarray:
    """Data of `dtype` ("bfloat16" as uint16 bits) -> float64."""
    if dtype == "bfloat16":
        with np.errstate(invalid="ignore"):  # signaling NaNs (the poison) convert quietly
            return bf16_to_f32(x).astype(np.float64)
    return np.asarray(x).astype(np.float64)


def from_f64(x, dtype: str) -> np.ndarray:
    """float64 -> `dtype`, rounded once (bf16 via float32: exact for values a bf16 holds
    apart from double rounding, which cannot change a round-to-nearest-even result here
    by more than the one unit the tolerances allow)."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "bfloat16":
        return f32_to_bf16(x.astype(np.float32))
    return x.astype(np.dtype(dtype))


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
