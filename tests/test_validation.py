"""Validation and error messages, on one rank with numpy arrays (no GPU needed)."""
import numpy as np
import pytest
from mpi4py import MPI

from cupy_qknorm import ClosedError, TPQKNorm
from cupy_qknorm import reference as ref
from cupy_qknorm.compile import Spec
from cupy_qknorm.norm import check_config, choose_transport

Q, K = 256, 64


@pytest.fixture
def norm():
    n = TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi")
    yield n
    n.close()


def arrays(tokens=4, dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((tokens, Q)).astype(dtype)
    k = rng.standard_normal((tokens, K)).astype(dtype)
    return q, k, np.ones(Q, dtype), np.ones(K, dtype)


def test_single_rank_matches_reference(norm):
    q, k, qw, kw = arrays(9)
    qr, kr = ref.qk_norm(q, k, qw, kw, 1e-6)
    qo, ko = np.full_like(q, np.nan), np.full_like(k, np.nan)
    got = norm(q, k, qw, kw, out=(qo, ko))
    assert got[0] is qo and got[1] is ko
    assert ref.compare(qo, qr, "float32")[1] == 0
    assert ref.compare(ko, kr, "float32")[1] == 0
    norm(q, k, qw, kw)  # in place
    np.testing.assert_array_equal(q, qo)


BAD_INPUTS = [
    ("wrong q width", lambda q, k, qw, kw: (q[:, :Q - 4], k, qw, kw), ValueError, r"shape must be \[T, 256\]"),
    ("3-D q", lambda q, k, qw, kw: (q[None], k, qw, kw), ValueError, "shape must be"),
    ("wrong dtype", lambda q, k, qw, kw: (q.astype(np.float64), k, qw, kw), TypeError, "dtype must be float32"),
    ("non-contiguous last dim", lambda q, k, qw, kw: (np.zeros((4, 2 * Q), np.float32)[:, ::2], k, qw, kw), ValueError, "last dim must be contiguous"),
    ("misaligned row stride", lambda q, k, qw, kw: (np.zeros((4, Q + 1), np.float32)[:, :Q], k, qw, kw), ValueError, "multiple of 16"),
    ("misaligned data", lambda q, k, qw, kw: (np.zeros(4 * Q + 1, np.float32)[1:].reshape(4, Q), k, qw, kw), ValueError, "16-byte aligned"),
    ("weight of the wrong length", lambda q, k, qw, kw: (q, k, qw[:-4], kw), ValueError, r"q_weight: shape must be \[256\]"),
    ("weight of a third dtype", lambda q, k, qw, kw: (q, k, qw.astype(np.float16), kw), TypeError, "q_weight: dtype"),
    ("q and k with different T", lambda q, k, qw, kw: (q, k[:3], qw, kw), ValueError, "k has 3 rows but q has 4"),
    ("not an array", lambda q, k, qw, kw: (q.tolist(), k, qw, kw), TypeError, "expected a cupy or numpy array"),
]


@pytest.mark.parametrize("what,make,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_and_writes_nothing(norm, what, make, exc, match):
    q, k, qw, kw = arrays()
    args = make(q, k, qw, kw)
    qo, ko = np.full((4, Q), 7.0, np.float32), np.full((4, K), 7.0, np.float32)
    before = [a.copy() for a in args if isinstance(a, np.ndarray)]
    with pytest.raises(exc, match=match):
        norm(*args, out=(qo, ko))
    assert (qo == 7.0).all() and (ko == 7.0).all()
    for a, b in zip([a for a in args if isinstance(a, np.ndarray)], before):
        np.testing.assert_array_equal(a, b)


def test_bad_out(norm):
    q, k, qw, kw = arrays()
    with pytest.raises(TypeError, match="out must be a pair"):
        norm(q, k, qw, kw, out=q)
    with pytest.raises(ValueError, match=r"out\[1\] has 2 rows"):
        norm(q, k, qw, kw, out=(np.empty_like(q), np.empty((2, K), np.float32)))


def test_nan_inf_stay_in_their_row(norm):
    q, k, qw, kw = arrays(6)
    q[2, 5] = np.nan
    k[4, 0] = np.inf
    qr, kr = ref.qk_norm(q, k, qw, kw, 1e-6)
    norm(q, k, qw, kw)
    assert np.isnan(q[2]).all() and not np.isnan(np.delete(q, 2, axis=0)).any()
    assert ref.compare(q, qr, "float32")[1] == 0 and ref.compare(k, kr, "float32")[1] == 0


def test_zero_tokens_is_a_no_op(norm):
    q, k, qw, kw = arrays(0)
    assert norm(q, k, qw, kw)[0] is q


def test_use_after_close():
    n = TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi")
    n.close()
    n.close()  # idempotent
    with pytest.raises(ClosedError):
        n(*arrays())


def test_context_manager_closes():
    with TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi") as n:
        pass
    with pytest.raises(ClosedError):
        n(*arrays())


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="bf16"), "dtype must be one of"),
    (dict(q_dim=250), "q_dim=250 must split"),
    (dict(k_dim=0), "k_dim must be a positive int"),
    (dict(max_tokens=0), "max_tokens must be"),
    (dict(eps=-1.0), "eps must be a finite number"),
    (dict(transport="tcp"), "transport must be one of"),
])
def test_bad_config(kwargs, match):
    args = dict(q_dim=Q, k_dim=K, dtype="float32")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TPQKNorm(MPI.COMM_SELF, **args)


