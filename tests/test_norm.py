"""norm.py on one rank with numpy arrays (transport "mpi"; no GPU): the configuration
checks, validation of every input before anything is written, the overlap rules, RoPE's
positions, close, bound calls, and the cache of validated calls of CuPy arrays."""
import gc

import numpy as np
import pytest
from mpi4py import MPI

from cupy_qknorm import ClosedError, PeerTimeoutError, PositionError, RoPE, TPQKNorm
from cupy_qknorm import reference as ref
from cupy_qknorm.norm import check_config
from tests.fake_cuda import HostMemory, fake_norm

Q, K = 256, 64


@pytest.fixture
def norm():
    n = TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi")
    yield n
    n.close()


def arrays(tokens=4, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((tokens, Q)).astype(dtype)
    k = rng.standard_normal((tokens, K)).astype(dtype)
    return q, k, (1 + 0.25 * rng.standard_normal(Q)).astype(dtype), \
        (1 + 0.25 * rng.standard_normal(K)).astype(dtype)


# -- check_config ------------------------------------------------------------------------
def config(**change):
    args = dict(q_dim=6144, k_dim=1024, dtype="bfloat16", eps=1e-6, max_tokens=16,
                timeout_s=5.0, world=2)
    args.update(change)
    return check_config(**args)


def test_check_config_returns_plain_numbers():
    got = config(q_dim=np.int64(6144), eps=np.float32(1e-6), max_tokens=np.int32(16),
                 timeout_s=np.float64(0.5))
    assert got == (6144, 1024, float(np.float32(1e-6)), 16, 500_000_000, None, None)
    assert [type(v) for v in got[:5]] == [int, int, float, int, int]
    assert config(timeout_s=None)[4] == 0           # wait forever
    assert config(timeout_s=1e-12)[4] == 1          # never 0, which means forever
    assert config(eps=0)[2] == 0.0


@pytest.mark.parametrize("timeout", [0, 0.0, -1, float("inf"), float("nan"), True, "5"])
def test_check_config_refuses_timeouts(timeout):
    with pytest.raises(ValueError, match="timeout_s must be a finite number of seconds > 0, "
                                         "or None to wait forever"):
        config(timeout_s=timeout)


@pytest.mark.parametrize("change,match", [
    (dict(eps=True), "eps must be a finite number >= 0, got True"),
    (dict(eps=-1e-6), "eps must be a finite number >= 0"),
    (dict(eps=float("nan")), "eps must be a finite number"),
    (dict(eps="1e-6"), "eps must be a finite number"),
    (dict(q_dim=True), "q_dim must be a positive int, got True"),
    (dict(q_dim=6144.0), "q_dim must be a positive int"),
    (dict(k_dim=0), "k_dim must be a positive int, got 0"),
    (dict(max_tokens=True), "max_tokens must be an int, got True"),
    (dict(max_tokens=0), "max_tokens must be an int in 1..16777216, got 0"),
    (dict(max_tokens=(1 << 24) + 1), "max_tokens must be an int in 1..16777216"),
    (dict(max_tokens=16.0), "max_tokens must be an int, got 16.0"),
    (dict(dtype="bf16"), "dtype must be one of"),
    (dict(world=3), r"k_dim=1024 must split over 3 ranks into slices that are multiples of 8"),
    (dict(world=17), "the communicator has 17 ranks; 1..16 are supported"),
    (dict(q_dim=6144 + 4), r"q_dim=6148 must split over 2 ranks"),
])
def test_check_config_refuses(change, match):
    with pytest.raises(ValueError, match=match):
        config(**change)


def test_check_config_accepts_numpy_scalars():
    assert config(max_tokens=np.int64(8))[3] == 8 and config(k_dim=np.int32(1024))[1] == 1024
    config(world=3, k_dim=1536)


@pytest.mark.parametrize("world,k_local", [(1, 1024), (2, 512), (4, 256), (8, 128),
                                           (16, 128)])
def test_check_config_lays_out_kv_heads_split_or_replicated(world, k_local):
    """MiniMax's 8 KV heads of 128: split up to G=8, one head on two ranks at G=16; the
    k partial counts on the first rank of each replica group only."""
    from cupy_qknorm.norm import Config
    got = config(world=world, kv_heads=8, head_dim=128, rope=RoPE.minimax_m2())
    assert got[5:] == (8, 128)
    for rank in range(world):
        c = Config(*got[:2], "bfloat16", *got[2:5], world, rank, None, *got[5:])
        assert (c.q_local, c.k_local) == (6144 // world, k_local)
        assert c.k_counted == (world < 16 or rank % 2 == 0)
    # head_dim from the rope
    assert config(world=16, kv_heads=8, rope=RoPE.minimax_m2())[5:] == (8, 128)


@pytest.mark.parametrize("change,match", [
    (dict(world=3), "8 KV heads neither split evenly over 3 ranks nor replicate evenly on "
                    r"them \(G must divide 8 or be a multiple of it\)"),
    (dict(world=12, q_dim=128 * 48), "8 KV heads neither split evenly over 12 ranks"),
    (dict(head_dim=None), "kv_heads needs head_dim"),
    (dict(kv_heads=4), r"k_dim=1024 must be kv_heads \* head_dim = 4 \* 128"),
    (dict(kv_heads=0), "kv_heads must be a positive int"),
    (dict(q_dim=6144 + 128, world=2), "q_dim=6272 is 49 heads of 128, which do not split "
                                      "evenly over 2 ranks"),
    (dict(rope=RoPE(64, 64, max_position=8)), "head_dim=128 but rope.head_dim=64"),
    (dict(kv_heads=None), "head_dim is given without kv_heads"),
])
def test_check_config_refuses_a_kv_head_layout(change, match):
    args = dict(kv_heads=8, head_dim=128)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        config(**args)


def test_check_config_checks_the_rope():
    with pytest.raises(ValueError, match="RoPE needs whole heads"):
        config(world=8, k_dim=512, rope=RoPE.minimax_m2())
    config(world=8, rope=RoPE.minimax_m2())


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="bf16"), "dtype must be one of"),
    (dict(q_dim=250), "q_dim=250 must split"),
    (dict(timeout_s=0), "timeout_s must be"),
    (dict(transport="tcp"), "transport must be one of"),
])
def test_constructor_refuses_a_bad_config(kwargs, match):
    args = dict(q_dim=Q, k_dim=K, dtype="float32", transport="mpi")
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^rank 0: {match}" if "transport" not in kwargs
                       else match):
        TPQKNorm(MPI.COMM_SELF, **args)


