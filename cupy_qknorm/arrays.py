"""Zero-copy views of the caller's arrays: pointer, shape, row stride, dtype and device.

Accepted: cupy and numpy arrays, and any producer of __cuda_array_interface__ (torch,
numba, JAX on GPU). bf16 data is held as uint16 bit patterns (or numpy's "bfloat16" from
ml_dtypes). Every check happens here, before anything is launched or written.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

_TYPESTR = {"<f4": "float32", "<f2": "float16", "<u2": "bfloat16"}


_NAMES: dict = {}


def dtype_name(dt) -> str | None:
    """numpy/cupy dtype -> our dtype name; uint16 stands for bf16 bit patterns."""
    name = _NAMES.get(dt, False)
    if name is False:
        d = np.dtype(dt)
        name = {"float32": "float32", "float16": "float16", "uint16": "bfloat16",
                "bfloat16": "bfloat16"}.get(d.name)
        _NAMES[dt] = name
    return name


def _cupy_ndarray():
    global _CUPY_NDARRAY
    if _CUPY_NDARRAY is None:
        try:
            import cupy
            _CUPY_NDARRAY = cupy.ndarray
        except ImportError:
            _CUPY_NDARRAY = type(None)
    return _CUPY_NDARRAY


_CUPY_NDARRAY = None


class Operand(NamedTuple):
    obj: object
    ptr: int
    shape: tuple
    strides: tuple       # bytes
    dtype: str | None
    itemsize: int
    device: int | None   # None: host memory


def describe(x, role: str) -> Operand:
    if type(x) is _cupy_ndarray():
        mem, dt = x.data, x.dtype
        return Operand(x, mem.ptr, x.shape, x.strides, dtype_name(dt), dt.itemsize,
                       mem.device_id)
    if isinstance(x, np.ndarray):
        return Operand(x, x.ctypes.data, x.shape, x.strides, dtype_name(x.dtype),
                       x.dtype.itemsize, None)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        import cupy
        shape = tuple(cai["shape"])
        item = int(cai["typestr"][2:])
        strides = cai.get("strides")
        if strides is None:  # C-contiguous
            strides, acc = [], item
            for d in reversed(shape):
                strides.insert(0, acc)
                acc *= d
        ptr = int(cai["data"][0])
        dev = cupy.cuda.runtime.pointerGetAttributes(ptr).device if ptr else None
        return Operand(x, ptr, shape, tuple(strides), _TYPESTR.get(cai["typestr"]), item, dev)
    raise TypeError(f"{role}: expected a cupy or numpy array or a __cuda_array_interface__ "
                    f"producer, got {type(x).__name__}")


def cupy_signature(arrs):
    """(key, pointers) of a tuple of CuPy arrays, or (None, None) if any is not one.

    The key holds everything validation looks at (shape, strides, dtype, device, address
    modulo 16), so a key seen before needs no validation again."""
    cls = _cupy_ndarray()
    key, ptrs = [], []
    for x in arrs:
        if type(x) is not cls:
            return None, None
        mem = x.data
        p = mem.ptr
        ptrs.append(p)
        key += (x.shape, x.strides, x.dtype, mem.device_id, p & 15)
    return tuple(key), ptrs


class Plan(NamedTuple):
    """What a launch needs besides the pointers, derived from validated operands."""
    tokens: int
    weight_dtype: str
    strides: tuple   # elements between rows of q, k, q_out, k_out
    itemsize: int

    @classmethod
    def of(cls, ops):
        q, k, qw, _, qo, ko = ops
        return cls(q.shape[0], qw.dtype, tuple(row_stride(op) for op in (q, k, qo, ko)),
                   q.itemsize)


def check_rows(op: Operand, role: str, width: int, dtype: str):
    """A [T, width] matrix of `dtype`: last dim contiguous, rows 16-byte aligned."""
    if op.dtype != dtype:
        raise TypeError(f"{role}: dtype must be {dtype} (bf16 as uint16 bits), got "
                        f"{getattr(op.obj, 'dtype', op.dtype)}")
    if len(op.shape) != 2 or op.shape[1] != width:
        raise ValueError(f"{role}: shape must be [T, {width}], got {list(op.shape)}")
    rows = op.shape[0]
    if rows == 0:
        return  # nothing is read or written
    if width > 1 and op.strides[1] != op.itemsize:
        raise ValueError(f"{role}: the last dim must be contiguous (stride {op.strides[1]} "
                         f"bytes, expected {op.itemsize})")
    if rows > 1 and (op.strides[0] % 16 or op.strides[0] < width * op.itemsize):
        raise ValueError(f"{role}: row stride of {op.strides[0]} bytes must be a multiple of "
                         f"16 and at least one row ({width * op.itemsize} bytes)")
    if op.ptr % 16:
        raise ValueError(f"{role}: data must be 16-byte aligned (address % 16 = {op.ptr % 16})")


def check_weight(op: Operand, role: str, width: int, dtype: str):
    if op.dtype not in (dtype, "float32"):
        raise TypeError(f"{role}: dtype must be {dtype} or float32, got "
                        f"{getattr(op.obj, 'dtype', op.dtype)}")
    if len(op.shape) != 1 or op.shape[0] != width:
        raise ValueError(f"{role}: shape must be [{width}], got {list(op.shape)}")
    if width > 1 and op.strides[0] != op.itemsize:
        raise ValueError(f"{role}: must be contiguous")
    if op.ptr % 16:
        raise ValueError(f"{role}: data must be 16-byte aligned (address % 16 = {op.ptr % 16})")


def row_stride(op: Operand) -> int:
    """Elements between rows (any value for a single row)."""
    return op.strides[0] // op.itemsize if op.shape[0] > 1 else op.shape[1]