def test_check_config_needs_vector_multiples():
    with pytest.raises(ValueError, match="multiples of 8"):
        check_config(6144, 1024, "bfloat16", 1e-6, 16, 5.0, 3)  # 1024/3 is no integer
    check_config(6144, 1536, "bfloat16", 1e-6, 16, 5.0, 3)
    with pytest.raises(ValueError, match="1..8 are supported"):
        check_config(6144, 1024, "bfloat16", 1e-6, 16, 5.0, 16)


GPU = (True, "bus0", "host", True)


@pytest.mark.parametrize("asked,facts,want", [
    ("auto", [GPU, (True, "bus1", "host", True)], "ipc"),
    ("auto", [GPU, (True, "bus1", "other", True)], "nccl"),
    ("auto", [GPU, (True, "bus0", "host", True)], "nccl"),   # two ranks on one GPU
    ("auto", [GPU, (False, None, "host", False)], "mpi"),
    ("auto", [GPU, (True, "bus1", "other", False)], "mpi"),  # no NCCL across nodes
    ("ipc", [GPU, (True, "bus1", "other", True)], None),
    ("nccl", [GPU, (False, None, "host", False)], None),
    ("mpi", [GPU, GPU], "mpi"),
])
def test_choose_transport(asked, facts, want):
    name, reason = choose_transport(asked, facts)
    assert name == want, reason


def test_spec_plan():
    # 448 vectors of 16 bytes per row: narrow = 2 a thread (7 warps), 2 rows in flight in
    # registers; wide = 8 a thread (2 warps), 3 rows in flight in shared memory
    s = Spec.plan("bfloat16", "float32", 2, 3072, 512)
    assert s.warps == 7 and s.threads == 224 and s.depth == 2 and not s.staged
    assert s.stage_bytes == 0
    assert s.names["fused"] == "qknorm::fused<qknorm::bf16_t, float, 2, 3072, 512, 7, 2, 0>"
    w = Spec.plan("bfloat16", "float32", 2, 3072, 512, "wide")
    assert (w.warps, w.depth, w.staged) == (2, 3, 1)
    assert w.stage_bytes == 3 * 7 * 64 * 16  # whole vectors for each of the 64 threads
    assert w.names["fused"].endswith(", 2, 3, 1>") and str(w).endswith("depth=3 staged")
    assert Spec.plan("float32", "float32", 1, 6144, 1024).warps == 28
    assert Spec.plan("float32", "float32", 1, 12288, 2048).warps == 32  # capped
    with pytest.raises(ValueError, match="weight dtype"):
        Spec.plan("float32", "bfloat16", 2, 3072, 512)
    with pytest.raises(ValueError, match="multiple of 8"):
        Spec.plan("float16", "float16", 2, 3076, 512)
    with pytest.raises(ValueError, match="layout must be one of"):
        Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "deep")


