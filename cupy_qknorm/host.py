"""The op on the host, in float64, for numpy arrays under transport "mpi"; and the 16-bit
conversions the package and its tests share. bf16 values are held as uint16 bit patterns
(CuPy and plain numpy have no bfloat16).

    sums[t] = (sum(q[t]^2), sum(k[t]^2))                   this rank's slice (partial_sums)
    out[t]  = rope(x[t] * w / sqrt(S[t] / full_width + eps))  S: the sums over all ranks

rounded once to the data type (apply), as the kernels compute it. With a paged KV cache,
k's output rows and v's rows are then written at their tokens' slots (write_cache), in
the data's dtype or as FP8 E4M3 bits (fp8_e4m3_bits).
"""
from __future__ import annotations

import numpy as np


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
        with np.errstate(invalid="ignore"):  # signaling NaNs (a poison) convert quietly
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


def first_bad_position(positions, rows: int) -> int:
    """The first token whose position is outside [0, rows), or -1."""
    p = np.asarray(positions)
    bad = np.flatnonzero((p < 0) | (p >= rows))
    return int(bad[0]) if bad.size else -1


def partial_sums(q, k, dtype: str) -> np.ndarray:
    """float64 [T, 2]: this rank's sums of squares of q's and k's rows."""
    sums = np.empty((q.shape[0], 2))
    for col, x in enumerate((q, k)):
        x = to_f64(x, dtype)
        sums[:, col] = np.einsum("ij,ij->i", x, x)
    return sums


def apply(x, w, sums, full_width: int, eps: float, dtype: str, out, rope=None,
          positions=None, table=None) -> None:
    """Scale rows x (dtype) by their full rows' sums [T] and the float64 weight w, rotate
    them with `rope` by `positions` in `table`, and store them into `out`, rows whose
    position is outside the table excepted."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = to_f64(x, dtype) / np.sqrt(sums[:, None] / full_width + eps) * w
        keep = np.ones(len(y), bool)
        if rope is not None:
            keep = (positions >= 0) & (positions < table.shape[0])
            y = _rotate(y[keep], positions[keep], table, rope.head_dim, rope.rotary_dim,
                        rope.style)
        dst = out.view(np.uint16) if dtype == "bfloat16" else out
        dst[keep] = from_f64(y, dtype)


def _rotate(y, positions, table, head_dim, rotary_dim, style):
    """Rows y [T, D] rotated in float64 by the fp32 angles of their positions: every head's
    first rotary_dim elements in pairs (NeoX: i with i + half; GPT-J: 2i with 2i + 1)."""
    half = rotary_dim // 2
    heads = y.reshape(len(y), -1, head_dim)
    rot = heads[..., :rotary_dim]
    if style == "neox":
        a, b = rot[..., :half], rot[..., half:]
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
    angles = table[positions].astype(np.float64)
    cos, sin = angles[:, None, :half], angles[:, None, half:]
    first, second = a * cos - b * sin, b * cos + a * sin
    out = heads.copy()
    if style == "neox":
        out[..., :half], out[..., half:rotary_dim] = first, second
    else:
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = first, second
    return out.reshape(y.shape)


# ---------------------------------------------------------------------------------------
# The paged KV-cache write (cupy_qknorm.kvcache states the layout and the conversion).
_F32_SIGN, _F32_ABS, _F32_INF = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), 0x7F800000
_FP8_NAN, _FP8_MAX_BITS = 0x7F, 0x7E          # E4M3 (fn): S.1111.111 is NaN, S.1111.110 448
_FP8_MIN_NORMAL = 0x3C800000                  # 2^-6 as float32 bits
_FP8_EXP_SHIFT = (127 - 7) << 3               # float32 bias minus E4M3's, at E4M3's exponent


def fp8_e4m3_bits(x) -> np.ndarray:
    """float32 -> FP8 E4M3 (fn) bit patterns (uint8): x rounded to nearest even, |x| past
    448 (infinities too) saturated to +-448 (0x7E / 0xFE), every NaN -> 0x7F (the sign
    dropped), the sign of zero kept. What CUDA's cvt.rn.satfinite.e4m3x2.f32 computes (on an
    NVIDIA H200 bit for bit, NaNs of both signs included)."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32) if x.flags.c_contiguous else x.copy().view(np.uint32)
    sign = ((u & _F32_SIGN) >> np.uint32(24)).astype(np.uint8)
    a = (u & _F32_ABS).astype(np.int64)
    # normal E4M3 (|x| >= 2^-6): round the 23-bit mantissa to 3 bits, nearest even; a carry
    # into the exponent is the right answer, and anything past 448 saturates below
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - _FP8_EXP_SHIFT
    # subnormal E4M3 (|x| < 2^-6): multiples of 2^-9; |x| * 2^9 is exact, rint is RNE
    with np.errstate(over="ignore", invalid="ignore"):  # lanes np.where drops below
        small = np.rint(np.abs(x) * np.float32(512.0)).astype(np.int64)
    mag = np.where(a >= _FP8_MIN_NORMAL, np.minimum(normal, _FP8_MAX_BITS), small)
    bits = mag.astype(np.uint8) | sign
    return np.asarray(np.where(a > _F32_INF, np.uint8(_FP8_NAN), bits))


