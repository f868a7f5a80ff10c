"""XLA's FFI C API (xla/ffi/api/c_api.h) through ctypes: the call frame a handler receives,
the metadata handshake, the stream, attributes, buffers and errors. No JAX import: JAX
registers the handler this module makes (cupy_qknorm.jax does that).

A handler is one C function, XLA_FFI_Error* handler(XLA_FFI_CallFrame*), called:
- once with a metadata extension in the frame (the handshake): it states the FFI API
  version it was written against and its traits (whether XLA may capture its calls in a
  command buffer, i.e. a CUDA graph) and returns;
- at each execution (stage EXECUTE) with the argument and result buffers, the attributes
  and an execution context (the stream on a GPU). It returns NULL or an XLA_FFI_Error,
  which XLA raises in the caller as a runtime error carrying the message.
A ctypes CFUNCTYPE takes the GIL for its Python body, whatever thread XLA calls it on.
"""
from __future__ import annotations

import ctypes
import struct
from typing import NamedTuple

import numpy as np

API_MAJOR, API_MINOR = 0, 1  # the version of c_api.h this layout follows (fields used here)
STAGE_EXECUTE = 3
EXTENSION_METADATA = 1
COMMAND_BUFFER_COMPATIBLE = 1
ATTR_SCALAR = 3

# XLA_FFI_DataType -> numpy dtype of the bits (bf16 as uint16 bit patterns, FP8 E4M3 (fn)
# as uint8 bit patterns)
DTYPES = {16: np.dtype(np.uint16), 7: np.dtype(np.uint16), 10: np.dtype(np.float16), 11: np.dtype(np.float32),
          4: np.dtype(np.int32), 5: np.dtype(np.int64), 6: np.dtype(np.uint8),
          20: np.dtype(np.uint8)}
# XLA_FFI_Error_Code
INVALID_ARGUMENT, DEADLINE_EXCEEDED, FAILED_PRECONDITION, INTERNAL = 3, 4, 9, 13

_p = ctypes.c_void_p


class ExtensionBase(ctypes.Structure):
    pass


ExtensionBase._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                          ("next", ctypes.POINTER(ExtensionBase))]


class ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class Metadata(ctypes.Structure):
    # newer headers append fields (state_type_id): struct_size says how many XLA has
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", ApiVersion),
                ("traits", ctypes.c_uint32)]


class MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", ExtensionBase), ("metadata", ctypes.POINTER(Metadata))]


class ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


class StreamGetArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _p), ("ctx", _p),
                ("stream", _p)]


_ERROR_CREATE = ctypes.CFUNCTYPE(_p, ctypes.POINTER(ErrorCreateArgs))
_STREAM_GET = ctypes.CFUNCTYPE(_p, ctypes.POINTER(StreamGetArgs))


class Api(ctypes.Structure):
    """The head of XLA_FFI_Api: the function table's first five entries, whose order the
    API keeps across minor versions."""
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _p),
                ("api_version", ApiVersion), ("internal_api", _p),
                ("error_create", _ERROR_CREATE), ("error_get_message", _p),
                ("error_destroy", _p), ("handler_register", _p),
                ("stream_get", _STREAM_GET)]


class Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _p),
                ("dtype", ctypes.c_int), ("data", _p), ("rank", ctypes.c_int64),
                ("dims", ctypes.POINTER(ctypes.c_int64))]


class _List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("items", ctypes.POINTER(_p))]


class ByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.POINTER(ctypes.c_char)), ("len", ctypes.c_size_t)]


class Scalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", _p)]


class Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("names", ctypes.POINTER(ctypes.POINTER(ByteSpan))),
                ("attrs", ctypes.POINTER(_p))]


class CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("extension_start", ctypes.POINTER(ExtensionBase)),
                ("api", ctypes.POINTER(Api)), ("ctx", _p), ("stage", ctypes.c_int),
                ("args", _List), ("rets", _List), ("attrs", Attrs), ("future", _p)]


# the layout on a 64-bit host, field by field as c_api.h places them
assert ctypes.sizeof(Buffer) == 48 and ctypes.sizeof(_List) == 40
assert CallFrame.args.offset == 40 and CallFrame.rets.offset == 80
assert CallFrame.attrs.offset == 120 and CallFrame.future.offset == 168
assert Api.stream_get.offset == 80 and Metadata.traits.offset == 32