def test_staged_rows_too_big_for_shared_memory_stay_in_registers():
    # G=1 fp32, wide: 7 warps of 8 vectors, 28 KB a row; three do not fit 44 KB
    s = Spec.plan("float32", "float32", 1, 6144, 1024, "wide")
    assert (s.staged, s.depth, s.stage_bytes) == (0, 2, 0)
    assert Spec.plan("bfloat16", "bfloat16", 1, 6144, 1024, "wide").stage_bytes == 43008


def test_layout_by_tokens_a_launch():
    from cupy_qknorm.transports import WIDE_FROM, layout_for
    assert [layout_for(t) for t in (1, WIDE_FROM - 1, WIDE_FROM, 10 ** 6)] == \
        ["narrow", "narrow", "wide", "wide"]
    assert layout_for(5000, 10 ** 9) == "narrow" and layout_for(1, 1) == "wide"


def test_staging_switched_off(monkeypatch):
    monkeypatch.setenv("CUPY_QKNORM_STAGED", "0")  # the wide layout before staged rows
    w = Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide")
    assert (w.warps, w.depth, w.staged) == (2, 2, 0)
    monkeypatch.setenv("CUPY_QKNORM_STAGED", "2")
    with pytest.raises(ValueError, match="CUPY_QKNORM_STAGED must be 0 or 1, got 2"):
        Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide")


def test_spec_depth_override(monkeypatch):
    monkeypatch.setenv("CUPY_QKNORM_DEPTH", "4")
    assert Spec.plan("bfloat16", "bfloat16", 2, 3072, 512).depth == 4
    assert Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide").depth == 4
    monkeypatch.setenv("CUPY_QKNORM_DEPTH", "1")
    with pytest.raises(ValueError, match="CUPY_QKNORM_DEPTH must be 2 or more, got 1"):
        Spec.plan("bfloat16", "bfloat16", 2, 3072, 512)


@pytest.mark.parametrize("name,value,match", [
    ("CUPY_QKNORM_VECTORS_PER_THREAD", "0", "must be 1 or more, got 0"),
    ("CUPY_QKNORM_VECTORS_PER_THREAD", "two", "must be an integer, got 'two'"),
    ("CUPY_QKNORM_DEPTH", "3.5", "must be an integer"),
])
def test_experiment_knobs_fail_clearly(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} {match}"):
        Spec.plan("bfloat16", "bfloat16", 2, 3072, 512)


def test_env_int(monkeypatch):
    from cupy_qknorm.compile import env_int, options
    monkeypatch.delenv("CUPY_QKNORM_MIN_BLOCKS", raising=False)
    assert not any("MIN_BLOCKS" in o for o in options())
    for raw, want in (("", 7), ("  ", 7), ("5", 5), (" 6 ", 6)):
        monkeypatch.setenv("X_KNOB", raw)
        assert env_int("X_KNOB", 7, 1) == want
    monkeypatch.setenv("CUPY_QKNORM_MIN_BLOCKS", "5")
    assert "-DQKNORM_MIN_BLOCKS=5" in options()
    monkeypatch.setenv("CUPY_QKNORM_MIN_BLOCKS", "0")
    with pytest.raises(ValueError, match="CUPY_QKNORM_MIN_BLOCKS must be 1 or more"):
        options()
    monkeypatch.delenv("CUPY_QKNORM_MIN_BLOCKS")
    assert not any("AHEAD" in o for o in options())
    monkeypatch.setenv("CUPY_QKNORM_AHEAD", "2")
    assert "-DQKNORM_AHEAD=2" in options()
    monkeypatch.setenv("CUPY_QKNORM_AHEAD", "0")
    with pytest.raises(ValueError, match="CUPY_QKNORM_AHEAD must be 1 or more"):
        options()


