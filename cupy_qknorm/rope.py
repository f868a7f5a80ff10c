"""Rotary position embedding after the norm: its configuration, checks and cos/sin table.

For every head of q and k (head h of the full row holds elements [h*head_dim,
(h+1)*head_dim)), the first rotary_dim elements x of the normalized row are rotated by
the angle a_i = pos * theta^(-2i / rotary_dim), i < rotary_dim / 2, and the rest pass:

    NeoX ("neox", rotate-half): y[i] = x[i] cos a_i - x[i + half] sin a_i,
                                y[i + half] = x[i + half] cos a_i + x[i] sin a_i
    GPT-J ("gptj", pairs):      y[2i] = x[2i] cos a_i - x[2i + 1] sin a_i,
                                y[2i + 1] = x[2i + 1] cos a_i + x[2i] sin a_i

x stays fp32 between the norm and the rotation; y is rounded once. The cos/sin table is
[max_position, rotary_dim] fp32, cos in the first half of a row and sin in the second
(the layout inference engines use): built here in float64 and stored as fp32, or given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .shapes import MINIMAX_ROPE, positive_int, vector_elems

STYLES = {"neox": 1, "gptj": 2}


@dataclass(frozen=True)
class RoPE:
    """Rotary embedding applied after the norm (see the module's docstring).

    Give `theta` and `max_position` for the built-in table (computed in float64, stored
    as fp32), or `table` ([max_position, rotary_dim] float32, numpy or CuPy) to use an
    engine's own table exactly."""
    head_dim: int
    rotary_dim: int
    theta: float = 10000.0
    style: str = "neox"
    max_position: int | None = None
    table: object = field(default=None, compare=False, repr=False)

    @classmethod
    def minimax_m2(cls):
        """MiniMax M2's rotary embedding: heads of 128, the first 64 rotated, NeoX style,
        theta 5e6, 196,608 positions."""
        return cls(**MINIMAX_ROPE)

    @property
    def style_code(self) -> int:
        return STYLES[self.style]

    def rows(self) -> int:
        """Positions the table holds."""
        if self.table is not None:
            return int(self.table.shape[0])
        return int(self.max_position)


def check(rope: RoPE, dtype: str, world: int, q_dim: int, k_dim: int) -> None:
    """Raise ValueError where `rope` cannot run with this configuration. Pure."""
    if not isinstance(rope, RoPE):
        raise TypeError(f"rope must be a cupy_qknorm.RoPE or None, got {type(rope).__name__}")
    head = positive_int("rope.head_dim", rope.head_dim)
    rot = positive_int("rope.rotary_dim", rope.rotary_dim)
    if rope.style not in STYLES:
        raise ValueError(f"rope.style must be one of {sorted(STYLES)}, got {rope.style!r}")
    if rot % 2 or rot > head:
        raise ValueError(f"rope.rotary_dim must be even and at most head_dim ({head}), "
                         f"got {rot}")
    for name, d in (("q_dim", q_dim), ("k_dim", k_dim)):
        if d % world or (d // world) % head:
            raise ValueError(
                f"RoPE needs whole heads on every rank: {name}={d} over {world} ranks is "
                f"{d / world:g} a rank, not a multiple of head_dim={head}")
    n = vector_elems(dtype)
    vectors = head // n if head % n == 0 else 0
    if not vectors or not (32 % vectors == 0 or vectors % 32 == 0):
        raise ValueError(f"rope.head_dim={head} must be a whole number of 16-byte vectors "
                         f"({n} {dtype}) that divides 32 or is a multiple of 32")
    step = 2 * n if rope.style == "neox" else n
    if rot % step:
        raise ValueError(f"rope.rotary_dim={rot} must be a multiple of {step} for {dtype} "
                         f"in {rope.style} style")
    if rot // n > 32:
        raise ValueError(f"rope.rotary_dim={rot} is too wide for {dtype}: at most 32 16-byte "
                         f"vectors ({32 * n} elements), so that a warp holds every pair")
    if rope.table is None:
        positive_int("rope.max_position", rope.max_position)
        if rope.max_position >= 2 ** 31:
            raise ValueError(f"rope.max_position must be below 2^31, got {rope.max_position}")
        if isinstance(rope.theta, bool) or not isinstance(rope.theta, (int, float, np.number)) \
                or not math.isfinite(rope.theta) or rope.theta <= 1:
            raise ValueError(f"rope.theta must be a finite number > 1, got {rope.theta!r}")
    else:
        t = rope.table
        shape = tuple(getattr(t, "shape", ()))
        if getattr(t, "dtype", None) != np.float32 or len(shape) != 2 or shape[1] != rot \
                or shape[0] < 1:
            raise ValueError(f"rope.table must be float32 [max_position, {rot}] (cos | sin), "
                             f"got {getattr(t, 'dtype', type(t).__name__)} {list(shape)}")
        if not getattr(t, "flags", None) or not t.flags.c_contiguous:
            raise ValueError("rope.table must be C-contiguous")
        if rope.max_position is not None and rope.max_position != shape[0]:
            raise ValueError(f"rope.max_position={rope.max_position} but the table has "
                             f"{shape[0]} rows")


def table(max_position: int, rotary_dim: int, theta: float) -> np.ndarray:
    """float32 [max_position, rotary_dim]: cos(pos f_i) for i < rotary_dim / 2, then
    sin(pos f_i), with f_i = theta ** (-2i / rotary_dim) and the angle pos f_i in float64.

    SGLang's and vLLM's caches compute the angle in fp32, which differs from this by up to
    about 1e-2 rad near position 196607; the kernels take whichever table they are given."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    half = rotary_dim // 2
    inv_freq = float(theta) ** (-2.0 * np.arange(half, dtype=np.float64) / rotary_dim)
    angle = np.arange(max_position, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


_TABLES: dict = {}


def shared_table(max_position: int, rotary_dim: int, theta: float) -> np.ndarray:
    """table(...), read-only, built once a process (50 MB at MiniMax's sizes)."""
    key = (int(max_position), int(rotary_dim), float(theta))
    if key not in _TABLES:
        t = table(*key)
        t.flags.writeable = False
        _TABLES[key] = t
    return _TABLES[key]


def host_table(rope: RoPE) -> np.ndarray:
    """The cos/sin table as a float32 numpy array: the built-in one shared and read-only,
    a given one copied to the host."""
    if rope.table is None:
        return shared_table(rope.max_position, rope.rotary_dim, float(rope.theta))
    t = rope.table
    return np.ascontiguousarray(t.get() if hasattr(t, "get") else np.asarray(t))
