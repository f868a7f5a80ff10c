"""Zero-copy views of the caller's arrays: pointer, shape, row stride, dtype and device.

Accepted: cupy and numpy arrays, any producer of __cuda_array_interface__ (numba, torch),
and any DLPack producer (__dlpack__ and __dlpack_device__: torch, JAX, ...), which is how
torch's bfloat16 tensors come in. bf16 data is held as uint16 bit patterns (or numpy's
"bfloat16" from ml_dtypes), or as a DLPack bfloat16 tensor. Every check happens here,
before anything is launched or written.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from .params import MAX_CALL_TOKENS

_TYPESTR = {"<f4": "float32", "<f2": "float16", "<u2": "bfloat16", "<i4": "int32",
            "<i8": "int64"}


_NAMES: dict = {}


def dtype_name(dt) -> str | None:
    """numpy/cupy dtype -> our dtype name; uint16 stands for bf16 bit patterns."""
    name = _NAMES.get(dt, False)
    if name is False:
        d = np.dtype(dt)
        name = {"float32": "float32", "float16": "float16", "uint16": "bfloat16",
                "bfloat16": "bfloat16", "int32": "int32", "int64": "int64"}.get(d.name)
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
    writable: bool = True  # False where the producer says read-only


def describe(x, role: str) -> Operand:
    if type(x) is _cupy_ndarray():
        mem, dt = x.data, x.dtype
        return Operand(x, mem.ptr, x.shape, x.strides, dtype_name(dt), dt.itemsize,
                       mem.device_id)
    if isinstance(x, np.ndarray):
        return Operand(x, x.ctypes.data, x.shape, x.strides, dtype_name(x.dtype),
                       x.dtype.itemsize, None, bool(x.flags.writeable))
    # DLPack first where both are offered: its dtype codes tell bfloat16 from float16,
    # while __cuda_array_interface__ has no bf16 typestr (torch has exported bf16 as "<f2",
    # float16's, and later as "<V2"). The interface is the fallback when the export fails.
    dlpack_error = None
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        try:
            op = _describe_dlpack(x, role)
        except _ExportFailed as e:
            dlpack_error = e.error
        else:  # DLPack has no read-only flag: take the interface's where it has one
            try:
                read_only = bool(x.__cuda_array_interface__["data"][1])
            except Exception:  # noqa: BLE001 - no interface, or none for this dtype
                read_only = False
            return op._replace(writable=op.writable and not read_only)
    try:
        cai = x.__cuda_array_interface__
    except (AttributeError, TypeError):  # torch raises TypeError for some dtypes
        cai = None
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
        return Operand(x, ptr, shape, tuple(strides), _TYPESTR.get(cai["typestr"]), item, dev,
                       not cai["data"][1])
    if dlpack_error is not None:
        raise TypeError(f"{role}: its DLPack export failed: {dlpack_error}") from dlpack_error
    raise TypeError(f"{role}: expected a cupy or numpy array, a __cuda_array_interface__ "
                    f"producer or a DLPack producer, got {type(x).__name__}")


# DLPack (dlpack.h): the structures a "dltensor" capsule points to.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
_DL_TYPES = {(1, 16): "bfloat16", (4, 16): "bfloat16", (2, 16): "float16", (2, 32): "float32",
             (0, 32): "int32", (0, 64): "int64"}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def dlpack_view(x):
    """(data address, shape, strides in bytes, dtype name or None, itemsize, (device type,
    device id)) of a DLPack producer, without taking ownership: the capsule is left
    unconsumed, so it releases its own reference when dropped, while `x` (which the caller
    keeps) owns the memory. No synchronization is asked of the producer (stream -1 for CUDA);
    order the producer's work before the call as for any other input."""
    dev_type, dev_id = (int(v) for v in x.__dlpack_device__())
    stream = -1 if dev_type in (_DL_CUDA, _DL_CUDA_MANAGED) else None
    capsule = x.__dlpack__(stream=stream)
    t = _DLTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
    shape = tuple(t.shape[i] for i in range(t.ndim))
    item = max(1, t.dtype.bits // 8)
    if t.strides:
        strides = tuple(t.strides[i] * item for i in range(t.ndim))
    else:  # C-contiguous
        strides, acc = [], item
        for d in reversed(shape):
            strides.insert(0, acc)
            acc *= d
        strides = tuple(strides)
    name = _DL_TYPES.get((t.dtype.code, t.dtype.bits)) if t.dtype.lanes == 1 else None
    ptr = (t.data or 0) + t.byte_offset
    del capsule
    return ptr, shape, strides, name, item, (dev_type, dev_id)


class _ExportFailed(Exception):
    """The producer's __dlpack__ or __dlpack_device__ raised: try another protocol."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _describe_dlpack(x, role):
    try:
        ptr, shape, strides, name, item, (dev_type, dev_id) = dlpack_view(x)
    except (TypeError, ValueError, BufferError, AttributeError, RuntimeError) as e:
        raise _ExportFailed(e) from e  # e.g. JAX's XlaRuntimeError, torch's requires_grad
    if dev_type == _DL_CPU:  # the host path computes with numpy: view it as numpy
        try:
            host = np.from_dlpack(x)
        except (TypeError, ValueError, BufferError, RuntimeError) as e:
            raise TypeError(f"{role}: numpy cannot view this host tensor ({e}); pass "
                            f"bfloat16 in host memory as uint16 bits") from e
        return describe(host, role)
    if dev_type not in (_DL_CUDA, _DL_CUDA_MANAGED):
        raise TypeError(f"{role}: DLPack device type {dev_type} is neither CPU nor CUDA")
    return Operand(x, ptr, shape, strides, name, item, dev_id)


class Plan(NamedTuple):
    """What a launch needs besides the pointers, derived from validated operands."""
    tokens: int
    weight_dtype: str
    strides: tuple       # elements between rows of q, k, q_out, k_out
    itemsize: int
    position_bytes: int  # 4 or 8 with RoPE, else 0

    @classmethod
    def of(cls, ops):
        q, k, qw, _, qo, ko, pos = ops
        return cls(q.shape[0], qw.dtype, tuple(row_stride(op) for op in (q, k, qo, ko)),
                   q.itemsize, pos.itemsize if pos is not None else 0)

    @staticmethod
    def pointers(ops):
        """The launch's addresses: q, k, q_weight, k_weight, q_out, k_out, positions."""
        return [op.ptr if op is not None else 0 for op in ops]


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


def check_token_vector(op: Operand, role: str, tokens: int, got, one: str,
                       dtype_error=TypeError):
    """A vector of one int32 or int64 per token (RoPE positions, KV-cache slots): [T],
    contiguous, aligned. `got`: the dtype the message names; `one`: what each entry is
    ("one per token"); `dtype_error`: the exception a wrong dtype raises."""
    if op.dtype not in ("int32", "int64"):
        raise dtype_error(f"{role}: dtype must be int32 or int64, got {got}")
    if len(op.shape) != 1 or op.shape[0] != tokens:
        raise ValueError(f"{role}: shape must be [{tokens}] ({one}), got {list(op.shape)}")
    if tokens > 1 and op.strides[0] != op.itemsize:
        raise ValueError(f"{role}: must be contiguous")
    if tokens and op.ptr % op.itemsize:
        raise ValueError(f"{role}: data must be {op.itemsize}-byte aligned")


def check_positions(op: Operand, tokens: int):
    """RoPE positions: [T] int32 or int64, contiguous."""
    check_token_vector(op, "positions", tokens, getattr(op.obj, "dtype", op.dtype),
                       "one per token")


def check_weights(q_weight: Operand, k_weight: Operand, dq: int, dk: int, dtype: str):
    """q's and k's weights: their slices' widths, the data dtype or float32, one dtype."""
    check_weight(q_weight, "q_weight", dq, dtype)
    check_weight(k_weight, "k_weight", dk, dtype)
    if q_weight.dtype != k_weight.dtype:
        raise TypeError(f"q_weight and k_weight must have one dtype, got {q_weight.dtype} "
                        f"and {k_weight.dtype}")


def check_call_tokens(tokens: int):
    """A call's T: at most MAX_CALL_TOKENS (the unfused path's header carries it in fp32)."""
    if tokens > MAX_CALL_TOKENS:
        raise ValueError(f"q has {tokens} rows; a call takes at most {MAX_CALL_TOKENS} "
                         f"(make several calls)")


def _span(op: Operand):
    """(first byte, end byte, row stride in bytes, row bytes) of a 1-D or 2-D operand."""
    if not op.shape or 0 in op.shape:
        return None
    width = op.shape[-1] * op.itemsize
    rows = op.shape[0] if len(op.shape) == 2 else 1
    stride = op.strides[0] if len(op.shape) == 2 and rows > 1 else width
    return op.ptr, op.ptr + (rows - 1) * stride + width, stride, width


def extent(op: Operand):
    """(first byte, end byte) of a 1-D or 2-D operand, or None where it is empty."""
    span = _span(op)
    return None if span is None else span[:2]


def overlap(a: Operand, b: Operand) -> bool:
    """Whether two row-major operands share a byte. Exact for equal row strides (views
    into one fused qkv buffer interleave without touching); otherwise by their extents."""
    sa, sb = _span(a), _span(b)
    if sa is None or sb is None or sa[1] <= sb[0] or sb[1] <= sa[0]:
        return False
    if sa[2] != sb[2]:
        return True
    stride = sa[2]
    d = (sb[0] - sa[0]) % stride  # b's row start within a's period
    return d < sa[3] or d + sb[3] > stride


def same_view(a: Operand, b: Operand) -> bool:
    return a.ptr == b.ptr and a.shape == b.shape and a.strides == b.strides
