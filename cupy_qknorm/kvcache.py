"""Stand-in of the KV cache's configuration and per-call views (the host half replaces it)."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from .arrays import describe

CACHE_FP8 = "float8_e4m3fn"
FP8_MAX = 448.0
_DATA = ("bfloat16", "float16", "float32")


class KVCache:
    def __init__(self, block_size: int, head_dim: int = 128, dtype: str | None = None):
        for name, v in (("block_size", block_size), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {v!r}")
        if dtype is not None and dtype not in _DATA + (CACHE_FP8,):
            raise ValueError(f"KVCache: dtype must be None, one of {list(_DATA)} or "
                             f"{CACHE_FP8!r}, got {dtype!r}")
        object.__setattr__(self, "block_size", int(block_size))
        object.__setattr__(self, "head_dim", int(head_dim))
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, *_):
        raise AttributeError("KVCache is immutable")

    def __eq__(self, o):
        return isinstance(o, KVCache) and self.key() == o.key()

    def __hash__(self):
        return hash(self.key())

    def key(self):
        return (self.block_size, self.head_dim, self.dtype)

    def __repr__(self):
        return f"KVCache(block_size={self.block_size}, head_dim={self.head_dim}, dtype={self.dtype!r})"

    def cache_dtype(self, data_dtype: str) -> str:
        return data_dtype if self.dtype is None else self.dtype

    def storage_dtype(self, data_dtype: str) -> np.dtype:
        d = self.cache_dtype(data_dtype)
        return np.dtype({"bfloat16": np.uint16, CACHE_FP8: np.uint8}.get(d, d))

    def kv_heads(self, k_local: int) -> int:
        if k_local % self.head_dim:
            raise ValueError(f"KVCache: k's local width {k_local} is not a whole number of "
                             f"heads of {self.head_dim}")
        return k_local // self.head_dim


class CacheView(NamedTuple):
    ptr: int
    num_blocks: int
    block_size: int
    heads: int
    head_dim: int
    strides: tuple

    @property
    def slots(self) -> int:
        return self.num_blocks * self.block_size


def cache_view(arr, role, kv, heads, data_dtype) -> CacheView:
    op = describe(arr, role)
    want = kv.storage_dtype(data_dtype)
    dt = getattr(arr, "dtype", None)
    if dt is None or np.dtype(dt) != want:
        raise ValueError(f"{role}: dtype must be {want}, got {dt}")
    shape, item = tuple(op.shape), op.itemsize
    st = tuple(s // item for s in op.strides)
    if len(shape) == 3 and kv.block_size == 1:
        shape, st = (shape[0], 1) + shape[1:], (st[0], 0) + st[1:]
    if len(shape) != 4 or shape[1:] != (kv.block_size, heads, kv.head_dim):
        raise ValueError(f"{role}: shape must be [blocks, {kv.block_size}, {heads}, "
                         f"{kv.head_dim}], got {list(op.shape)}")
    if shape[0] == 0:
        raise ValueError(f"{role}: the cache is empty")
    if st[3] != 1:
        raise ValueError(f"{role}: head_dim axis must be contiguous")
    if any(s < 0 for s in st):
        raise ValueError(f"{role}: negative strides")
    if any(s * item % 16 for s in st[:3]) or op.ptr % 16:
        raise ValueError(f"{role}: rows must be 16-byte aligned")
    return CacheView(op.ptr, shape[0], kv.block_size, heads, kv.head_dim, st[:3])


def slot_view(arr, tokens):
    op = describe(arr, "slot_mapping")
    if op.dtype not in ("int32", "int64"):
        raise ValueError(f"slot_mapping: dtype must be int32 or int64, got {op.dtype}")
    if len(op.shape) != 1 or op.shape[0] != tokens:
        raise ValueError(f"slot_mapping: shape must be [{tokens}], got {list(op.shape)}")
    if tokens > 1 and op.strides[0] != op.itemsize:
        raise ValueError("slot_mapping: must be contiguous")
    return op.ptr, op.itemsize


def scale_arg(x, role):
    if x is None:
        return 1.0, 0
    if isinstance(x, (float, int, np.floating)) and not isinstance(x, bool):
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"{role}: must be finite and > 0, got {x!r}")
        return float(x), 0
    op = describe(x, role)
    if op.dtype != "float32" or tuple(op.shape) not in ((), (1,)):
        raise ValueError(f"{role}: a float or an fp32 array of shape () or (1,)")
    return 1.0, op.ptr
