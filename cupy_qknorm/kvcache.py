"""The paged KV cache the op can write after the norm and RoPE: its configuration and the
per-call checks of the caches, the slot mapping and the scales. Pure: no GPU, no MPI; works
on numpy and CuPy arrays (and any array arrays.describe takes) without importing CuPy.

For token t with slot s = slot_mapping[t] (s == -1: not written), every kv head h gets

    cache[s // block_size, s % block_size, h, :] = c(row[t, h*head_dim:(h+1)*head_dim])

where row is k's output (after the norm and RoPE, rounded as the output holds it) or v's
row, and c is the identity for a cache of the data's dtype, or for FP8 E4M3

    c(x) = fp8_e4m3(f32(x) / f32(scale)),  round to nearest even, saturating at +-448,
           every NaN as 0x7F (stored as uint8 bits, as bf16 is stored as uint16 bits).

A cache is [num_blocks, block_size, kv_heads, head_dim] with any strides (the head_dim
axis contiguous): the NHD layout is the contiguous case, an HND cache
([num_blocks, kv_heads, block_size, head_dim]) is passed as its transposed view, and a
token pool [slots, kv_heads, head_dim] is the 3-D form with block_size 1.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .arrays import check_token_vector, describe
from .shapes import DTYPES, positive_int

CACHE_FP8 = "float8_e4m3fn"   # the one cache dtype that is not a data dtype: uint8 bits
FP8_MAX = 448.0               # the largest finite E4M3 (fn) value; conversion saturates here
CACHE_DTYPES = (*DTYPES, CACHE_FP8)
ALIGN = 16                    # bytes: every cache row (block, row, head) starts on it

_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32,
            CACHE_FP8: np.uint8}
# names an array's dtype may have for each cache dtype (bf16 and fp8 as their bits, or
# ml_dtypes' types, which the package reads as the same bits)
_ACCEPTED = {"bfloat16": ("uint16", "bfloat16"), "float16": ("float16",),
             "float32": ("float32",), CACHE_FP8: ("uint8", "float8_e4m3fn")}


@dataclass(frozen=True)
class KVCache:
    """What does not change about a rank's paged KV cache: rows of `head_dim` elements in
    blocks of `block_size` tokens, held in `dtype` (None: the data's dtype; else a data
    dtype name, which must then be the data's, or "float8_e4m3fn"). The number of kv heads
    follows from the rank's k width (kv_heads). Hashable: a configuration, not a buffer."""
    block_size: int
    head_dim: int = 128
    dtype: str | None = None

    def __post_init__(self):
        block = positive_int("kv_cache.block_size", self.block_size)
        head = positive_int("kv_cache.head_dim", self.head_dim)
        if head % 16:
            raise ValueError(f"kv_cache.head_dim must be a multiple of 16 (whole 16-byte "
                             f"rows in every cache dtype), got {head}")
        if self.dtype is not None and self.dtype not in CACHE_DTYPES:
            raise ValueError(f"kv_cache.dtype must be None or one of {list(CACHE_DTYPES)}, "
                             f"got {self.dtype!r}")
        object.__setattr__(self, "block_size", block)
        object.__setattr__(self, "head_dim", head)

    def cache_dtype(self, data_dtype: str) -> str:
        """The cache's dtype name for data of `data_dtype`: the data's, or "float8_e4m3fn"."""
        if data_dtype not in DTYPES:
            raise ValueError(f"data dtype must be one of {list(DTYPES)}, got {data_dtype!r}")
        if self.dtype is None or self.dtype == CACHE_FP8:
            return self.dtype or data_dtype
        if self.dtype != data_dtype:
            raise ValueError(f"kv_cache.dtype {self.dtype!r} differs from the data's "
                             f"{data_dtype!r}: a cache holds the data's dtype or "
                             f"{CACHE_FP8!r}")
        return data_dtype

    def storage_dtype(self, data_dtype: str) -> np.dtype:
        """The numpy dtype a cache array holds for data of `data_dtype`: uint16 for bf16,
        uint8 for FP8, else the dtype itself."""
        return np.dtype(_STORAGE[self.cache_dtype(data_dtype)])

    def kv_heads(self, k_local: int) -> int:
        """Heads in a rank's k (and v) slice of `k_local` elements: k_local / head_dim."""
        k_local = positive_int("k width", k_local)
        if k_local % self.head_dim:
            raise ValueError(f"kv_cache: the rank's k width {k_local} is not a whole number "
                             f"of heads of {self.head_dim} (head_dim)")
        return k_local // self.head_dim

    def is_fp8(self) -> bool:
        """Whether the cache holds FP8 E4M3 bits (and the scales apply)."""
        return self.dtype == CACHE_FP8


class CacheView(NamedTuple):
    """A validated cache: element [b, r, h, d] lies at ptr + ((b*strides[0] + r*strides[1]
    + h*strides[2]) + d) * itemsize. Strides are in elements, 0 for an axis of extent 1
    (its index is always 0; a token pool's row axis)."""
    ptr: int                 # address of element [0, 0, 0, 0]
    num_blocks: int
    block_size: int
    heads: int
    head_dim: int
    strides: tuple           # (block, row, head) in elements; the head_dim axis is contiguous

    @property
    def slots(self) -> int:
        """Slots the cache holds: num_blocks * block_size."""
        return self.num_blocks * self.block_size


def _dtype_name(op) -> str | None:
    """The array's own dtype name (uint16, uint8, float8_e4m3fn, ...), not the package's
    reading of it: the cache dtype decides what its bits mean."""
    dt = getattr(op.obj, "dtype", None)
    try:
        return np.dtype(dt).name
    except TypeError:  # not a numpy dtype (torch's): its name after the module's
        return str(dt).rsplit(".", 1)[-1] if dt is not None else op.dtype


def cache_view(arr, role: str, kv: KVCache, heads: int, data_dtype: str) -> CacheView:
    """The address and element strides of `arr` as a [num_blocks, block_size, heads,
    head_dim] cache of `kv` for data of `data_dtype`, or ValueError(f"{role}: ...") in one
    line: wrong ndim, shape or storage dtype; the head_dim axis not contiguous; a negative
    stride or axes that overlap; a (block, row, head) row or the data not 16-byte aligned;
    an empty or read-only cache. A 3-D [slots, heads, head_dim] array is a token pool and
    needs kv.block_size == 1."""
    op = describe(arr, role)
    cache_dtype = kv.cache_dtype(data_dtype)
    storage = kv.storage_dtype(data_dtype)
    name = _dtype_name(op)
    if name not in _ACCEPTED[cache_dtype] or op.itemsize != storage.itemsize:
        raise ValueError(f"{role}: dtype must be {storage.name} for a {cache_dtype} cache, "
                         f"got {name}")
    shape, strides = tuple(op.shape), tuple(op.strides)
    want = f"[num_blocks, {kv.block_size}, {heads}, {kv.head_dim}]"
    if len(shape) == 3:
        if kv.block_size != 1:
            raise ValueError(f"{role}: a 3-D cache [slots, heads, head_dim] is a token pool "
                             f"and needs block_size 1, not {kv.block_size}; pass {want}")
        shape = (shape[0], 1, shape[1], shape[2])
        strides = (strides[0], 0, strides[1], strides[2])
        want = f"[slots, {heads}, {kv.head_dim}]"
    elif len(shape) != 4:
        raise ValueError(f"{role}: must be 4-D {want} (or 3-D [slots, heads, head_dim] with "
                         f"block_size 1), got {len(shape)}-D {list(op.shape)}")
    if shape[1:] != (kv.block_size, heads, kv.head_dim):
        raise ValueError(f"{role}: shape must be {want}, got {list(op.shape)}")
    if shape[0] == 0:
        raise ValueError(f"{role}: the cache is empty (0 blocks)")
    if not op.writable:
        raise ValueError(f"{role}: the array is read-only")
    if strides[3] != op.itemsize:  # head_dim >= 16: this axis always has extent > 1
        raise ValueError(f"{role}: the head_dim axis must be contiguous (stride "
                         f"{strides[3]} bytes, expected {op.itemsize})")
    outer = [(s, n) for s, n in zip(strides[:3], shape[:3]) if n > 1]  # extent 1: unused
    if any(s < 0 for s, _ in outer):
        raise ValueError(f"{role}: negative strides {list(op.strides)} are not supported")
    if any(s % ALIGN for s, _ in outer):
        raise ValueError(f"{role}: every (block, row, head) row must start 16-byte aligned; "
                         f"strides {list(op.strides)} bytes")
    if op.ptr % ALIGN:
        raise ValueError(f"{role}: data must be 16-byte aligned (address % 16 = "
                         f"{op.ptr % ALIGN})")
    reach = 0  # a stride at least the extent of every smaller axis: no two elements alias
    for s, n in sorted([*outer, (strides[3], shape[3])]):
        if s < max(reach, 1):
            raise ValueError(f"{role}: its elements overlap (strides {list(op.strides)} "
                             f"bytes, shape {list(op.shape)})")
        reach = s * n
    elems = tuple(s // op.itemsize if n > 1 else 0 for s, n in zip(strides[:3], shape[:3]))
    return CacheView(op.ptr, shape[0], shape[1], shape[2], shape[3], elems)


def slot_view(arr, tokens: int) -> tuple:
    """(address, itemsize) of `slot_mapping`: [tokens] int32 or int64, contiguous; the
    cache slot of each token, -1 for none. ValueError("slot_mapping: ...") in one line
    otherwise. The slots' values are checked where they are read (on the device)."""
    op = describe(arr, "slot_mapping")
    check_token_vector(op, "slot_mapping", tokens, _dtype_name(op), "one slot per token",
                       ValueError)
    return op.ptr, op.itemsize


def scale_arg(x, role: str) -> tuple:
    """The FP8 scale `x` as a launch argument (value, address): a Python or numpy number
    (finite and > 0 in fp32) -> (its fp32 value, 0); an fp32 array of shape () or (1,),
    on the device or the host, -> (1.0, its address), read at run time, so a graph replay
    sees the value it holds then; None -> (1.0, 0). ValueError(f"{role}: ...") otherwise."""
    if x is None:
        return 1.0, 0
    if isinstance(x, bool):
        raise ValueError(f"{role}: must be a number > 0 or an fp32 scalar array, got a bool")
    if isinstance(x, numbers.Real):
        try:
            with np.errstate(over="ignore"):
                v = float(np.float32(x))
        except OverflowError:  # an int past float64's range
            v = math.inf
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{role}: must be finite and > 0 in fp32, got {repr(x)[:40]}")
        return v, 0
    try:
        op = describe(x, role)
    except TypeError as e:
        raise ValueError(f"{role}: must be a number > 0 or an fp32 scalar array, got "
                         f"{type(x).__name__}") from e
    if op.dtype != "float32" or tuple(op.shape) not in ((), (1,)):
        raise ValueError(f"{role}: an array scale must be float32 of shape () or (1,), got "
                         f"{_dtype_name(op)} {list(op.shape)}")
    if op.ptr % 4:
        raise ValueError(f"{role}: data must be 4-byte aligned")
    return 1.0, op.ptr
