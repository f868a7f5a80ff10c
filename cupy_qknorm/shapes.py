"""Data types, widths and how they split over ranks. Pure: no GPU, no MPI."""
from __future__ import annotations

import numbers

DTYPES = ("bfloat16", "float16", "float32")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
MAX_WORLD = 16                  # the width of the kernels' Params.slots
MINIMAX_DIMS = (6144, 1024)     # MiniMax M2: 48 q heads and 8 kv heads of 128
MINIMAX_HEADS = (48, 8, 128)    # q heads, KV heads, head_dim
MINIMAX_ROPE = dict(head_dim=128, rotary_dim=64, theta=5e6, style="neox",
                    max_position=196608)
OTHER_LOCAL_DIMS = (1024, 128)  # per rank, for the G that MiniMax's widths do not split into


def positive_int(name: str, v) -> int:
    """v as an int, or ValueError naming it where v is not a positive integer (bools are
    not integers here; numpy integers are)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def vector_elems(dtype: str) -> int:
    """Elements of `dtype` in one 16-byte vector: local widths must be multiples of it."""
    return 16 // ITEMSIZE[dtype]


def default_dims(world: int) -> tuple:
    """Full (q_dim, k_dim) for examples, checks and benchmarks at `world` ranks: MiniMax's
    widths where they split into whole 16-byte vectors of bf16 (G = 1, 2, 4, 8, 16), else
    6144 / 1536 (G = 3, 6, 12), else 1024 / 128 per rank (the other G)."""
    if not 1 <= world <= MAX_WORLD:
        raise ValueError(f"world size must be 1..{MAX_WORLD}, got {world}")
    for q, k in (MINIMAX_DIMS, (6144, 1536)):
        if q % world == 0 and k % world == 0 and (q // world) % 8 == 0 and \
                (k // world) % 8 == 0:
            return q, k
    return OTHER_LOCAL_DIMS[0] * world, OTHER_LOCAL_DIMS[1] * world


def whole_heads(world: int, q_dim: int, k_dim: int, head_dim: int) -> bool:
    """Whether every rank's q and k slices hold whole heads of `head_dim`."""
    return all(d % world == 0 and (d // world) % head_dim == 0 for d in (q_dim, k_dim))


def kv_layout(world: int, kv_heads: int) -> str:
    """How k's `kv_heads` heads lie over `world` ranks: "split" (kv_heads / world whole
    heads a rank), "replicated" (rank r holds head r * kv_heads // world, each head on
    world / kv_heads ranks: the convention of the inference engines when TP exceeds the KV
    heads), or "" where neither holds evenly."""
    if kv_heads % world == 0:
        return "split"
    if world % kv_heads == 0:
        return "replicated"
    return ""


def minimax_local(world: int):
    """(q_local, k_local) of MiniMax M2's heads at `world` ranks, or None where they do not
    lie evenly: G = 1, 2, 4, 8 split both; G = 16 replicates each KV head on two ranks."""
    q_heads, kv_heads, head = MINIMAX_HEADS
    if q_heads % world or not kv_layout(world, kv_heads):
        return None
    return q_heads * head // world, head * max(1, kv_heads // world)
