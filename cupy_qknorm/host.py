"""The op on the host, in float64, for numpy arrays under transport "mpi"; and the 16-bit
conversions the package and its tests share. bf16 values are held as uint16 bit patterns
(CuPy and plain numpy have no bfloat16).

    sums[t] = (sum(q[t]^2), sum(k[t]^2))                   this rank's slice (partial_sums)
    out[t]  = rope(x[t] * w / sqrt(S[t] / full_width + eps))  S: the sums over all ranks

rounded once to the data type (apply), as the kernels compute it.
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