@pytest.mark.parametrize("knob", ["IEEE_RSQRT", "TRACE"])
def test_flag_knobs(monkeypatch, knob):
    from cupy_qknorm.compile import options
    name, define = f"CUPY_QKNORM_{knob}", f"-DQKNORM_{knob}=1"
    monkeypatch.delenv(name, raising=False)
    assert not any(knob in o for o in options())
    monkeypatch.setenv(name, "0")
    assert not any(knob in o for o in options())
    monkeypatch.setenv(name, "1")
    assert define in options()
    for bad, match in (("2", "must be 0 or 1"), ("yes", "must be an integer")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name} {match}"):
            options()


class DLPackOnly:
    """A producer that offers only the DLPack protocol (as torch or JAX tensors do)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, stream=None, **kw):
        assert stream is None, "a host tensor must be exported with stream=None"
        return self._a.__dlpack__(stream=stream, **kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_view_reads_the_capsule():
    from cupy_qknorm.arrays import dlpack_view
    a = np.zeros((5, 24), np.float32)[1:, :16]  # offset start, strided rows
    ptr, shape, strides, name, item, dev = dlpack_view(a)
    assert (ptr, shape, strides, name, item, dev) == (
        a.ctypes.data, (4, 16), (96, 4), "float32", 4, (1, 0))
    b = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert dlpack_view(b)[1:5] == ((3, 4), (8, 2), "bfloat16", 2)  # uint16 holds bf16 bits
    assert dlpack_view(np.zeros(3, np.float64))[3] is None


def test_dlpack_producers_run_and_are_written_in_place(norm):
    q, k, qw, kw = arrays(6)
    qr, kr = ref.qk_norm(q, k, qw, kw, 1e-6)
    qo, ko = np.full_like(q, np.nan), np.full_like(k, np.nan)
    got = norm(DLPackOnly(q), DLPackOnly(k), DLPackOnly(qw), DLPackOnly(kw),
               out=(DLPackOnly(qo), DLPackOnly(ko)))
    assert isinstance(got[0], DLPackOnly)
    assert ref.compare(qo, qr, "float32")[1] == 0  # written through the zero-copy view
    assert ref.compare(ko, kr, "float32")[1] == 0


def test_dlpack_bad_producer_is_a_type_error(norm):
    q, k, qw, kw = arrays()
    with pytest.raises(TypeError, match="dtype must be float32"):
        norm(DLPackOnly(q.astype(np.float64)), k, qw, kw)


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


def test_dlpack_dtype_wins_over_the_array_interface_typestr():
    from cupy_qknorm.arrays import describe
    bits = np.zeros((3, 16), np.uint16)  # bf16 bit patterns; the interface says float16
    op = describe(BothProtocols(bits), "q")
    assert (op.dtype, op.shape, op.ptr) == ("bfloat16", (3, 16), bits.ctypes.data)
    assert op.writable
    assert not describe(BothProtocols(bits, read_only=True), "q_out").writable


def test_array_interface_is_the_fallback_when_the_dlpack_export_fails():
    pytest.importorskip("cupy")
    from cupy_qknorm.arrays import describe
    a = np.zeros((0, 16), np.float32)
    for error in (BufferError("no"), RuntimeError("XlaRuntimeError is one")):
        op = describe(BothProtocols(a, "<f4", export_error=error), "q")
        assert (op.dtype, op.shape, op.ptr, op.device) == ("float32", (0, 16), 0, None)


def test_dlpack_export_failure_without_an_interface_is_a_type_error(norm):
    class Broken(DLPackOnly):
        def __dlpack__(self, stream=None, **kw):
            raise BufferError("cannot export")
    q, k, qw, kw = arrays()
    with pytest.raises(TypeError, match="q: its DLPack export failed: cannot export"):
        norm(Broken(q), k, qw, kw)


def test_read_only_output_is_refused_before_anything_is_written(norm):
    q, k, qw, kw = arrays()
    qo, ko = np.full_like(q, 7.0), np.full_like(k, 7.0)
    ko.flags.writeable = False
    with pytest.raises(ValueError, match=r"out\[1\]: the array is read-only"):
        norm(q, k, qw, kw, out=(qo, ko))
    assert (qo == 7.0).all() and (ko == 7.0).all()
    q.flags.writeable = False
    with pytest.raises(ValueError, match=r"q \(in place\): the array is read-only"):
        norm(q, k, qw, kw)


def test_bound_call_reuses_validated_arrays(norm):
    q, k, qw, kw = arrays(5)
    qo, ko = np.full_like(q, np.nan), np.full_like(k, np.nan)
    call = norm.bind(q, k, qw, kw, out=(qo, ko))
    for seed in range(3):  # new contents in the same buffers, normalized on each call
        rng = np.random.default_rng(seed)
        q[...] = rng.standard_normal(q.shape) * 10.0 ** seed
        k[...] = rng.standard_normal(k.shape)
        qo.fill(np.nan)
        got = call()
        assert got[0] is qo and got[1] is ko
        qr, kr = ref.qk_norm(q, k, qw, kw, 1e-6)
        assert ref.compare(qo, qr, "float32")[1] == 0
        assert ref.compare(ko, kr, "float32")[1] == 0


def test_bind_validates_at_once_and_stops_after_close():
    n = TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi")
    q, k, qw, kw = arrays()
    with pytest.raises(ValueError, match="k has 3 rows but q has 4"):
        n.bind(q, k[:3], qw, kw)
    call = n.bind(q, k, qw, kw)
    n.close()
    with pytest.raises(ClosedError):
        call()


def test_fast_path_signature_covers_what_validation_reads():
    """The cached-validation key of CuPy arrays changes with everything validation looks
    at (shape, strides, dtype, device, address modulo 16) and with nothing else. CuPy
    arrays over host memory stand in for device arrays: no GPU is touched."""
    cupy = pytest.importorskip("cupy")
    from cupy_qknorm.arrays import cupy_signature
    host = np.zeros(1 << 16, np.uint8)

    def arr(shape, offset=0, dtype=np.uint16, device=0, strides=None):
        mem = cupy.cuda.UnownedMemory(host.ctypes.data + offset, host.nbytes - offset,
                                      host, device_id=device)
        return cupy.ndarray(shape, dtype, memptr=cupy.cuda.MemoryPointer(mem, 0),
                            strides=strides)

    def key(**change):
        six = [arr((2, 64)), arr((2, 16)), arr((64,)), arr((16,)), arr((2, 64)), arr((2, 16))]
        for i, a in change.items():
            six[int(i[1:])] = a
        return cupy_signature(tuple(six))

    base, ptrs = key()
    assert len(ptrs) == 6
    assert key(a4=arr((2, 64), offset=4096))[0] == base       # another aligned address
    assert key(a0=arr((2, 64), offset=2))[0] != base          # misaligned
    assert key(a0=arr((3, 64)))[0] != base                    # T
    assert key(a1=arr((2, 16), strides=(64, 2)))[0] != base   # row stride
    assert key(a2=arr((32,), dtype=np.float32))[0] != base    # dtype
    assert key(a3=arr((16,), device=1))[0] != base            # device
    assert cupy_signature((np.zeros(2),) * 6) == (None, None)  # not CuPy: no fast path
