"""arrays.py: zero-copy views of the caller's arrays (numpy, DLPack, the CUDA array
interface) and the overlap rules of outputs. CPU only."""
import numpy as np
import pytest

from cupy_qknorm.arrays import describe, dlpack_view, overlap, same_view


def op(a, role="x"):
    return describe(a, role)


def test_overlap_of_plain_slices():
    buf = np.zeros((8, 64), np.float32)
    assert overlap(op(buf[:4]), op(buf[3:]))
    assert not overlap(op(buf[:4]), op(buf[4:]))             # adjacent rows
    assert overlap(op(buf[:-1]), op(buf[1:]))                # shifted by one row
    assert overlap(op(buf), op(buf)) and same_view(op(buf), op(buf))
    assert not same_view(op(buf[:-1]), op(buf[1:]))
    assert not same_view(op(buf[:4]), op(buf[:4, :32]))      # same start, other shape
    flat = np.zeros(256, np.float32)
    assert overlap(op(flat[:64]), op(flat[63:127])) and not overlap(op(flat[:64]), op(flat[64:]))


def test_views_interleaved_in_one_qkv_buffer_do_not_overlap():
    qkv = np.zeros((6, 64 + 32 + 32), np.float32)  # rows of [q | k | v]
    q, k, v = qkv[:, :64], qkv[:, 64:96], qkv[:, 96:]
    assert not overlap(op(q), op(k)) and not overlap(op(k), op(v)) and not overlap(op(q), op(v))
    assert overlap(op(q), op(qkv[:, 60:68]))                 # straddles q and k
    assert overlap(op(qkv[1:, :64]), op(qkv[:-1, 32:96]))    # other rows, same bytes
    assert not overlap(op(qkv[1:, :64]), op(qkv[:, 100:]))   # other rows, other columns
    # equal strides, b's rows start inside a's period but past a's row: no byte shared
    assert not overlap(op(qkv[1:, :32]), op(qkv[:-1, 64:96]))


def test_strides_differ_is_judged_by_extent():
    buf = np.zeros(4096, np.float32)
    a = buf[:2048].reshape(16, 128)[:, :64]   # row stride 512 bytes
    b = buf[:2048].reshape(32, 64)[:, :32]    # row stride 256 bytes, inside a's extent
    assert overlap(op(a), op(b))
    c = buf[2048:].reshape(32, 64)[:, :32]
    assert not overlap(op(a), op(c))


def test_empty_operands_never_overlap():
    buf = np.zeros((4, 64), np.float32)
    assert not overlap(op(buf[:0]), op(buf)) and not overlap(op(buf), op(buf[:, :0]))


class DLPackOnly:
    """A producer that offers only the DLPack protocol (as torch or JAX tensors do)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, stream=None, **kw):
        assert stream is None, "a host tensor must be exported with stream=None"
        return self._a.__dlpack__(stream=stream, **kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class BothProtocols(DLPackOnly):
    """DLPack plus a __cuda_array_interface__ that names a dtype of its own, as torch
    does for bfloat16 ("<f2", float16's typestr, in some versions)."""

    def __init__(self, a, typestr="<f2", read_only=False, export_error=None):
        super().__init__(a)
        self.typestr, self.read_only, self.export_error = typestr, read_only, export_error

    def __dlpack__(self, stream=None, **kw):
        if self.export_error is not None:
            raise self.export_error
        return super().__dlpack__(stream=stream, **kw)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self._a.shape, "typestr": self.typestr, "strides": None,
                "data": (0, self.read_only), "version": 3}


def test_dlpack_view_reads_the_capsule():
    a = np.zeros((5, 24), np.float32)[1:, :16]  # offset start, strided rows
    assert dlpack_view(a) == (a.ctypes.data, (4, 16), (96, 4), "float32", 4, (1, 0))
    b = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert dlpack_view(b)[1:5] == ((3, 4), (8, 2), "bfloat16", 2)  # uint16 holds bf16 bits
    assert dlpack_view(np.zeros(3, np.float64))[3] is None
    assert dlpack_view(np.zeros(3, np.int64))[3] == "int64"


def test_describe_numpy():
    a = np.zeros((3, 16), np.float16)
    d = describe(a, "q")
    assert (d.ptr, d.shape, d.strides, d.dtype, d.itemsize, d.device, d.writable) == \
        (a.ctypes.data, (3, 16), (32, 2), "float16", 2, None, True)
    a.flags.writeable = False
    assert not describe(a, "q").writable
    assert describe(np.zeros(2, np.float64), "q").dtype is None


def test_dlpack_dtype_wins_over_the_array_interface_typestr():
    bits = np.zeros((3, 16), np.uint16)  # bf16 bit patterns; the interface says float16
    d = describe(BothProtocols(bits), "q")
    assert (d.dtype, d.shape, d.ptr) == ("bfloat16", (3, 16), bits.ctypes.data)
    assert d.writable
    assert not describe(BothProtocols(bits, read_only=True), "q_out").writable


def test_array_interface_is_the_fallback_when_the_dlpack_export_fails():
    pytest.importorskip("cupy")
    a = np.zeros((0, 16), np.float32)
    for error in (BufferError("no"), RuntimeError("XlaRuntimeError is one")):
        d = describe(BothProtocols(a, "<f4", export_error=error), "q")
        assert (d.dtype, d.shape, d.ptr, d.device) == ("float32", (0, 16), 0, None)


def test_not_an_array_is_a_type_error():
    with pytest.raises(TypeError, match="q: expected a cupy or numpy array"):
        describe([[1.0]], "q")

    class Broken(DLPackOnly):
        def __dlpack__(self, stream=None, **kw):
            raise BufferError("cannot export")
    with pytest.raises(TypeError, match="k: its DLPack export failed: cannot export"):
        describe(Broken(np.zeros(4, np.float32)), "k")