def cache_values(rows, data_dtype: str, cache_dtype: str, scale: float) -> np.ndarray:
    """What a cache stores for `rows` [T, width] of `data_dtype` (bf16 as uint16 bits; the
    op's rounded outputs): the rows themselves for a cache of the data's dtype, else
    fp8_e4m3_bits(f32(rows) / f32(scale)) with the division in fp32 (IEEE, round to
    nearest), as the kernels compute it."""
    if cache_dtype == data_dtype:
        return np.asarray(rows)
    if cache_dtype != "float8_e4m3fn":
        raise ValueError(f"cache dtype must be {data_dtype!r} or 'float8_e4m3fn', got "
                         f"{cache_dtype!r}")
    if data_dtype == "bfloat16":
        f32 = bf16_to_f32(rows)
    else:
        f32 = np.asarray(rows).astype(np.float32)
    with np.errstate(all="ignore"):  # NaN and inf convert as stated; a poison is no fault
        return fp8_e4m3_bits(f32 / np.float32(scale))


def write_cache(cache, rows, slots, heads: int, head_dim: int, block_size: int,
                data_dtype: str, cache_dtype: str, scale: float) -> None:
    """cache[s // block_size, s % block_size, h, :] = cache_values(rows)[t, h-th head] for
    every token t whose slot s = slots[t] is not -1. `cache` is the numpy array as the
    caller passed it ([num_blocks, block_size, heads, head_dim] of any strides, or a token
    pool [slots, heads, head_dim]; written in place); rows [T, heads * head_dim]. The
    caller refuses slots outside the cache (first_bad_slot) with its own error first; one
    that comes here anyway raises ValueError before anything is written. Repeated slots:
    the last token's row wins here (the GPU promises no order)."""
    slots = np.asarray(slots).astype(np.int64)
    num_slots = cache.shape[0] * (1 if cache.ndim == 3 else block_size)
    bad = first_bad_slot(slots, num_slots)
    if bad >= 0:
        raise ValueError(f"token {bad}: slot {int(slots[bad])} is outside the cache's "
                         f"{num_slots} slots")
    keep = np.flatnonzero(slots != -1)
    if keep.size == 0:
        return
    values = cache_values(np.asarray(rows)[keep], data_dtype, cache_dtype, scale)
    values = values.reshape(keep.size, heads, head_dim)
    if values.dtype.itemsize != cache.dtype.itemsize:
        raise ValueError(f"cache: {cache.dtype} cannot hold {cache_dtype} values")
    dst = cache if cache.dtype == values.dtype else cache.view(values.dtype)  # same bits
    s = slots[keep]
    if cache.ndim == 3:  # a token pool: block_size 1
        dst[s] = values
    else:
        dst[s // block_size, s % block_size] = values


def first_bad_slot(slots, num_slots: int) -> int:
    """The first token whose slot is outside [0, num_slots) and not -1 (do not write), or
    -1 where there is none."""
    s = np.asarray(slots)
    bad = np.flatnonzero((s < -1) | (s >= num_slots))
    return int(bad[0]) if bad.size else -1