def test_timeout_none_waits_forever():
    with TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi", timeout_s=None) as n:
        assert n.config.timeout_ns == 0
        q, k, qw, kw = arrays()
        n(q, k, qw, kw)


# -- results and validation ----------------------------------------------------------------
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
    np.testing.assert_array_equal(k, ko)


BAD_INPUTS = [
    ("wrong q width", lambda q, k, qw, kw: (q[:, :Q - 4], k, qw, kw), ValueError,
     r"q: shape must be \[T, 256\], got \[4, 252\]"),
    ("3-D q", lambda q, k, qw, kw: (q[None], k, qw, kw), ValueError, "q: shape must be"),
    ("wrong dtype", lambda q, k, qw, kw: (q.astype(np.float64), k, qw, kw), TypeError,
     "q: dtype must be float32"),
    ("non-contiguous last dim",
     lambda q, k, qw, kw: (np.zeros((4, 2 * Q), np.float32)[:, ::2], k, qw, kw), ValueError,
     "last dim must be contiguous"),
    ("misaligned row stride",
     lambda q, k, qw, kw: (np.zeros((4, Q + 1), np.float32)[:, :Q], k, qw, kw), ValueError,
     "multiple of 16"),
    ("misaligned data",
     lambda q, k, qw, kw: (np.zeros(4 * Q + 1, np.float32)[1:].reshape(4, Q), k, qw, kw),
     ValueError, "16-byte aligned"),
    ("weight of the wrong length", lambda q, k, qw, kw: (q, k, qw[:-4], kw), ValueError,
     r"q_weight: shape must be \[256\]"),
    ("weight of a third dtype", lambda q, k, qw, kw: (q, k, qw.astype(np.float16), kw),
     TypeError, "q_weight: dtype"),
    ("weights of two dtypes", lambda q, k, qw, kw: (q.astype(np.float16), k.astype(np.float16),
                                                    qw, kw.astype(np.float16)),
     TypeError, "q: dtype must be float32"),
    ("q and k with different T", lambda q, k, qw, kw: (q, k[:3], qw, kw), ValueError,
     "k has 3 rows but q has 4"),
    ("not an array", lambda q, k, qw, kw: (q.tolist(), k, qw, kw), TypeError,
     "expected a cupy or numpy array"),
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
    norm(q, k, qw, kw)  # a refused call leaves the object usable


def test_weights_must_share_a_dtype():
    with TPQKNorm(MPI.COMM_SELF, Q, K, "float16", transport="mpi") as n:
        q, k, qw, kw = arrays(dtype=np.float16)
        with pytest.raises(TypeError, match="q_weight and k_weight must have one dtype"):
            n(q, k, qw.astype(np.float32), kw)


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


class DLPackOnly:
    """A producer that offers only the DLPack protocol (as torch or JAX tensors do)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, stream=None, **kw):
        return self._a.__dlpack__(stream=stream, **kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_producers_run_and_are_written_in_place(norm):
    q, k, qw, kw = arrays(6)
    qr, kr = ref.qk_norm(q, k, qw, kw, 1e-6)
    qo, ko = np.full_like(q, np.nan), np.full_like(k, np.nan)
    got = norm(DLPackOnly(q), DLPackOnly(k), DLPackOnly(qw), DLPackOnly(kw),
               out=(DLPackOnly(qo), DLPackOnly(ko)))
    assert isinstance(got[0], DLPackOnly)
    assert ref.compare(qo, qr, "float32")[1] == 0  # written through the zero-copy view
    assert ref.compare(ko, kr, "float32")[1] == 0
    with pytest.raises(TypeError, match="dtype must be float32"):
        norm(DLPackOnly(q.astype(np.float64)), k, qw, kw)


# -- overlaps --------------------------------------------------------------------------------
def test_output_partly_over_its_input_is_refused():
    with TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi") as n:
        qbuf = np.random.default_rng(1).standard_normal((5, Q)).astype(np.float32)
        kbuf = np.random.default_rng(2).standard_normal((5, K)).astype(np.float32)
        _, _, qw, kw = arrays()
        before = qbuf.copy(), kbuf.copy()
        with pytest.raises(ValueError, match=r"out\[0\] overlaps q \(outputs may only be "
                                             r"their own input exactly, in place\)"):
            n(qbuf[:-1], kbuf[:-1], qw, kw, out=(qbuf[1:], kbuf[1:]))
        with pytest.raises(ValueError, match=r"out\[1\] overlaps k"):
            n(qbuf[:-1], kbuf[:-1], qw, kw, out=(np.empty((4, Q), np.float32), kbuf[1:]))
        np.testing.assert_array_equal(qbuf, before[0])
        np.testing.assert_array_equal(kbuf, before[1])


@pytest.mark.parametrize("make,match", [
    (lambda q, k, qw, kw, o: (q, k, qw, kw, (q, k[:, :K])), None),               # in place
    (lambda q, k, qw, kw, o: (q, k, qw, kw, (o[0], o[0][:, :K])),
     r"out\[0\] overlaps out\[1\]"),
    (lambda q, k, qw, kw, o: (q, k, qw, kw, (o[0], q[:, :K])), r"out\[1\] overlaps q"),
    (lambda q, k, qw, kw, o: (q, k, qw, kw, (o[0], qw.reshape(4, K))),
     r"out\[1\] overlaps q_weight"),
])
def test_outputs_may_overlap_nothing_but_their_own_input(norm, make, match):
    q, k, qw, kw = arrays()
    k = np.ascontiguousarray(k)
    out = (np.empty_like(q), np.empty_like(k))
    args = make(q, k, qw, kw, out)
    if match is None:
        norm(*args[:4], out=args[4])
        return
    before = [a.copy() for a in (q, k, qw, kw, out[0])]
    with pytest.raises(ValueError, match=match):
        norm(*args[:4], out=args[4])
    for a, b in zip((q, k, qw, kw, out[0]), before):
        np.testing.assert_array_equal(a, b)


def test_views_of_one_qkv_buffer_run_in_place_and_into_another():
    """q and k as column views of one fused [T, q | k | v] buffer: strided rows that
    interleave without sharing a byte, in place and into views of another such buffer."""
    rng = np.random.default_rng(3)
    with TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi") as n:
        qkv = rng.standard_normal((6, Q + 2 * K)).astype(np.float32)
        q, k, v = qkv[:, :Q], qkv[:, Q:Q + K], qkv[:, Q + K:]
        _, _, qw, kw = arrays()
        qr, kr = ref.qk_norm(q, k, qw, kw, 1e-6)
        v_before = v.copy()
        out = np.full_like(qkv, 7.0)
        n(q, k, qw, kw, out=(out[:, :Q], out[:, Q:Q + K]))
        assert ref.compare(out[:, :Q], qr, "float32")[1] == 0
        assert ref.compare(out[:, Q:Q + K], kr, "float32")[1] == 0
        assert (out[:, Q + K:] == 7.0).all()
        n(q, k, qw, kw)
        assert ref.compare(q, qr, "float32")[1] == 0 and ref.compare(k, kr, "float32")[1] == 0
        np.testing.assert_array_equal(v, v_before)


# -- RoPE's positions (transport "mpi", numpy) --------------------------------------------
ROPE = RoPE(128, 64, theta=1e4, max_position=64)
RQ, RK = 256, 128  # two heads of q, one of k


@pytest.fixture
def rope_norm():
    n = TPQKNorm(MPI.COMM_SELF, RQ, RK, "float32", transport="mpi", rope=ROPE)
    yield n
    n.close()


def rope_arrays(tokens=4):
    q, k, qw, kw, _, _ = ref.make_case(5, tokens, RQ, RK, "float32")
    return q, k, qw, kw


@pytest.mark.parametrize("positions,exc,match", [
    (np.arange(4, dtype=np.float32), TypeError,
     "positions: dtype must be int32 or int64, got float32"),
    (np.arange(4, dtype=np.uint32), TypeError, "positions: dtype must be int32 or int64"),
    (np.arange(5, dtype=np.int32), ValueError,
     r"positions: shape must be \[4\] \(one per token\), got \[5\]"),
    (np.arange(4, dtype=np.int64).reshape(4, 1), ValueError, "positions: shape must be"),
    (np.arange(8, dtype=np.int32)[::2], ValueError, "positions: must be contiguous"),
    (np.zeros(9, np.int32).view(np.uint8)[1:17].view(np.int32), ValueError,
     "positions: data must be 4-byte aligned"),
    (None, TypeError, r"this object applies RoPE: pass positions=\[T\] int32 or int64"),
])
def test_bad_positions_raise_and_write_nothing(rope_norm, positions, exc, match):
    q, k, qw, kw = rope_arrays()
    qo, ko = np.full_like(q, 7.0), np.full_like(k, 7.0)
    with pytest.raises(exc, match=match):
        rope_norm(q, k, qw, kw, out=(qo, ko), positions=positions)
    assert (qo == 7.0).all() and (ko == 7.0).all()


def test_positions_without_rope_are_refused(norm):
    q, k, qw, kw = arrays()
    with pytest.raises(TypeError, match="positions given, but this object was built "
                                        "without rope="):
        norm(q, k, qw, kw, positions=np.arange(4, dtype=np.int32))


def test_output_over_the_positions_is_refused(rope_norm):
    q, k, qw, kw = rope_arrays(4)
    ko = np.zeros((4, RK), np.float32)
    pos = ko.reshape(-1)[:4].view(np.int32)
    pos[:] = 0
    with pytest.raises(ValueError, match=r"out\[1\] overlaps positions"):
        rope_norm(q, k, qw, kw, out=(np.empty_like(q), ko), positions=pos)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("pos_dtype", [np.int32, np.int64])
def test_rope_matches_reference(style, pos_dtype):
    rope = RoPE(128, 64, theta=1e4, style=style, max_position=64)
    q, k, qw, kw = rope_arrays(5)
    pos = np.array([63, 0, 1, 17, 63], pos_dtype)
    table = ref.rope_table(64, 64, 1e4)
    qy, ky, qm, km = ref.qk_norm_rope(q.astype(np.float64), k.astype(np.float64),
                                      qw.astype(np.float64), kw.astype(np.float64), 1e-6,
                                      pos, table, 128, 64, style)
    with TPQKNorm(MPI.COMM_SELF, RQ, RK, "float32", transport="mpi", rope=rope) as n:
        qo, ko = np.full_like(q, np.nan), np.full_like(k, np.nan)
        n(q, k, qw, kw, out=(qo, ko), positions=pos)
    assert ref.compare_rope(qo, qy, qm, "float32")[1] == 0
    assert ref.compare_rope(ko, ky, km, "float32")[1] == 0


@pytest.mark.parametrize("bad", [64, -1])
def test_position_outside_the_table_names_the_token(bad):
    """The rows of valid positions are written, the bad one is not; the object closes."""
    q, k, qw, kw = rope_arrays(4)
    pos = np.array([0, 63, bad, 1])
    qo, ko = np.full_like(q, 7.0), np.full_like(k, 7.0)
    good = np.array([0, 63, 0, 1])
    with TPQKNorm(MPI.COMM_SELF, RQ, RK, "float32", transport="mpi", rope=ROPE) as n:
        want = [np.full_like(q, 7.0), np.full_like(k, 7.0)]
        n(q, k, qw, kw, out=want, positions=good)
    with TPQKNorm(MPI.COMM_SELF, RQ, RK, "float32", transport="mpi", rope=ROPE) as n:
        with pytest.raises(PositionError, match=f"rank 0: token 2 has position {bad}, outside "
                                                f"the RoPE table's 64 rows; its row was not "
                                                f"written, the rows of valid positions were"
                           ) as e:
            n(q, k, qw, kw, out=(qo, ko), positions=pos)
        assert (e.value.token, e.value.position) == (2, bad)
        for o, w in ((qo, want[0]), (ko, want[1])):
            assert (o[2] == 7.0).all()
            np.testing.assert_array_equal(np.delete(o, 2, axis=0), np.delete(w, 2, axis=0))
        with pytest.raises(ClosedError):
            n(q, k, qw, kw, out=(qo, ko), positions=good)


# -- lifetime and bound calls --------------------------------------------------------------
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
    with pytest.raises(ClosedError):
        n.bind(*arrays())


def test_unclosed_object_warns():
    n = TPQKNorm(MPI.COMM_SELF, Q, K, "float32", transport="mpi")
    with pytest.warns(ResourceWarning, match="TPQKNorm was not closed"):
        n.__del__()
    n.close()


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
    with pytest.raises(ValueError, match=r"out\[0\] overlaps q"):
        n.bind(q[:3], k[:3], qw, kw, out=(q[1:], np.empty((3, K), np.float32)))
    call = n.bind(q, k, qw, kw)
    n.close()
    with pytest.raises(ClosedError):
        call()


# -- the cache of validated calls (GPU transports over tests/fake_cuda.py) ---------------
@pytest.fixture(params=["ipc", "nccl", "mpi"], ids=["ipc", "nccl", "mpi-gpu"])
def device_norm(request):
    """A TPQKNorm whose transport is a GPU one over a fake CUDA, on CuPy arrays over host
    memory: (norm, fake cuda, memory). (An id "mpi" would be pytest-mpi's mark.)"""
    cupy = pytest.importorskip("cupy")
    n, cuda = fake_norm(MPI.COMM_SELF, request.param, Q, K)
    yield n, cuda, HostMemory(cupy)
    n.close()


def test_cupy_arrays_keep_strides_dtype_and_data(device_norm):
    """The cache compares shapes only: a live CuPy array can change nothing else that
    validation reads. Checked on every CuPy version this runs with."""
    _, _, mem = device_norm
    a = mem.array((4, Q))
    for attr, value in (("strides", (4 * Q * 2, 4)), ("dtype", np.int32), ("data", a.data)):
        with pytest.raises(AttributeError):
            setattr(a, attr, value)
    a.shape = (8, Q // 2)  # the one thing that changes in place
    assert a.shape == (8, Q // 2)


def test_repeated_calls_validate_once(device_norm):
    n, cuda, mem = device_norm
    q, k, qw, kw = _set(mem)
    per_call = len(n._transport.KINDS) if n.transport != "mpi" else 2
    for _ in range(100):
        got = n(q, k, qw, kw)
    assert got[0] is q and got[1] is k
    assert n._validations == 1 and len(cuda.launches) == 100 * per_call
    first = cuda.launches[0]
    assert first["tokens"] == 4 and [first[f] for f in ("q", "k", "q_weight", "k_weight",
                                                         "q_out", "k_out")] == \
        [a.data.ptr for a in (q, k, qw, kw, q, k)]
    qo, ko = mem.array((4, Q)), mem.array((4, K))
    for _ in range(10):                            # another array set: its own entry
        n(q, k, qw, kw, out=(qo, ko))
    assert n._validations == 2 and len(cuda.launches) == 110 * per_call
    assert (cuda.launches[-1]["q_out"], cuda.launches[-1]["k_out"]) == (qo.data.ptr,
                                                                       ko.data.ptr)
    q2, k2, qw2, kw2 = (mem.cupy.ndarray(a.shape, a.dtype, a.data) for a in (q, k, qw, kw))
    n(q2, k2, qw2, kw2)                            # new objects over the same memory
    assert n._validations == 3 and len(n._calls) == 3
    n(q, k, qw, kw, tag=3)                         # a tag is a call of its own
    n(q, k, qw, kw, tag=3)
    assert n._validations == 4 and len(n._calls) == 4


def _set(mem, tokens=4):
    return (mem.array((tokens, Q)), mem.array((tokens, K)), mem.array((Q,)),
            mem.array((K,)))


def test_a_dropped_array_drops_its_entry(device_norm):
    n, cuda, mem = device_norm
    q, k, qw, kw = _set(mem)
    n(q, k, qw, kw)
    q2 = mem.array((4, Q))
    n(q2, k, qw, kw)
    assert len(n._calls) == 2
    del q2
    gc.collect()
    assert len(n._calls) == 1, "an entry outlived its array: a new array at the same id " \
                               "would skip validation"
    n(q, k, qw, kw)
    assert n._validations == 2


@pytest.mark.parametrize("role", ["q", "k", "q_weight", "k_weight", "out[0]", "out[1]",
                                  "q in place", "k in place", "q_weight in place"])
def test_an_in_place_reshape_is_validated_again(device_norm, role):
    n, cuda, mem = device_norm
    q, k, qw, kw = _set(mem)
    in_place = role.endswith("in place")
    qo, ko = (q, k) if in_place else (mem.array((4, Q)), mem.array((4, K)))
    kwargs = {} if in_place else dict(out=(qo, ko))
    n(q, k, qw, kw, **kwargs)
    n(q, k, qw, kw, **kwargs)
    launched = len(cuda.launches)
    assert n._validations == 1
    names = ["q", "k", "q_weight", "k_weight", "out[0]", "out[1]"]
    a = (q, k, qw, kw, qo, ko)[names.index(role.split()[0])]
    shape = a.shape
    a.shape = (2, a.size // 2) if a.ndim == 1 else (a.shape[0] * 2, a.shape[1] // 2)
    with pytest.raises(ValueError, match="shape must be"):
        n(q, k, qw, kw, **kwargs)
    assert n._validations == 2 and len(cuda.launches) == launched
    a.shape = shape
    n(q, k, qw, kw, **kwargs)  # alone (G=1) a refused input leaves the object usable
    assert len(cuda.launches) > launched


@pytest.mark.parametrize("out", [False, True])
def test_an_error_a_kernel_recorded_stops_the_cached_path(device_norm, out):
    n, cuda, mem = device_norm
    q, k, qw, kw = _set(mem)
    kwargs = dict(out=(mem.array((4, Q)), mem.array((4, K)))) if out else {}
    n(q, k, qw, kw, **kwargs)
    n(q, k, qw, kw, **kwargs)
    launched = len(cuda.launches)
    n._transport.error[1:6] = [-1, 3, 0, 0, 0]
    n._transport.error[0] = 1  # as a kernel records a timeout
    with pytest.raises(PeerTimeoutError, match="rank 0 waited longer than 5 s"):
        n(q, k, qw, kw, **kwargs)
    assert len(cuda.launches) == launched and not n._calls
    with pytest.raises(ClosedError):
        n(q, k, qw, kw, **kwargs)


def test_numpy_calls_are_not_cached(norm):
    q, k, qw, kw = arrays()
    for _ in range(3):
        norm(q, k, qw, kw)
    assert norm._validations == 3 and not norm._calls