# A handler receives the frame's address; its fields are read with struct straight from
# memory: _MEMORY is a read-only byte view of the whole address space (no copy, no foreign
# call: a field costs one unpack_from), read only at the addresses XLA hands over.
HANDLER = ctypes.CFUNCTYPE(_p, _p)
_MEMORY = memoryview((ctypes.c_char * (1 << 62)).from_address(0)).cast("B").toreadonly()
_HEAD = struct.Struct("<QQQi")      # extension_start, api, ctx, stage (from offset 8)
_LIST = struct.Struct("<q8xQ")      # size, (types), items of XLA_FFI_Args/Rets (from +16)
_ATTRS = struct.Struct("<qQQQ")     # size, types, names, attrs (from +16)
_BUFFER = struct.Struct("<i4xQqQ")  # dtype, data, rank, dims (from offset 16)
_SPAN = struct.Struct("<QQ")
_SCALAR = struct.Struct("<i4xQ")
_VALUES = {4: struct.Struct("<i"), 5: struct.Struct("<q"), 11: struct.Struct("<f")}
_ARGS, _RETS, _ATTRS_AT = (CallFrame.args.offset + 16, CallFrame.rets.offset + 16,
                           CallFrame.attrs.offset + 16)


class Frame(NamedTuple):
    """What a call reads of its XLA_FFI_CallFrame."""
    address: int
    extensions: int
    api: int
    ctx: int
    stage: int


def frame_at(address: int) -> Frame:
    return Frame(address, *_HEAD.unpack_from(_MEMORY, address + 8))


class Array(NamedTuple):
    """A buffer of the call: its address, shape and numpy dtype (None: not one of ours)."""
    ptr: int
    shape: tuple
    dtype: np.dtype | None


def _buffers(at: int) -> list:
    n, items = _LIST.unpack_from(_MEMORY, at)
    out = []
    if n > 0:
        for b in struct.unpack_from(f"<{n}Q", _MEMORY, items):
            dtype, data, rank, dims = _BUFFER.unpack_from(_MEMORY, b + 16)
            shape = struct.unpack_from(f"<{rank}q", _MEMORY, dims) if rank > 0 else ()
            out.append(Array(data, shape, DTYPES.get(dtype)))
    return out


def args(frame: Frame) -> list:
    return _buffers(frame.address + _ARGS)


def rets(frame: Frame) -> list:
    return _buffers(frame.address + _RETS)


def scalar_attrs(frame: Frame) -> dict:
    """The call's int32, int64 and float32 scalar attributes by name (Python ints and
    floats)."""
    n, types, names, values = _ATTRS.unpack_from(_MEMORY, frame.address + _ATTRS_AT)
    out = {}
    if n <= 0:
        return out
    kinds = struct.unpack_from(f"<{n}i", _MEMORY, types)
    names = struct.unpack_from(f"<{n}Q", _MEMORY, names)
    values = struct.unpack_from(f"<{n}Q", _MEMORY, values)
    for kind, name, value in zip(kinds, names, values):
        if kind != ATTR_SCALAR:
            continue
        dtype, at = _SCALAR.unpack_from(_MEMORY, value)
        v = _VALUES.get(dtype)
        if v is not None:
            text, length = _SPAN.unpack_from(_MEMORY, name)
            out[bytes(_MEMORY[text:text + length]).decode()] = v.unpack_from(_MEMORY, at)[0]
    return out


def handshake(frame: Frame, traits: int) -> bool:
    """Answer XLA's metadata query if this call is one (True), else False."""
    ext = ctypes.cast(frame.extensions, ctypes.POINTER(ExtensionBase))
    while ext:
        if ext.contents.type == EXTENSION_METADATA:
            meta = ctypes.cast(ext, ctypes.POINTER(MetadataExtension)).contents.metadata
            if meta:
                m = meta.contents
                m.api_version.struct_size = ctypes.sizeof(ApiVersion)
                m.api_version.major_version = API_MAJOR
                m.api_version.minor_version = API_MINOR
                m.traits = traits
            return True
        ext = ext.contents.next
    return False


_APIS: dict = {}  # XLA_FFI_Api address -> (XLA_FFI_Stream_Get, XLA_FFI_Error_Create)


def _api(address: int) -> tuple:
    fns = _APIS.get(address)
    if fns is None:
        api = Api.from_address(address)
        fns = _APIS[address] = (api.stream_get, api.error_create)
    return fns


def stream(frame: Frame) -> int:
    """The platform stream of this execution (a CUstream on CUDA), or 0."""
    args = StreamGetArgs(ctypes.sizeof(StreamGetArgs), None, frame.ctx, None)
    if _api(frame.api)[0](ctypes.byref(args)):
        raise RuntimeError("XLA_FFI_Stream_Get failed")
    return args.stream or 0


def error(frame: Frame, code: int, message: str) -> int:
    """An XLA_FFI_Error* carrying `message` (XLA copies it and owns the error)."""
    text = message.encode(errors="replace")
    args = ErrorCreateArgs(ctypes.sizeof(ErrorCreateArgs), None, text, code)
    return _api(frame.api)[1](ctypes.byref(args))


def host_array(a: Array) -> np.ndarray:
    """A numpy view of a host buffer (writable)."""
    n = int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize
    if n == 0 or not a.ptr:
        return np.empty(a.shape, a.dtype)
    return np.frombuffer((ctypes.c_char * n).from_address(a.ptr), a.dtype).reshape(a.shape)
