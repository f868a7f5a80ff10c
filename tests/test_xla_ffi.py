"""cupy_qknorm.xla_ffi without JAX: a call frame laid out as XLA's FFI C API lays it out
(xla/ffi/api/c_api.h), read back field by field; the metadata handshake through an
extension chain."""
import ctypes

import numpy as np

from cupy_qknorm import xla_ffi as x


def frame_of(shapes, dtypes, n_args, attrs, ptrs=None):
    """A CallFrame with buffers of `shapes`/`dtypes` (the first n_args arguments, the rest
    results; at `ptrs`, else at made-up addresses) and scalar attributes
    {name: (xla dtype, value)}; returns (frame, keep)."""
    keep = []
    bufs = []
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        dims = (ctypes.c_int64 * max(1, len(shape)))(*shape)
        ptr = 0x10000 * (i + 1) if ptrs is None else ptrs[i]
        b = x.Buffer(ctypes.sizeof(x.Buffer), None, dt, ptr, len(shape), dims)
        keep += [dims, b]
        bufs.append(ctypes.addressof(b))
    args = (ctypes.c_void_p * n_args)(*bufs[:n_args])
    rets = (ctypes.c_void_p * (len(bufs) - n_args))(*bufs[n_args:])
    kinds, names, values = [], [], []
    for name, (dt, v) in sorted(attrs.items()):
        val = {4: ctypes.c_int32, 5: ctypes.c_int64, 11: ctypes.c_float}[dt](v)
        s = x.Scalar(dt, ctypes.addressof(val))
        text = ctypes.create_string_buffer(name.encode())
        span = x.ByteSpan(ctypes.cast(text, ctypes.POINTER(ctypes.c_char)), len(name))
        keep += [val, s, text, span]
        kinds.append(x.ATTR_SCALAR)
        names.append(ctypes.pointer(span))
        values.append(ctypes.addressof(s))
    n = len(attrs)
    table = ((ctypes.c_int * n)(*kinds), (ctypes.POINTER(x.ByteSpan) * n)(*names),
             (ctypes.c_void_p * n)(*values))
    keep += [args, rets, *table]
    frame = x.CallFrame(ctypes.sizeof(x.CallFrame), None, None, 0x1234, x.STAGE_EXECUTE,
                        x._List(40, None, n_args, None, args),
                        x._List(40, None, len(bufs) - n_args, None, rets),
                        x.Attrs(48, None, n, *table), None)
    return frame, keep


def test_a_frame_reads_back_its_buffers_and_attributes():
    shapes = [(5, 256), (5, 128), (256,), (128,), (5,), (5, 256), (5, 128)]
    dtypes = [16, 16, 11, 11, 5, 16, 16]
    frame, _keep = frame_of(shapes, dtypes, 5, {"handle": (5, 2 ** 40 + 3), "tag": (4, -1),
                                                "k_scale": (11, 0.375)})
    f = x.frame_at(ctypes.addressof(frame))
    assert (f.extensions, f.ctx, f.stage) == (0, 0x1234, x.STAGE_EXECUTE)
    args, rets = x.args(f), x.rets(f)
    assert [a.shape for a in args + rets] == shapes
    assert [a.ptr for a in args + rets] == [0x10000 * (i + 1) for i in range(7)]
    assert [a.dtype for a in args] == [np.dtype(np.uint16)] * 2 + [np.dtype(np.float32)] * 2 \
        + [np.dtype(np.int64)]
    assert x.scalar_attrs(f) == {"handle": 2 ** 40 + 3, "tag": -1, "k_scale": 0.375}
    assert x.DTYPES[6] == x.DTYPES[20] == np.dtype(np.uint8)  # u8 and FP8 E4M3 (fn): bits


def test_handshake_finds_the_metadata_extension_down_the_chain():
    meta = x.Metadata(ctypes.sizeof(x.Metadata), x.ApiVersion(), 0)
    ext = x.MetadataExtension(x.ExtensionBase(ctypes.sizeof(x.MetadataExtension),
                                              x.EXTENSION_METADATA, None),
                              ctypes.pointer(meta))
    other = x.ExtensionBase(24, 999, ctypes.cast(ctypes.pointer(ext),
                                                 ctypes.POINTER(x.ExtensionBase)))
    frame, _keep = frame_of([], [], 0, {})
    f = x.frame_at(ctypes.addressof(frame))
    assert not x.handshake(f, x.COMMAND_BUFFER_COMPATIBLE)  # no extension: a real call
    frame.extension_start = ctypes.pointer(other)
    f = x.frame_at(ctypes.addressof(frame))
    assert x.handshake(f, x.COMMAND_BUFFER_COMPATIBLE)
    assert (meta.api_version.major_version, meta.api_version.minor_version,
            meta.traits) == (x.API_MAJOR, x.API_MINOR, x.COMMAND_BUFFER_COMPATIBLE)


def test_host_array_views_the_buffer():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    v = x.host_array(x.Array(a.ctypes.data, (3, 4), np.dtype(np.float32)))
    v[1, 2] = -1
    assert a[1, 2] == -1 and v.shape == (3, 4)
    assert x.host_array(x.Array(0, (0, 4), np.dtype(np.float32))).shape == (0, 4)
